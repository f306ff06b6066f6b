"""Preference losses: reward-model (pairwise and K-wise) and DPO-family.

Shapes: B = batch of comparisons, K = completions per prompt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """-log σ(r_chosen - r_rejected - margin) -> [B] (Llama 2's margin: a clearer preference asks for a larger gap)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def center_rewards_penalty(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """(r_chosen + r_rejected)² -> [B]: Eisenstein et al. 2023's auxiliary term (TRL's center_rewards_coefficient),
    pulling each pair's midpoint to 0. It leaves the gap r_chosen − r_rejected free; mean(r²) would shrink it too."""
    return (chosen_scores + rejected_scores).pow(2)


def plackett_luce_loss(scores: torch.Tensor, valid: torch.Tensor | None = None,
                       ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise Plackett-Luce negative log-likelihood of a ranking -> [B].

    scores [B, K]; valid [B, K] marks real completions (a prompt may have fewer than K); ranks [B, K] the labeler's
    ranks (1 = best, equal = tied), None = the positions' order (scores best first, a strict order).
    NLL = Σ_i [log(exp(s_i) + Σ_{j ranked below i} exp(s_j)) - s_i] over valid i: in a strict order the usual
    Σ_i [logsumexp(s_i..s_K) - s_i], the last one contributing 0. Tie model: tied completions are left out of each
    other's denominators, so a tie asserts no order between them (the same term whichever of them came first; a
    ranking where all are tied costs 0) and everything ranked below them is still below each of them. Rankings of
    the form [1, 2, ..., 2] (one best, the rest unordered) give Ziegler et al.'s best-of-K loss."""
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    k = scores.shape[-1]
    if ranks is None:
        ranks = torch.arange(k, device=scores.device).expand(scores.shape)
    s = scores.masked_fill(~valid, 0.0)  # padding never reaches a denominator; this keeps it finite
    # competes[b, i, j]: j is in the denominator of i's place: i itself, or a real completion ranked below i
    below = ranks[..., None, :] > ranks[..., :, None]
    competes = (below & valid[..., None, :]) | torch.eye(k, dtype=torch.bool, device=scores.device)
    expanded = s[..., None, :].expand(*s.shape, k)
    denom = torch.logsumexp(expanded.masked_fill(~competes, torch.finfo(s.dtype).min), dim=-1)
    return ((denom - s) * valid.to(s.dtype)).sum(-1)


def best_of_k_loss(scores: torch.Tensor, best: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Ziegler et al. (2019): the labeler picks the best of K; loss = -log softmax(scores)[best] -> [B]."""
    if valid is not None:
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return F.cross_entropy(scores, best, reduction="none")


def implicit_reward(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward β·(log π(y|x) − log π_ref(y|x)) -> same shape."""
    return beta * (logps - ref_logps)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid", reference_free: bool = False,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family losses on completion log-prob sums (or means, for IPO as its authors asked) -> (losses [B],
    chosen_rewards [B], rejected_rewards [B]); rewards are detached implicit rewards for logging.

    h = (log π_c − log π_ref_c) − (log π_r − log π_ref_r)   (reference terms 0 when reference_free)
    sigmoid: −(1−s)·log σ(βh) − s·log σ(−βh)    (s = label_smoothing: conservative DPO, s=0 is DPO)
    ipo:     (h − 1/(2β))²
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen_rewards = implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach()
    return losses, chosen_rewards, rejected_rewards
