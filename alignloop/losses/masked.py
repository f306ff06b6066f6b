"""Masked reductions: the one place where losses are reduced.

Shapes: x and mask broadcast together; mask is bool or 0/1 (True = the element counts).

Across processes: every reduction takes an optional `reduce`, a function that sums a tensor of partial sums over the
processes (an all-reduce with op SUM, e.g. `lambda t: accelerator.reduce(t, "sum")`). With it the result is that of
the whole global batch, each process passing its own shard: `masked_mean(x, mask, reduce=all_sum)` is the global
mean (Σ sums / Σ counts, not a mean of per-process means). Default None: this process's tensors only. The functions
stay pure otherwise; `reduce` is called the same number of times, in the same order, on every process.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
               reduce: Reduce | None = None) -> torch.Tensor:
    """Sum of x over the positions where mask is True (all of them if dim is None); with `reduce`, summed over the
    processes too."""
    m = mask.to(x.dtype)
    s = (x * m).sum() if dim is None else (x * m).sum(dim=dim)
    return s if reduce is None else reduce(s)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                reduce: Reduce | None = None) -> torch.Tensor:
    """Mean over the masked positions. An empty mask gives 0 (not NaN), so an all-padding micro-batch adds nothing.
    With `reduce`: Σ_processes sum / Σ_processes count (one call of `reduce` on both, stacked)."""
    m = mask.to(x.dtype)
    if dim is None:
        num, den = (x * m).sum(), m.sum()
    else:
        num, den = (x * m).sum(dim=dim), m.sum(dim=dim)
    if reduce is not None:
        num, den = reduce(torch.stack([num, den.to(num.dtype)]))
    return num / den.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False,
               reduce: Reduce | None = None) -> torch.Tensor:
    """Variance over the masked positions; population variance by default (the RLHF reproductions whiten with it).
    Two passes (mean, then mean squared deviation), each over every process when `reduce` is given."""
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_mean((x - mean) ** 2, mask, reduce=reduce)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if reduce is not None:
            n = reduce(n)
        if n < 2:
            raise ValueError("unbiased variance needs at least two masked elements")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Reduce | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions (of every process with `reduce`). With shift_mean=False
    the mean is kept (reward whitening must not change the sign of rewards). Masked-out positions come back as 0."""
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_mean((x - mean) ** 2, mask, reduce=reduce)  # = masked_var, without recomputing the mean
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Largest x over the masked positions (a scalar); 0 for an empty mask."""
    m = mask.bool()
    if not m.any():
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(m, x, torch.full_like(x, float("-inf"))).max()
