"""The PRM's per-step losses by hand (BCE with hard, neutral and soft targets; 3-class cross-entropy), their masks,
and gradient checks in float64."""
from __future__ import annotations

import math

import pytest
import torch

from alignloop.losses import (
    PRM_CLASSES,
    good_probability,
    label_classes,
    masked_mean,
    step_bce_loss,
    step_ce_loss,
    step_targets,
)


def test_targets_good_bad_neutral_and_unlabelled():
    labels = torch.tensor([[1, 0, -1, 0, 1]])
    mask = torch.tensor([[True, True, True, False, False]])    # the last two: not step ends / no label
    t, m = step_targets(labels, mask)                            # default: neutral counts as good (1.0)
    assert t.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]] and m.tolist() == mask.tolist()
    t, m = step_targets(labels, mask, neutral=0.5)
    assert t.tolist() == [[1.0, 0.5, 0.0, 0.0, 0.0]]
    t, m = step_targets(labels, mask, neutral=None)              # neutral left out
    assert m.tolist() == [[True, False, True, False, False]]
    with pytest.raises(ValueError, match="neutral target"):
        step_targets(labels, mask, neutral=2.0)


def test_bce_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0), math.log(3.0), 7.0]])
    targets = torch.tensor([[1.0, 0.0, 0.5, 1.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss = step_bce_loss(logits, targets, mask)
    # logit 0 -> p 1/2: -log 1/2; logit ln 3 -> p 3/4: target 0 -> -log 1/4; target 1/2 -> -(log 3/4 + log 1/4)/2
    expected = [math.log(2), -math.log(0.25), -(math.log(0.75) + math.log(0.25)) / 2, 0.0]
    assert loss[0].tolist() == pytest.approx(expected, abs=1e-6)
    # masked positions contribute nothing, whatever their (even invalid) target
    assert step_bce_loss(logits, torch.tensor([[1.0, 0.0, 0.5, 5.0]]), mask)[0, 3] == 0
    assert masked_mean(loss, mask).item() == pytest.approx(sum(expected[:3]) / 3, abs=1e-6)


def test_ce_by_hand():
    assert PRM_CLASSES == ("bad", "neutral", "good")
    assert label_classes(torch.tensor([-1, 0, 1])).tolist() == [0, 1, 2]
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [0.0, math.log(2.0), 0.0],
                            [9.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, -1, 0, 5]])                     # the last label is junk, but masked out
    mask = torch.tensor([[True, True, True, False]])
    loss = step_ce_loss(logits, labels, mask)
    # probabilities (1/3, 1/3, 1/3) and (1/4, 1/2, 1/4)
    assert loss[0].tolist() == pytest.approx([math.log(3), -math.log(0.25), -math.log(0.5), 0.0], abs=1e-6)


def test_good_probability():
    assert good_probability(torch.tensor([[0.0], [math.log(3.0)]])).tolist() == pytest.approx([0.5, 0.75])
    # 3 classes: 1 - P(bad); (1/4, 1/2, 1/4) -> 3/4
    assert good_probability(torch.tensor([0.0, math.log(2.0), 0.0])).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="1 \\(BCE\\) or 3 \\(CE\\)"):
        good_probability(torch.zeros(2, 2))


def test_half_precision_logits_computed_in_float32():
    logits = torch.tensor([[0.0, 2.0]], dtype=torch.bfloat16)
    loss = step_bce_loss(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([[True, True]]))
    assert loss.dtype == torch.float32


def test_gradcheck_float64():
    torch.manual_seed(0)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    targets = torch.tensor([[1.0, 0.0, 0.3, 0.0], [0.0, 1.0, 0.5, 1.0]], dtype=torch.float64)
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: step_bce_loss(x, targets, mask), (z,))
    labels = torch.tensor([[1, 0, -1, 1], [-1, 1, 0, 0]])
    z3 = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: step_ce_loss(x, labels, mask), (z3,))
    # the BCE gradient by hand: d/dz = σ(z) - y on a step, 0 off it
    loss = step_bce_loss(z, targets, mask).sum()
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.allclose(grad, torch.where(mask, torch.sigmoid(z) - targets, 0.0).detach())
