"""Chat templating: conversational records (lists of {role, content}) -> strings, through the tokenizer.

The prompt is rendered with ``add_generation_prompt=True``; the completion is the rest of the rendered full
conversation (``render(prompt + completion)`` minus the rendered prompt), so prompt + completion is exactly the
rendered conversation.
"""
from __future__ import annotations

from typing import Any

from alignloop.data.errors import DataError

Messages = list[dict[str, Any]]


def is_messages(value: Any) -> bool:
    return isinstance(value, list)


def check_chat_template(tokenizer, where: str) -> None:
    """Raise a DataError if the data is conversational and `tokenizer` has no chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: the data is conversational (lists of messages) but the tokenizer has no chat "
                        f"template; set tokenizer.chat_template (or use a chat model's tokenizer), or give "
                        f"plain-text data")


def render_prompt(messages: Messages, tokenizer) -> str:
    """The prompt as the model sees it, ending with the generation prompt (e.g. ``<|assistant|>``)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_completion(prompt: Messages, completion: Messages, tokenizer, rendered_prompt: str | None = None) -> str:
    """The text that follows the rendered prompt in the rendered conversation prompt + completion."""
    p = render_prompt(prompt, tokenizer) if rendered_prompt is None else rendered_prompt
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False, add_generation_prompt=False)
    if not full.startswith(p):
        raise ValueError("the chat template renders the whole conversation so that it does not start with the "
                         "rendered prompt (add_generation_prompt=True); the completion cannot be separated")
    return full[len(p):]


def assistant_spans(prompt: Messages, tokenizer, rendered_prompt: str) -> list[tuple[int, int]] | None:
    """Character spans [start, end) of the earlier assistant turns inside `rendered_prompt` (the render of `prompt`
    with the generation prompt): each turn's text as the template writes it after its generation prompt, up to the
    next turn. None when the template does not render the conversation's prefixes as prefixes of each other (then
    the turns cannot be located and only the last one is trained)."""
    spans = []
    for j, m in enumerate(prompt):
        if m.get("role") != "assistant":
            continue
        before = render_prompt(prompt[:j], tokenizer) if j else None
        through = tokenizer.apply_chat_template(list(prompt[:j + 1]), tokenize=False, add_generation_prompt=False)
        if before is None or not through.startswith(before) or not rendered_prompt.startswith(through):
            return None
        spans.append((len(before), len(through)))
    return spans
