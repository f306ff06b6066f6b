"""Completion log-probabilities of padded rows, with the LM head applied only where a completion token is predicted.

    completion_logps(model, batch, average=False) -> [R] (sums, or means with `average`; float32, float64 kept)
    lm_head_parts(model) -> (backbone, lm_head) | None

The offline preference trainers (DPO, KTO) score completions this way. On
a small vocabulary model the LM head over every position is a large share of the step; applying it at the
completion positions only gives the same log-probs (tested against the full forward).
"""
from __future__ import annotations

import torch
from torch import nn

from alignloop.losses import logprobs_from_logits, masked_mean, masked_sum
from alignloop.models.forward import model_forward, unwrap_model


def lm_head_parts(model: nn.Module):
    """(backbone, lm_head) when the LM head can be applied to selected positions only (decoder LMs whose logits are
    lm_head(last hidden state), no soft-capping or logit scale); None otherwise (then the full forward is used)."""
    hf = unwrap_model(model)
    cfg = getattr(hf, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (
            None, 1, 1.0):
        return None
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    backbone = getattr(hf, "base_model", None)
    if head is None or backbone is None or backbone is hf:
        return None
    return backbone, head


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """Sum (or, with `average`, mean) of the log-probs of each row's completion tokens -> [R] (float32 under
    autocast or for half-precision models; float64 models keep float64, as `logprobs_from_logits` does).

    batch: input_ids, attention_mask, position_ids, response_mask [R,T] (a collator's output: `SFTCollator` with
    response_mask = labels != -100, `PreferenceCollator`). Logits at position t predict token t+1, so the tokens
    scored are input_ids[:, 1:] where response_mask[:, 1:]."""
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    labels, rmask = ids[:, 1:], batch["response_mask"][:, 1:].bool()
    parts = lm_head_parts(model)
    if parts is None:
        logps = logprobs_from_logits(model_forward(model, ids, mask, position_ids=pos)[:, :-1], labels)
    else:
        backbone, head = parts
        out = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, :-1]
        picked = head(hidden[rmask])                                     # [N, V]: completion positions only
        token_logps = logprobs_from_logits(picked[None], labels[rmask][None])[0]
        logps = torch.zeros(rmask.shape, dtype=token_logps.dtype, device=token_logps.device)
        logps = logps.masked_scatter(rmask, token_logps)
    return masked_mean(logps, rmask, dim=1) if average else masked_sum(logps, rmask, dim=1)
