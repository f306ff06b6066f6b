"""Log-probabilities and entropy from logits.

Shapes: logits [B, T, V] already aligned with tokens [B, T] (logits[:, t] predicts tokens[:, t]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits up to float32 (a softmax over a vocabulary in bf16 loses ~3 digits); float64 stays float64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens] -> [B, T]. Divide by the sampling temperature exactly as during
    sampling, or "on-policy" ratios differ from 1. Computed in float32 for bf16/fp16 logits, in float64 for float64
    ones (gradient checks, references)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = _at_least_float32(logits)
    if temperature != 1.0:
        logits = logits / temperature
    # gather - logsumexp avoids materialising the full [B, T, V] log-softmax a second time.
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position -> [B, T]. Reduce with masked_mean over the
    response mask only: padding positions must never count."""
    logits = _at_least_float32(logits)
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
