"""Evaluation of policies: samples, reward (reward model and/or gold function), KL to a reference, length, win rate.

    samples = sample_policy(model, tok, prompts, n=1, ref_model=ref)    # texts, lengths, per-sequence KL to ref
    rm = load_reward_scorer("runs/demo/rm/final")                       # texts -> scores (a RewardModel)
    gold = load_function("alignloop.demo.domain:gold_scores")            # f(prompts, responses) -> list[float]
    summary = summarize(samples, reference_samples, rm=rm, gold=gold)

KL to the reference is estimated on the policy's own samples: Σ_t k1 = Σ_t [log π(y_t|x,y<t) − log π_ref(y_t|x,y<t)]
over the response tokens (`alignloop.losses.kl_penalty`, kind k1; an unbiased estimator of KL(π‖π_ref)), averaged
over samples. Win rate against the reference: each policy sample is paired with the reference sample of the same
prompt (same index); a win counts 1, a tie ½.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from alignloop.errors import UserError


@dataclass
class Samples:
    prompts: list[str]
    responses: list[str]
    lengths: list[int]                         # response tokens (EOS included when generated)
    kl: list[float] | None = None              # per-sequence KL estimate to the reference
    scores: dict[str, list[float]] = field(default_factory=dict)   # "gold", "rm"

    def to_rows(self) -> list[dict]:
        rows = []
        for i, (p, r) in enumerate(zip(self.prompts, self.responses)):
            row = {"prompt": p, "response": r, "length": self.lengths[i]}
            if self.kl is not None:
                row["kl"] = self.kl[i]
            for k, v in self.scores.items():
                row[k] = v[i]
            rows.append(row)
        return rows

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Samples:
        s = cls([r["prompt"] for r in rows], [r["response"] for r in rows], [int(r["length"]) for r in rows],
                [r["kl"] for r in rows] if rows and "kl" in rows[0] else None)
        for k in ("gold", "rm"):
            if rows and k in rows[0]:
                s.scores[k] = [float(r[k]) for r in rows]
        return s


def load_function(spec: str) -> Callable:
    """`module:function` -> the function (a gold scorer `f(prompts, responses) -> list[float]`)."""
    if ":" not in spec:
        raise UserError(f"gold function {spec!r}: expected 'module:function'")
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"gold function {spec!r}: {e}") from None
    if not callable(fn):
        raise UserError(f"gold function {spec!r} is not callable")
    return fn


def load_policy(path: str, padding_side: str = "left"):
    from alignloop.models import load_causal_lm, load_tokenizer

    try:
        tok = load_tokenizer(path, padding_side=padding_side)
        model = load_causal_lm(path)
    except OSError as e:
        raise UserError(f"cannot load model {path!r}: {e}") from None
    return model.eval(), tok


@torch.no_grad()
def response_logprobs(model, rollout) -> torch.Tensor:
    """log π(y_t | x, y<t) [B,R] of a rollout's response tokens under `model` (0 where masked)."""
    from alignloop.losses import logprobs_from_logits
    from alignloop.models import model_forward

    P = rollout.prompt_ids.shape[1]
    logits = model_forward(model, rollout.input_ids, rollout.attention_mask.long())
    lp = logprobs_from_logits(logits[:, P - 1:-1].float(), rollout.response_ids)
    return lp * rollout.response_mask


@torch.no_grad()
def sample_policy(model, tokenizer, prompts: Sequence[str], n: int = 1, max_new_tokens: int = 48,
                  temperature: float = 1.0, seed: int = 0, batch_size: int = 32, ref_model=None,
                  max_prompt_length: int = 256) -> Samples:
    """n samples per prompt (prompt-major order: prompt 0's n samples first). With `ref_model`, also the
    per-sequence KL estimate Σ_t k1 to it (on the policy's temperature-scaled log-probs)."""
    from alignloop.losses import kl_penalty, masked_sum
    from alignloop.rollout import HFSampler, SamplingParams

    torch.manual_seed(seed)
    model.eval()
    flat = [p for p in prompts for _ in range(n)]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_length:] for p in flat]
    sampler = HFSampler(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    responses, lengths, kls = [], [], []
    for start in range(0, len(ids), batch_size):
        r = sampler.generate(ids[start:start + batch_size], params)
        for row, mask in zip(r.response_ids, r.response_mask):
            responses.append(tokenizer.decode(row[mask].tolist(), skip_special_tokens=True))
            lengths.append(int(mask.sum()))
        if ref_model is not None:
            ref_lp = response_logprobs(ref_model, r)
            pol_lp = r.policy_logprobs if temperature == 1.0 else response_logprobs(model, r)
            kl = masked_sum(kl_penalty(pol_lp, ref_lp, "k1"), r.response_mask, dim=1)
            kls.extend(kl.tolist())
    return Samples(list(flat), responses, lengths, kls if ref_model is not None else None)


class RewardScorer:
    """A reward model as `(prompts, responses) -> scores` (prompt + response text, scored at the last real token;
    `alignloop.trainers.best_of_n.reward_fn_from_model`), with EOS appended as in reward-model training."""

    def __init__(self, path: str, batch_size: int = 64):
        from alignloop.models import RewardModel, load_tokenizer
        from alignloop.trainers.best_of_n import reward_fn_from_model

        try:
            self.model = RewardModel.from_pretrained(path).eval()
            self.tokenizer = load_tokenizer(path, padding_side="right")
        except OSError as e:
            raise UserError(f"cannot load reward model {path!r}: {e}") from None
        self.fn = reward_fn_from_model(self.model, self.tokenizer, batch_size)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        # the reward trainer appends EOS to every completion (RewardConfig.add_eos): score the same kind of text
        eos = self.tokenizer.eos_token or ""
        return [float(x) for x in self.fn(list(prompts), [r + eos for r in responses])]


def win_rate(policy: Sequence[float], reference: Sequence[float]) -> float:
    """Share of paired samples where the policy scores higher (ties ½)."""
    if len(policy) != len(reference) or not policy:
        raise ValueError("win_rate needs two non-empty score lists of the same length")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy, reference)) / len(policy)


def score(samples: Samples, rm: Callable | None = None, gold: Callable | None = None) -> Samples:
    if rm is not None and "rm" not in samples.scores:
        samples.scores["rm"] = [float(x) for x in rm(samples.prompts, samples.responses)]
    if gold is not None and "gold" not in samples.scores:
        samples.scores["gold"] = [float(x) for x in gold(samples.prompts, samples.responses)]
    return samples


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _sem(xs):
    if len(xs) < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarize(samples: Samples, reference: Samples | None = None) -> dict[str, float]:
    """mean reward (gold/rm, with standard errors), KL, length, win rates against the reference samples."""
    out: dict[str, float] = {"n": len(samples.responses), "length": _mean(samples.lengths)}
    if samples.kl is not None:
        out["kl"] = _mean(samples.kl)
    for k, v in samples.scores.items():
        out[f"{k}/mean"] = _mean(v)
        out[f"{k}/sem"] = _sem(v)
        if reference is not None and k in reference.scores and len(reference.scores[k]) == len(v):
            out[f"{k}/win_rate"] = win_rate(v, reference.scores[k])
    return out


def best_of_n(candidates: Samples, n_per_prompt: int, n: int, key: str = "rm") -> Samples:
    """From `n_per_prompt` scored candidates per prompt (prompt-major), keep for each prompt the best by `key`
    among its first n. KL to the base policy: log n − (n−1)/n (Beirami et al. 2024's bound), per sample."""
    if n > n_per_prompt:
        raise ValueError(f"best-of-{n} needs at least {n} candidates per prompt")
    sel = []
    for start in range(0, len(candidates.responses), n_per_prompt):
        block = range(start, start + n)
        sel.append(max(block, key=lambda i: candidates.scores[key][i]))
    from alignloop.trainers.best_of_n import best_of_n_kl

    out = Samples([candidates.prompts[i] for i in sel], [candidates.responses[i] for i in sel],
                  [candidates.lengths[i] for i in sel], [best_of_n_kl(n)] * len(sel))
    for k, v in candidates.scores.items():
        out.scores[k] = [v[i] for i in sel]
    return out


def first_of_each(candidates: Samples, n_per_prompt: int) -> Samples:
    """The first candidate of each prompt (one plain sample per prompt)."""
    idx = list(range(0, len(candidates.responses), n_per_prompt))
    out = Samples([candidates.prompts[i] for i in idx], [candidates.responses[i] for i in idx],
                  [candidates.lengths[i] for i in idx], [candidates.kl[i] for i in idx] if candidates.kl else None)
    for k, v in candidates.scores.items():
        out.scores[k] = [v[i] for i in idx]
    return out


def evaluate_policy(policy: str, reference: str, prompts: Sequence[str], rm: Callable | None = None,
                    gold: Callable | None = None, n: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
                    seed: int = 0, batch_size: int = 32, reference_samples: Samples | None = None
                    ) -> tuple[dict[str, float], Samples, Samples]:
    """Sample the policy (KL to the reference on those samples) and the reference on the same prompts, score
    both, and summarise. Returns (summary, policy samples, reference samples)."""
    ref_model, ref_tok = load_policy(reference)
    pol_model, pol_tok = load_policy(policy)
    if reference_samples is None:
        reference_samples = sample_policy(ref_model, ref_tok, prompts, n, max_new_tokens, temperature, seed + 1,
                                          batch_size)
    score(reference_samples, rm, gold)
    s = sample_policy(pol_model, pol_tok, prompts, n, max_new_tokens, temperature, seed, batch_size,
                      ref_model=ref_model)
    score(s, rm, gold)
    return summarize(s, reference_samples), s, reference_samples


def people_win_rate(store, project: str) -> dict[str, float]:
    """The win rate of the policy against the reference as judged by people in the app: pairs imported by
    `alignloop eval --human-db` carry params {"eval_role": "policy"|"reference"}; each current judgement counts 1
    for the policy's completion, ½ for tie / both bad, 0 otherwise."""
    p = store.get_project(project)
    _, comps = store.prompts_and_completions(p.id)
    wins = n = 0.0
    labelers = set()
    for r in store.current_judgements(p.id):
        roles = [(comps[c].params or {}).get("eval_role") for c in r["completion_ids"]]
        if sorted(roles) != ["policy", "reference"]:
            continue
        n += 1
        labelers.add(r["labeler"])
        if r["choice"] in ("tie", "both_bad"):
            wins += 0.5
        elif roles["ab".index(r["choice"])] == "policy":
            wins += 1.0
    if not n:
        raise UserError(f"project {project}: no judgements of (policy, reference) pairs yet")
    return {"people/win_rate": wins / n, "people/judgements": int(n), "people/labelers": len(labelers)}
