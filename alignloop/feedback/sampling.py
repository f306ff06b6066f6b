"""`alignloop feedback sample`: sample N completions per prompt with a model, in the import format.

Generation goes through the project's rollout code (`alignloop.rollout.HFSampler`: left-padded prompts, KV cache).
If that module is unavailable, a small fallback uses transformers' `model.generate` (left padding, attention mask).
"""
from __future__ import annotations

from collections.abc import Sequence

from alignloop.errors import UserError


def prompt_text(messages: list[dict], is_chat: bool, tokenizer) -> str:
    if not is_chat:
        return messages[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise UserError("a multi-turn prompt needs a tokenizer with a chat template")


def generate_texts(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int = 64,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 8,
                   seed: int = 0) -> list[list[str]]:
    """n sampled completions for each prompt (decoded, special tokens removed)."""
    import torch

    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in flat]
    out: list[str] = []
    try:
        from alignloop.rollout import HFSampler, SamplingParams
    except ImportError:  # fallback: transformers' generate
        HFSampler = None
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        if HFSampler is not None:
            r = HFSampler(model, tokenizer).generate(chunk, SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k))
            for row, mask in zip(r.response_ids, r.response_mask):
                out.append(tokenizer.decode(row[mask].tolist(), skip_special_tokens=True))
        else:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            with torch.no_grad():
                gen = model.generate(input_ids=input_ids, attention_mask=attn, do_sample=True,
                                     temperature=temperature, top_p=top_p, top_k=top_k or None,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad)
            for row in gen[:, width:]:
                out.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def sample_records(prompt_rows: list[dict], model_path: str, n: int, **gen) -> list[dict]:
    """prompt_rows: `{"prompt": str | messages}` dicts. Returns import rows `{"prompt", "completions": [{"text",
    "model", "params"}]}`."""
    from alignloop.feedback.importing import normalise_prompt

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path)
    except OSError as e:
        raise UserError(f"cannot load model {model_path!r}: {e}") from None
    texts = []
    for i, row in enumerate(prompt_rows):
        msgs, is_chat = normalise_prompt(row.get("prompt"), row.get("_where", f"prompt {i + 1}"))
        texts.append(prompt_text(msgs, is_chat, tok))
    outs = generate_texts(model, tok, texts, n, **gen)
    params = {k: v for k, v in gen.items() if k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
    return [{"prompt": row["prompt"], "completions": [{"text": t, "model": str(model_path), "params": params}
                                                      for t in cs]}
            for row, cs in zip(prompt_rows, outs)]
