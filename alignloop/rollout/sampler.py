"""Batched sampling from a causal LM with a KV cache: `SamplingParams`, `Rollout`, the `Sampler` protocol, `HFSampler`.

    sampler = HFSampler(model, tokenizer)
    rollout = sampler.generate(prompts_token_ids, SamplingParams(max_new_tokens=48, temperature=0.7))
    rollout.response_ids, rollout.response_mask, rollout.logprobs

Layout (the trainer relies on it): prompts are **left-padded** to P tokens (`prompt_mask` False on pads), responses
are **right-padded** to R tokens (`response_mask` True on real tokens, including the stop token itself). So
`input_ids = cat(prompt_ids, response_ids)`, `attention_mask = cat(prompt_mask, response_mask)` and
position ids from `alignloop.models.position_ids_from_attention_mask` (real tokens count 0, 1, 2, ...; pads are masked
anyway) -- in sampling **and** in every training forward pass, one function for both.

Log-probabilities. Two are stored:
- `logprobs`: log-probability of each sampled token under *exactly the distribution it was sampled from*: logits /
  temperature, then top-k, then top-p (nucleus), renormalised.
- `policy_logprobs`: log-probability under the temperature-scaled *full* distribution, log_softmax(logits / T). This
  is what a training forward pass recomputes (`logprobs_from_logits(logits, tokens, temperature)`), so PPO's ratio
  compares like with like. With pure sampling (top_k = 0, top_p = 1) the two are the same tensor.

Stopping: a response ends at its first stop token (EOS and `stop_token_ids`) or once its decoded text contains one
of `stop_strings` (the token completing the string is the last one kept); everything after is padding, masked out.
`stopped[b]` says whether row b ended that way (False: it ran into `max_new_tokens`).

Streaming: `HFSampler.generate(..., on_step=fn)` calls `fn(tokens, alive)` after each step (nothing is done per step
without it).

A faster backend (e.g. vLLM on GPU) only has to implement the `Sampler` protocol: `generate(prompts_token_ids,
params) -> Rollout`. The trainer never touches the model through the sampler's internals.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from alignloop.data.collators import pad_batch, position_ids_from_attention_mask
from alignloop.errors import ConfigError
from alignloop.models.fast import is_wide
from alignloop.models.forward import unwrap_model


@dataclass
class SamplingParams:
    """How to sample. `top_k=0` and `top_p=1.0` mean no truncation (pure sampling from logits / temperature)."""
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum number of tokens generated per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature (> 0)."})
    top_k: int = field(default=0, metadata={"help": "Keep the k most likely tokens (0 = all)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0 = all)."})
    eos_token_id: int | None = field(default=None, metadata={"help": "EOS id (a stop token); None = take it from "
                                                                      "the tokenizer."})
    stop_token_ids: Sequence[int] = field(default=(), metadata={"help": "Further token ids that end a response."})
    stop_strings: Sequence[str] = field(default=(), metadata={"help": "Strings that end a response (needs a "
                                                                      "tokenizer)."})
    pad_token_id: int | None = field(default=None, metadata={"help": "Pad id; None = tokenizer's pad (or EOS)."})

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Rollout:
    """A batch of sampled responses. Shapes: B prompts, P prompt tokens (left-padded), R response tokens."""
    prompt_ids: torch.Tensor        # [B, P] long, left-padded
    prompt_mask: torch.Tensor       # [B, P] bool
    response_ids: torch.Tensor      # [B, R] long, right-padded with pad_token_id after the stop
    response_mask: torch.Tensor     # [B, R] bool, True on real response tokens (the stop token included)
    logprobs: torch.Tensor          # [B, R] float32, sampled distribution (see module doc); 0 where masked
    policy_logprobs: torch.Tensor   # [B, R] float32, temperature-scaled full distribution; 0 where masked
    stopped: torch.Tensor           # [B] bool, True when the response ended with a stop token / string
    pad_token_id: int = 0

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device) -> Rollout:
        """Every tensor moved to `device` (in place; returns the rollout)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The `rows`' prompt + response tokens without the columns that are padding in every one of them (a
        micro-batch forward wastes nothing on them): (input_ids [b, P'+R'], attention_mask [b, P'+R'], P', R')."""
        pm, rm = self.prompt_mask[rows], self.response_mask[rows]
        p0 = int((~pm).all(0).long().cumprod(0).sum())   # leading prompt columns that are pad in every row
        r = int(rm.any(0).sum())
        ids = torch.cat([self.prompt_ids[rows, p0:], self.response_ids[rows, :r]], 1)
        mask = torch.cat([pm[:, p0:], rm[:, :r]], 1).long()
        return ids, mask, pm.shape[1] - p0, r


@runtime_checkable
class Sampler(Protocol):
    """A generation backend. Implementations must return log-probs of the sampled tokens as described above."""

    def generate(self, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> Rollout: ...


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (ids [B, L] long, mask [B, L] bool)."""
    if len(sequences) == 0:
        raise ValueError("no prompts")
    empty = [i for i, s in enumerate(sequences) if len(s) == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty: every prompt needs at least one token")
    ids, mask = pad_batch([list(s) for s in sequences], pad_token_id, "left")
    return ids.to(device), mask.bool().to(device)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p truncation of (already temperature-scaled) logits [B, V]; removed entries become -inf.
    Top-p keeps the smallest set of most likely tokens whose mass reaches top_p (the top token is always kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs          # mass of strictly more likely tokens
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _parameters(model: torch.nn.Module) -> set[str]:
    """The names `model.forward` takes (none when its signature cannot be read)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


class HFSampler:
    """Sampling loop over a Hugging Face causal LM with a KV cache, under `torch.inference_mode` and with dropout
    off (eval mode; the previous mode is restored afterwards).

    `model` may be any module whose forward takes (input_ids, attention_mask, position_ids, use_cache and the cache)
    and returns `.logits` and the cache (every HF causal LM). The cache is named as the model's forward names it:
    `cache` (transformers >= 5.2x, where `past_key_values` warns and is going away) or `past_key_values` (older
    releases and modules written to them). `tokenizer` is needed only for `stop_strings` and for default EOS / pad ids.

    `cpu_threads`: torch intra-op threads while sampling on CPU (restored afterwards; None = leave as is; 0 = auto).
    Decode steps of a narrow model are tiny ops where OpenMP synchronisation costs more than a second thread gains
    (2 layers x 128, 16 x 48 tokens on 2 idle cores: 1 thread 0.11 s, 2 threads 0.98 s), while a wider one gains
    (6 x 384: 1 thread 0.68 s, 2 threads 0.42 s). Auto: 1 thread below hidden size 256, every thread from there.
    With more runnable processes than cores, extra threads cost far more: pass 1 on a shared machine.

    `generator`: the `torch.Generator` the tokens are drawn with (on the model's device); None = torch's global RNG.
    Two samplers running at once in two threads each need their own (the global RNG would interleave their draws)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, cpu_threads: int | None = 0,
                 generator: torch.Generator | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cpu_threads = cpu_threads
        self.generator = generator
        self._keep = "logits_to_keep" in _parameters(model)
        # a peft/DDP wrapper forwards **kwargs: the name is the one the transformers model underneath takes
        self._cache = "cache" if "cache" in _parameters(unwrap_model(model)) else "past_key_values"

    def _ids(self, params: SamplingParams) -> tuple[int, list[int]]:
        tok = self.tokenizer
        eos = params.eos_token_id
        if eos is None and tok is not None:
            eos = tok.eos_token_id
        if eos is None:
            eos = getattr(getattr(self.model, "config", None), "eos_token_id", None)
        pad = params.pad_token_id
        if pad is None and tok is not None:
            pad = tok.pad_token_id
        if pad is None:
            pad = eos if eos is not None else 0
        stops = list(params.stop_token_ids) + ([eos] if eos is not None else [])
        return pad, sorted({int(s) for s in stops})

    def _auto_threads(self, available: int) -> int:
        return available if is_wide(self.model) else 1

    def _device(self):
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def generate(self, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> Rollout:
        """Sample a response to each prompt. `on_step(tokens [B] long, alive [B] bool)`, when given, is called after
        each decoding step with the step's token of every row and whether the row was still generating (False: the
        token is padding): streaming for a caller that shows text as it comes. It reads no random numbers, so the
        samples are the same with and without it."""
        threads = torch.get_num_threads()
        change = self.cpu_threads is not None and self._device().type == "cpu"
        if change:
            torch.set_num_threads(self.cpu_threads or self._auto_threads(threads))
        try:
            r = self._generate(prompts_token_ids, params, on_step)
        finally:
            if change:
                torch.set_num_threads(threads)
        # leave inference mode: the trainer feeds these tensors to autograd-recorded ops
        for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs", "policy_logprobs",
                  "stopped"):
            setattr(r, k, getattr(r, k).clone())
        return r

    @torch.inference_mode()
    def _generate(self, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                  on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> Rollout:
        params.validate()
        if params.stop_strings and self.tokenizer is None:
            raise ConfigError("stop_strings need a tokenizer: HFSampler(model, tokenizer)")
        pad_id, stop_ids = self._ids(params)
        device = self._device()
        prompt_ids, prompt_mask = left_pad(prompts_token_ids, pad_id, device)
        B = prompt_ids.shape[0]
        stop_t = torch.tensor(stop_ids, dtype=torch.long, device=device)

        was_training = self.model.training
        self.model.eval()
        try:
            mask = prompt_mask.long()
            pos = position_ids_from_attention_mask(mask)
            extra = {"logits_to_keep": 1} if self._keep else {}
            out = self.model(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
            past = getattr(out, self._cache)
            next_pos = pos[:, -1:] + 1
            done = torch.zeros(B, dtype=torch.bool, device=device)
            stopped = torch.zeros(B, dtype=torch.bool, device=device)
            tokens, lps, plps, masks = [], [], [], []
            logits = out.logits[:, -1, :]
            for step in range(params.max_new_tokens):
                scaled = logits.float() / params.temperature
                policy_lp = torch.log_softmax(scaled, dim=-1)
                if params.top_k or params.top_p < 1.0:
                    sample_lp = torch.log_softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
                else:
                    sample_lp = policy_lp
                tok = torch.multinomial(sample_lp.exp(), 1, generator=self.generator).squeeze(1)
                alive = ~done
                tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
                lp = sample_lp.gather(1, tok[:, None]).squeeze(1)
                plp = lp if sample_lp is policy_lp else policy_lp.gather(1, tok[:, None]).squeeze(1)
                tokens.append(tok)
                masks.append(alive)
                lps.append(torch.where(alive, lp, torch.zeros_like(lp)))
                plps.append(torch.where(alive, plp, torch.zeros_like(plp)))
                hit = alive & torch.isin(tok, stop_t) if len(stop_ids) else torch.zeros_like(alive)
                if params.stop_strings:
                    hit = hit | (alive & self._hits_stop_string(torch.stack(tokens, 1), torch.stack(masks, 1),
                                                                 params.stop_strings))
                stopped |= hit
                done |= hit
                if on_step is not None:
                    on_step(tok, alive)
                if bool(done.all()) or step == params.max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
                out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                                 use_cache=True, **{self._cache: past})
                past = getattr(out, self._cache)
                next_pos = next_pos + 1
                logits = out.logits[:, -1, :]
        finally:
            self.model.train(was_training)
        response_ids = torch.stack(tokens, 1)
        response_mask = torch.stack(masks, 1)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                       response_mask=response_mask, logprobs=torch.stack(lps, 1), policy_logprobs=torch.stack(plps, 1),
                       stopped=stopped, pad_token_id=pad_id)

    def _hits_stop_string(self, tokens: torch.Tensor, masks: torch.Tensor, stop_strings) -> torch.Tensor:
        hit = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for b in range(tokens.shape[0]):
            if not bool(masks[b, -1]):
                continue
            text = self.tokenizer.decode(tokens[b][masks[b]].tolist(), skip_special_tokens=False)
            # only strings that end inside the newest token count (earlier ones would have stopped the row already)
            hit[b] = any(s in text for s in stop_strings)
        return hit
