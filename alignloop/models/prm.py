"""Process reward models (PRMs): an LM backbone with a per-token head, read at the step-end positions.

Design: a PRM is stored as a plain transformers `AutoModelForTokenClassification` (GPT-2's head is `classifier`,
Llama/Qwen/Mistral's `score`), so `AutoModelForTokenClassification.from_pretrained(folder)` loads it without
alignloop. num_labels = 1 for the BCE loss (the logit that the step is good) or 3 for the 3-class cross-entropy
(bad / neutral / good, `alignloop.losses.PRM_CLASSES`). Its config carries `alignloop_prm` = {"loss", "separator"}:
what marks a folder as a PRM (`is_prm_folder`) and how its text is split into steps. Built from a causal LM folder,
the backbone's weights are copied and the head gets the reward-head init N(0, 1/sqrt(d+1)), bias 0.

A step's score is the head at the LAST token of its separator (`alignloop.data.tokenize_steps`), read with
position ids from the attention mask, so left or right padding gives the unpadded values.

Shapes: B = solutions, T = tokens, C = num_labels, S = steps of a solution.
    batch_steps(examples, pad_token_id) -> {input_ids, attention_mask, position_ids, step_mask [B,T] bool,
        step_labels [B,T] long (+1/0/-1; 0 where no label), label_mask [B,T] bool (a labelled step end),
        soft_targets [B,T] float, soft_mask [B,T] bool}
    prm_logits(model, input_ids, attention_mask) -> [B,T,C];  step_probabilities(...) -> [B,T] float32
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForTokenClassification

from alignloop.data import STEP_SEPARATOR, pad_batch, position_ids_from_attention_mask, tokenize_steps
from alignloop.errors import UserError
from alignloop.losses import PRM_CLASSES, good_probability
from alignloop.models.forward import model_forward, unwrap_model
from alignloop.models.loading import (
    LoraOptions,
    check_name_or_path,
    has_adapter,
    load_tokenizer,
    resolve_dtype,
)
from alignloop.models.value_head import init_reward_head

PRM_CONFIG_KEY = "alignloop_prm"
PRM_LOSSES = {"bce": 1, "ce": 3}
HEAD_NAMES = ("classifier", "score")


def prm_info(path_or_model) -> dict | None:
    """The `alignloop_prm` entry of a PRM's config ({"loss", "separator"}), or None when it is not a PRM."""
    if isinstance(path_or_model, nn.Module):
        return getattr(getattr(unwrap_model(path_or_model), "config", None), PRM_CONFIG_KEY, None)
    config = Path(path_or_model) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get(PRM_CONFIG_KEY)
    except (json.JSONDecodeError, OSError):
        return None


def is_prm_folder(path: str | os.PathLike) -> bool:
    """A saved PRM: a folder whose config.json carries `alignloop_prm`."""
    return prm_info(path) is not None


def token_head(model: nn.Module) -> nn.Linear | None:
    """The token classifier's head (`classifier` or `score`), through peft wrappers."""
    hf = unwrap_model(model)
    return next((getattr(hf, n) for n in HEAD_NAMES if isinstance(getattr(hf, n, None), nn.Module)), None)


def build_prm(name_or_path: str | os.PathLike, loss: str = "bce", *, dtype=None, lora: LoraOptions | None = None,
              gradient_checkpointing: bool = False, trust_remote_code: bool = False,
              separator: str = STEP_SEPARATOR) -> nn.Module:
    """A trainable PRM: from a causal LM (or any checkpoint of a backbone transformers can put a token head on; the
    head is new) or from a saved PRM (trained further; its loss must be `loss`). `lora` adds a LoRA adapter (the
    head trained in full)."""
    if loss not in PRM_LOSSES:
        raise UserError(f"loss must be one of {', '.join(PRM_LOSSES)}, got {loss!r}")
    name = check_name_or_path(name_or_path, "model")
    info = prm_info(name) if Path(name).is_dir() else None
    if info is not None and info.get("loss") != loss:
        raise UserError(f"{name} is a PRM trained with loss {info.get('loss')!r}; train it further with that loss "
                        f"(or start from its base model)")
    labels = PRM_LOSSES[loss]
    id2label = {0: "good"} if labels == 1 else dict(enumerate(PRM_CLASSES))
    try:
        model, loading = AutoModelForTokenClassification.from_pretrained(
            name, dtype=resolve_dtype(dtype), num_labels=labels, id2label=id2label,
            label2id={v: k for k, v in id2label.items()}, trust_remote_code=trust_remote_code,
            output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {name!r} as a token classifier (a PRM backbone): {e}") from e
    head = token_head(model)
    missing = set(loading.get("missing_keys", ())) if isinstance(loading, dict) else set()
    if isinstance(head, nn.Linear) and any(k.split(".")[0] in HEAD_NAMES for k in missing):
        init_reward_head(head)
    if getattr(model.config, "pad_token_id", None) is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    setattr(model.config, PRM_CONFIG_KEY, {"loss": loss, "separator": separator})
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None and not has_adapter(model):
        model = _with_lora(model, lora)
    return model


def _with_lora(model: nn.Module, lora: LoraOptions) -> nn.Module:
    """A LoRA adapter on the backbone; the head trained in full (peft's token-classification modules_to_save), and
    kept out of "all-linear" (peft leaves only a sequence classifier's head out by itself)."""
    from peft import get_peft_model  # noqa: PLC0415 - slow import (seconds): adapters only

    config = lora.to_peft_config("TOKEN_CLS")
    head = next(n for n in HEAD_NAMES if getattr(model, n, None) is token_head(model))
    config.exclude_modules = [head]
    return get_peft_model(model, config)


def load_prm(path: str | os.PathLike, dtype=None, device=None) -> tuple[nn.Module, object]:
    """(PRM in eval mode, its tokenizer) from a folder `alignloop prm` wrote (its config marks it). A folder that is
    not a PRM is a UserError."""
    name = check_name_or_path(path, "model")
    if not is_prm_folder(name):
        raise UserError(f"{name} is not a process reward model: its config.json has no {PRM_CONFIG_KEY!r} entry "
                        f"(train one with `alignloop prm`)")
    model = AutoModelForTokenClassification.from_pretrained(name, dtype=resolve_dtype(dtype))
    if device is not None:
        model.to(device)
    return model.eval(), load_tokenizer(name, padding_side="right")


def prm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head at every position [B,T,C], position ids from the attention mask (padded positions: meaningless)."""
    return model_forward(model, input_ids, attention_mask)


def step_probabilities(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       step_mask: torch.Tensor) -> torch.Tensor:
    """P(step good) [B,T] float32 at the step-end positions (`step_mask`), 0 elsewhere (`good_probability`: σ of a
    1-output head, 1 - P(bad) of a 3-class one)."""
    p = good_probability(prm_logits(model, input_ids, attention_mask)).float()
    return torch.where(step_mask.bool().to(p.device), p, torch.zeros_like(p))


def batch_steps(examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None,
                padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad PRM examples ({"input_ids", "step_ends"[, "labels", "soft_labels"]} as
    `alignloop.data.tokenize_step_records` makes them) into tensors (see the module docstring)."""
    input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], pad_token_id, padding_side,
                                          pad_to_multiple_of)
    B, T = input_ids.shape
    step_mask = torch.zeros(B, T, dtype=torch.bool)
    step_labels = torch.zeros(B, T, dtype=torch.long)
    label_mask = torch.zeros(B, T, dtype=torch.bool)
    soft_targets = torch.zeros(B, T)
    soft_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, e in enumerate(examples):
        shift = T - len(e["input_ids"]) if padding_side == "left" else 0
        labels = e.get("labels") or [None] * len(e["step_ends"])
        soft = e.get("soft_labels") or [None] * len(e["step_ends"])
        for pos, label, s in zip(e["step_ends"], labels, soft, strict=True):
            step_mask[i, pos + shift] = True
            if label is not None:
                step_labels[i, pos + shift], label_mask[i, pos + shift] = label, True
            if s is not None:
                soft_targets[i, pos + shift], soft_mask[i, pos + shift] = s, True
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids_from_attention_mask(attention_mask), "step_mask": step_mask,
            "step_labels": step_labels, "label_mask": label_mask, "soft_targets": soft_targets,
            "soft_mask": soft_mask}


@torch.no_grad()
def score_steps(model: nn.Module, tokenizer, prompts: Sequence[str], step_lists: Sequence[Sequence[str]], *,
                separator: str = STEP_SEPARATOR, max_length: int | None = None,
                batch_size: int = 32) -> list[list[float | None]]:
    """P(step good) of every step of every solution (prompt texts and their steps), in eval mode, `batch_size`
    solutions per forward. Steps past `max_length` (whole steps kept from the start) are not seen: None."""
    if len(prompts) != len(step_lists):
        raise ValueError(f"got {len(prompts)} prompts for {len(step_lists)} solutions")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = []
    for prompt, steps in zip(prompts, step_lists, strict=True):
        ids, ends = tokenize_steps(tokenizer, prompt, list(steps), separator, max_length) if steps else ([], [])
        examples.append({"input_ids": ids, "step_ends": ends, "n": len(steps)})
    was = model.training
    model.eval()
    out: list[list[float | None]] = []
    try:
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo:lo + batch_size]
            batch = batch_steps([e for e in chunk if e["step_ends"]], pad_id)
            probs = step_probabilities(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                       batch["step_mask"]).cpu() if batch["input_ids"].numel() else None
            k = 0
            for e in chunk:
                seen = probs[k, e["step_ends"]].tolist() if e["step_ends"] else []
                k += bool(e["step_ends"])
                out.append(seen + [None] * (e["n"] - len(seen)))
    finally:
        model.train(was)
    return out
