"""KTO, Kahneman-Tversky optimisation (Ethayarajh et al. 2024): a loss on unpaired examples, each completion labelled
desirable (thumbs up) or undesirable (thumbs down), defined as TRL 1.16's `KTOTrainer` defines it (loss_type "kto").

Shapes: B = examples (rows) of the batch; log-probs are sums over completion tokens, one per row.

    r_θ(x, y)  = log π_θ(y|x) − log π_ref(y|x)                                        (the log-ratio)
    z₀         = max(0, mean over mismatched pairs (x_i, y_j), j ≠ i, of r_θ(x_i, y_j)), not differentiated
    desirable:   λ_D · (1 − σ(β · (r_θ(x, y) − z₀)))
    undesirable: λ_U · (1 − σ(β · (z₀ − r_θ(x, y))))

z₀ is the reference point of prospect theory, an estimate of KL(π_θ ‖ π_ref): the mean log-ratio of completions
paired with prompts they were not written for. `kto_reference_point` computes it (a masked mean, over several
processes with `reduce`); `kto_loss` takes it as a number. The paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3].
"""
from __future__ import annotations

import torch

from alignloop.losses.masked import Reduce, masked_mean


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, mask: torch.Tensor | None = None,
                        reduce: Reduce | None = None) -> torch.Tensor:
    """z₀ = max(0, mean(policy_kl_logps − ref_kl_logps)) over the masked rows -> a scalar, detached.

    policy_kl_logps, ref_kl_logps [B]: log-prob sums of mismatched (prompt, completion) pairs under the policy and the
    reference. `reduce` sums the partial sums over processes (`alignloop.losses.masked`): the mean of the whole
    global batch, as TRL gathers it. Clamped at 0 (a KL is never negative; the estimate can be) and detached: no
    gradient flows through the reference point."""
    diff = (policy_kl_logps - ref_kl_logps).detach()
    mask = torch.ones_like(diff, dtype=torch.bool) if mask is None else mask
    return masked_mean(diff, mask, reduce=reduce).clamp(min=0.0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             reference_point: torch.Tensor | float, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO losses of B unpaired rows -> (losses [B], rewards [B]); rewards = β·(log π − log π_ref), detached, for
    logging (TRL's rewards/chosen and rewards/rejected are their means over the desirable / undesirable rows).

    desirable [B] bool: True = a desirable completion (label true, thumbs up). reference_point: z₀ (a number or a
    scalar tensor; detached here in any case), from `kto_reference_point`.
        desirable row:   λ_D · (1 − σ(β·(r − z₀)))
        undesirable row: λ_U · (1 − σ(β·(z₀ − r)))        r = policy_logps − ref_logps
    TRL's training loss is the mean of these over the batch's rows."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logratio = policy_logps - ref_logps
    z0 = torch.as_tensor(reference_point, dtype=logratio.dtype, device=logratio.device).detach()
    good = 1 - torch.sigmoid(beta * (logratio - z0))
    bad = 1 - torch.sigmoid(beta * (z0 - logratio))
    losses = torch.where(desirable.bool(), desirable_weight * good, undesirable_weight * bad)
    return losses, beta * logratio.detach()
