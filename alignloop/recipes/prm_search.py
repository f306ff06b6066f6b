"""Search with a process reward model: best-of-N by PRM / ORM / majority voting, solve rate against N, and
step-level beam search guided by the PRM (Lightman et al. 2023; Wang et al. 2024).

Best-of-N from a pool of candidates (a problem's n sampled solutions, each with a score and whether it is correct):

    pick_best(scores)                                 # index of the best-scored candidate (ties: the first)
    majority_vote(answers, weights=None)              # the most voted final answer (None answers do not vote);
                                                      # weights: PRM-weighted voting (sum of scores per answer)
    best_of_n_rate(scores, correct, N)                # expected solve rate of best-of-N drawn from the pool
    majority_rate(answers, right_answer, N, ...)      # the same for (weighted) majority voting
    solve_rate_curve(pools, ns, method)               # mean over problems, for N = 1, 2, 4, ..., 64

Estimating solve rate at N without bias from a pool of n >= N samples per problem (drawing N fresh samples per N
would cost sum(N) samples and add noise between the Ns):
- score-based selection (PRM, ORM): the exact combinatorial estimator. With the pool sorted by score (best first),
  the candidate at position j is the best of a uniformly random N-subset (without replacement) with probability
  C(n−1−j, N−1) / C(n, N) (the subset contains it and N−1 of the n−1−j candidates below it), so
  E[solved] = Σ_j C(n−1−j, N−1) / C(n, N) · correct_j. Ties are broken uniformly at random: within a group of
  tied scores every order is equally likely, so each candidate's correctness is replaced by its tie group's mean.
  It is the average over all C(n, N) subsets (the pass@k estimator of Chen et al. 2021 is the special case "any
  correct"), unbiased for best-of-N of fresh samples, and exact (no Monte Carlo noise). N = n is the whole pool.
- voting (majority, PRM-weighted): the winner depends on the whole subset, so the estimate averages `subsets`
  random N-subsets (without replacement; the same seeded draws for every method); a tie between answers counts as
  1/k solved when the right answer is one of the k tied (uniform tie-breaking, in expectation). N = n uses the one
  subset there is. N = 1 is the pool's share of right answers either way.

Beam search (`prm_beam_search`): from each prompt, `beam_width` partial solutions; each step every unfinished beam
is expanded by `expand` sampled next steps (a `Continuer` as in `alignloop.recipes.math_shepherd`: the text up to the
first separator is the step; a continuation without one is the last step, or ends the solution when empty); all
candidates are scored by the PRM (the aggregate of their step scores, `alignloop.scoring.aggregate_step_scores`:
the prefix score) and the `beam_width` best per prompt, finished ones included, are kept. It stops when every kept
beam is finished or after `max_steps` steps; the answer is the best finished beam (the best kept one if none
finished).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from alignloop.data import STEP_SEPARATOR, join_steps
from alignloop.scoring import aggregate_step_scores

Continuer = Callable[[Sequence[str], int], list[list[str]]]
POWERS_OF_TWO = (1, 2, 4, 8, 16, 32, 64)


# ------------------------------------------------------------------------------------------------ selection
def pick_best(scores: Sequence[float]) -> int:
    """Index of the highest score (the first among ties)."""
    if not len(scores):
        raise ValueError("no candidates")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def vote_totals(answers: Sequence[Hashable | None], weights: Sequence[float] | None = None) -> dict:
    """Votes per answer (None answers, e.g. no final answer, do not vote); weights: each candidate's vote."""
    totals: dict = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        totals[a] = totals.get(a, 0.0) + (1.0 if weights is None else float(weights[i]))
    return totals


def majority_vote(answers: Sequence[Hashable | None], weights: Sequence[float] | None = None):
    """The answer with the most votes (weighted: the largest sum of weights); ties: the one seen first; None when no
    candidate has an answer."""
    totals = vote_totals(answers, weights)
    if not totals:
        return None
    best = max(totals.values())
    return next(a for a in totals if totals[a] == best)


# ------------------------------------------------------------------------------------------------ estimators
def best_of_n_weights(n_pool: int, n: int) -> np.ndarray:
    """w[j] = C(n_pool−1−j, n−1) / C(n_pool, n): the probability that the candidate ranked j (0 = best) is the best
    of a uniformly random n-subset. Sums to 1."""
    if not 1 <= n <= n_pool:
        raise ValueError(f"N must be in 1..{n_pool} (the pool), got {n}")
    total = math.comb(n_pool, n)
    return np.array([math.comb(n_pool - 1 - j, n - 1) / total for j in range(n_pool)], dtype=np.float64)


def best_of_n_rate(scores: Sequence[float], correct: Sequence[bool | float], n: int) -> float:
    """Expected correctness of the best-scored of N candidates drawn without replacement from the pool (the exact
    estimator of the module docstring; ties broken uniformly at random)."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    if s.shape != c.shape or s.ndim != 1:
        raise ValueError(f"scores and correct must be two lists of one length, got {s.shape} and {c.shape}")
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    # each tie group's mean correctness
    _, start, counts = np.unique(-s, return_index=True, return_counts=True)
    for a, k in zip(start, counts, strict=True):
        if k > 1:
            c[a:a + k] = c[a:a + k].mean()
    return float(best_of_n_weights(len(s), n) @ c)


def random_subsets(n_pool: int, n: int, subsets: int, rng: np.random.Generator) -> np.ndarray:
    """[S, n] indices of random n-subsets (without replacement) of range(n_pool); N = n_pool: the one subset."""
    if n == n_pool:
        return np.arange(n_pool)[None, :]
    return np.argsort(rng.random((subsets, n_pool)), axis=1)[:, :n]


def majority_rate(answers: Sequence[Hashable | None], right, n: int, weights: Sequence[float] | None = None,
                  subsets: int = 256, seed: int = 0) -> float:
    """Expected solve rate of (weighted) majority voting among N candidates drawn without replacement from the
    pool, averaged over `subsets` random subsets (see the module docstring; ties count 1/k, no vote counts 0)."""
    ids: dict = {}
    codes = np.array([-1 if a is None else ids.setdefault(a, len(ids)) for a in answers])
    n_pool = len(codes)
    if not 1 <= n <= n_pool:
        raise ValueError(f"N must be in 1..{n_pool} (the pool), got {n}")
    if right not in ids:
        return 0.0
    w = np.ones(n_pool) if weights is None else np.asarray(weights, dtype=np.float64)
    has = codes >= 0
    one_hot = np.zeros((n_pool, len(ids)))
    one_hot[np.arange(n_pool)[has], codes[has]] = 1.0
    # [S, n] candidate indices: N = 1 exactly (each candidate alone), else random subsets
    idx = np.arange(n_pool)[:, None] if n == 1 else random_subsets(n_pool, n, subsets, np.random.default_rng(seed))
    present = one_hot[idx].sum(1) > 0                                   # [S, A] answers with a vote in the subset
    totals = (one_hot * w[:, None])[idx].sum(1)                         # [S, A] their (weighted) votes
    masked = np.where(present, totals, -np.inf)
    best = masked.max(1, keepdims=True)
    winners = (masked == best) & present
    k = winners.sum(1)
    hit = winners[:, ids[right]]
    return float(np.where(k > 0, hit / np.maximum(k, 1), 0.0).mean())


def solve_rate_curve(pools: Sequence[dict], ns: Sequence[int] = POWERS_OF_TWO, method: str = "score",
                     subsets: int = 256, seed: int = 0) -> dict[int, float]:
    """Mean solve rate over problems for each N. `pools`: one dict per problem with "correct" (per candidate) and,
    by method: "score" (best-of-N by "scores"), "majority" (by "answers" and the problem's "right" answer),
    "weighted" (majority voting weighted by "scores"). Seeds differ per problem (seed + its index)."""
    out = {}
    for n in ns:
        rates = []
        for i, p in enumerate(pools):
            if method == "score":
                rates.append(best_of_n_rate(p["scores"], p["correct"], n))
            elif method in ("majority", "weighted"):
                rates.append(majority_rate(p["answers"], p["right"], n,
                                           weights=p["scores"] if method == "weighted" else None,
                                           subsets=subsets, seed=seed + i))
            else:
                raise ValueError(f"method must be score, majority or weighted, got {method!r}")
        out[int(n)] = float(np.mean(rates)) if rates else float("nan")
    return out


# ------------------------------------------------------------------------------------------------ beam search
def first_step(continuation: str, separator: str = STEP_SEPARATOR) -> tuple[str, bool]:
    """(the next step, whether the solution ends with it): the text before the first separator, not final; with no
    separator, the whole text, final (the policy stopped there). Blank pieces before the step are skipped, as
    `split_steps` skips them (a policy that leaves a blank line between steps continues with the separator)."""
    rest = continuation
    while True:
        head, sep, tail = rest.partition(separator)
        if not sep or head.strip() or not tail.strip():
            return (head, False) if sep else (rest, True)
        rest = tail


def step_scores_of(scorer, prompts: list[str], step_lists: list[list[str]],
                   separator: str = STEP_SEPARATOR) -> list[list[float]]:
    """Step scores from a `ProcessScorer` (`score_steps`; a step past the PRM's context scores 0.0), an object with
    `step_scores(prompts, texts)`, or a function (prompts, step lists) -> step scores."""
    if hasattr(scorer, "score_steps"):
        return [[0.0 if v is None else float(v) for v in row] for row in scorer.score_steps(prompts, step_lists)]
    if hasattr(scorer, "step_scores"):
        return scorer.step_scores(prompts, [join_steps(s, separator) for s in step_lists])
    return scorer(prompts, step_lists)


def prm_beam_search(prompts: Sequence[str], continuer: Continuer, scorer, beam_width: int = 4, expand: int = 4,
                    max_steps: int = 8, aggregate: str = "min", is_final: Callable[[str], bool] | None = None,
                    separator: str = STEP_SEPARATOR) -> list[dict]:
    """Step-level beam search (see the module docstring). `scorer`: a `ProcessScorer` or a function (prompts, step
    lists) -> step scores (`step_scores_of`). `is_final(step)`: a step that ends the solution
    (e.g. an answer line). `separator`: the steps' (a PRM's own). Returns per prompt {"prompt", "completions":
    steps, "score", "finished", "text"}."""
    if beam_width < 1 or expand < 1 or max_steps < 1:
        raise ValueError("beam_width, expand and max_steps must be >= 1")
    beams: list[list[dict]] = [[{"steps": [], "finished": False, "score": 0.0}] for _ in prompts]
    for _ in range(max_steps):
        active = [(i, b) for i, bs in enumerate(beams) for b in bs if not b["finished"]]
        if not active:
            break
        conts = continuer([prompts[i] + join_steps(b["steps"], separator) for i, b in active], expand)
        pool: list[list[dict]] = [[b for b in bs if b["finished"]] for bs in beams]
        seen = [{tuple(b["steps"]) for b in p} for p in pool]
        fresh: list[tuple[int, dict]] = []
        for (i, b), texts in zip(active, conts, strict=True):
            for t in texts:
                step, final = first_step(t, separator)
                if step.strip():
                    steps = b["steps"] + [step]
                    final = final or (is_final is not None and is_final(step))
                elif b["steps"]:
                    steps, final = list(b["steps"]), True      # the policy stopped: the beam is done
                else:
                    continue
                if tuple(steps) in seen[i]:
                    continue
                seen[i].add(tuple(steps))
                fresh.append((i, {"steps": steps, "finished": final, "score": 0.0}))
        if fresh:
            scores = step_scores_of(scorer, [prompts[i] for i, _ in fresh], [c["steps"] for _, c in fresh],
                                    separator)
            for (i, c), s in zip(fresh, scores, strict=True):
                c["score"] = float(aggregate_step_scores([list(s)], aggregate)[0])
                pool[i].append(c)
        for i in range(len(prompts)):
            if pool[i]:
                beams[i] = sorted(pool[i], key=lambda c: -c["score"])[:beam_width]
            else:   # nothing new and nothing finished: the beams end as they are
                beams[i] = [{**b, "finished": True} for b in beams[i]]
    out = []
    for p, bs in zip(prompts, beams, strict=True):
        done = [b for b in bs if b["finished"] and b["steps"]] or [b for b in bs if b["steps"]] or bs
        best = max(done, key=lambda c: c["score"])
        out.append({"prompt": p, "completions": best["steps"], "score": best["score"], "finished": best["finished"],
                    "text": join_steps(best["steps"], separator) if best["steps"] else ""})
    return out

