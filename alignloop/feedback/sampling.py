"""`alignloop feedback sample`: sample N completions per prompt with a model, as import rows.

Models and tokenizers load through `alignloop.models` (`load_causal_lm`, `load_tokenizer`); sampling goes through
the one home of "prompts in, N texts out", `alignloop.rollout.sample_completions` (left-padded batches, KV cache).
Multi-turn prompts are rendered with the tokenizer's chat template (generation prompt added).
"""
from __future__ import annotations

from collections.abc import Sequence

from alignloop.errors import UserError
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.rollout import SamplingParams, sample_completions

from .importing import normalise_prompt

GEN_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")  # recorded with each completion


def prompt_text(messages: list[dict], is_chat: bool, tokenizer) -> str:
    if not is_chat:
        return messages[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise UserError("a multi-turn prompt needs a tokenizer with a chat template")


def generate_texts(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int = 64,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 8,
                   seed: int = 0) -> list[list[str]]:
    """n sampled completions for each prompt (decoded, special tokens removed); `batch_size` sequences per
    generation call (the prompts' n copies in prompt order), as before."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    groups = sample_completions(model, tokenizer, prompts, n, params, batch_size=batch_size, seed=seed)
    return [[c.text for c in g] for g in groups]


def _load(model_path: str):
    try:
        return load_tokenizer(model_path, padding_side="left"), load_causal_lm(model_path)
    except UserError as e:
        raise UserError(f"cannot load model {model_path!r}: {e}") from None


def sample_records(prompt_rows: list[dict], model_path: str, n: int, **gen) -> list[dict]:
    """prompt_rows: `{"prompt": str | messages}` dicts. Returns import rows `{"prompt", "completions": [{"text",
    "model", "params"}]}`; `gen`: the keyword arguments of `generate_texts`."""
    tok, model = _load(model_path)
    texts = []
    for i, row in enumerate(prompt_rows):
        msgs, is_chat = normalise_prompt(row.get("prompt"), row.get("_where", f"prompt {i + 1}"))
        texts.append(prompt_text(msgs, is_chat, tok))
    outs = generate_texts(model, tok, texts, n, **gen)
    params = {k: v for k, v in gen.items() if k in GEN_PARAMS}
    return [{"prompt": row["prompt"], "completions": [{"text": t, "model": str(model_path), "params": params}
                                                      for t in cs]}
            for row, cs in zip(prompt_rows, outs, strict=True)]
