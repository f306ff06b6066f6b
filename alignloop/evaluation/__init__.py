"""Evaluating policies: samples, reward, KL to a reference, win rate, best-of-N (`alignloop eval`).

    evaluate.py   Samples, load_policy, sample_policy (through alignloop.rollout), score (through alignloop.scoring
                  scorers), summarize, best_of_n / first_of_each (from scored candidates), evaluate_policy,
                  people_win_rate (people's judgements of policy vs reference pairs in the feedback store)
    metrics.py    mean, sem, win_rate, best_of_n_kl
"""
from alignloop.evaluation.evaluate import (
    Samples,
    best_of_n,
    evaluate_policy,
    first_of_each,
    load_policy,
    people_win_rate,
    sample_policy,
    score,
    summarize,
)
from alignloop.evaluation.metrics import best_of_n_kl, mean, sem, win_rate

__all__ = [
    "Samples",
    "best_of_n",
    "best_of_n_kl",
    "evaluate_policy",
    "first_of_each",
    "load_policy",
    "mean",
    "people_win_rate",
    "sample_policy",
    "score",
    "sem",
    "summarize",
    "win_rate",
]
