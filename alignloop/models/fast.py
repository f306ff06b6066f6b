"""Speed-ups that change no weights and no function: safe on any model, saved checkpoints unaffected."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignloop.errors import UserError
from alignloop.models.forward import unwrap_model
from alignloop.models.value_head import hidden_size

# The name under which `fp32_cpu_attention` registers its attention function with transformers.
CPU_SDPA = "alignloop_sdpa"


def fuse_gelu(model: nn.Module | None) -> int:
    """Swap transformers' `NewGELUActivation` (GPT-2's gelu_new: the tanh approximation of GELU written as six
    elementwise ops, each a kernel launch forward and backward) for `GELUTanh`, the same function in one fused
    kernel (to ~2e-7). Returns the number of modules swapped."""
    if model is None or not isinstance(model, nn.Module):
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                n += 1
    return n


def _sdpa_fp32_on_cpu(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, except that on CPU with bf16/fp16 inputs (autocast) it runs in float32 and
    casts the output back: PyTorch's CPU flash-attention backward is ~3.5x slower in bf16 than in fp32, and
    attention is a small share of the FLOPs, so fp32 here is both faster and more exact. Elsewhere: unchanged."""
    if query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def fp32_cpu_attention(model: nn.Module | None) -> int:
    """Point every transformers config in `model` that uses "sdpa" attention at `_sdpa_fp32_on_cpu` (registered as
    "alignloop_sdpa", with SDPA's mask format). The function is SDPA itself except under CPU autocast, so results
    and saved configs do not change (transformers does not save the attention implementation). Returns the number
    of configs switched."""
    if model is None or not isinstance(model, nn.Module):
        return 0
    AttentionInterface.register(CPU_SDPA, _sdpa_fp32_on_cpu)
    AttentionMaskInterface.register(CPU_SDPA, sdpa_mask)
    seen: set[int] = set()
    n = 0
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        seen.add(id(cfg))
        if cfg._attn_implementation == "sdpa":
            cfg._attn_implementation_internal = CPU_SDPA
            n += 1
    return n


def disable_dropout(model: nn.Module | None) -> int:
    """Set every `nn.Dropout` probability in `model` to 0 (not a pure speed-up: the function becomes deterministic in
    training mode; reward models and DPO default to this, as TRL does). Returns the number of modules changed."""
    if model is None or not isinstance(model, nn.Module):
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p != 0.0:
            m.p = 0.0
            n += 1
    return n


def speed_up(model: nn.Module | None) -> None:
    """Every speed-up of this module (`fuse_gelu`, `fp32_cpu_attention`): same function, same saved checkpoint."""
    fuse_gelu(model)
    fp32_cpu_attention(model)


WIDE = 256


def is_wide(model: nn.Module) -> bool:
    """Hidden size >= 256: wide enough for the CPU to be compute-bound, where padding-free packing pays for its
    bookkeeping (SFT, DPO `packing="auto"`) and a decode step gains from a second thread (`HFSampler`, measured:
    2 x 128 is fastest on one thread, 6 x 384 on two)."""
    try:
        return hidden_size(unwrap_model(model).config) >= WIDE
    except (AttributeError, UserError):
        return False
