"""Chat templating: conversational records (lists of {role, content}) -> strings, through the tokenizer.

The prompt is rendered with ``add_generation_prompt=True``; the completion is the rest of the rendered full
conversation (``render(prompt + completion)`` minus the rendered prompt), so prompt + completion is exactly the
rendered conversation.

A tokenizer without a chat template of its own gets the one plain format, `PLAIN_CHAT_TEMPLATE` ("User: ...",
"Assistant: ..."; `ensure_chat_template`, `chat_template_or_plain`, `chat_stop_strings`): the one home of that format
for the labeling app's conversations and the pipeline.
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


# The one chat format of models that have none (a base model, the demo's tiny model): the labeling app's
# conversations render their context with it, and the pipeline trains on conversations in it, so a policy trained on
# exported conversations is sampled in the format it learnt. Every prefix of a conversation renders as a prefix of
# the whole (`render_completion` and `assistant_spans` work): a turn is "User: ..." or "Assistant: ...<eos>", turns are
# separated by "\n\n" written *before* the next turn (never after a reply's EOS), and the generation prompt is
# "\n\nAssistant:" (the reply's text starts after it, usually with a space). So a rendered reply ends at EOS, the
# token a reward model is trained to read its reward at and the one PPO / best-of-N / evaluation score at
# (`data.reward_input_ids` appends EOS to a sampled reply).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + (eos_token or '') }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ('\n\n' if messages else '') + 'Assistant:' }}{% endif %}"
)
# The plain format before the separator moved in front of the next turn (a reply ended "<eos>\n\n"): tokenizers saved
# with it (older runs' checkpoints) are still recognised as the plain format (their stop strings).
_PLAIN_CHAT_TEMPLATE_V1 = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + (eos_token or '') + '\n\n' }}"
    "{% else %}{{ m['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
PLAIN_TEMPLATES = (PLAIN_CHAT_TEMPLATE, _PLAIN_CHAT_TEMPLATE_V1)
# Where a reply in the plain format ends when the model does not stop at EOS: it starts the user's next turn.
PLAIN_STOP_STRINGS = ("\n\nUser:",)


def chat_template_or_plain(tokenizer) -> str:
    """The tokenizer's own chat template, or `PLAIN_CHAT_TEMPLATE` when it has none."""
    return getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE


def ensure_chat_template(tokenizer):
    """Give `tokenizer` the plain template when it has no chat template of its own (in place; returns it), so
    `render_prompt` / `render_completion` / `apply_chat_template` work on any causal LM's tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def chat_stop_strings(tokenizer) -> tuple[str, ...]:
    """The strings that end a reply in `tokenizer`'s chat format besides EOS: the plain format's next-user marker,
    none for a tokenizer's own template (its end-of-turn token is EOS or the model's generation config's)."""
    return PLAIN_STOP_STRINGS if chat_template_or_plain(tokenizer) in PLAIN_TEMPLATES else ()
