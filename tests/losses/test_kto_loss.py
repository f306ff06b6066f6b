"""KTO loss (`alignloop.losses.kto_loss`, `kto_reference_point`) against TRL 1.16's definition worked out by hand,
plus properties and gradient checks."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.losses import kto_loss, kto_reference_point

T = torch.tensor


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_hand_worked():
    """Four rows, β = 0.1, λ_D = 1, λ_U = 1.5 (TRL: losses = cat(λ_D·chosen_losses, λ_U·rejected_losses)).

    Mismatched pairs: policy [-20, -15, -9, -30], reference [-21, -15.5, -9, -29.5] -> log-ratios [1, 0.5, 0, -0.5],
    mean 0.25 -> z₀ = max(0, 0.25) = 0.25.
    Rows (policy, reference, label) -> log-ratio r:
      0: (-10, -12, up)   r = 2:    u = 0.1·(2 − 0.25) = 0.175;  e^-0.175 = 0.839457, σ = 1/1.839457 = 0.543639
                                    loss = 1 · (1 − 0.543639) = 0.456361
      1: (-6, -5.5, up)   r = -0.5: u = 0.1·(-0.5 − 0.25) = -0.075; σ(-0.075) = 1/(1 + 1.077884) = 0.481259
                                    loss = 1 − 0.481259 = 0.518741
      2: (-8, -7, down)   r = -1:   u = 0.1·(0.25 − (-1)) = 0.125; σ = 1/(1 + 0.882497) = 0.531209
                                    loss = 1.5 · (1 − 0.531209) = 1.5 · 0.468791 = 0.703186
      3: (-9, -11, down)  r = 2:    u = 0.1·(0.25 − 2) = -0.175; σ = 1 − 0.543639 = 0.456361
                                    loss = 1.5 · 0.543639 = 0.815458
    rewards = β·r = [0.2, -0.05, -0.1, 0.2]; TRL's loss = mean = (0.456361 + 0.518741 + 0.703186 + 0.815458)/4
    = 0.623437."""
    z0 = kto_reference_point(T([-20.0, -15.0, -9.0, -30.0]), T([-21.0, -15.5, -9.0, -29.5]))
    assert z0.item() == pytest.approx(0.25, abs=1e-7)
    losses, rewards = kto_loss(T([-10.0, -6.0, -8.0, -9.0]), T([-12.0, -5.5, -7.0, -11.0]),
                               T([True, True, False, False]), z0, beta=0.1, desirable_weight=1.0,
                               undesirable_weight=1.5)
    assert losses.tolist() == pytest.approx([0.456361, 0.518741, 0.703186, 0.815458], abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.2, -0.05, -0.1, 0.2], abs=1e-6)
    assert losses.mean().item() == pytest.approx(0.623437, abs=1e-6)
    # the same from the formula in float64
    for loss, (p, r, up) in zip(losses.tolist(), [(-10, -12, 1), (-6, -5.5, 1), (-8, -7, 0), (-9, -11, 0)],
                                strict=True):
        want = 1 - sig(0.1 * (p - r - 0.25)) if up else 1.5 * (1 - sig(0.1 * (0.25 - (p - r))))
        assert loss == pytest.approx(want, abs=1e-6)


def test_reference_point_is_clamped_at_zero_masked_and_reduced():
    """Mismatched log-ratios [-1, -2] (mean -1.5) -> z₀ = 0, not -1.5. A mask keeps rows: [3, (-1 masked out)] -> 3.
    `reduce` sums (numerator, count) over processes: two shards [1] and [2, 3] -> (1 + 5) / 3 = 2, as one batch."""
    assert kto_reference_point(T([-11.0, -12.0]), T([-10.0, -10.0])).item() == 0.0
    assert kto_reference_point(T([3.0, -1.0]), T([0.0, 0.0]), mask=T([True, False])).item() == pytest.approx(3.0)
    other = T([2.0 + 3.0, 2.0])  # the other process's (sum, count)
    z = kto_reference_point(T([1.0]), T([0.0]), reduce=lambda t: t + other)
    assert z.item() == pytest.approx(2.0)
    # with z₀ = 0 the loss is TRL's with kl = 0: a desirable row at r = 0 loses 1 − σ(0) = 0.5
    losses, _ = kto_loss(T([-4.0]), T([-4.0]), T([True]), 0.0, beta=0.1)
    assert losses.item() == pytest.approx(0.5)


def test_reference_point_and_loss_gradients():
    """No gradient through z₀; d loss / d log π = −λ_D·β·σ(u)(1−σ(u)) for a desirable row (u = β(r − z₀)) and
    +λ_U·β·σ(v)(1−σ(v)) for an undesirable one (v = β(z₀ − r)). Row 0: u = 0.175, σ = 0.543639 ->
    −1 · 0.1 · 0.543639 · 0.456361 = −0.024810; row 1 (down, λ_U = 2): v = 0.1 · (0.25 − 0.5) = −0.025,
    σ = 0.493750 -> 2 · 0.1 · 0.493750 · 0.506250 = 0.049992. The reference gets the opposite gradient."""
    kl_pol = T([1.0, 0.0], requires_grad=True)
    z0 = kto_reference_point(kl_pol, T([0.75, -0.25]))
    assert not z0.requires_grad and z0.item() == pytest.approx(0.25)
    pol = T([-10.0, -7.0], requires_grad=True)
    ref = T([-12.0, -7.5], requires_grad=True)
    losses, rewards = kto_loss(pol, ref, T([True, False]), z0, beta=0.1, undesirable_weight=2.0)
    assert not rewards.requires_grad
    losses.sum().backward()
    assert pol.grad.tolist() == pytest.approx([-0.024810, 0.049992], abs=1e-6)
    assert ref.grad.tolist() == pytest.approx([0.024810, -0.049992], abs=1e-6)
    assert kl_pol.grad is None
    # float64 gradcheck of the loss in the log-probs
    d = T([True, False, True])
    torch.autograd.gradcheck(lambda p, r: kto_loss(p, r, d, 0.3, 0.5, 1.2, 0.7)[0],
                             (torch.randn(3, dtype=torch.float64, requires_grad=True),
                              torch.randn(3, dtype=torch.float64, requires_grad=True)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=6), st.floats(0.0, 20.0), st.floats(0.01, 2.0),
       st.floats(0.1, 3.0), st.floats(0.1, 3.0))
def test_kto_properties(ratios, z0, beta, wd, wu):
    """Each loss lies in [0, λ] of its class; a desirable loss falls and an undesirable one rises as the log-ratio
    grows; the two labels' losses, each divided by its λ, sum to 1 (σ(a) + σ(−a) = 1); at r = z₀ a loss is λ/2."""
    r = torch.tensor(ratios, dtype=torch.float64)
    zeros = torch.zeros_like(r)
    up, down = torch.ones_like(r, dtype=torch.bool), torch.zeros_like(r, dtype=torch.bool)
    lu, _ = kto_loss(r, zeros, up, z0, beta, wd, wu)
    ld, _ = kto_loss(r, zeros, down, z0, beta, wd, wu)
    assert ((lu >= 0) & (lu <= wd + 1e-12)).all() and ((ld >= 0) & (ld <= wu + 1e-12)).all()
    lu2, _ = kto_loss(r + 1.0, zeros, up, z0, beta, wd, wu)
    ld2, _ = kto_loss(r + 1.0, zeros, down, z0, beta, wd, wu)
    assert (lu2 <= lu + 1e-12).all() and (ld2 >= ld - 1e-12).all()
    torch.testing.assert_close(lu / wd + ld / wu, torch.ones_like(r))   # σ(a) + σ(−a) = 1
    at_z0, _ = kto_loss(torch.full((1,), z0, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                        torch.ones(1, dtype=torch.bool), z0, beta)
    assert at_z0.item() == pytest.approx(0.5)


def test_kto_loss_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        kto_loss(T([0.0]), T([0.0]), T([True]), 0.0, beta=0.0)
