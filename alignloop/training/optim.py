"""Optimizer and learning-rate schedule shared by every trainer."""
from __future__ import annotations

import torch
from transformers import get_scheduler


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW; biases and norm weights get no weight decay. Only parameters that require grad are optimised."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    # the fused kernel: the same update in one kernel instead of a loop over tensors (CPU and CUDA, float dtypes)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def build_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """Warmup then `name` ("linear", "cosine", "constant", "constant_with_warmup", ...), via transformers."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))
