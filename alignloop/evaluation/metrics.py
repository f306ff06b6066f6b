"""Small evaluation statistics: mean, standard error, win rate, and the KL of best-of-N."""
from __future__ import annotations

import math
from collections.abc import Sequence

from alignloop.errors import ConfigError


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty list (an absent figure, printed as "–" in reports)."""
    return sum(xs) / len(xs) if xs else float("nan")


def sem(xs: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / √n); NaN below two values."""
    if len(xs) < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def win_rate(policy: Sequence[float], reference: Sequence[float]) -> float:
    """Share of paired samples where the policy scores higher (ties ½)."""
    if len(policy) != len(reference) or not policy:
        raise ValueError("win_rate needs two non-empty score lists of the same length")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy, reference, strict=True)) / len(policy)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N || base policy) = log N - (N-1)/N nats (0 for N = 1): Stiennon et al. 2020's formula, an upper
    bound (Beirami et al. 2024)."""
    if n < 1:
        raise ConfigError(f"best_of must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n
