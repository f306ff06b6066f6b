"""Speed helpers for PPO on small models (CPU): swaps that keep the function computed, only faster.

`fuse_gelu(model)`: GPT-2-style models use transformers' `NewGELUActivation` ("gelu_new"), the tanh approximation of
GELU written as ~8 separate elementwise ops (each a kernel launch forward and backward). PyTorch's
`F.gelu(x, approximate="tanh")` computes the same formula in one fused kernel. The swap is applied to every model
PPO runs (policy, reference, reward) so they stay mutually consistent; results agree to float rounding (~1e-7).
Saved checkpoints are unaffected: the activation is chosen by the config, which is not modified.
"""
from __future__ import annotations

from torch import nn


def fuse_gelu(model: nn.Module | None) -> int:
    """Replace NewGELUActivation submodules by GELUTanh in place; returns how many were replaced."""
    if model is None or not isinstance(model, nn.Module):
        return 0
    from transformers.activations import GELUTanh, NewGELUActivation

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                n += 1
    return n
