"""Critic-free RL: advantage estimators (REINFORCE with a baseline, RLOO, GRPO, Dr. GRPO), the sequence-level
"KL in the reward", and the per-token loss weights of each way of aggregating a token loss over a batch.

No value model: a sequence's advantage is its score minus a baseline that does not depend on the sequence itself
(another sample's score, a group mean, a moving average of past batches), and every token of the completion gets
that one advantage (the trainer broadcasts it over T and feeds it to `ppo_policy_loss` or to −A·log π).

Shapes:
  B = sequences (completions) in the batch;
  T = response tokens (the padded completion length);
  K = group size: the completions sampled for one prompt. The rows of one group are CONTIGUOUS: row i belongs to
      group i // K (rows 0..K−1 are prompt 0's completions, K..2K−1 prompt 1's, ...), so B is a multiple of K.
scores [B]: one scalar reward per sequence. response_mask [B,T]: True = a real response token.

All functions are pure (tensors in, unreduced tensors out); the only state is `MovingAverageBaseline`'s value.

Process supervision (step rewards; DeepSeekMath, Shao et al. 2024, §4.1.3): a completion's reward is one number per
reasoning step instead of one per completion. Steps are given as padded [B,S] tensors (S = the most steps of a row):
step_rewards, step_mask (True = a real step; the real steps of a row come first) and step_ends (long: the index of
the response token that ends each step, `alignloop.rollout.step_end_positions`). Each estimator turns step rewards
into step advantages [B,S] (`grpo_step_advantages`, `rloo_step_advantages`, `reinforce_step_advantages`), and
`step_advantages_to_tokens` gives each token the sum of the advantages of the steps ending at or after it
(DeepSeekMath: "the advantage of each token as the sum of the normalized rewards from the following steps"). With one
step per completion ending at its last real token every process form equals its outcome form.
"""
from __future__ import annotations

import torch

from alignloop.losses.masked import masked_sum
from alignloop.losses.ppo import place_step_rewards

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
"""How a per-token loss is aggregated over a batch (verl's names); see `token_loss_weights`."""

GRPO_SCALES = ("std", "none")


def reinforce_advantages(scores: torch.Tensor, baseline: torch.Tensor | float) -> torch.Tensor:
    """REINFORCE with a baseline -> A [B] = scores − b (Williams 1992).

    Any baseline b(x) that does not depend on the sampled completion y keeps the policy gradient unbiased
    (E_y[∇log π(y|x)·b(x)] = b(x)·∇Σ_y π(y|x) = 0) and only lowers its variance. `baseline`: a float (e.g.
    `MovingAverageBaseline.value` from before this batch) or a tensor broadcasting to [B] (e.g. a per-prompt
    value); it is detached, so no gradient ever flows into it."""
    if isinstance(baseline, torch.Tensor):
        baseline = baseline.detach().to(device=scores.device, dtype=scores.dtype)
    return scores - baseline


def _groups(scores: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    """scores [B] -> [B/K, K] (contiguous groups), after checking that they form groups with a baseline."""
    if scores.dim() != 1:
        raise ValueError(f"{name}: scores must be 1-D [B], got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"{name}: group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(f"{name}: the batch of {scores.shape[0]} scores is not a whole number of groups of "
                         f"{group_size} (rows of one group are contiguous: row i is in group i // {group_size})")
    return scores.view(-1, group_size)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics") -> A [B].

    A_i = r_i − mean_{j ≠ i in i's group} r_j = r_i − (Σ_group r − r_i)/(K − 1), which equals K/(K−1)·(r_i − group
    mean). The sample's own reward is never in its baseline, so the estimate is unbiased. ValueError if
    group_size < 2 or B is not a multiple of group_size. Differentiable in scores (the trainer detaches them)."""
    r = _groups(scores, group_size, "rloo_advantages")
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others).reshape(-1)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages -> A [B].

    scale="std" (GRPO, Shao et al. 2024, DeepSeekMath): A_i = (r_i − group mean) / (group std + eps), with the
    UNBIASED std (divisor K − 1), as DeepSeekMath's code and TRL's GRPOTrainer compute it (`torch.std`), and their
    eps = 1e-4. scale="none" (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i − group
    mean; no std division, which would weight too-easy and too-hard prompts (small std) more.
    A group whose rewards are all equal gives exactly 0 (no signal, no NaN), whatever their size or dtype (its
    gradient is 0 too; the trainer passes detached scores anyway).
    ValueError if group_size < 2 (a group of one has no baseline), if B is not a multiple of it, or for an unknown
    scale."""
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo_advantages: scale must be one of {GRPO_SCALES}, got {scale!r}")
    r = _groups(scores, group_size, "grpo_advantages")
    # r − mean is not always exactly 0 for equal rewards: the mean is rounded (float32 [1e6 + 0.1] * 3 gives
    # −0.0625 each, and a std of 0.077, i.e. advantages of −0.8). An all-equal group is set to exactly 0.
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)
    centred = torch.where(constant, torch.zeros_like(r), r - r.mean(dim=1, keepdim=True))
    if scale == "std":
        std = r.std(dim=1, keepdim=True)  # unbiased (K − 1), as DeepSeekMath and TRL
        centred = centred / torch.where(constant, torch.ones_like(std), std + eps)  # no 0/0 even with eps = 0
    return centred.reshape(-1)


class MovingAverageBaseline:
    """An exponential moving average of past batches' mean scores: the REINFORCE baseline b (no prompt dependence).

    value: None before the first update. update(batch_mean): the first call sets value = batch_mean, later ones
    value = decay·value + (1 − decay)·batch_mean; returns the new value.
    Use the value from BEFORE updating with the current batch: `b = baseline.value` (0 when None), advantages =
    `reinforce_advantages(scores, b)`, then `baseline.update(scores.mean())`. A baseline must not depend on the
    current samples (updating first would put each sample's own reward in its baseline: a biased gradient).
    ValueError for decay outside [0, 1)."""

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MovingAverageBaseline: decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.value: float | None = None

    def update(self, batch_mean: float) -> float:
        batch_mean = float(batch_mean)
        if self.value is None:
            self.value = batch_mean
        else:
            self.value = self.decay * self.value + (1.0 - self.decay) * batch_mean
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        value = state["value"]
        self.value = None if value is None else float(value)


def sequence_kl_reward(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                       kl_coef: float) -> torch.Tensor:
    """The "KL in the reward" of a sequence -> [B] = scores − β·Σ_t KL_t over the real response tokens.

    RLOO's form (Ahmadian et al. 2024): the whole completion is one action, so its reward is the score minus β
    times the sequence's KL estimate (kl [B,T] per token from `kl_penalty`; padding never counts). It equals the
    sum over t of `ppo_rewards`' per-token rewards for a row with a real token. Differentiable in scores and kl."""
    return scores - kl_coef * masked_sum(kl, response_mask.bool(), dim=1)


def _as_count(n: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A global count as a float32 scalar on `device`, at least 1 (an empty global batch gives weights 0, not NaN)."""
    return torch.as_tensor(n, dtype=torch.float32).to(device).clamp(min=1.0)


def token_loss_weights(response_mask: torch.Tensor, aggregation: str, n_tokens: float | torch.Tensor,
                       n_sequences: float | torch.Tensor, norm_length: int | None = None) -> torch.Tensor:
    """Per-token weights w [B,T] float32 such that Σ_{b,t} w·loss_tok is the loss aggregated over the GLOBAL batch.

    n_tokens / n_sequences: the global batch's number of valid response tokens and of sequences (over every
    micro-batch and process, given by the caller), so the weighted sums of micro-batches and processes add up to
    the global batch's value. Masked positions get 0; a row with no valid token gets 0 (no division by zero);
    counts below 1 are taken as 1. Aggregations (verl's names):
      "token-mean"              w = 1/n_tokens: every token of the batch counts the same (DAPO, Yu et al. 2025,
                                "token-level policy gradient loss"; also the PPO trainer's masked mean);
      "seq-mean-token-mean"     w = 1/(n_sequences·len_b), len_b = row b's valid tokens: each sample's token mean,
                                then the mean over samples (GRPO, Shao et al. 2024); a long sequence's tokens
                                weigh less;
      "seq-mean-token-sum"      w = 1/n_sequences: the sequence's log-prob sum times its advantage, averaged over
                                sequences (REINFORCE / RLOO, Ahmadian et al. 2024);
      "seq-mean-token-sum-norm" w = 1/(n_sequences·norm_length): token sums divided by a constant such as
                                max_new_tokens, not by the sequence's own length (Dr. GRPO, Liu et al. 2025);
                                norm_length required (ValueError if None or < 1), ignored by the others.
    ValueError for an unknown aggregation."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}")
    m = response_mask.bool().to(torch.float32)
    device = m.device
    if aggregation == "token-mean":
        return m / _as_count(n_tokens, device)
    n_seq = _as_count(n_sequences, device)
    if aggregation == "seq-mean-token-mean":
        lengths = m.sum(dim=1, keepdim=True).clamp(min=1.0)
        return m / (n_seq * lengths)
    if aggregation == "seq-mean-token-sum":
        return m / n_seq
    if norm_length is None or norm_length < 1:
        raise ValueError(f"aggregation 'seq-mean-token-sum-norm' needs norm_length >= 1 (e.g. max_new_tokens), "
                         f"got {norm_length!r}")
    return m / (n_seq * float(norm_length))


# ------------------------------------------------------------------------------------------------ process supervision
def _step_groups(step_rewards: torch.Tensor, step_mask: torch.Tensor, group_size: int,
                 name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,S] -> ([G, K, S] rewards with padded steps 0, [G, K, S] float mask), after the group checks."""
    if step_rewards.dim() != 2 or step_rewards.shape != step_mask.shape:
        raise ValueError(f"{name}: step_rewards and step_mask must both be [B,S], got {tuple(step_rewards.shape)} "
                         f"and {tuple(step_mask.shape)}")
    _groups(step_rewards.new_zeros(step_rewards.shape[0]), group_size, name)   # the group checks of the outcome forms
    m = step_mask.bool()
    r = step_rewards.masked_fill(~m, 0.0)
    B, S = r.shape
    return r.view(B // group_size, group_size, S), m.view(B // group_size, group_size, S).to(r.dtype)


def grpo_step_advantages(step_rewards: torch.Tensor, step_mask: torch.Tensor, group_size: int, scale: str = "std",
                         eps: float = 1e-4) -> torch.Tensor:
    """Process-supervised GRPO (Shao et al. 2024, §4.1.3) -> step advantages [B,S] (0 on padded steps).

    Every real step reward of a group (all K completions' steps together) is normalised by the group's mean and,
    with scale="std" (GRPO), its unbiased std (divisor n − 1 over the group's n steps, + eps, as `grpo_advantages`):
    r̃_ij = (r_ij − mean(R)) / (std(R) + eps), R = the group's step rewards. scale="none" (Dr. GRPO, Liu et al.
    2025): r̃_ij = r_ij − mean(R). A group whose step rewards are all equal (or that has fewer than two steps) gives
    exactly 0. With one step per completion this is `grpo_advantages` of the scores.

    By hand (K = 2, eps = 0): completion 0's steps [1, 0], completion 1's [1] -> R = {1, 0, 1}: mean 2/3,
    std = √((1/9 + 4/9 + 1/9)/2) = √(1/3) = 0.57735; r̃ = [[1/3, −2/3]/0.57735, [1/3]/0.57735]
    = [[0.57735, −1.15470], [0.57735, 0]]; scale="none": [[1/3, −2/3], [1/3, 0]]."""
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo_step_advantages: scale must be one of {GRPO_SCALES}, got {scale!r}")
    r, m = _step_groups(step_rewards, step_mask, group_size, "grpo_step_advantages")
    G = r.shape[0]
    r, m = r.reshape(G, -1), m.reshape(G, -1)
    n = m.sum(dim=1, keepdim=True)
    mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1.0)
    inf = torch.finfo(r.dtype).max
    hi = torch.where(m > 0, r, torch.full_like(r, -inf)).amax(dim=1, keepdim=True)
    lo = torch.where(m > 0, r, torch.full_like(r, inf)).amin(dim=1, keepdim=True)
    constant = (hi <= lo) | (n < 2)                      # all real steps equal (an empty group too)
    centred = torch.where(constant, torch.zeros_like(r), (r - mean) * m)
    if scale == "std":
        var = ((r - mean).pow(2) * m).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1.0)
        centred = centred / torch.where(constant, torch.ones_like(var), var.sqrt() + eps)
    return centred.view_as(step_rewards)


def rloo_step_advantages(step_rewards: torch.Tensor, step_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Process-supervised RLOO -> step advantages [B,S] (0 on padded steps): each step reward minus the mean of
    the step rewards of the OTHER K − 1 completions of its group, pooled over all their real steps:
    A_ij = r_ij − b_i, b_i = Σ_{k ≠ i} Σ_j r_kj / Σ_{k ≠ i} n_k.

    Why this baseline: it leaves the whole completion i out, not only step j (i's other steps depend on the same
    sample, so they must not be in its baseline), and it is the GRPO process form's pooled group mean with i left
    out, so with one step per completion it is exactly `rloo_advantages` of the scores. Pooling (rather than the
    mean of each completion's mean) weighs every step alike, as that mean does. The baseline never depends on
    sample i; the sum of step advantages from a token on is still only an approximately unbiased signal (how many
    steps follow depends on the sample), the price of per-step credit without a value model. When no other
    completion of the group has a step there is no baseline: those steps get 0 (no signal, as an all-equal group).

    By hand (K = 2): completion 0's steps [1, 0], completion 1's [1] -> b_0 = 1, b_1 = (1 + 0)/2 = 0.5:
    A = [[0, −1], [0.5, 0]]. K = 3, steps [[2], [4, 0], [1]]: b = [(4+0+1)/3, (2+1)/2, (2+4+0)/3] = [5/3, 1.5, 2]
    -> A = [[1/3, 0], [2.5, −1.5], [−1, 0]]."""
    r, m = _step_groups(step_rewards, step_mask, group_size, "rloo_step_advantages")
    sums, counts = r.sum(dim=2), m.sum(dim=2)                                     # [G, K]
    other_sum = sums.sum(dim=1, keepdim=True) - sums
    other_n = counts.sum(dim=1, keepdim=True) - counts
    baseline = other_sum / other_n.clamp(min=1.0)
    adv = (r - baseline[:, :, None]) * m * (other_n > 0).to(r.dtype)[:, :, None]
    return adv.view_as(step_rewards)


def reinforce_step_advantages(step_rewards: torch.Tensor, step_mask: torch.Tensor,
                              baseline: torch.Tensor | float) -> torch.Tensor:
    """Process-supervised REINFORCE -> step advantages [B,S] = (r_ij − b)·step_mask: every step reward minus a
    baseline that does not depend on the sample (a float such as `MovingAverageBaseline.value` of past batches'
    mean STEP reward, or a tensor broadcasting to [B,S] or [B,1]; detached).

    By hand: steps [[1, 0], [2, pad]], b = 0.5 -> [[0.5, −0.5], [1.5, 0]]."""
    m = step_mask.bool()
    if isinstance(baseline, torch.Tensor):
        baseline = baseline.detach().to(device=step_rewards.device, dtype=step_rewards.dtype)
    return (step_rewards - baseline).masked_fill(~m, 0.0)


def reward_to_go(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Σ_{t' ≥ t} rewards_t' over the real tokens of each row -> [B,T] (0 on padding; undiscounted).

    By hand: rewards [[1, 0, 2, 5]], mask [[1, 1, 1, 0]] -> [[3, 2, 2, 0]]."""
    m = response_mask.bool()
    x = rewards.masked_fill(~m, 0.0)
    return x.flip(1).cumsum(1).flip(1).masked_fill(~m, 0.0)


def step_advantages_to_tokens(step_advantages: torch.Tensor, step_mask: torch.Tensor, step_ends: torch.Tensor,
                              response_mask: torch.Tensor) -> torch.Tensor:
    """Each token's advantage [B,T] = the sum of the advantages of the steps that end at or after it (DeepSeekMath's
    process supervision: Â_t = Σ_{index(j) ≥ t} r̃_j). Tokens after a row's last step end get 0 (they belong to no
    step; the trainers end the last step on the last real token, so none are left). ValueError when a real step
    ends outside the response (see `place_step_rewards`).

    By hand: advantages [[0.5, −1.0]] ending at [[1, 3]], 5 real tokens -> [[−0.5, −0.5, −1, −1, 0]]."""
    placed = place_step_rewards(step_advantages, step_mask, step_ends, response_mask.shape[1])
    return reward_to_go(placed, response_mask)


def step_kl_rewards(step_rewards: torch.Tensor, step_mask: torch.Tensor, step_ends: torch.Tensor,
                    kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The "KL in the reward" of process supervision -> [B,S]: each step's reward minus β times the KL of its own
    tokens, r_j − β·Σ_{e_{j−1} < t ≤ e_j} KL_t (e_{−1} = −1: the first step starts at the first token). Summed over a
    row's steps it is Σ_j r_j − β·Σ_t KL_t up to the last step end (`sequence_kl_reward` of one step ending at the
    last real token). Step ends must not decrease along a row; padding tokens never count.

    By hand (β = 0.5): kl [[0.2, 0.2, 0.4, 1.0]], mask [[1, 1, 1, 0]], steps [[1, −1]] ending at [[0, 2]]
    -> [[1 − 0.1, −1 − 0.5·0.6]] = [[0.9, −1.3]]."""
    m = step_mask.bool()
    ends = step_ends.long().masked_fill(~m, 0)
    if bool(m.any()) and (int(ends[m].min()) < 0 or int(ends[m].max()) >= kl.shape[1]):
        raise ValueError("step_kl_rewards: a step ends outside the response")
    cum = (kl * response_mask.to(kl.dtype)).cumsum(dim=1)                         # [B,T]
    at_end = cum.gather(1, ends) * m.to(kl.dtype)                                  # [B,S]
    before = torch.cat([at_end.new_zeros(at_end.shape[0], 1), at_end[:, :-1]], dim=1)
    return (step_rewards - kl_coef * (at_end - before)).masked_fill(~m, 0.0)
