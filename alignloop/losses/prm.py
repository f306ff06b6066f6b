"""Per-step losses of a process reward model (PRM), read at step-end positions: pure functions, unreduced [B,T],
zero where the mask is False. Reduce with `masked_mean` (a mean over the labelled steps) or a sum over a count.

Shapes: B = batch of solutions, T = tokens, C = classes (3: bad, neutral, good). A step's label is +1 (good),
0 (neutral) or -1 (bad); `mask` is True at the step-end positions that carry a label (everything else: not scored).

    targets, mask = step_targets(labels, mask, neutral=1.0)      # BCE targets: good 1, bad 0, neutral `neutral`
    loss = step_bce_loss(logits[B,T], targets, mask)              # soft targets in 0..1 allowed
    loss = step_ce_loss(logits[B,T,3], labels, mask)              # 3 classes: bad / neutral / good
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PRM_CLASSES = ("bad", "neutral", "good")   # class index = label + 1
NEUTRAL_TARGET = 1.0


def label_classes(labels: torch.Tensor) -> torch.Tensor:
    """Labels +1/0/-1 -> class indices 2/1/0 (`PRM_CLASSES`)."""
    return labels.long() + 1


def step_targets(labels: torch.Tensor, mask: torch.Tensor,
                 neutral: float | None = NEUTRAL_TARGET) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE targets [B,T] float and the mask [B,T] bool of the steps that are trained: good -> 1, bad -> 0, neutral ->
    `neutral` (a number in 0..1), or left out of the mask when `neutral` is None.

    The default, 1.0, counts a neutral step (reasonable but not moving the solution on, PRM800K's 0) as not an
    error, as the first-error metric and the outcome view do. Positions where `mask` is False get target 0."""
    if neutral is not None and not 0.0 <= neutral <= 1.0:
        raise ValueError(f"neutral target must be in 0..1 or None, got {neutral}")
    mask = mask.bool()
    targets = torch.where(labels > 0, 1.0, 0.0).to(torch.get_default_dtype())
    if neutral is None:
        mask = mask & (labels != 0)
    else:
        targets = torch.where(labels == 0, neutral, targets)
    return torch.where(mask, targets, 0.0), mask


def step_bce_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each step's logit [B,T] against its target [B,T] (1 good, 0 bad, or a soft target in
    0..1): -(y·log σ(z) + (1-y)·log(1-σ(z))) -> [B,T], 0 where `mask` is False (computed in float32 or wider).
    Logit 0, target 1: log 2 = 0.6931; logit ln 3 (σ = 0.75), target 0: -log 0.25 = 1.3863."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    y = torch.where(mask, targets.to(z.dtype), 0.5)   # masked positions: any valid target, zeroed below
    loss = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    return torch.where(mask, loss, torch.zeros_like(loss))


def step_ce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """3-class cross-entropy of each step's logits [B,T,3] (bad, neutral, good) against its label [B,T] (+1/0/-1):
    -log softmax(z)[label + 1] -> [B,T], 0 where `mask` is False. Logits 0,0,0: log 3 = 1.0986 whatever the label;
    logits (0, ln 2, 0) (probabilities 1/4, 1/2, 1/4), label -1: -log 1/4 = 1.3863."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    classes = torch.where(mask, label_classes(labels), 1).clamp(0, z.shape[-1] - 1)
    loss = -torch.log_softmax(z, -1).gather(-1, classes.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, loss, torch.zeros_like(loss))


def good_probability(logits: torch.Tensor) -> torch.Tensor:
    """The probability that a step is good, from the head's logits [..., C]: C = 1 (BCE) σ(z); C = 3 (CE)
    1 - P(bad) (a neutral step is not an error, as `step_targets`' default). -> [...] float32 (or wider)."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if z.shape[-1] == 1:
        return torch.sigmoid(z[..., 0])
    if z.shape[-1] == len(PRM_CLASSES):
        return 1.0 - torch.softmax(z, -1)[..., 0]
    raise ValueError(f"a PRM head has 1 (BCE) or 3 (CE) outputs, this one has {z.shape[-1]}")
