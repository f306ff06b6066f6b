"""Sampling N completions per prompt: the one home of "prompts in, texts out" for every caller (the feedback app's
`sample`, best-of-N, rejection sampling, the pipeline and evaluation).

    groups = sample_completions(model, tokenizer, prompts, n=4, params=SamplingParams(max_new_tokens=48), seed=0)
    groups[i][j].text, .stopped, .length, .kl          # prompt i's j-th completion

Prompts are tokenised without special tokens and keep their last `max_prompt_length` tokens (`encode_prompts`; an
empty prompt becomes BOS, or EOS when the tokenizer has no BOS); generation is batched through a `Sampler` (the
KV-cache `HFSampler` by default): the prompts' n copies in prompt order (prompt 0's n samples first), `batch_size`
sequences per call (best-of-N and rejection sampling ask for a whole number of prompts: their batch size × n).
With `stream`, each completion's text so far is passed on after every decoding step (the labeling app shows replies
as they come). Completions are decoded without special tokens (`decode_responses`), so the stop token is not in the
text; `stopped` tells a completion that ended at a stop token from one cut at `max_new_tokens`.

With `ref_model`, each completion also carries `kl` = Σ_t [log π(y_t|·) − log π_ref(y_t|·)] over its tokens (the k1
estimator, `alignloop.losses.kl_penalty`), both log-probs at the sampling temperature: the per-sequence KL that
PPO's `objective/kl` reports, estimated on the policy's own samples.

Shapes: B = sequences in a call, P = prompt tokens (left-padded), R = response tokens (right-padded).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from alignloop.data.users import split_user_tag
from alignloop.losses import kl_penalty, logprobs_from_logits, masked_sum
from alignloop.models.forward import model_forward
from alignloop.rollout.sampler import HFSampler, Rollout, Sampler, SamplingParams


@dataclass
class Completion:
    text: str                    # decoded without special tokens
    stopped: bool                # ended with a stop token / string (False: cut at max_new_tokens)
    length: int                  # response tokens, the stop token included
    kl: float | None = None      # Σ_t k1 to the reference (only with ref_model)


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int | None = None,
                   user_tag: str | None = None) -> list[list[int]]:
    """Token ids of each prompt (no special tokens), keeping the last `max_prompt_length` tokens. An empty prompt
    becomes [BOS] (or [EOS]): generation needs at least one token to condition on. `user_tag` (a template of
    `alignloop.data.users`): a prompt that starts with such a tag keeps the tag's tokens and the end of the rest
    (left truncation alone would cut the tag, and the policy would not know whose prompt it is)."""
    ids = [list(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    if max_prompt_length is not None:
        ids = [_truncated(tokenizer, p, x, max_prompt_length, user_tag) for p, x in zip(prompts, ids, strict=True)]
    if any(not x for x in ids):
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [x or [start] for x in ids]
    return ids


def _truncated(tokenizer, prompt: str, ids: list[int], max_length: int, user_tag: str | None) -> list[int]:
    user, rest = split_user_tag(prompt, user_tag) if user_tag is not None else (None, prompt)
    if len(ids) <= max_length or user is None:
        return ids[-max_length:]
    tag = tokenizer(prompt[:len(prompt) - len(rest)], add_special_tokens=False)["input_ids"][:max_length]
    keep = max_length - len(tag)
    return list(tag) + (ids[-keep:] if keep > 0 else [])


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """The response texts of a rollout, without special tokens (the stop token is not part of the text)."""
    return tokenizer.batch_decode([r[m].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask,
                                                                  strict=True)], skip_special_tokens=True)


@torch.no_grad()
def response_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | x, y<t) [B,R] of a rollout's response tokens under `model` at `temperature` (0 where masked),
    in eval mode (dropout off; the previous mode is restored)."""
    P = rollout.prompt_ids.shape[1]
    was = model.training
    model.eval()
    try:
        logits = model_forward(model, rollout.input_ids, rollout.attention_mask.long())
    finally:
        model.train(was)
    lp = logprobs_from_logits(logits[:, P - 1:-1], rollout.response_ids, temperature)
    return lp * rollout.response_mask


def _streamer(tokenizer, stream: Callable[[int, str], None], first: int, rows: int, every_s: float):
    """An `on_step` for `HFSampler.generate` that calls stream(first + b, text of row b so far) for the live rows,
    at most every `every_s` seconds (each call decodes the whole text so far: per step, a long reply's decoding
    would cost more than its sampling)."""
    tokens: list[list[int]] = [[] for _ in range(rows)]
    last = [float("-inf")]

    def on_step(tok: torch.Tensor, alive: torch.Tensor) -> None:
        live = []
        for b, (t, a) in enumerate(zip(tok.tolist(), alive.tolist(), strict=True)):
            if a:
                tokens[b].append(t)
                live.append(b)
        now = time.monotonic()
        if now - last[0] < every_s:
            return
        last[0] = now
        for b in live:
            stream(first + b, tokenizer.decode(tokens[b], skip_special_tokens=True))

    return on_step


def sample_completions(model, tokenizer, prompts: Sequence[str], n: int, params: SamplingParams | None = None, *,
                       batch_size: int = 32, max_prompt_length: int | None = None, seed: int | None = None,
                       ref_model=None, sampler: Sampler | None = None, user_tag: str | None = None,
                       stream: Callable[[int, str], None] | None = None,
                       stream_every_s: float = 0.0,
                       generator: torch.Generator | None = None) -> list[list[Completion]]:
    """n completions for each prompt -> one list of `Completion` per prompt, in prompt order; `batch_size` sequences
    per generation call. `seed` seeds torch's RNG first (None: the RNG as it is). `user_tag`: the prompts' user tags
    survive truncation (`encode_prompts`). `stream(k, text_so_far)`: called after each decoding step for every
    completion k (= prompt i * n + sample j) still being generated, with its text so far (decoded as the final text
    is; needs a sampler whose `generate` takes `on_step`, as `HFSampler`'s does), at most every `stream_every_s`
    seconds (0: after every step). `generator`: a `torch.Generator` (on the model's device) to draw from instead of
    torch's global RNG (`seed` seeds it), so that two samplings in two threads at once stay each seeded; the
    default sampler is built with it (a given `sampler` draws from its own). See the module docstring."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    params = params if params is not None else SamplingParams()
    if seed is not None:
        if generator is not None:
            generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
    sampler = sampler if sampler is not None else HFSampler(model, tokenizer, generator=generator)
    flat = [ids for ids in encode_prompts(tokenizer, prompts, max_prompt_length, user_tag) for _ in range(n)]
    done: list[Completion] = []
    for lo in range(0, len(flat), max(1, batch_size)):
        chunk = flat[lo:lo + max(1, batch_size)]
        if stream is None:
            rollout = sampler.generate(chunk, params)
        else:
            rollout = sampler.generate(chunk, params,
                                       on_step=_streamer(tokenizer, stream, lo, len(chunk), stream_every_s))
        texts = decode_responses(tokenizer, rollout)
        lengths = rollout.response_mask.sum(1).tolist()
        stopped = rollout.stopped.tolist()
        kls = [None] * len(texts)
        if ref_model is not None:
            ref_lp = response_logprobs(ref_model, rollout, params.temperature).to(rollout.policy_logprobs.device)
            kls = masked_sum(kl_penalty(rollout.policy_logprobs, ref_lp, "k1"), rollout.response_mask, dim=1).tolist()
        done += [Completion(t, bool(s), int(ln), k) for t, s, ln, k in zip(texts, stopped, lengths, kls, strict=True)]
    return [done[j * n:(j + 1) * n] for j in range(len(prompts))]
