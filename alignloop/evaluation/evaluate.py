"""Evaluation of policies: samples, reward (reward model and/or gold function), KL to a reference, length, win rate.

    samples = sample_policy(model, tok, prompts, n=1, ref_model=ref)    # texts, lengths, per-sequence KL to ref
    rm = load_scorer("runs/demo/rm/final")                              # alignloop.scoring: texts -> scores
    gold = load_function("alignloop.demo.domain:gold_scores")            # f(prompts, responses) -> list[float]
    score(samples, rm=rm, gold=gold); summary = summarize(samples, reference_samples)

Sampling and the KL go through `alignloop.rollout.sample_completions`: KL to the reference is estimated on the
policy's own samples, Σ_t k1 = Σ_t [log π(y_t|x,y<t) − log π_ref(y_t|x,y<t)] over the response tokens, both at the
sampling temperature (an unbiased estimator of KL(π‖π_ref) at temperature 1), averaged over samples. Scores go
through `alignloop.scoring` (a reward model sees the text as in its training). Win rate against the reference: each
policy sample is paired with the reference sample of the same prompt (same index); a win counts 1, a tie ½.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from alignloop.errors import UserError
from alignloop.evaluation.metrics import best_of_n_kl, mean, sem, win_rate
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.rollout import SamplingParams, sample_completions
from alignloop.scoring import score_with_parts


@dataclass
class Samples:
    prompts: list[str]
    responses: list[str]
    lengths: list[int]                         # response tokens (EOS included when generated)
    kl: list[float] | None = None              # per-sequence KL estimate to the reference
    scores: dict[str, list[float]] = field(default_factory=dict)   # "gold", "rm" (and "rm/<part>")

    def to_rows(self) -> list[dict]:
        rows = []
        for i, (p, r) in enumerate(zip(self.prompts, self.responses, strict=True)):
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

    def select(self, idx: Sequence[int], kl: list[float] | None = None) -> Samples:
        """The samples at `idx` (their scores too); `kl` replaces their KL when given."""
        out = Samples([self.prompts[i] for i in idx], [self.responses[i] for i in idx],
                      [self.lengths[i] for i in idx], kl if kl is not None else
                      [self.kl[i] for i in idx] if self.kl is not None else None)
        out.scores = {k: [v[i] for i in idx] for k, v in self.scores.items()}
        return out


def load_policy(path: str, padding_side: str = "left"):
    """(causal LM in eval mode, its tokenizer); a model that cannot be loaded is a UserError naming it (from the
    loaders)."""
    return load_causal_lm(path).eval(), load_tokenizer(path, padding_side=padding_side)


def sample_policy(model, tokenizer, prompts: Sequence[str], n: int = 1, max_new_tokens: int = 48,
                  temperature: float = 1.0, seed: int = 0, batch_size: int = 32, ref_model=None,
                  max_prompt_length: int = 256) -> Samples:
    """n samples per prompt (prompt-major order: prompt 0's n samples first), `batch_size` sequences per generation
    call. With `ref_model`, also the per-sequence KL estimate Σ_t k1 to it (module docstring)."""
    groups = sample_completions(model, tokenizer, prompts, n, SamplingParams(max_new_tokens=max_new_tokens,
                                                                             temperature=temperature),
                                batch_size=batch_size, max_prompt_length=max_prompt_length, seed=seed,
                                ref_model=ref_model)
    flat = [c for g in groups for c in g]
    return Samples([p for p in prompts for _ in range(n)], [c.text for c in flat], [c.length for c in flat],
                   [c.kl for c in flat] if ref_model is not None else None)


def score(samples: Samples, rm: Callable | None = None, gold: Callable | None = None) -> Samples:
    """Add "rm" (a scorer of `alignloop.scoring`) and "gold" (a function) scores, unless already there. A scorer of
    several parts (a multi-head reward model's heads, a weighted sum) adds "rm/<name>" per part too (same pass)."""
    for key, fn in (("rm", rm), ("gold", gold)):
        if fn is None or key in samples.scores:
            continue
        if hasattr(fn, "parts"):
            total, parts = score_with_parts(fn, samples.prompts, samples.responses)
            samples.scores[key] = total.tolist()
            samples.scores.update({f"{key}/{k}": v.tolist() for k, v in parts.items()} if len(parts) > 1 else {})
        else:
            samples.scores[key] = [float(x) for x in fn(samples.prompts, samples.responses)]
    return samples


def summarize(samples: Samples, reference: Samples | None = None) -> dict[str, float]:
    """mean reward (gold/rm, with standard errors), KL, length, win rates against the reference samples."""
    out: dict[str, float] = {"n": len(samples.responses), "length": mean(samples.lengths)}
    if samples.kl is not None:
        out["kl"] = mean(samples.kl)
    for k, v in samples.scores.items():
        out[f"{k}/mean"] = mean(v)
        out[f"{k}/sem"] = sem(v)
        if reference is not None and k in reference.scores and len(reference.scores[k]) == len(v):
            out[f"{k}/win_rate"] = win_rate(v, reference.scores[k])
    return out


def best_of_n(candidates: Samples, n_per_prompt: int, n: int, key: str = "rm") -> Samples:
    """From `n_per_prompt` scored candidates per prompt (prompt-major), keep for each prompt the best by `key`
    among its first n. KL to the base policy: log n − (n−1)/n (Beirami et al. 2024's bound), per sample."""
    if n > n_per_prompt:
        raise ValueError(f"best-of-{n} needs at least {n} candidates per prompt")
    sel = [max(range(start, start + n), key=lambda i: candidates.scores[key][i])
           for start in range(0, len(candidates.responses), n_per_prompt)]
    return candidates.select(sel, kl=[best_of_n_kl(n)] * len(sel))


def first_of_each(candidates: Samples, n_per_prompt: int) -> Samples:
    """The first candidate of each prompt (one plain sample per prompt)."""
    return candidates.select(range(0, len(candidates.responses), n_per_prompt))


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
