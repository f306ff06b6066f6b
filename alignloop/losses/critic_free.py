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
"""
from __future__ import annotations

import torch

from alignloop.losses.masked import masked_sum

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
