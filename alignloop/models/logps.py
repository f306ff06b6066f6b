"""Completion log-probabilities of padded rows, with the LM head applied only where a completion token is predicted.

    completion_logps(model, batch, average=False) -> [R] (sums, or means with `average`; float32, float64 kept)
    packed_completion_logps(model, packed, n_rows, average=False) -> [n_rows] (DPO's padding-free rows)
    lm_head_parts(model) -> (backbone, lm_head) | None
    CompletionLogps(model)(batch, average=False, n_rows=None): the module accelerate prepares (DDP/FSDP)

The offline preference trainers (DPO, KTO) score completions this way. On
a small vocabulary model the LM head over every position is a large share of the step; applying it at the
completion positions only gives the same log-probs (tested against the full forward).

Because the head is applied outside the transformers model's forward, a trainer that wraps that model in DDP/FSDP
would call the head outside the wrapper. `CompletionLogps` is the module to wrap instead: its forward runs the trunk
and the head, so every trained parameter gets its gradient through the wrapper (DDP's averaging hooks, FSDP's
reduce-scatter). It holds the model's own submodules, so its state dict (and a checkpoint of it) has the model's
keys.
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


def packed_completion_logps(model: nn.Module, packed: dict[str, torch.Tensor], n_rows: int,
                            average: bool = False) -> torch.Tensor:
    """`completion_logps` on a packed batch (DPO's `_packed_pairs`: input_ids / position_ids [B,C], an optional
    boolean attention_mask [B,1,C,C], src = flat indices of the positions whose logits predict `labels`, row = the
    input row of each) -> [n_rows] (sum, or mean with `average`, per input row)."""
    backbone, head = lm_head_parts(model)
    mask = packed.get("attention_mask")
    if mask is not None and getattr(getattr(unwrap_model(model), "config", None), "_attn_implementation",
                                    None) == "eager":
        # eager attention adds the mask to the scores: an additive mask, not a boolean one
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    out = backbone(input_ids=packed["input_ids"], attention_mask=mask, position_ids=packed["position_ids"],
                   use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    picked = hidden.reshape(-1, hidden.shape[-1])[packed["src"]]
    token_logps = logprobs_from_logits(head(picked)[None], packed["labels"][None])[0]
    rows = packed["row"]
    sums = torch.zeros(n_rows, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    if not average:
        return sums
    counts = torch.zeros(n_rows, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, rows, torch.ones_like(token_logps))
    return sums / counts.clamp(min=1.0)


def batch_logps(model: nn.Module, batch: dict[str, torch.Tensor], average: bool = False,
                n_rows: int | None = None) -> torch.Tensor:
    """`completion_logps` of padded rows, or, with `n_rows`, `packed_completion_logps` of a packed batch."""
    if n_rows is None:
        return completion_logps(model, batch, average)
    return packed_completion_logps(model, batch, n_rows, average)


class CompletionLogps(nn.Module):
    """A causal LM as the module that accelerate prepares (DDP, FSDP) for the offline preference trainers:
    `forward(batch, average=False, n_rows=None)` is `batch_logps(model, ...)`, trunk and LM head (completion
    positions only) inside one forward, so DDP averages every trained parameter's gradient in its backward hooks
    (tied embedding/head weights included: one parameter, one gradient) and FSDP gathers and reduces the head with
    the rest.

    The model's children are registered as this module's own (the model itself is held outside the module tree), so
    `state_dict()` / `named_parameters()` have exactly the model's keys: checkpoints are interchangeable with the
    plain model's. Train/eval mode: set it on the model (`model.train()`), as the trainers do."""

    _alignloop_wrapper = True  # `has_adapter` and friends look through it to `.lm`

    def __init__(self, model: nn.Module):
        super().__init__()
        if next(model.parameters(recurse=False), None) is not None or next(model.buffers(recurse=False), None) \
                is not None:
            raise ValueError("CompletionLogps: the model holds parameters or buffers of its own (not in a submodule)")
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["lm"] = model  # outside the module tree: no "lm." prefix, no second copy of the parameters
        self._no_split_modules = getattr(unwrap_model(model), "_no_split_modules", None)  # FSDP's wrap policy reads it

    def forward(self, batch: dict[str, torch.Tensor], average: bool = False,
                n_rows: int | None = None) -> torch.Tensor:
        return batch_logps(self.lm, batch, average, n_rows)
