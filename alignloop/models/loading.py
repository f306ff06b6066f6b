"""Loading models and tokenizers by hub id or local path, with dtype, LoRA and gradient checkpointing options.

User mistakes (a missing local folder, a folder without a model, an unknown dtype) raise
`alignloop.errors.UserError` with a message that says what to fix. peft is imported only where an adapter is made or
loaded (it takes seconds to import); `has_adapter` never needs to import it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignloop.errors import UserError
from alignloop.models.forward import unwrap_distributed

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """`None` -> torch.float32 (predictable training precision); "auto" -> "auto" (the checkpoint's own dtype);
    "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16" or a `torch.dtype` -> that dtype. Else `UserError`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise UserError(f"dtype {dtype} is not a floating-point dtype a model can be loaded in")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in DTYPES:
            return DTYPES[key]
    raise UserError(f"unknown dtype {dtype!r}: use one of auto, float32, bfloat16, float16 (or fp32, bf16, fp16)")


def _looks_like_local_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(name) or name.count("/") > 1
            or name in (".", ".."))


def check_name_or_path(name_or_path: str | os.PathLike, what: str = "model") -> str:
    """Validate a hub id or local path and return it as a string. A path that is clearly local (absolute, ./, ../,
    ~, or more than one '/') must exist and be a folder with a config.json (for models)."""
    if name_or_path is None or str(name_or_path).strip() == "":
        raise UserError(f"no {what} given: pass a hub id (e.g. 'gpt2') or a local folder")
    name = os.path.expanduser(str(name_or_path))
    p = Path(name)
    if isinstance(name_or_path, os.PathLike) or _looks_like_local_path(str(name_or_path)) or p.exists():
        if not p.exists():
            raise UserError(f"{what} path {str(name_or_path)!r} does not exist (expected a folder written by "
                            f"save_pretrained, or a hub id such as 'gpt2')")
        if not p.is_dir():
            raise UserError(f"{what} path {str(name_or_path)!r} is a file; expected a folder written by "
                            f"save_pretrained")
        if what != "tokenizer" and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise UserError(f"{what} folder {str(name_or_path)!r} has no config.json: is it a save_pretrained folder?")
    return name


@contextlib.contextmanager
def _user_errors(name: str, what: str):
    try:
        yield
    except UserError:
        raise
    except OSError as e:  # not found on the hub, offline, missing files
        hint = "" if Path(name).exists() else f" (and there is no local folder {name!r})"
        raise UserError(f"could not load {what} {name!r}{hint}: {e}") from e
    except ValueError as e:  # unrecognised model type / architecture
        if "Unrecognized" in str(e) or "does not appear" in str(e) or "not supported" in str(e):
            raise UserError(f"could not load {what} {name!r}: {e}") from e
        raise


@dataclass
class LoraOptions:
    """LoRA adapter settings (passed to `peft.LoraConfig`)."""

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (lora_alpha); scale = alpha / r."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "Modules to adapt: 'all-linear' or a list of module names."})
    bias: str = field(default="none", metadata={"help": "Which biases to train: none, all or lora_only."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha/sqrt(r)."})

    def __post_init__(self):
        if self.r <= 0:
            raise UserError(f"lora r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise UserError(f"lora bias must be none, all or lora_only, got {self.bias!r}")

    def to_peft_config(self, task_type: str = "CAUSAL_LM"):
        from peft import LoraConfig  # noqa: PLC0415 - slow import (seconds): adapters only

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, bias=self.bias, modules_to_save=self.modules_to_save,
                          use_rslora=self.use_rslora, task_type=task_type)


def apply_lora(model: nn.Module, options: LoraOptions, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap `model` in a peft LoRA model (only the adapter, plus `modules_to_save`, is trainable). At init the
    adapter is the identity (LoRA B = 0), so outputs equal the base model's."""
    from peft import get_peft_model  # noqa: PLC0415 - slow import (seconds): adapters only

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        return get_peft_model(model, options.to_peft_config(task_type))


def _unwrap_wrapper(model: nn.Module) -> nn.Module:
    # DDP/compile wrappers, then our wrappers (CausalLMWithValueHead, RewardModel) that hold the transformers/peft
    # model in .lm / .model
    model = unwrap_distributed(model)
    for attr in ("lm", "model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and getattr(model, "_alignloop_wrapper", False):
            return inner
    return model


def has_adapter(model: nn.Module) -> bool:
    """True when `model` (or the LM inside our wrappers) carries a peft adapter."""
    model = _unwrap_wrapper(model)
    peft = sys.modules.get("peft")  # a model cannot be a PeftModel before peft was imported: no need to import it
    if peft is not None and isinstance(model, peft.PeftModel):
        return True
    return bool(getattr(model, "_hf_peft_config_loaded", False))


_REFERENCE_ATTR = "_alignloop_reference_values"


def keep_reference(model: nn.Module) -> nn.Module:
    """Make `reference_mode(model)` give the policy as it is now (the starting policy, adapter on), not its base.

    Disabling the adapter gives the starting policy only while the adapter is the identity (a fresh LoRA: B = 0); a
    policy that starts from a trained adapter (an adapter folder as `model`, a model with an adapter loaded) would
    be compared with its base. So a copy of the values of its trainable parameters (the adapter, and any
    `modules_to_save`) is kept: memory the adapter's size, no second model. Inside `reference_mode` those values
    are swapped in (the parameters' storage is exchanged, nothing copied) and swapped back on exit. The copy is not
    part of the state dict (checkpoints and saved adapters are unchanged). Call once before the first optimizer
    step, after the model is on its device. Raises `ValueError` without an adapter (then keep a frozen copy of the
    model instead)."""
    inner = _unwrap_wrapper(model)
    if not has_adapter(inner):
        raise ValueError("keep_reference needs a model with a peft adapter; without LoRA keep a frozen copy of the "
                         "model (copy.deepcopy) as the reference")
    kept = [(p, p.detach().clone()) for p in inner.parameters() if p.requires_grad]
    setattr(inner, _REFERENCE_ATTR, kept)  # a plain attribute: not in the state dict
    return model


@contextlib.contextmanager
def _swapped_in(pairs: list[tuple[nn.Parameter, torch.Tensor]]):
    live = [p.data for p, _ in pairs]
    try:
        for p, start in pairs:
            p.data = start
        yield
    finally:
        for (p, _), data in zip(pairs, live, strict=True):
            p.data = data


def reference_context(model: nn.Module, ref_model: nn.Module | None, use_adapter: bool):
    """A context whose value is the reference model of an offline trainer, in eval mode: `ref_model` when given;
    else the LoRA policy's own reference (`reference_mode`); else the policy itself in eval mode, which is the
    reference only before its first optimizer step (precomputed reference log-probs)."""
    if ref_model is not None:
        return contextlib.nullcontext(ref_model)
    if use_adapter:
        return reference_mode(model)
    return _policy_as_reference(model)


@contextlib.contextmanager
def _policy_as_reference(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@contextlib.contextmanager
def reference_mode(model: nn.Module):
    """Use a LoRA policy as its own reference model: inside the block the model computes the reference, in eval
    mode (dropout off) and without gradients; on exit the adapter and the previous train/eval mode are restored.

    The reference is the policy's starting adapter when `keep_reference(model)` was called (needed when training
    starts from a trained adapter), else the base model with the adapter disabled (exact for a fresh adapter,
    which is the identity; no copy of anything).

    Raises `ValueError` for a model without an adapter: then the reference must be a separate model (a silent
    no-op here would make the "reference" equal the policy being trained)."""
    inner = _unwrap_wrapper(model)
    if not has_adapter(inner):
        raise ValueError("reference_mode needs a model with a peft adapter; without LoRA load a separate reference "
                         "model (load_causal_lm) instead")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            kept = getattr(inner, _REFERENCE_ATTR, None)
            if kept is not None:
                with _swapped_in(kept):
                    yield model
            elif hasattr(inner, "disable_adapter") and not getattr(inner, "_hf_peft_config_loaded", False):
                with inner.disable_adapter():
                    yield model
            else:  # an adapter loaded through transformers' own peft integration
                inner.disable_adapters()
                try:
                    yield model
                finally:
                    inner.enable_adapters()
    finally:
        model.train(was_training)


def _finish(model: nn.Module, lora: LoraOptions | None, gradient_checkpointing: bool, task_type: str) -> nn.Module:
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
    if lora is not None:
        if not isinstance(lora, LoraOptions):
            raise UserError(f"lora must be a LoraOptions (or None), got {type(lora).__name__}")
        model = apply_lora(model, lora, task_type=task_type)
    return model


def load_causal_lm(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                   lora: LoraOptions | None = None, gradient_checkpointing: bool = False,
                   trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """Load an `AutoModelForCausalLM` by hub id or local folder. `dtype`: None (float32), "auto", "float32",
    "bfloat16", "float16" or a torch.dtype. `lora` wraps the model in a peft LoRA adapter. A folder holding a peft
    adapter (adapter_config.json) loads base + adapter. Extra kwargs go to `from_pretrained`."""
    name = check_name_or_path(name_or_path, "model")
    torch_dtype = resolve_dtype(dtype)
    with _user_errors(name, "causal LM"):
        if Path(name, "adapter_config.json").exists() and not Path(name, "config.json").exists():
            from peft import AutoPeftModelForCausalLM  # noqa: PLC0415 - slow import (seconds): adapters only

            if lora is not None:
                warnings.warn(f"{name} already holds a LoRA adapter: training it, the lora options are ignored",
                              stacklevel=2)
            model = AutoPeftModelForCausalLM.from_pretrained(name, dtype=torch_dtype, is_trainable=True,
                                                             trust_remote_code=trust_remote_code, **kwargs)
            return _finish(model, None, gradient_checkpointing, "CAUSAL_LM")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    return _finish(model, lora, gradient_checkpointing, "CAUSAL_LM")


def load_sequence_classifier(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                             num_labels: int | None = None, lora: LoraOptions | None = None,
                             gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                             output_loading_info: bool = False, **kwargs: Any):
    """Load an `AutoModelForSequenceClassification` (same options as `load_causal_lm`). `num_labels=None` keeps the
    checkpoint's. With `output_loading_info`, returns `(model, info)` where info["missing_keys"] lists newly
    initialised weights (e.g. the score head when loading a causal-LM checkpoint)."""
    name = check_name_or_path(name_or_path, "model")
    torch_dtype = resolve_dtype(dtype)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if Path(name, "adapter_config.json").exists() and not Path(name, "config.json").exists():
        from peft import AutoPeftModelForSequenceClassification  # noqa: PLC0415 - slow import (seconds): adapters only

        if lora is not None:
            warnings.warn(f"{name} already holds a LoRA adapter: training it, the lora options are ignored",
                              stacklevel=2)
        with _user_errors(name, "sequence classifier"):
            model = AutoPeftModelForSequenceClassification.from_pretrained(
                name, dtype=torch_dtype, is_trainable=True, trust_remote_code=trust_remote_code, **kwargs)
        model = _finish(model, None, gradient_checkpointing, "SEQ_CLS")
        return (model, {"missing_keys": set()}) if output_loading_info else model
    with _user_errors(name, "sequence classifier"):
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name, dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs)
        except RuntimeError as e:
            if "size mismatch" in str(e) or "mismatched" in str(e):
                raise UserError(f"could not load {name!r} with num_labels={num_labels}: the checkpoint's "
                                f"classification head has a different size ({e})") from e
            raise
    if getattr(model.config, "pad_token_id", None) is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    model = _finish(model, lora, gradient_checkpointing, "SEQ_CLS")
    return (model, info) if output_loading_info else model


def load_tokenizer(name_or_path: str | os.PathLike, padding_side: str = "right", trust_remote_code: bool = False,
                   **kwargs: Any):
    """Load a tokenizer by hub id or local folder. When it has no pad token, pad = EOS (our code finds the last
    real token from the attention mask, so pad == EOS is safe). `padding_side`: "right" (training) or "left"
    (generation)."""
    if padding_side not in ("left", "right"):
        raise UserError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    name = check_name_or_path(name_or_path, "tokenizer")
    with _user_errors(name, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer {name!r} has neither a pad token nor an EOS token; add one with "
                            f"tokenizer.add_special_tokens({{'pad_token': ...}}) and resize the model's embeddings")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok
