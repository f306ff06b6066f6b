"""Best-of-N sampling: draw N completions per prompt from a policy, score them with a reward model, keep the best.

    from alignloop.trainers.best_of_n import BestOfNConfig, best_of_n, reward_fn_from_model, best_of_n_kl
    rows, summary = best_of_n(policy, tokenizer, prompts, n=8, reward_fn=reward_fn_from_model(rm, rm_tokenizer),
                              params=SamplingParams(max_new_tokens=64, temperature=1.0))
    alignloop generate --model POLICY --prompts-file prompts.jsonl --best-of 8 --reward-model RM --output-file out.jsonl

Generation is batched (`alignloop.rollout.HFSampler`, KV cache: `batch_size` prompts x N completions per call) and so
is scoring (`score_batch_size` sequences per reward-model forward, in eval mode under inference_mode). The reward
model scores prompt + completion tokenised with its own tokenizer (so policy and reward model may use different
vocabularies) **the way the reward-model trainer tokenised its training pairs** (`alignloop.trainers.rm`,
`tokenize_preferences`): prompt and completion tokenised separately without special tokens, then EOS appended to the
completion unless it already ends with one (`add_eos`, like rm's `add_eos`, on by default), so the score is read at an
EOS token, as in training (`alignloop.models.score_sequences`, last real token). Completions are decoded without
special tokens, so one that stopped at EOS and one cut at `max_new_tokens` both get exactly one EOS (never two),
as every training completion had; the candidate's `stopped` flag tells them apart. PPO scores tokens instead
(`ppo_scoring`): there a response that stopped at EOS ends with it, and one cut at max tokens has none (use its
`missing_eos_penalty`). `add_eos=False` (`--no-add-eos`) is for a reward model trained with `--no-add-eos`.

Output JSONL, one line per prompt: {"prompt", "candidates": [{"completion", "score", "stopped"}, ... N],
"best_index", "best_completion", "best_score"}. Completions are decoded without special tokens (the stop token is
not part of the text). The summary reports the mean best and mean candidate score and the analytic KL of the
best-of-N distribution to the base policy, log N - (N-1)/N nats (Stiennon et al. 2020; an upper bound, Beirami et
al. 2024).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from alignloop.errors import ConfigError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N || base policy) = log N - (N-1)/N nats (0 for N = 1)."""
    if n < 1:
        raise ConfigError(f"best_of must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


@dataclass
class BestOfNConfig:
    """`alignloop generate`: sample completions; with --best-of N > 1, N per prompt scored by --reward-model."""

    model: str = field(default="", metadata={"help": "Policy to sample from: hub id or local folder."})
    prompts_file: str = field(default="", metadata={"help": "Prompts ({prompt} rows, text or messages; "
                                                            "JSONL/JSON/Parquet/CSV or a datasets folder)."})
    output_file: str = field(default="generations.jsonl", metadata={"help": "Where to write one JSON line per "
                                                                            "prompt (every candidate and its score)."})
    best_of: int = field(default=1, metadata={"help": "N: completions per prompt; the reward model picks the best."})
    reward_model: str | None = field(default=None, metadata={"help": "Reward model (a sequence classifier with one "
                                                                     "output) that scores the N candidates."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens generated per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_k: int = field(default=0, metadata={"help": "Top-k truncation (0 = none)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus mass (1.0 = none)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last N prompt tokens."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation call (x best_of sequences)."})
    score_batch_size: int = field(default=32, metadata={"help": "Sequences per reward-model forward."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    dtype: str | None = field(default=None, metadata={"help": "Load dtype: float32 (default), bfloat16, auto."})
    add_eos: bool = field(default=True, metadata={
        "help": "Score prompt + completion + EOS, as the reward-model trainer appends EOS to every completion (its "
                "add_eos); an EOS already there is not doubled. Off for a reward model trained with --no-add-eos."})

    def __post_init__(self):
        if self.best_of < 1:
            raise ConfigError(f"best_of must be >= 1, got {self.best_of}")
        if self.batch_size < 1 or self.score_batch_size < 1:
            raise ConfigError("batch_size and score_batch_size must be >= 1")


def reward_input_ids(tokenizer, prompts: Sequence[str], completions: Sequence[str], add_eos: bool = True,
                     max_length: int | None = None) -> list[list[int]]:
    """Token ids of prompt + completion exactly as the reward-model trainer builds its training sequences
    (`tokenize_preferences`): each part tokenised without special tokens, EOS appended to the completion unless it
    already ends with EOS (`add_eos`), and a sequence longer than `max_length` cut like rm's default truncation
    "keep_end" (the prompt from the left first, then the completion's end)."""
    from alignloop.data import truncate
    from alignloop.data.tokenize import _finish

    if len(prompts) != len(completions):
        raise ConfigError(f"got {len(prompts)} prompts for {len(completions)} completions")
    if not prompts:
        return []
    enc_p = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    enc_c = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (tokenizer.pad_token_id or 0)
    out = []
    for p, c in zip(enc_p, enc_c):
        p, c = _finish(list(p), list(c), tokenizer, add_eos, False)
        if max_length is not None and len(p) + len(c) > max_length:
            fitted = truncate(p, [c], max_length, "keep_end")
            p, c = (fitted[0], fitted[1][0]) if fitted is not None else ([], (p + c)[-max_length:])
        out.append(p + c or [filler])  # never an empty row (empty prompt and completion without add_eos)
    return out


def reward_fn_from_model(reward_model, tokenizer, batch_size: int = 32, max_length: int | None = None,
                         add_eos: bool = True) -> RewardFn:
    """A `(prompts, completions) -> scores` function from a reward model (a `RewardModel` or a transformers
    sequence classifier with one output), scoring in batches, in eval mode. The text is tokenised as the reward-model
    trainer did (`reward_input_ids`: with `add_eos`, the score is read at an EOS token; an EOS already at the end
    of a completion is not doubled); `max_length` defaults to the model's context size."""
    from alignloop.models import score_sequences

    limit = max_length or getattr(getattr(reward_model, "config", None), "n_positions", None) \
        or getattr(getattr(reward_model, "config", None), "max_position_embeddings", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    @torch.inference_mode()
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        was = reward_model.training
        reward_model.eval()
        device = next(reward_model.parameters()).device
        out: list[float] = []
        try:
            seqs = reward_input_ids(tokenizer, prompts, completions, add_eos, limit)
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i:i + batch_size]
                width = max(len(x) for x in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for j, x in enumerate(chunk):  # right padding: the score is read at the last real token
                    ids[j, :len(x)] = torch.tensor(x, dtype=torch.long)
                    mask[j, :len(x)] = 1
                s = score_sequences(reward_model, ids.to(device), mask.to(device))
                out += s.float().cpu().tolist()
        finally:
            reward_model.train(was)
        return out

    return score


def _prompt_texts(source, tokenizer, max_prompts: int | None = None) -> list[str]:
    """Prompt strings from a path or a list of rows/strings (messages are chat-templated)."""
    if isinstance(source, (list, tuple)) and all(isinstance(p, str) for p in source):
        prompts = list(source)
    else:
        from alignloop.data import load_prompts

        records, _ = load_prompts(source, tokenizer=tokenizer)
        prompts = [r["prompt"] for r in records]
    return prompts[:max_prompts] if max_prompts is not None else prompts


def sample_completions(policy, tokenizer, prompts: list[str], n: int, params, batch_size: int = 8,
                       max_prompt_length: int | None = None) -> list[list[dict[str, Any]]]:
    """N completions per prompt -> [[{"completion", "stopped", "length"}] * n] * len(prompts), batched with
    `HFSampler` (each prompt repeated n times in a batch of batch_size prompts)."""
    from alignloop.rollout import HFSampler

    sampler = HFSampler(policy, tokenizer)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_prompt_length is not None:
        ids = [x[-max_prompt_length:] for x in ids]
    if any(len(x) == 0 for x in ids):
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [x or [bos] for x in ids]
    out: list[list[dict[str, Any]]] = []
    for lo in range(0, len(ids), batch_size):
        chunk = ids[lo:lo + batch_size]
        rollout = sampler.generate([x for x in chunk for _ in range(n)], params)
        texts = tokenizer.batch_decode([r[m].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)],
                                       skip_special_tokens=True)
        lengths = rollout.response_mask.sum(1).tolist()
        stopped = rollout.stopped.tolist()
        for j in range(len(chunk)):
            out.append([{"completion": texts[j * n + i], "stopped": bool(stopped[j * n + i]),
                         "length": int(lengths[j * n + i])} for i in range(n)])
    return out


def best_of_n(policy, tokenizer, prompts: list[str], n: int, reward_fn: RewardFn | None, params=None,
              batch_size: int = 8, max_prompt_length: int | None = None) -> tuple[list[dict], dict[str, float]]:
    """Sample n completions per prompt, score them with `reward_fn(prompts, completions) -> scores`, keep the best.
    Returns (rows, summary); see the module docstring for the row layout. With n == 1 and no reward_fn, plain
    sampling (scores None)."""
    from alignloop.rollout import SamplingParams

    params = params if params is not None else SamplingParams()
    if n > 1 and reward_fn is None:
        raise ConfigError("best-of-N with N > 1 needs a reward model (--reward-model) to pick the best")
    candidates = sample_completions(policy, tokenizer, prompts, n, params, batch_size, max_prompt_length)
    flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
    flat_c = [c["completion"] for cs in candidates for c in cs]
    scores = [float(s) for s in reward_fn(flat_p, flat_c)] if reward_fn is not None else [None] * len(flat_c)
    rows, k = [], 0
    for p, cs in zip(prompts, candidates):
        for c in cs:
            c["score"] = scores[k]
            k += 1
        best = max(range(len(cs)), key=lambda i: cs[i]["score"]) if reward_fn is not None else 0
        rows.append({"prompt": p, "candidates": cs, "best_index": best, "best_completion": cs[best]["completion"],
                     "best_score": cs[best]["score"]})
    summary = {"n": n, "prompts": len(rows), "kl_best_of_n": best_of_n_kl(n)}
    if reward_fn is not None:
        summary["mean_best_score"] = sum(r["best_score"] for r in rows) / max(len(rows), 1)
        summary["mean_score"] = sum(s for s in scores) / max(len(scores), 1)
    return rows, summary


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def run_generate(config: BestOfNConfig) -> dict[str, float]:
    """The `alignloop generate` entry point."""
    from alignloop.models import RewardModel, load_causal_lm, load_tokenizer
    from alignloop.rollout import SamplingParams

    if not config.model:
        raise ConfigError("model: give the policy to sample from (--model)")
    if not config.prompts_file:
        raise ConfigError("prompts_file: give the prompts (--prompts-file)")
    if config.best_of > 1 and not config.reward_model:
        raise ConfigError("--best-of N > 1 needs --reward-model PATH to score the candidates")
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model, padding_side="left")
    policy = load_causal_lm(config.model, dtype=config.dtype).eval()
    reward_fn = None
    if config.reward_model:
        rm = RewardModel.from_pretrained(config.reward_model, dtype=config.dtype).eval()
        reward_fn = reward_fn_from_model(rm, load_tokenizer(config.reward_model), config.score_batch_size,
                                         add_eos=config.add_eos)
    prompts = _prompt_texts(config.prompts_file, tokenizer, config.max_prompts)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                            top_k=config.top_k, top_p=config.top_p)
    rows, summary = best_of_n(policy, tokenizer, prompts, config.best_of, reward_fn, params, config.batch_size,
                              config.max_prompt_length)
    write_jsonl(rows, config.output_file)
    summary["output_file"] = str(config.output_file)
    print(json.dumps(summary))
    return summary
