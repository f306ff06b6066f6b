"""Padding-aware forward passes: position ids and last-token indices from the attention mask.

Every trainer runs models through `model_forward` so that a left-padded batch gives the same logits for its real
tokens as the same sequences run alone, unpadded (position ids count only real tokens). The last real token of a
sequence is found from the attention mask (`last_token_index`), so left padding and tokenizers whose pad token is
EOS work; a sequence classifier's score is read where transformers reads it (the last real token that is not the
config's pad id), so a saved reward model scores the same under plain transformers.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from alignloop.data.collators import position_ids_from_attention_mask


def last_token_index(attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                     pad_token_id: int | None = None) -> torch.Tensor:
    """Index of each row's last real token (the last position where the mask is 1). [B,T] -> [B] long.

    Works with right padding, left padding and pad == EOS, because it reads the mask. With `input_ids` and
    `pad_token_id` it also passes over real tokens equal to the pad id, as transformers' sequence classifiers do
    (they read the last token that is not `config.pad_token_id`): with pad == EOS a trailing EOS is not read, so a
    score agrees with `AutoModelForSequenceClassification`'s. A row with no such token falls back to the mask's last
    real token; a row with no real token gets 0."""
    mask = attention_mask.long()
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (positions * mask).argmax(-1)
    if input_ids is None or pad_token_id is None:
        return last
    keep = mask * (input_ids != pad_token_id).long()
    return torch.where(keep.any(-1), (positions * keep).argmax(-1), last)


def unwrap_distributed(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model: strips DDP/compile wrappers and a peft wrapper (LoRA layers stay in
    place and active)."""
    while True:
        model = unwrap_distributed(model)
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _lm_wrapper(model: nn.Module) -> bool:
    """An alignloop wrapper holding a causal LM in `.lm` (e.g. `CausalLMWithValueHead`)."""
    return getattr(model, "_alignloop_wrapper", False) and isinstance(getattr(model, "lm", None), nn.Module)


def model_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  return_hidden: bool = False, position_ids: torch.Tensor | None = None, **kwargs):
    """Run a causal LM with position ids built from the attention mask (`position_ids_from_attention_mask`).

    Returns `logits` [B,T,V], or `(logits, last_hidden_state[B,T,D])` when `return_hidden`. No KV cache is kept.
    `model` may be a transformers causal LM, a peft model, or a `CausalLMWithValueHead` (its LM is used).
    The logits at position t predict token t+1 (shift them before `alignloop.losses.logprobs_from_logits`).
    An alignloop wrapper around an LM (one with an `lm` attribute, e.g. `CausalLMWithValueHead`) is called itself,
    and its `.logits` returned, so a distributed wrapper around it sees the call."""
    if position_ids is None:
        position_ids = position_ids_from_attention_mask(attention_mask)
    if _lm_wrapper(unwrap_distributed(model)):
        if not return_hidden and not kwargs:
            # through the (possibly DDP-wrapped) module itself, so distributed gradient sync sees the call
            return model(input_ids, attention_mask, position_ids=position_ids).logits
        model = unwrap_distributed(model).lm
    extra = {"use_cache": False, **kwargs}
    if _accepts(unwrap_model(model).forward, "position_ids"):
        extra["position_ids"] = position_ids
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=return_hidden, **extra)
    if return_hidden:
        return out.logits, out.hidden_states[-1]
    return out.logits


def backbone_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state [B,T,D] of a transformers model's backbone (`model.base_model`, e.g. GPT2Model for
    GPT2ForSequenceClassification), with position ids from the attention mask. Peft wrappers are looked through."""
    hf = unwrap_model(model)
    backbone = hf.base_model if getattr(hf, "base_model", None) is not None else hf
    kwargs = {}
    if _accepts(backbone.forward, "position_ids"):
        kwargs["position_ids"] = position_ids_from_attention_mask(attention_mask)
    if _accepts(backbone.forward, "use_cache"):
        kwargs["use_cache"] = False
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
