"""PPO components: per-token rewards (outcome: the score on the last token; process: each step's reward on its
step-end token), clipped surrogate, clipped value loss, KL estimators, GAE and KL-coefficient
controllers.

Shapes: B = rollouts in the (mini)batch, T = response length. Every per-token tensor is [B, T] and is reduced
with `masked_mean(x, response_mask)` by the trainer (token-level averaging).
"""
from __future__ import annotations

import torch


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float, clip_range_high: float | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate -> (loss [B,T], clipped [B,T] as 0/1 floats, approx_kl [B,T]).

    ρ = exp(log π − log π_old); loss = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε_high)) (the negation of L_clip, to minimise).
    ε = clip_range; ε_high = clip_range_high, None = ε (symmetric, PPO's). A larger ε_high is DAPO's "clip-higher"
    (Yu et al. 2025, ε = 0.2, ε_high = 0.28): a low-probability token can gain more before its ratio is clipped.
    `clipped` marks tokens where the clipped term is the active one (clip fraction = its masked mean).
    approx_kl = ½(log ρ)², the estimator OpenAI's and TRL's PPO log (k2 of π_old vs π)."""
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_obj = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = torch.maximum(unclipped, clipped_obj)
    clipped = (clipped_obj > unclipped).to(logprobs.dtype).detach()
    approx_kl = (0.5 * log_ratio.pow(2)).detach()
    return loss, clipped, approx_kl


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss -> (loss [B,T], clipped [B,T] 0/1).

    ½·max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    l_unclipped = (values - returns).pow(2)
    l_clipped = (v_clipped - returns).pow(2)
    loss = 0.5 * torch.maximum(l_unclipped, l_clipped)
    return loss, (l_clipped > l_unclipped).to(values.dtype).detach()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) at sampled tokens -> [B,T]. With ℓ = log π_ref − log π:
    k1 = −ℓ (unbiased, can be negative), k2 = ℓ²/2, k3 = (e^ℓ − 1) − ℓ (unbiased, ≥ 0, low variance)."""
    log_ratio = ref_logprobs - logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3', got {kind!r}")


def ppo_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF PPO (Ziegler et al. 2019; torchtune's `get_rewards_ppo`) -> (rewards [B,T],
    non_score_rewards [B,T]).

    scores [B]: one score per sequence; kl [B,T]: per-token KL estimate to the reference (`kl_penalty`);
    response_mask [B,T] (True = a real response token); kl_coef: β.
    non_score_rewards_t = −β·KL_t on every response token (0 elsewhere); rewards = non_score_rewards plus the score
    on the **last real response token**, found from the mask (not from a pad id, so pad == EOS tokenizers and any
    padding side work). So Σ_t rewards_t = score − β·Σ_t KL_t per row. A row without any real token gets no score
    (all zeros). Differentiable in scores and kl; nothing is reduced."""
    m = response_mask.bool()
    non_score = (-kl_coef * kl).masked_fill(~m, 0.0)
    positions = torch.arange(m.shape[1], device=m.device)
    last = torch.where(m, positions, -1).amax(dim=1)                     # [B]; -1 for an empty row
    at_last = (positions[None, :] == last[:, None]) & m                  # [B,T]: one-hot (none for an empty row)
    rewards = non_score + at_last.to(non_score.dtype) * scores[:, None].to(non_score.dtype)
    return rewards, non_score


def place_step_rewards(step_rewards: torch.Tensor, step_mask: torch.Tensor, step_ends: torch.Tensor,
                       length: int) -> torch.Tensor:
    """Each step's reward put on the token where the step ends -> [B,T] (T = `length`), 0 on every other token.

    step_rewards [B,S] (S = the most steps of a row; padded), step_mask [B,S] (True = a real step), step_ends [B,S]
    long: the index in the response of the token that ends each step (`alignloop.rollout.step_end_positions`).
    Padded steps add nothing (their end may be anything); two steps ending at the same token add up. ValueError
    when a real step ends outside [0, length). Differentiable in step_rewards.

    By hand: rewards [[0.5, −1]], ends [[1, 3]], length 5 -> [[0, 0.5, 0, −1, 0]]."""
    m = step_mask.bool()
    ends = step_ends.long()
    if bool(m.any()) and (int(ends[m].min()) < 0 or int(ends[m].max()) >= length):
        raise ValueError(f"place_step_rewards: a step ends outside the {length} response tokens "
                         f"(ends {ends[m].tolist()})")
    values = step_rewards.masked_fill(~m, 0.0)
    out = torch.zeros(step_rewards.shape[0], length, dtype=step_rewards.dtype, device=step_rewards.device)
    return out.scatter_add(1, ends.masked_fill(~m, 0), values)


def ppo_process_rewards(step_rewards: torch.Tensor, step_mask: torch.Tensor, step_ends: torch.Tensor,
                        kl: torch.Tensor, response_mask: torch.Tensor,
                        kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of PPO with process supervision (step rewards, Lightman et al. 2023; Wang et al. 2024,
    Math-Shepherd) -> (rewards [B,T], non_score_rewards [B,T]).

    As `ppo_rewards` (−β·KL_t on every real response token), but instead of one score on the last real token, each
    step's reward sits on the token that ends the step (`place_step_rewards`; step_rewards/step_mask/step_ends
    [B,S]). So Σ_t rewards_t = Σ_steps r_j − β·Σ_t KL_t per row, and GAE credits each step's tokens with the
    rewards of that step and of the steps after it. With one step per row ending at its last real token this is
    exactly `ppo_rewards` (the outcome form). ValueError when a real step ends on a padding token.

    By hand (β = 0.5): kl [[0.2, 0.2, 0.4, 0.0]], mask [[1, 1, 1, 0]], steps [[1.0, −1.0]] ending at [[0, 2]] ->
    non_score [[−0.1, −0.1, −0.2, 0]], rewards [[0.9, −0.1, −1.2, 0]]."""
    m = response_mask.bool()
    sm = step_mask.bool()
    if bool(sm.any()) and not bool(m.gather(1, step_ends.long().clamp(0, m.shape[1] - 1))[sm].all()):
        raise ValueError("ppo_process_rewards: a step ends on a padding token (step_ends must index real response "
                         "tokens)")
    non_score = (-kl_coef * kl).masked_fill(~m, 0.0)
    placed = place_step_rewards(step_rewards.to(non_score.dtype), sm, step_ends, m.shape[1])
    return non_score + placed, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens -> (advantages [B,T], returns [B,T]).

    δ_t = r_t + γ·V_{t+1} − V_t with V = 0 after the last real token; A_t = δ_t + γλ·A_{t+1}; returns = A + V.
    Vectorised over the batch; the recursion runs backwards over T. Masked-out positions are 0 in both outputs
    and never leak into real positions (response_mask need not be a prefix, e.g. for packed rows)."""
    m = response_mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    B, T = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        # A masked-out position passes its successor's value/advantage through untouched.
        adv = torch.where(m[:, t] > 0, adv, next_adv)
        advantages[:, t] = adv * m[:, t]
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        next_adv = adv
    returns = (advantages + values) * m
    return advantages, returns


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. (2019): e = clip(KL/target − 1, −0.2, 0.2); β ← β·(1 + e·n_steps/horizon).
    n_steps is the number of episodes in the batch just used. β rises when KL is above target, falls below it."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
