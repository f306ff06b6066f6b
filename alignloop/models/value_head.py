"""A policy LM with a scalar value head on its trunk, for PPO: logits and per-token values in one forward pass.

Save layout (`CausalLMWithValueHead.save_pretrained(dir)`):
    dir/config.json, dir/model.safetensors, ...   the LM, via transformers' save_pretrained (plain
                                                  AutoModelForCausalLM.from_pretrained(dir) loads it); with a LoRA
                                                  adapter, merged by default, or adapter files when merge_lora=False
    dir/value_head.safetensors                    {"weight": [1, D], "bias": [1]} of the value head
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignloop.errors import UserError
from alignloop.models.forward import model_forward, unwrap_model
from alignloop.models.loading import LoraOptions, has_adapter, load_causal_lm

VALUE_HEAD_FILE = "value_head.safetensors"


def init_reward_head(linear: nn.Linear, d_model: int | None = None) -> None:
    """Reward-head init: weight ~ N(0, std = 1/sqrt(d_model + 1)), bias 0 (Huang et al. 2024; OpenAI's
    lm-human-preferences)."""
    d = d_model if d_model is not None else linear.in_features
    with torch.no_grad():
        linear.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
        if linear.bias is not None:
            linear.bias.zero_()


def hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    text = getattr(config, "text_config", None)
    if text is not None:
        return hidden_size(text)
    raise UserError(f"cannot find the hidden size of {type(config).__name__} (hidden_size / n_embd / d_model)")


class ValueHead(nn.Module):
    """Scalar head [B,T,D] -> [B,T]. `init="zero"` (PPO value head: values start at 0) or `"reward"`
    (N(0, 1/sqrt(D+1)), bias 0). Computed in float32 whatever the trunk's dtype."""

    def __init__(self, d_model: int, init: str = "zero", dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.summary = nn.Linear(d_model, 1)
        if init == "zero":
            nn.init.zeros_(self.summary.weight)
            nn.init.zeros_(self.summary.bias)
        elif init == "reward":
            init_reward_head(self.summary, d_model)
        else:
            raise ValueError(f"init must be 'zero' or 'reward', got {init!r}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(hidden).to(self.summary.weight.dtype)
        return self.summary(hidden).squeeze(-1)

    def state_for_save(self) -> dict[str, torch.Tensor]:
        return {"weight": self.summary.weight.detach().cpu().contiguous(),
                "bias": self.summary.bias.detach().cpu().contiguous()}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.summary.weight.copy_(state["weight"])
            self.summary.bias.copy_(state["bias"])


class LogitsAndValues(NamedTuple):
    logits: torch.Tensor   # [B,T,V]
    values: torch.Tensor   # [B,T], float32


class CausalLMWithValueHead(nn.Module):
    """`.lm` (a transformers causal LM, optionally a peft model) + `.v_head` (`ValueHead` on the last hidden state).

    `forward(input_ids, attention_mask) -> LogitsAndValues(logits[B,T,V], values[B,T])` in one pass, with position
    ids from the attention mask. `generate(...)` is the LM's. Use `reference_mode(model)` on a LoRA policy to get
    reference outputs from the same weights."""

    _alignloop_wrapper = True

    def __init__(self, lm: nn.Module, v_head: ValueHead | None = None, value_head_init: str = "zero"):
        super().__init__()
        self.lm = lm
        if v_head is None:
            v_head = ValueHead(hidden_size(unwrap_model(lm).config), init=value_head_init)
            param = next(lm.parameters(), None)
            if param is not None:
                v_head.to(param.device)
        self.v_head = v_head

    @property
    def config(self):
        return unwrap_model(self.lm).config

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                        lora: LoraOptions | None = None, gradient_checkpointing: bool = False,
                        trust_remote_code: bool = False, value_head_init: str = "zero",
                        **kwargs: Any) -> CausalLMWithValueHead:
        """Load the LM with `load_causal_lm`; the value head from `value_head.safetensors` when the folder has
        one, else freshly initialised (`value_head_init`)."""
        lm = load_causal_lm(name_or_path, dtype=dtype, lora=lora, gradient_checkpointing=gradient_checkpointing,
                            trust_remote_code=trust_remote_code, **kwargs)
        model = cls(lm, value_head_init=value_head_init)
        head_file = Path(os.path.expanduser(str(name_or_path))) / VALUE_HEAD_FILE
        if head_file.exists():
            try:
                model.v_head.load_saved(load_file(str(head_file)))
            except (KeyError, RuntimeError) as e:
                raise UserError(f"{head_file} does not match this model's hidden size: {e}") from e
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                **kwargs) -> LogitsAndValues:
        logits, hidden = model_forward(self.lm, input_ids, attention_mask, return_hidden=True,
                                       position_ids=position_ids, **kwargs)
        return LogitsAndValues(logits, self.v_head(hidden))

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None, merge_lora: bool = True, **kwargs) -> None:
        """LM via `save_pretrained` (merged copy when it has a LoRA adapter and `merge_lora`), value head as
        `value_head.safetensors`, tokenizer too when given."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lm = self.lm
        if has_adapter(lm) and merge_lora:
            lm = copy.deepcopy(lm).merge_and_unload()
        lm.save_pretrained(path, **kwargs)
        save_file(self.v_head.state_for_save(), str(path / VALUE_HEAD_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


class ActorCritic(nn.Module):
    """PPO's policy with its value function: forward(input_ids, attention_mask) -> (logits [B,T,V], values [B,T]),
    from the policy's value head (`CausalLMWithValueHead`, one pass) or a separate critic (e.g. a `CriticModel`
    initialised from the reward model). `lm` is the causal LM that samples."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.policy, self.critic = policy, critic

    @property
    def lm(self) -> nn.Module:
        return self.policy.lm if isinstance(self.policy, CausalLMWithValueHead) else self.policy

    def forward(self, input_ids, attention_mask):
        if self.critic is None:
            out = self.policy(input_ids, attention_mask)
            return out.logits, out.values
        return model_forward(self.lm, input_ids, attention_mask), self.critic(input_ids, attention_mask).float()
