"""Critic-free advantage estimators, sequence KL reward, token-loss aggregation weights, PPO's clip-higher and the k3
KL term's gradient: each against values worked out by hand (in each docstring), plus properties and gradient checks.
Groups are contiguous: row i is in group i // K."""
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.losses import (
    AGGREGATIONS,
    MovingAverageBaseline,
    grpo_advantages,
    kl_penalty,
    ppo_policy_loss,
    ppo_rewards,
    reinforce_advantages,
    rloo_advantages,
    sequence_kl_reward,
    token_loss_weights,
)

T = torch.tensor


# ---------------------------------------------------------------- REINFORCE with a baseline
def test_reinforce_advantages_by_hand():
    """scores [1, 0.5, −2], baseline 0.5 -> [0.5, 0, −2.5]; a per-row baseline [1, 1, −1] -> [0, −0.5, −1].
    The baseline is detached: the gradient goes to the scores only (d/dscores = 1), never to the baseline."""
    assert torch.equal(reinforce_advantages(T([1.0, 0.5, -2.0]), 0.5), T([0.5, 0.0, -2.5]))
    s = T([1.0, 0.5, -2.0], requires_grad=True)
    b = T([1.0, 1.0, -1.0], requires_grad=True)
    a = reinforce_advantages(s, b)
    assert torch.equal(a, T([0.0, -0.5, -1.0]))
    a.sum().backward()
    assert torch.equal(s.grad, torch.ones(3)) and b.grad is None


# ---------------------------------------------------------------- RLOO
def test_rloo_by_hand_excludes_own_reward():
    """Group [1, 2, 3, 6] (K = 4): each baseline is the mean of the OTHER three:
    A = [1 − (2+3+6)/3, 2 − (1+3+6)/3, 3 − (1+2+6)/3, 6 − (1+2+3)/3] = [1 − 11/3, 2 − 10/3, 3 − 3, 6 − 2]
      = [−2.6667, −1.3333, 0, 4]  ( = 4/3·(r − 3) ).
    Including the sample's own reward (r − group mean 3) would give [−2, −1, 0, 3]: must not."""
    a = rloo_advantages(T([1.0, 2.0, 3.0, 6.0]), 4)
    assert torch.allclose(a, T([-8 / 3, -4 / 3, 0.0, 4.0]), atol=1e-6)
    assert not torch.allclose(a, T([-2.0, -1.0, 0.0, 3.0]), atol=1e-3)


def test_rloo_groups_are_contiguous():
    """scores [0, 10, 1, 11], K = 2: groups are rows {0, 1} and {2, 3} (row i in group i // K):
    A = [0 − 10, 10 − 0, 1 − 11, 11 − 1] = [−10, 10, −10, 10]. Strided groups ({0, 2}, {1, 3}) would give
    [−1, −1, 1, 1]."""
    assert torch.equal(rloo_advantages(T([0.0, 10.0, 1.0, 11.0]), 2), T([-10.0, 10.0, -10.0, 10.0]))


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_size_errors(fn):
    """A group of one has no baseline; B must be whole groups; scores are [B]."""
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        fn(T([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        fn(T([1.0, 2.0]), 0)
    with pytest.raises(ValueError, match="not a whole number of groups"):
        fn(torch.arange(6.0), 4)
    with pytest.raises(ValueError, match="1-D"):
        fn(torch.zeros(2, 2), 2)


def _rloo_loop(scores, K):
    out = []
    for i, r in enumerate(scores):
        g = i // K
        others = [scores[j] for j in range(g * K, g * K + K) if j != i]
        out.append(r - sum(others) / len(others))
    return out


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_rloo_properties(K, G, seed):
    """Against a per-element leave-one-out loop; = K/(K−1)·(r − group mean); sums to 0 in each group; adding a
    constant to a group changes nothing."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(G * K, generator=g, dtype=torch.float64) * 3
    a = rloo_advantages(r, K)
    assert torch.allclose(a, T(_rloo_loop(r.tolist(), K), dtype=torch.float64), atol=1e-12)
    mean = r.view(G, K).mean(1, keepdim=True)
    assert torch.allclose(a, (K / (K - 1) * (r.view(G, K) - mean)).reshape(-1), atol=1e-12)
    assert torch.allclose(a.view(G, K).sum(1), torch.zeros(G, dtype=torch.float64), atol=1e-12)
    shift = torch.randn(G, 1, generator=g, dtype=torch.float64).expand(G, K).reshape(-1) * 10
    assert torch.allclose(rloo_advantages(r + shift, K), a, atol=1e-10)


def test_rloo_gradient():
    """dA_i/dr_i = 1, dA_i/dr_j = −1/(K−1) in the same group, 0 across groups. K = 3: the Jacobian has blocks
    [[1, −½, −½], [−½, 1, −½], [−½, −½, 1]] and zeros elsewhere."""
    r = torch.randn(6, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda x: rloo_advantages(x, 3), r)
    block = torch.full((3, 3), -0.5, dtype=torch.float64).fill_diagonal_(1.0)
    assert torch.allclose(jac, torch.block_diag(block, block))
    torch.autograd.gradcheck(lambda x: rloo_advantages(x, 3), (r,))


# ---------------------------------------------------------------- GRPO / Dr. GRPO
def test_grpo_by_hand():
    """Group [1, 2, 3, 6]: mean 3, r − mean = [−2, −1, 0, 3]; UNBIASED var = (4 + 1 + 0 + 9)/3 = 14/3,
    std = 2.160247; eps = 1e-4: A = [−2, −1, 0, 3]/2.160347 = [−0.925777, −0.462889, 0, 1.388666].
    (The population std √(14/4) = 1.870829 would give [−1.069, −0.535, 0, 1.604].)
    Dr. GRPO (scale="none"): A = r − mean = [−2, −1, 0, 3].
    K = 2, [0, 1]: r − mean = ±0.5, unbiased std = √0.5 = 0.707107: A = ±0.5/0.707207 = ±0.707007."""
    a = grpo_advantages(T([1.0, 2.0, 3.0, 6.0]), 4)
    assert torch.allclose(a, T([-0.925777, -0.462889, 0.0, 1.388666]), atol=1e-5)
    assert torch.equal(grpo_advantages(T([1.0, 2.0, 3.0, 6.0]), 4, scale="none"), T([-2.0, -1.0, 0.0, 3.0]))
    assert torch.allclose(grpo_advantages(T([0.0, 1.0]), 2), T([-0.707007, 0.707007]), atol=1e-5)
    # two groups, contiguous: [1, 2, 3, 6] then [0, 0, 1, 1] (mean ½, unbiased std √(1/3) = 0.577350)
    b = grpo_advantages(T([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0]), 4)
    half = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(b, T([-0.925777, -0.462889, 0.0, 1.388666, -half, -half, half, half]), atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(T([0.0, 1.0]), 2, scale="mad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_grpo_all_equal_group_is_exactly_zero(dtype, scale):
    """A group with one reward repeated has no signal: A = 0 exactly, no NaN, for 5, 1e6, 1e6 + 0.1 and 0.3 (K = 6).
    Float32 [1e6 + 0.1] * 3 is the hard case: its computed mean is off by 0.0625 and its computed std is 0.077, so a
    plain (r − mean)/(std + eps) gives −0.0625/0.0766 = −0.82 per row instead of 0. Even eps = 0 gives 0, not 0/0.
    A non-constant group next to it keeps its values ([0, 1, 2] -> [−1, 0, 1]/(1 + eps) with unbiased std 1)."""
    for value, K in [(5.0, 4), (1e6, 4), (1e6 + 0.1, 3), (0.3, 6)]:
        for eps in (1e-4, 0.0):
            a = grpo_advantages(torch.full((2 * K,), value, dtype=dtype), K, scale=scale, eps=eps)
            assert torch.equal(a, torch.zeros(2 * K, dtype=dtype)), (value, K, eps)
    mixed = grpo_advantages(T([7.0, 7.0, 7.0, 0.0, 1.0, 2.0], dtype=dtype), 3, scale=scale)
    d = 1.0 + 1e-4 if scale == "std" else 1.0
    assert torch.allclose(mixed, T([0.0, 0.0, 0.0, -1 / d, 0.0, 1 / d], dtype=dtype), atol=1e-6)
    assert not mixed.isnan().any()


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_grpo_properties(K, G, seed):
    """Against `statistics` per group (mean, sample stdev = unbiased); sums to 0 in each group; a group's permutation
    permutes its advantages; scale="none" is RLOO's advantage times (K−1)/K."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(G * K, generator=g, dtype=torch.float64) * 2 + 1
    a, dr = grpo_advantages(r, K), grpo_advantages(r, K, scale="none")
    want, want_dr = [], []
    for grp in r.view(G, K).tolist():
        m, s = statistics.fmean(grp), statistics.stdev(grp)
        want += [(x - m) / (s + 1e-4) for x in grp]
        want_dr += [x - m for x in grp]
    assert torch.allclose(a, T(want, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(dr, T(want_dr, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(a.view(G, K).sum(1), torch.zeros(G, dtype=torch.float64), atol=1e-10)
    perm = torch.randperm(K, generator=g)
    assert torch.allclose(grpo_advantages(r.view(G, K)[:, perm].reshape(-1), K), a.view(G, K)[:, perm].reshape(-1))
    assert torch.allclose(dr, rloo_advantages(r, K) * (K - 1) / K, atol=1e-12)


def test_grpo_gradient():
    """scale="none" is linear: dA_i/dr_j = δ_ij − 1/K in a group (K = 2: [[½, −½], [−½, ½]]); scale="std" passes
    gradcheck away from constant groups."""
    r = T([0.0, 1.0, 3.0, -1.0], dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda x: grpo_advantages(x, 2, scale="none"), r)
    block = T([[0.5, -0.5], [-0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(jac, torch.block_diag(block, block))
    torch.autograd.gradcheck(lambda x: grpo_advantages(x, 2), (r,))
    r3 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: grpo_advantages(x, 3), (r3,))


# ---------------------------------------------------------------- moving-average baseline
def test_moving_average_baseline_by_hand():
    """decay 0.9: None before any update; update(2) -> 2 (the first sets it); update(4) -> 0.9·2 + 0.1·4 = 2.2;
    update(0) -> 0.9·2.2 = 1.98. decay 0 keeps only the latest batch. A 0-d tensor is accepted as a float."""
    b = MovingAverageBaseline(0.9)
    assert b.value is None
    assert b.update(2.0) == 2.0 and b.value == 2.0
    assert b.update(4.0) == pytest.approx(2.2)
    assert b.update(T(0.0)) == pytest.approx(1.98) and isinstance(b.value, float)
    z = MovingAverageBaseline(0.0)
    z.update(3.0)
    assert z.update(-1.0) == -1.0
    assert MovingAverageBaseline().decay == 0.9


def test_moving_average_baseline_used_before_update():
    """The trainer's order: advantages with the value from BEFORE this batch, then update. Batch 1 scores [1, 3]
    (no value yet -> baseline 0): A = [1, 3]; value -> 2. Batch 2 scores [5, 7]: A = [5 − 2, 7 − 2] = [3, 5] (not
    [5 − 2.4, 7 − 2.4], which would include batch 2's own mean 6: 0.9·2 + 0.1·6 = 2.4); value -> 2.4."""
    b = MovingAverageBaseline(0.9)
    out = []
    for scores in (T([1.0, 3.0]), T([5.0, 7.0])):
        out.append(reinforce_advantages(scores, b.value if b.value is not None else 0.0))
        b.update(scores.mean())
    assert torch.equal(out[0], T([1.0, 3.0])) and torch.equal(out[1], T([3.0, 5.0]))
    assert b.value == pytest.approx(2.4)


def test_moving_average_baseline_state_and_errors():
    """state_dict round-trips the value, None included; decay outside [0, 1) is refused."""
    b = MovingAverageBaseline(0.5)
    b.update(1.0)
    b.update(3.0)
    c = MovingAverageBaseline(0.5)
    c.load_state_dict(b.state_dict())
    assert c.value == 2.0 and c.update(4.0) == b.update(4.0) == 3.0
    fresh = MovingAverageBaseline()
    c.load_state_dict(fresh.state_dict())
    assert c.value is None
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            MovingAverageBaseline(bad)


# ---------------------------------------------------------------- sequence-level KL in the reward
def test_sequence_kl_reward_by_hand():
    """β = 0.5. Row 0, mask [1, 1, 1, 0], score 2, KL [0.1, 0.2, 0.4, 9 (pad)]: 2 − 0.5·0.7 = 1.65.
    Row 1, mask [0, 0, 1, 1], score −1, KL [5 (pad), 5 (pad), 0.2, −0.2]: −1 − 0.5·0 = −1.
    Row 2, no real token, score 4: 4 (nothing to penalise). (Rows 0-1: the sums of ppo_rewards' per-token rewards.)"""
    scores = T([2.0, -1.0, 4.0])
    kl = T([[0.1, 0.2, 0.4, 9.0], [5.0, 5.0, 0.2, -0.2], [1.0, 1.0, 1.0, 1.0]])
    mask = T([[True, True, True, False], [False, False, True, True], [False] * 4])
    assert torch.allclose(sequence_kl_reward(scores, kl, mask, 0.5), T([1.65, -1.0, 4.0]), atol=1e-6)
    assert torch.allclose(sequence_kl_reward(scores, kl, mask.long(), 0.5), T([1.65, -1.0, 4.0]), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 9), st.floats(0.0, 2.0), st.integers(0, 2**31 - 1))
def test_sequence_kl_reward_is_the_sum_of_ppo_rewards(B, T_, beta, seed):
    """For every row with a real token: sequence_kl_reward = Σ_t ppo_rewards (score − β·Σ KL either way)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    kl = torch.randn(B, T_, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T_, generator=g) < 0.6
    mask[:, 0] = True
    assert torch.allclose(sequence_kl_reward(scores, kl, mask, beta), ppo_rewards(scores, kl, mask, beta)[0].sum(1),
                          atol=1e-10)


def test_sequence_kl_reward_gradient():
    """d/dscores = 1; d/dKL_t = −β on real tokens, 0 on padding."""
    mask = T([[True, True, False], [False, True, True]])
    s = torch.randn(2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    sequence_kl_reward(s, k, mask, 0.3).sum().backward()
    assert torch.equal(s.grad, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(k.grad, -0.3 * mask.double())
    torch.autograd.gradcheck(lambda a, b: sequence_kl_reward(a, b, mask, 0.3), (s, k))


# ---------------------------------------------------------------- token-loss aggregation weights
def test_token_loss_weights_by_hand():
    """mask [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]: 4 valid tokens, 3 sequences (row 2 empty);
    token losses [[1, 2, 3, 99], [4, 99, 99, 99], [99, ...]] (99 under the mask never counts).
      token-mean:              w = 1/4 on valid tokens;            Σ w·loss = (1+2+3+4)/4 = 2.5
      seq-mean-token-mean:     row 0: 1/(3·3) = 1/9, row 1: 1/(3·1) = 1/3, row 2: 0;  Σ = (2 + 4 + 0)/3 = 2
      seq-mean-token-sum:      w = 1/3;                            Σ = (6 + 4)/3 = 3.3333
      seq-mean-token-sum-norm: norm_length 4: w = 1/(3·4) = 1/12;  Σ = (6 + 4)/12 = 0.8333"""
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]).bool()
    loss = T([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [99.0] * 4])
    m = mask.float()
    want_w = {
        "token-mean": m / 4,
        "seq-mean-token-mean": m * T([[1 / 9], [1 / 3], [0.0]]),
        "seq-mean-token-sum": m / 3,
        "seq-mean-token-sum-norm": m / 12,
    }
    want_total = {"token-mean": 2.5, "seq-mean-token-mean": 2.0, "seq-mean-token-sum": 10 / 3,
                  "seq-mean-token-sum-norm": 10 / 12}
    assert set(AGGREGATIONS) == set(want_w) and len(AGGREGATIONS) == 4
    for agg in AGGREGATIONS:
        w = token_loss_weights(mask, agg, n_tokens=4, n_sequences=3, norm_length=4)
        assert w.dtype == torch.float32 and w.shape == (3, 4)
        assert torch.allclose(w, want_w[agg]), agg
        assert (w * loss).sum().item() == pytest.approx(want_total[agg], abs=1e-6), agg
        # counts given as tensors (e.g. all-reduced) work the same
        wt = token_loss_weights(mask, agg, n_tokens=T(4), n_sequences=T(3.0), norm_length=4)
        assert torch.allclose(wt, w)


def test_token_loss_weights_errors_and_empty():
    """Unknown aggregation lists the four; -norm needs norm_length >= 1; an all-empty batch (0 counts) gives 0s."""
    mask = T([[True, False]])
    with pytest.raises(ValueError) as e:
        token_loss_weights(mask, "seq-mean", 1, 1)
    assert all(a in str(e.value) for a in AGGREGATIONS)
    for bad in (None, 0):
        with pytest.raises(ValueError, match="norm_length"):
            token_loss_weights(mask, "seq-mean-token-sum-norm", 1, 1, norm_length=bad)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for agg in AGGREGATIONS:
        w = token_loss_weights(empty, agg, n_tokens=0, n_sequences=0, norm_length=3)
        assert torch.equal(w, torch.zeros(2, 3))


def _aggregate_directly(loss, mask, agg, L):
    """The definitions, written per sequence: token-mean = Σ/N; the seq-mean ones = mean over rows."""
    m = mask.double()
    if agg == "token-mean":
        return (loss * m).sum() / m.sum().clamp(min=1)
    row_sum = (loss * m).sum(1)
    if agg == "seq-mean-token-mean":
        return (row_sum / m.sum(1).clamp(min=1)).mean()
    if agg == "seq-mean-token-sum":
        return row_sum.mean()
    return row_sum.mean() / L


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.integers(1, 10), st.integers(1, 7), st.integers(0, 2**31 - 1),
       st.sampled_from(AGGREGATIONS))
def test_token_loss_weights_micro_batches_add_up(B, T_, cut, seed, agg):
    """Split a batch in two micro-batches at any row, each weighted with the GLOBAL counts: the two weighted sums add
    up to the whole batch's, which is the aggregation's definition (per-sequence means/sums written directly).
    Masked positions get weight 0."""
    cut = min(cut, B - 1)
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T_, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T_, generator=g) < 0.6
    n_tok, n_seq, L = int(mask.sum()), B, T_ + 2

    def weighted(rows):
        w = token_loss_weights(mask[rows], agg, n_tokens=n_tok, n_sequences=n_seq, norm_length=L)
        assert (w[~mask[rows]] == 0).all()
        return (w.double() * loss[rows]).sum()

    whole = weighted(slice(None))
    assert (weighted(slice(0, cut)) + weighted(slice(cut, B))).item() == pytest.approx(whole.item(), abs=1e-5)
    assert whole.item() == pytest.approx(_aggregate_directly(loss, mask, agg, L).item(), abs=1e-5)


# ---------------------------------------------------------------- PPO clip-higher (DAPO)
def test_ppo_policy_loss_clip_higher_by_hand():
    """ε_low = 0.2, ε_high = 0.28, so ρ is clipped to [0.8, 1.28].
    Token 0: ρ = 1.25, A = 1: unclipped −1.25, clipped −1.25 -> −1.25, not clipped (symmetric ε = 0.2: −1.2, clipped).
    Token 1: ρ = 1.3, A = 1: unclipped −1.3, clipped −1.28 -> max = −1.28, clipped.
    Token 2: ρ = 0.7, A = −1: unclipped 0.7, clipped 0.8 -> 0.8, clipped (the low side stays at 0.2).
    Token 3: ρ = 0.85, A = −1: 0.85 both -> 0.85, not clipped.
    Gradient w.r.t. log π: −A·ρ where not clipped (token 0: −1.25; token 3: 0.85), 0 where clipped."""
    lp = torch.log(T([[1.25, 1.3, 0.7, 0.85]], dtype=torch.float64)).requires_grad_()
    adv = T([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    old = torch.zeros(1, 4, dtype=torch.float64)
    loss, clipped, _ = ppo_policy_loss(lp, old, adv, 0.2, clip_range_high=0.28)
    assert torch.allclose(loss, T([[-1.25, -1.28, 0.8, 0.85]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(clipped, T([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64))
    loss.sum().backward()
    assert torch.allclose(lp.grad, T([[-1.25, 0.0, 0.0, 0.85]], dtype=torch.float64), atol=1e-12)
    sym, sym_clipped, _ = ppo_policy_loss(lp.detach(), old, adv, 0.2)
    assert torch.allclose(sym, T([[-1.2, -1.2, 0.8, 0.85]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(sym_clipped, T([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64))


def test_ppo_policy_loss_clip_range_high_none_is_symmetric():
    """clip_range_high=None is exactly the symmetric clip (the present behaviour), also passed positionally."""
    g = torch.Generator().manual_seed(0)
    lp, old, adv = (torch.randn(3, 7, generator=g) * 0.3 for _ in range(3))
    base = ppo_policy_loss(lp, old, adv, 0.2)
    for other in (ppo_policy_loss(lp, old, adv, 0.2, clip_range_high=0.2), ppo_policy_loss(lp, old, adv, 0.2, None)):
        assert all(torch.equal(x, y) for x, y in zip(base, other, strict=True))


# ---------------------------------------------------------------- the k3 KL term's gradient
def test_k3_gradient_by_hand():
    """k3 = e^ℓ − 1 − ℓ with ℓ = ref − logp; d k3/d logp = −e^ℓ + 1 = 1 − exp(ref − logp).
    logp = −1, ref = −2: ℓ = −1, grad = 1 − e^−1 = 0.632121 (π above π_ref: pushed down).
    logp = −2, ref = −1: ℓ = 1, grad = 1 − e = −1.718282 (π below π_ref: pushed up).
    logp = ref = −0.5: k3 = 0 and its gradient is 0."""
    lp = T([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref = T([-2.0, -1.0, -0.5], dtype=torch.float64)
    k3 = kl_penalty(lp, ref, "k3")
    assert k3[2].item() == 0.0
    k3.sum().backward()
    assert torch.allclose(lp.grad, T([0.632121, -1.718282, 0.0], dtype=torch.float64), atol=1e-6)
    assert lp.grad[2].item() == 0.0
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, dtype=torch.float64)
    kl_penalty(x, r, "k3").sum().backward()
    assert torch.allclose(x.grad, 1 - torch.exp(r - x.detach()))
