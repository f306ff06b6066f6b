"""Every loss against values worked out by hand (in each docstring), plus properties and gradient checks."""
import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.losses import (
    AdaptiveKLController,
    FixedKLController,
    best_of_k_loss,
    bradley_terry_loss,
    center_rewards_penalty,
    dpo_loss,
    entropy_from_logits,
    gae,
    implicit_reward,
    kl_penalty,
    logprobs_from_logits,
    masked_max,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    plackett_luce_loss,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
)

T = torch.tensor


def sig(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- masked reductions
def test_masked_reductions_by_hand():
    """x = [1, 2, 3, 100], mask = [1, 1, 1, 0]: sum 6, mean 2, population var ((1+0+1)/3) = 2/3,
    unbiased var 1; whiten: (x-2)/sqrt(2/3) = [-1.2247, 0, 1.2247, 0 (masked)]."""
    x, m = T([1.0, 2.0, 3.0, 100.0]), T([True, True, True, False])
    assert masked_sum(x, m).item() == 6.0
    assert masked_mean(x, m).item() == 2.0
    assert masked_var(x, m).item() == pytest.approx(2 / 3)
    assert masked_var(x, m, unbiased=True).item() == pytest.approx(1.0)
    w = masked_whiten(x, m)
    assert torch.allclose(w, T([-1.224744, 0.0, 1.224744, 0.0]), atol=1e-5)
    # shift_mean=False keeps the mean: (x-2)/sqrt(2/3) + 2
    assert torch.allclose(masked_whiten(x, m, shift_mean=False)[:3], T([0.775256, 2.0, 3.224744]), atol=1e-5)


def test_masked_mean_dim_and_empty_mask():
    """Row 0: (1+2)/2 = 1.5; row 1 has an empty mask -> 0, not NaN."""
    x = T([[1.0, 2.0, 9.0], [4.0, 5.0, 6.0]])
    m = T([[1, 1, 0], [0, 0, 0]])
    assert torch.equal(masked_mean(x, m, dim=1), T([1.5, 0.0]))
    assert torch.equal(masked_sum(x, m, dim=1), T([3.0, 0.0]))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=2, max_size=20), st.integers(0, 2**31 - 1))
def test_whiten_property(values, seed):
    """Whitened masked values have mean 0 and population std 1 (when not constant); padding never matters."""
    x = T(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(len(values), generator=g) < 0.7
    m[:2] = True
    if masked_var(x, m) < 1e-3:  # eps = 1e-8 in the denominator visibly shrinks near-constant inputs
        return
    w = masked_whiten(x, m)
    assert masked_mean(w, m).abs().item() < 1e-6
    assert masked_var(w, m).item() == pytest.approx(1.0, rel=1e-4)
    x2 = x.clone()
    x2[~m] = 1e6  # what sits under the mask is irrelevant
    assert torch.allclose(masked_whiten(x2, m), w)


class _ThreadAllReduce:
    """Stands in for an all-reduce (op SUM) between `n` processes, each running in a thread: a call blocks until
    every worker has made its call, then each gets the sum of the n tensors (added in rank order, so all get the
    same bits)."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots: list = [None] * n

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t
            self.barrier.wait()
            out = sum(self.slots[1:], self.slots[0])
            self.barrier.wait()  # nobody overwrites a slot before everyone has read them
            return out
        return reduce


def _on_shards(fn, shards):
    """fn(*shard, reduce) on each shard in its own thread, all joined by one simulated all-reduce -> results."""
    allreduce, out = _ThreadAllReduce(len(shards)), [None] * len(shards)

    def work(rank):
        try:
            out[rank] = fn(*shards[rank], allreduce.for_rank(rank))
        finally:
            if out[rank] is None:  # this worker failed: release the others instead of leaving them waiting
                allreduce.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o is not None for o in out), "a worker failed (its traceback is printed above)"
    return out


@pytest.mark.parametrize("seed", range(3))
def test_masked_reductions_split_with_summing_reduce_equal_the_whole_batch(seed):
    """A batch split over 3 'processes' (uneven shards, one with an all-False mask) with a summing `reduce` gives
    what the whole batch gives alone: global sum, mean (Σ sums / Σ counts, not a mean of means), variance, whitening."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.rand(7, 5, generator=g) < 0.6
    mask[0, 0] = mask[1, 0] = True
    mask[5] = False  # a shard's row with nothing to count
    cuts = [(0, 3), (3, 4), (4, 7)]
    shards = [(x[a:b], mask[a:b]) for a, b in cuts]
    assert shards[1][1].sum() <= 5

    def run(xs, ms, reduce):
        return (masked_sum(xs, ms, reduce=reduce), masked_mean(xs, ms, reduce=reduce),
                masked_mean(xs, ms, dim=0, reduce=reduce), masked_var(xs, ms, reduce=reduce),
                masked_var(xs, ms, unbiased=True, reduce=reduce), masked_whiten(xs, ms, reduce=reduce),
                masked_whiten(xs, ms, shift_mean=False, reduce=reduce))

    whole = run(x, mask, None)
    parts = _on_shards(run, shards)
    for k in range(5):  # the scalar reductions (and the per-column mean): every shard holds the global value
        for p in parts:
            assert torch.allclose(p[k], whole[k], atol=1e-12, rtol=1e-12), k
    for k in (5, 6):    # whitening: each shard's rows, whitened with the global statistics
        assert torch.allclose(torch.cat([p[k] for p in parts]), whole[k], atol=1e-12, rtol=1e-12)
    # without `reduce` each process would only see its own shard
    assert not torch.allclose(masked_mean(*shards[0]), whole[1])


def test_masked_max():
    """max over the masked positions only (the 100 is masked out); an empty mask gives 0."""
    x, m = T([[1.0, -5.0, 100.0], [3.0, 2.0, 7.0]]), T([[True, True, False], [False, True, False]])
    assert masked_max(x, m).item() == 2.0
    assert masked_max(x, torch.zeros_like(m)).item() == 0.0


# ---------------------------------------------------------------- log-probs and entropy
def test_logprobs_by_hand():
    """logits [0, ln 3] -> p = [1/4, 3/4]; token 1: log 0.75. At temperature 2: logits [0, ln3/2] ->
    p1 = sqrt3/(1+sqrt3) = 0.633975."""
    logits = T([[[0.0, math.log(3)]]])
    tok = T([[1]])
    assert logprobs_from_logits(logits, tok).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert logprobs_from_logits(logits, tok, temperature=2.0).item() == pytest.approx(
        math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, tok, temperature=0.0)


def test_logprobs_match_log_softmax_random():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    tok = torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, tok[..., None]).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, tok, 0.7), ref, atol=1e-6)


def test_entropy_by_hand_and_masking():
    """Uniform over 4 -> ln 4 = 1.386294; one-hot-ish (logit 100) -> ~0. Masked mean over only the first position
    gives ln 4 no matter what the padded position holds."""
    logits = T([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    h = entropy_from_logits(logits)
    assert h[0, 0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(h, T([[True, False]])).item() == pytest.approx(math.log(4), abs=1e-6)
    assert (entropy_from_logits(torch.randn(4, 7, 13)) >= 0).all()



def test_logprobs_and_entropy_keep_float64_and_pass_gradcheck():
    """float64 logits stay float64 (they were cast down to float32: a reference or a gradient check then carried
    float32's ~1e-7 error), and bf16 logits still come up to float32. Hand value: logits [0, ln 3] in float64 give
    log 0.75 to 1e-15, and the entropy of [1/4, 3/4] is -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351446188083."""
    logits = torch.tensor([[[0.0, math.log(3)]]], dtype=torch.float64)
    tok = torch.tensor([[1]])
    lp, h = logprobs_from_logits(logits, tok), entropy_from_logits(logits)
    assert lp.dtype == h.dtype == torch.float64
    assert abs(lp.item() - math.log(0.75)) < 1e-15
    assert abs(h.item() - 0.5623351446188083) < 1e-15
    assert logprobs_from_logits(logits.bfloat16(), tok).dtype == torch.float32
    assert entropy_from_logits(logits.half()).dtype == torch.float32
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    toks = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, toks, temperature=0.7), (x,))
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, temperature=1.3), (x,))

# ---------------------------------------------------------------- reward-model losses
def test_bradley_terry_by_hand():
    """r_c = 2, r_r = 1: -log σ(1) = 0.313262; with margin 1: -log σ(0) = ln 2 = 0.693147;
    r_c = r_r: ln 2."""
    loss = bradley_terry_loss(T([2.0, 2.0, 0.5]), T([1.0, 1.0, 0.5]), margin=T([0.0, 1.0, 0.0]))
    assert torch.allclose(loss, T([-math.log(sig(1)), math.log(2), math.log(2)]), atol=1e-6)
    assert bradley_terry_loss(T([2.0]), T([1.0])).item() == pytest.approx(0.313262, abs=1e-6)


def test_center_rewards_penalty_by_hand():
    """(r_c + r_r)²: r_c = 2, r_r = 1 -> 9; a pair centred on 0 (3, -3) -> 0 whatever its gap (mean(r²) would give 9
    and shrink the gap). d/dr_c = d/dr_r = 2(r_c + r_r) = 6 at (2, 1)."""
    c = T([2.0, 3.0]).requires_grad_()
    r = T([1.0, -3.0]).requires_grad_()
    pen = center_rewards_penalty(c, r)
    assert pen.tolist() == [9.0, 0.0]
    pen.sum().backward()
    assert c.grad.tolist() == [6.0, 0.0] and r.grad.tolist() == [6.0, 0.0]


def test_bradley_terry_gradient():
    """d/dr_c of -log σ(r_c - r_r) = -(1 - σ(d)) = -σ(-d); at d = 1: -0.268941; d/dr_r = +0.268941."""
    c, r = T([2.0], requires_grad=True), T([1.0], requires_grad=True)
    bradley_terry_loss(c, r).sum().backward()
    assert c.grad.item() == pytest.approx(-0.268941, abs=1e-6)
    assert r.grad.item() == pytest.approx(0.268941, abs=1e-6)
    torch.autograd.gradcheck(lambda a, b: bradley_terry_loss(a, b),
                             (torch.randn(4, dtype=torch.float64, requires_grad=True),
                              torch.randn(4, dtype=torch.float64, requires_grad=True)))


def test_plackett_luce_by_hand():
    """Scores best-first [2, 1, 0]: NLL = [lse(2,1,0) - 2] + [lse(1,0) - 1] + 0
    = (2.407606 - 2) + (1.313262 - 1) = 0.720868. With K=2 it equals Bradley-Terry: -log σ(2-1)."""
    loss = plackett_luce_loss(T([[2.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.407606 + 0.313262, abs=1e-5)
    assert plackett_luce_loss(T([[2.0, 1.0]])).item() == pytest.approx(bradley_terry_loss(T([2.0]), T([1.0])).item(),
                                                                       abs=1e-6)
    # A padded third slot is ignored: same as K=2.
    padded = plackett_luce_loss(T([[2.0, 1.0, 55.0]]), valid=T([[True, True, False]]))
    assert padded.item() == pytest.approx(0.313262, abs=1e-6)


def test_plackett_luce_prefers_correct_order():
    torch.manual_seed(1)
    s = torch.randn(16, 4).sort(dim=-1, descending=True).values
    assert (plackett_luce_loss(s) <= plackett_luce_loss(s.flip(-1)) + 1e-6).all()
    torch.autograd.gradcheck(plackett_luce_loss, (torch.randn(3, 4, dtype=torch.float64, requires_grad=True),))


def test_plackett_luce_ties_by_hand():
    """Tie model: tied completions are left out of each other's denominators. Ranks [1, 1, 2], scores [1, 1, 0]:
    each tied first competes only with the third: 2·[lse(1, 0) - 1] = 2·log(1 + e⁻¹) = 2·0.313262 = 0.626523 (the
    strict order 1 > 2 > 3, which the pairs' win counts gave: [lse(1,1,0) - 1] + [lse(1,0) - 1] = 0.861995 +
    0.313262 = 1.175257). Ranks [1, 2, 2] on [0, ln 3, 0] ordered [2, 1, 2]: only the first has a term,
    lse(0, ln 3, 0) - ln 3 = -ln(3/5) = 0.510826, Ziegler's best-of-K loss."""
    tie = plackett_luce_loss(T([[1.0, 1.0, 0.0]]), ranks=T([[1, 1, 2]]))
    assert tie.item() == pytest.approx(2 * math.log(1 + math.exp(-1)), abs=1e-6)
    assert plackett_luce_loss(T([[1.0, 1.0, 0.0]])).item() == pytest.approx(1.175257, abs=1e-5)
    best = plackett_luce_loss(T([[0.0, math.log(3), 0.0]]), ranks=T([[2, 1, 2]]))
    assert best.item() == pytest.approx(-math.log(0.6), abs=1e-6)
    assert best.item() == pytest.approx(best_of_k_loss(T([[0.0, math.log(3), 0.0]]), T([1])).item(), abs=1e-6)
    # all tied: no order asserted, loss 0; a padded slot with a large score is ignored
    assert plackett_luce_loss(T([[3.0, -1.0, 0.5]]), ranks=T([[1, 1, 1]])).item() == 0.0
    padded = plackett_luce_loss(T([[1.0, 1.0, 0.0, 50.0]]), T([[True, True, True, False]]), T([[1, 1, 2, 0]]))
    assert padded.item() == pytest.approx(tie.item(), abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=2, max_size=5), st.randoms(use_true_random=False))
def test_plackett_luce_ranks_properties(ranks, rnd):
    """With ranks the positions' order does not matter; strict ranks equal the best-first form; lowering the
    score of a completion ranked last (below some other) never raises the loss."""
    g = torch.Generator().manual_seed(rnd.randint(0, 2**31))
    s = torch.randn(1, len(ranks), generator=g, dtype=torch.float64)
    r = T([ranks])
    perm = torch.randperm(len(ranks), generator=g)
    loss = plackett_luce_loss(s, ranks=r)
    assert plackett_luce_loss(s[:, perm], ranks=r[:, perm]).item() == pytest.approx(loss.item(), abs=1e-9)
    order = torch.argsort(s[0], descending=True)
    assert plackett_luce_loss(s[:, order]).item() == pytest.approx(
        plackett_luce_loss(s[:, order], ranks=torch.arange(1, len(ranks) + 1)[None]).item(), abs=1e-9)
    worst = int(torch.argmax(r[0]))
    if (r[0] < r[0, worst]).any():
        lower = s.clone()
        lower[0, worst] -= 1.0
        assert plackett_luce_loss(lower, ranks=r).item() <= loss.item() + 1e-12


def test_plackett_luce_ties_gradient():
    """Tied completions get no gradient from each other: with ranks [1, 1, 2] the two firsts' gradients are each
    -(1 - σ(s_i - s_3)), independent of the other tied score."""
    s = T([[0.5, -0.25, 0.0]], requires_grad=True)
    plackett_luce_loss(s, ranks=T([[1, 1, 2]])).sum().backward()
    assert s.grad[0, 0].item() == pytest.approx(-(1 - sig(0.5)), abs=1e-6)
    assert s.grad[0, 1].item() == pytest.approx(-(1 - sig(-0.25)), abs=1e-6)
    torch.autograd.gradcheck(lambda x: plackett_luce_loss(x, ranks=T([[1, 1, 2, 3], [2, 1, 2, 2]])),
                             (torch.randn(2, 4, dtype=torch.float64, requires_grad=True),))


def test_best_of_k_by_hand():
    """Scores [0, ln 3, 0], best = 1: softmax p1 = 3/5; loss -ln 0.6 = 0.510826. Invalid slot excluded:
    scores [0, ln 3, 9] with slot 2 invalid -> p1 = 3/4 -> -ln 0.75 = 0.287682."""
    assert best_of_k_loss(T([[0.0, math.log(3), 0.0]]), T([1])).item() == pytest.approx(-math.log(0.6), abs=1e-6)
    v = best_of_k_loss(T([[0.0, math.log(3), 9.0]]), T([1]), valid=T([[True, True, False]]))
    assert v.item() == pytest.approx(-math.log(0.75), abs=1e-6)


# ---------------------------------------------------------------- DPO family
def test_dpo_sigmoid_by_hand():
    """π_c = -1, π_r = -3, ref_c = -2, ref_r = -2: h = (−1+2) − (−3+2) = 2; β = 0.5: βh = 1;
    loss = -log σ(1) = 0.313262; rewards: chosen 0.5·1 = 0.5, rejected 0.5·(−1) = −0.5."""
    loss, rc, rr = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert rc.item() == 0.5 and rr.item() == -0.5


def test_cdpo_and_ipo_by_hand():
    """Same h = 2, β = 0.5. cDPO s = 0.1: 0.9·(−log σ(1)) + 0.1·(−log σ(−1)) = 0.9·0.313262 + 0.1·1.313262
    = 0.413262. IPO: (h − 1/(2β))² = (2 − 1)² = 1. Reference-free: h = −1 − (−3) = 2 as well here, so take
    π_c = −1, π_r = −2: h = 1, βh = 0.5, −log σ(0.5) = 0.474077."""
    cdpo, _, _ = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5, label_smoothing=0.1)
    assert cdpo.item() == pytest.approx(0.413262, abs=1e-6)
    ipo, _, _ = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx(1.0, abs=1e-6)
    free, rc, _ = dpo_loss(T([-1.0]), T([-2.0]), T([-9.0]), T([-9.0]), beta=0.5, reference_free=True)
    assert free.item() == pytest.approx(0.474077, abs=1e-6)
    assert rc.item() == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, loss_type="hinge?")
    with pytest.raises(ValueError):
        dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, label_smoothing=0.6)


def test_dpo_properties_and_gradient():
    """At π = π_ref the loss is ln 2 with zero rewards; the gradient raises chosen and lowers rejected log-probs."""
    z = torch.zeros(3)
    loss, _rc, _rr = dpo_loss(z, z, z, z, beta=0.1)
    assert torch.allclose(loss, torch.full((3,), math.log(2)))
    pc, pr = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    dpo_loss(pc, pr, torch.zeros(2), torch.zeros(2), beta=0.1)[0].sum().backward()
    # dL/dπ_c = −β·σ(−βh) = −0.1·0.5 = −0.05
    assert torch.allclose(pc.grad, torch.full((2,), -0.05)) and torch.allclose(pr.grad, torch.full((2,), 0.05))
    args = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    torch.autograd.gradcheck(lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3, label_smoothing=0.2)[0], args)
    assert implicit_reward(T([-1.0]), T([-3.0]), 0.5).item() == 1.0


# ---------------------------------------------------------------- PPO
def test_ppo_rewards_by_hand():
    """β = 0.5, B = 2 rows of T = 4 with different lengths and padding sides.
    Row 0, right-padded, mask [1, 1, 1, 0], score 2, KL [0.1, 0.2, 0.4, 9 (pad)]:
      non-score = −0.5·KL on real tokens = [−0.05, −0.1, −0.2, 0] (the pad's 9 never counts);
      the score goes on the last real token (t = 2): rewards = [−0.05, −0.1, −0.2 + 2, 0] = [−0.05, −0.1, 1.8, 0];
      Σ rewards = 1.65 = 2 − 0.5·(0.1 + 0.2 + 0.4).
    Row 1, left-padded, mask [0, 0, 1, 1], score −1, KL [5 (pad), 5 (pad), 0.2, −0.2] (k1 can be negative):
      non-score = [0, 0, −0.1, 0.1]; the last real token is t = 3: rewards = [0, 0, −0.1, 0.1 − 1] = [0, 0, −0.1, −0.9];
      Σ rewards = −1 = −1 − 0.5·(0.2 − 0.2).
    A third row with no real token gets neither score nor penalty: zeros."""
    scores = T([2.0, -1.0, 4.0])
    kl = T([[0.1, 0.2, 0.4, 9.0], [5.0, 5.0, 0.2, -0.2], [1.0, 1.0, 1.0, 1.0]])
    mask = T([[True, True, True, False], [False, False, True, True], [False] * 4])
    rewards, non_score = ppo_rewards(scores, kl, mask, kl_coef=0.5)
    assert torch.allclose(non_score, T([[-0.05, -0.1, -0.2, 0.0], [0.0, 0.0, -0.1, 0.1], [0.0] * 4]), atol=1e-7)
    assert torch.allclose(rewards, T([[-0.05, -0.1, 1.8, 0.0], [0.0, 0.0, -0.1, -0.9], [0.0] * 4]), atol=1e-7)
    assert torch.allclose(rewards.sum(1), T([1.65, -1.0, 0.0]), atol=1e-6)
    # pad == EOS does not matter: only the mask says where the response ends (a 0/1 mask works the same)
    assert torch.equal(ppo_rewards(scores, kl, mask.long(), 0.5)[0], rewards)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 9), st.floats(0.0, 2.0), st.integers(0, 2**31 - 1))
def test_ppo_rewards_sum_to_score_minus_beta_kl(B, T_, beta, seed):
    """For any mask (prefix or not): Σ_t rewards = score − β·Σ_t KL over the real tokens, Σ_t non_score = −β·Σ KL,
    nothing lands off the mask, and exactly one token per row (its last real one) differs from the non-score reward."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    kl = torch.randn(B, T_, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T_, generator=g) < 0.6
    mask[:, 0] |= torch.rand(B, generator=g) < 0.5  # some rows may still be empty
    rewards, non_score = ppo_rewards(scores, kl, mask, beta)
    has = mask.any(1)
    kl_sum = (kl * mask).sum(1)
    assert torch.allclose(rewards.sum(1), torch.where(has, scores, 0.0) - beta * kl_sum, atol=1e-10)
    assert torch.allclose(non_score.sum(1), -beta * kl_sum, atol=1e-10)
    assert (rewards[~mask] == 0).all() and (non_score[~mask] == 0).all()
    for b in range(B):
        idx = mask[b].nonzero().flatten()
        if len(idx):
            diff = (rewards[b] - non_score[b]).nonzero().flatten()
            assert set(diff.tolist()) <= {idx[-1].item()}


def test_ppo_rewards_gradient():
    """d rewards / d score is 1 at the last real token only; d rewards / d KL_t = −β on real tokens, 0 on padding."""
    mask = T([[True, True, False], [False, True, True]])
    scores = torch.randn(2, dtype=torch.float64, requires_grad=True)
    kl = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda s, k: ppo_rewards(s, k, mask, 0.3), (scores, kl))
    rewards, _ = ppo_rewards(scores, kl, mask, 0.3)
    rewards.sum().backward()
    assert torch.equal(scores.grad, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(kl.grad, -0.3 * mask.double())


def test_ppo_policy_loss_by_hand():
    """ε = 0.2. Token 0: ρ = e^0 = 1, A = 2 -> loss −2, not clipped, approx-KL 0.
    Token 1: log ρ = ln 1.5, A = 1: unclipped −1.5, clipped −1.2 -> max = −1.2 (clipped),
    approx-KL ½(ln1.5)² = 0.082202.
    Token 2: log ρ = ln 0.5, A = 1: unclipped −0.5, clipped −0.8 -> max = −0.5 (not clipped: pessimistic bound).
    Token 3: log ρ = ln 0.5, A = −1: unclipped 0.5, clipped 0.8 -> 0.8 (clipped)."""
    lp = T([[0.0, math.log(1.5), math.log(0.5), math.log(0.5)]])
    loss, clipped, akl = ppo_policy_loss(lp, torch.zeros(1, 4), T([[2.0, 1.0, 1.0, -1.0]]), clip_range=0.2)
    assert torch.allclose(loss, T([[-2.0, -1.2, -0.5, 0.8]]), atol=1e-6)
    assert torch.equal(clipped, T([[0.0, 1.0, 0.0, 1.0]]))
    assert akl[0, 0].item() == 0.0 and akl[0, 1].item() == pytest.approx(0.5 * math.log(1.5) ** 2, abs=1e-7)


def test_ppo_policy_loss_on_policy_is_ratio_one():
    """Old = new: loss = −A, no clipping, approx-KL 0; gradient wrt logprobs is −A."""
    lp = torch.randn(2, 5, requires_grad=True)
    adv = torch.randn(2, 5)
    loss, clipped, akl = ppo_policy_loss(lp, lp.detach(), adv, 0.2)
    assert torch.allclose(loss, -adv) and clipped.sum() == 0 and akl.abs().max() == 0
    loss.sum().backward()
    assert torch.allclose(lp.grad, -adv)


def test_ppo_value_loss_by_hand():
    """ε_v = 0.2, R = 1. Token 0: V = 0.5, V_old = 0.4: unclipped (−0.5)² = 0.25, clipped V' = 0.5 (within range)
    -> ½·0.25 = 0.125, not clipped. Token 1: V = 2, V_old = 0: V' = 0.2: (1)² = 1 vs (−0.8)² = 0.64 -> ½·1 = 0.5
    (unclipped larger). Token 2: V = 0.9, V_old = 2: V' = 1.8: 0.01 vs 0.64 -> ½·0.64 = 0.32 (clipped)."""
    loss, clipped = ppo_value_loss(T([[0.5, 2.0, 0.9]]), T([[0.4, 0.0, 2.0]]), T([[1.0, 1.0, 1.0]]), 0.2)
    assert torch.allclose(loss, T([[0.125, 0.5, 0.32]]), atol=1e-6)
    assert torch.equal(clipped, T([[0.0, 0.0, 1.0]]))


def test_kl_estimators_by_hand():
    """log π = −1, log π_ref = −2: ℓ = −1. k1 = 1, k2 = 0.5, k3 = e^−1 − 1 + 1 = 0.367879.
    Equal log-probs give 0 for all three."""
    lp, ref = T([[-1.0, -3.0]]), T([[-2.0, -3.0]])
    assert torch.allclose(kl_penalty(lp, ref, "k1"), T([[1.0, 0.0]]))
    assert torch.allclose(kl_penalty(lp, ref, "k2"), T([[0.5, 0.0]]))
    assert torch.allclose(kl_penalty(lp, ref, "k3"), T([[math.exp(-1), 0.0]]), atol=1e-6)
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")


def test_kl_estimators_unbiased_monte_carlo():
    """Sampling from π, E[k1] = E[k3] = KL(π‖π_ref) exactly, checked against the closed form."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True)
    lp, lq = p.log()[x], q.log()[x]
    assert kl_penalty(lp, lq, "k1").mean().item() == pytest.approx(true_kl, rel=0.03)
    assert kl_penalty(lp, lq, "k3").mean().item() == pytest.approx(true_kl, rel=0.03)
    assert (kl_penalty(lp, lq, "k3") >= 0).all()


def _gae_loop(rewards, values, mask, gamma, lam):
    """Plain per-element reference: each row independently, only over its real tokens."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        last = 0.0
        for j in range(len(idx) - 1, -1, -1):
            t = idx[j]
            nv = values[b, idx[j + 1]].item() if j + 1 < len(idx) else 0.0
            delta = rewards[b, t].item() + gamma * nv - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values.double()) * mask


def test_gae_by_hand():
    """T = 2, γ = 1, λ = 0.5, r = [0, 1], V = [0.5, 0.2]: δ1 = 1 + 0 − 0.2 = 0.8, A1 = 0.8;
    δ0 = 0 + 0.2 − 0.5 = −0.3, A0 = −0.3 + 0.5·0.8 = 0.1; returns = [0.6, 1.0]."""
    adv, ret = gae(T([[0.0, 1.0, 7.0]]), T([[0.5, 0.2, 9.0]]), T([[True, True, False]]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, T([[0.1, 0.8, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, T([[0.6, 1.0, 0.0]]), atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_loop_random(seed):
    g = torch.Generator().manual_seed(seed)
    B, T_ = 6, 17
    rewards, values = torch.randn(B, T_, generator=g), torch.randn(B, T_, generator=g)
    lengths = torch.randint(1, T_ + 1, (B,), generator=g)
    mask = torch.arange(T_)[None] < lengths[:, None]
    mask[0] = torch.rand(T_, generator=g) < 0.6  # a non-prefix mask too
    gamma, lam = 0.97, 0.9
    adv, ret = gae(rewards.double(), values.double(), mask, gamma, lam)
    ref_adv, ref_ret = _gae_loop(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-10) and torch.allclose(ret, ref_ret, atol=1e-10)


def test_kl_controllers():
    """Target 6, horizon 10000, β0 = 0.15, 256 episodes. KL 12 -> e = clip(1, ±0.2) = 0.2:
    β = 0.15·(1 + 0.2·256/10000) = 0.150768. KL 3 -> e = −0.2 -> β decreases by the same factor form."""
    c = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    assert c.update(12.0, 256) == pytest.approx(0.15 * (1 + 0.2 * 256 / 10000))
    c2 = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    assert c2.update(3.0, 256) == pytest.approx(0.15 * (1 - 0.2 * 256 / 10000))
    c3 = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    assert c3.update(6.6, 100) == pytest.approx(0.15 * (1 + 0.1 * 100 / 10000))
    assert FixedKLController(0.05).update(100.0, 256) == 0.05
    state = c.state_dict()
    c4 = AdaptiveKLController(1.0, 6.0, 10000)
    c4.load_state_dict(state)
    assert c4.value == c.value
