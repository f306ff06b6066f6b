"""Reward models (LM backbone + scalar head), critics initialised from them, and rewards from existing classifiers.

Design: a reward model is stored as a plain transformers `AutoModelForSequenceClassification` with `num_labels=1`
(for GPT-2, Llama, Qwen, Mistral... the head is a bias-free `score` Linear on the backbone's last hidden state), so
`AutoModelForSequenceClassification.from_pretrained(folder)` loads what we save, with no alignloop code, and scores
what alignloop scores. `score_sequences` runs the backbone with position ids from the attention mask and applies the
head at the token transformers reads: the last real token that is not `config.pad_token_id` (`last_token_index`).
With pad == EOS (GPT-2, Llama) that is the token before the appended EOS, as in transformers and TRL, so an
alignloop reward model scores the same under transformers and a TRL reward model the same under alignloop; unlike
transformers' own pad-id search, left padding and EOS inside the text are read correctly too. Encoder classifiers
(BERT, RoBERTa, ..., no `score` Linear) are called through their own forward, which pools the first token and is
padding-safe.

Multi-head reward models (one score per criterion, labeler group or labeler on a shared backbone) are the same
format with `num_labels = H`: the `score` Linear's weight is [H, d], row h being head h. The config names the heads:
`id2label = {0: name0, ...}` and `alignloop_heads = {"by": "criterion" | "group" | "labeler", "names": [...],
"population": <the head trained on every pair> | None}` (`heads_info`). A model without `alignloop_heads` is the
plain one-head reward model. Plain transformers still loads a multi-head model (its logits are the H head scores).

Shapes: B = sequences, T = tokens, H = heads, d = hidden size.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignloop.errors import UserError
from alignloop.models.forward import backbone_hidden_states, last_token_index, unwrap_distributed, unwrap_model
from alignloop.models.loading import (
    LoraOptions,
    apply_lora,
    check_name_or_path,
    has_adapter,
    load_sequence_classifier,
    load_tokenizer,
)
from alignloop.models.value_head import init_reward_head


def _score_head(hf: nn.Module) -> nn.Module | None:
    """The decoder-style classification head (`score`) of a transformers sequence classifier, or None."""
    head = getattr(hf, "score", None)
    return head if isinstance(head, nn.Module) else None


def has_decoder_head(model: nn.Module) -> bool:
    """True for a decoder-style sequence classifier (a `score` head read at the last real token: GPT-2, Llama, ...,
    alignloop's reward models); False for an encoder classifier (BERT, RoBERTa: pooled, with special tokens)."""
    return _score_head(unwrap_model(_classifier(model))) is not None


def context_length(model: nn.Module, tokenizer=None) -> int | None:
    """The most tokens a sequence classifier takes: its config's position limit, less the positions a RoBERTa-style
    embedding reserves (padding_idx + 1: roberta-base's 514 positions hold 512 tokens), capped by the tokenizer's
    `model_max_length` when that is set; None when neither says."""
    hf = unwrap_model(_classifier(model))
    config = getattr(hf, "config", None)
    limits = (getattr(config, k, None) for k in ("max_position_embeddings", "n_positions"))
    limit = next((x for x in limits if isinstance(x, int) and x > 0), None)
    emb = getattr(getattr(hf, "base_model", hf), "embeddings", None)
    reserved = getattr(emb, "padding_idx", None)
    if limit is not None and isinstance(reserved, int) and hasattr(emb, "position_embeddings"):
        limit -= reserved + 1
    most = getattr(tokenizer, "model_max_length", None)
    if isinstance(most, int) and 0 < most < 1_000_000:   # transformers' "no limit" is a huge number
        limit = most if limit is None else min(limit, most)
    return limit


def _classifier(model: nn.Module) -> nn.Module:
    """Our wrappers (RewardModel, CriticModel, ClassifierReward; possibly DDP-wrapped) -> the classifier inside."""
    inner = unwrap_distributed(model)
    if getattr(inner, "_alignloop_wrapper", False) and isinstance(getattr(inner, "model", None), nn.Module):
        return inner.model
    return model


def token_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Classification head applied at every position of a decoder sequence classifier: [B,T,num_labels].
    Position ids come from the attention mask. Values at padded positions are meaningless (mask them)."""
    model = _classifier(model)
    hf = unwrap_model(model)
    head = _score_head(hf)
    if head is None:
        raise UserError(f"{type(hf).__name__} has no `score` head on a decoder backbone; per-token values need a "
                        f"decoder-style sequence classifier (GPT-2, Llama, Qwen, Mistral, ...)")
    hidden = backbone_hidden_states(model, input_ids, attention_mask)
    return head(hidden)


def _pad_token_id(hf: nn.Module) -> int | None:
    """The pad id transformers' sequence classifier skips when it picks the scored token."""
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    return getattr(config, "pad_token_id", None)


def sequence_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B,num_labels] of a sequence classifier, read at each sequence's last real token that is not the
    config's pad id (see `last_token_index`; right and left padding give the same result as the unpadded sequence,
    and the result is transformers' own for any sequence it reads correctly). Encoder
    classifiers without a `score` head use their own (padding-safe) forward."""
    model = _classifier(model)
    hf = unwrap_model(model)
    if _score_head(hf) is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    hidden = backbone_hidden_states(model, input_ids, attention_mask)
    idx = last_token_index(attention_mask, input_ids, _pad_token_id(hf)).to(hidden.device)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    # apply the head through the (possibly peft-wrapped) module so trained modules_to_save copies are used
    return _score_head(unwrap_model(model))(last)


def score_sequences(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    label: int = 0) -> torch.Tensor:
    """Scalar score per sequence [B], float32, at the last real token (column `label` of `sequence_logits`; for a
    multi-head `RewardModel`, head number `label`). `model`: a `RewardModel`, or a transformers (optionally peft)
    sequence classifier."""
    inner = unwrap_distributed(model)
    if isinstance(inner, RewardModel) and not isinstance(inner, CriticModel):
        if not 0 <= label < inner.num_heads:
            raise ValueError(f"label {label} is not a head of this reward model (it has {inner.num_heads})")
        # through a DDP wrapper, if any; a one-head model is called as it always was (subclasses override forward)
        return model(input_ids, attention_mask) if inner.num_heads == 1 else model(input_ids, attention_mask,
                                                                                    head=label)
    return sequence_logits(model, input_ids, attention_mask)[:, label].float()


# ---------------------------------------------------------------- multi-head format

HEADS_BY = ("criterion", "group", "labeler")
POPULATION_HEAD = "population"


def check_heads(heads: Any) -> dict[str, Any]:
    """A heads description {"by", "names", "population"} checked and normalised (a UserError naming what is wrong):
    `by` one of HEADS_BY, `names` distinct non-empty strings, `population` None or one of the names."""
    if not isinstance(heads, dict):
        raise UserError(f"alignloop_heads: expected an object {{by, names, population}}, got {type(heads).__name__}")
    by, names, population = heads.get("by"), heads.get("names"), heads.get("population")
    if by not in HEADS_BY:
        raise UserError(f"alignloop_heads.by: expected one of {', '.join(HEADS_BY)}, got {by!r}")
    if (not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)):
        raise UserError(f"alignloop_heads.names: expected distinct non-empty strings, got {names!r}")
    if population is not None and population not in names:
        raise UserError(f"alignloop_heads.population: {population!r} is not one of the heads {list(names)}")
    return {"by": by, "names": list(names), "population": population}


def heads_info(config_or_folder: Any) -> dict[str, Any] | None:
    """The `alignloop_heads` of a reward model ({"by", "names", "population"}, checked against its num_labels), or
    None for a plain one-head model. Takes a transformers config, a model (ours or transformers'), a config dict, or a
    model folder (only its config.json is read; a hub id goes through AutoConfig, so the cache)."""
    config = config_or_folder
    if isinstance(config, (str, os.PathLike)):
        folder = Path(check_name_or_path(config, "reward model"))
        if folder.is_dir():  # a LoRA adapter folder has no config.json: no heads of its own
            path = folder / "config.json"
            config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        else:
            from transformers import AutoConfig  # noqa: PLC0415 - a hub id only: the local case reads config.json

            config = AutoConfig.from_pretrained(str(config_or_folder)).to_dict()
    elif isinstance(config, nn.Module):
        config = unwrap_model(_classifier(config)).config
    if not isinstance(config, dict):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    raw = config.get("alignloop_heads")
    if raw is None:
        return None
    heads = check_heads(raw)
    n_labels = len(config.get("id2label") or {}) or config.get("num_labels")
    if n_labels is not None and n_labels != len(heads["names"]):
        raise UserError(f"alignloop_heads names {len(heads['names'])} heads but the model has {n_labels} outputs")
    return heads


def set_heads(config, heads: dict[str, Any] | None) -> None:
    """Write a heads description into a transformers config (id2label, label2id, alignloop_heads): what
    `heads_info` reads back. None leaves a one-head config as transformers made it."""
    if heads is None:
        return
    heads = check_heads(heads)
    config.id2label = dict(enumerate(heads["names"]))
    config.label2id = {name: i for i, name in enumerate(heads["names"])}
    config.alignloop_heads = heads


def _merged_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).merge_and_unload()


class RewardModel(nn.Module):
    """LM backbone + H >= 1 scalar heads, read at the last real token: `forward(input_ids, attention_mask) ->
    scores[B]` (float32) for a one-head model or a named head, `head_scores(...) -> [B, H]` for all heads.

    Wraps a transformers `AutoModelForSequenceClassification` with num_labels=H (attribute `.model`, optionally a
    peft model); H > 1 needs the config's `alignloop_heads` (see the module docstring), so that a multi-class
    classifier is not taken for a reward model by mistake. `save_pretrained` writes a plain transformers folder;
    `from_pretrained` loads it, or a causal-LM checkpoint (e.g. the SFT model), in which case the new heads get the
    reward init N(0, 1/sqrt(d+1))."""

    _alignloop_wrapper = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config = unwrap_model(model).config
        num_labels = getattr(config, "num_labels", 1)
        self.heads = heads_info(config)
        if self.heads is None and num_labels != 1:
            raise UserError(f"a reward model needs a single-output head (num_labels=1), this one has {num_labels} "
                            f"and no alignloop_heads naming them: use ClassifierReward for multi-class classifiers")
        self.head_names: list[str] = self.heads["names"] if self.heads else ["reward"]

    @property
    def config(self):
        return unwrap_model(self.model).config

    @property
    def num_heads(self) -> int:
        return len(self.head_names)

    def head_index(self, head: int | str) -> int:
        """The column of a head given by number or name (a UserError naming the heads otherwise)."""
        if isinstance(head, str) and head in self.head_names:
            return self.head_names.index(head)
        if isinstance(head, int) and not isinstance(head, bool) and 0 <= head < self.num_heads:
            return head
        raise UserError(f"{head!r} is not a head of this reward model; its heads: {', '.join(self.head_names)}")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                        lora: LoraOptions | None = None, gradient_checkpointing: bool = False,
                        trust_remote_code: bool = False, heads: dict[str, Any] | None = None,
                        **kwargs: Any) -> RewardModel:
        """Load a reward model (its heads as saved), or start one from a causal LM: one head, or with `heads`
        ({"by", "names", "population"}) one head per name. `heads` given for a saved multi-head model must name the
        same heads (training continues on them)."""
        saved = heads_info(name_or_path)
        if heads is not None:
            heads = check_heads(heads)
            if saved is not None and saved != heads:
                raise UserError(f"{name_or_path} has the heads {saved}; asked for {heads}: start a model with other "
                                f"heads from a causal LM (e.g. the SFT model)")
        heads = heads or saved
        model, info = load_sequence_classifier(name_or_path, dtype=dtype, num_labels=len(heads["names"]) if heads
                                               else 1, lora=None, gradient_checkpointing=gradient_checkpointing,
                                               trust_remote_code=trust_remote_code, output_loading_info=True,
                                               **kwargs)
        head = _score_head(model)
        missing = set(info.get("missing_keys", ())) if isinstance(info, dict) else set()
        if head is not None and any(k.startswith("score.") for k in missing) and isinstance(head, nn.Linear):
            init_reward_head(head)
        set_heads(unwrap_model(model).config, heads)
        if lora is not None and not has_adapter(model):
            model = apply_lora(model, lora, task_type="SEQ_CLS")
        return cls(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, head: int | str | None = None,
                all_heads: bool = False) -> torch.Tensor:
        """Scores [B] of one head (`head`: a number or name; may be left out when there is one head), or with
        `all_heads=True` the scores of every head [B, H] (the trainer's path: a DDP-wrapped model syncs gradients
        only through forward, so `head_scores` is this call)."""
        logits = sequence_logits(self.model, input_ids, attention_mask).float()
        if all_heads:
            return logits
        if head is None:
            if self.num_heads > 1:
                raise UserError(f"this reward model has {self.num_heads} heads ({', '.join(self.head_names)}): name "
                                f"one (head=...) or use head_scores")
            return logits[:, 0]
        return logits[:, self.head_index(head)]

    def head_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The score of every head [B, H], float32, at each sequence's last real token."""
        return self(input_ids, attention_mask, all_heads=True)

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     head: int | str | None = None) -> torch.Tensor:
        """One head at every position: [B,T] float32 (padded positions are meaningless); `head` as in forward."""
        if head is None and self.num_heads > 1:
            raise UserError(f"this reward model has {self.num_heads} heads ({', '.join(self.head_names)}): name one")
        return token_logits(self.model, input_ids, attention_mask)[..., 0 if head is None
                                                                   else self.head_index(head)].float()

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None, merge_lora: bool = True, **kwargs) -> None:
        """Write the classifier with `save_pretrained` (a plain transformers folder). With a LoRA adapter,
        `merge_lora=True` (default) saves a merged copy (the live model keeps its adapter); False saves the adapter
        only (peft format)."""
        model = self.model
        if has_adapter(model) and merge_lora:
            model = _merged_copy(model)
        model.save_pretrained(path, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


class CriticModel(RewardModel):
    """A separate critic for PPO, initialised from a reward model: `forward(input_ids, attention_mask) ->
    values[B,T]`, the reward model's scalar head applied at every position. Saved like a `RewardModel`."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.token_scores(input_ids, attention_mask)


def critic_from_reward_model(reward_model: str | os.PathLike | RewardModel, dtype: str | torch.dtype | None = None,
                             lora: LoraOptions | None = None, gradient_checkpointing: bool = False,
                             trust_remote_code: bool = False) -> CriticModel:
    """A trainable critic initialised from a reward model (a path/hub id, or a `RewardModel` which is deep-copied,
    so training the critic leaves the reward model unchanged; a frozen reward model gives a trainable critic)."""
    if isinstance(reward_model, RewardModel):
        inner = copy.deepcopy(reward_model.model)
        if has_adapter(inner):  # keep the reward model's adapter; train it (and the head copy) only
            for name, param in inner.named_parameters():
                param.requires_grad_("lora_" in name or "modules_to_save" in name)
        else:
            inner.requires_grad_(True)
            if lora is not None:
                inner = apply_lora(inner, lora, task_type="SEQ_CLS")
        return CriticModel(inner)
    return CriticModel.from_pretrained(reward_model, dtype=dtype, lora=lora,
                                       gradient_checkpointing=gradient_checkpointing,
                                       trust_remote_code=trust_remote_code)


class ClassifierReward(nn.Module):
    """Reward from an existing sequence classifier: the logit of its positive class (e.g. "not hate" for a
    hate-speech classifier). `positive_label`: a class index or a label name from `config.id2label`.

    `reward(texts) -> [B]` tokenises (right padding, truncation to `max_length`) and scores in batches of
    `batch_size` under `torch.no_grad()` in eval mode; `score_tokens(input_ids, attention_mask) -> [B]` scores
    tokens that are already in the classifier's vocabulary."""

    _alignloop_wrapper = True

    def __init__(self, model: nn.Module, tokenizer=None, positive_label: int | str = 1, max_length: int = 512,
                 batch_size: int = 32):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.label_index = self.resolve_label(unwrap_model(model).config, positive_label)
        self.max_length = max_length
        self.batch_size = batch_size
        if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token

    @staticmethod
    def resolve_label(config, positive_label: int | str) -> int:
        num_labels = int(getattr(config, "num_labels", 1))
        id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        if isinstance(positive_label, bool):
            raise UserError(f"positive_label must be a class index or label name, got {positive_label!r}")
        if isinstance(positive_label, int):
            idx = positive_label if positive_label >= 0 else num_labels + positive_label
            if not 0 <= idx < num_labels:
                raise UserError(f"positive_label {positive_label} is out of range: the classifier has {num_labels} "
                                f"classes {sorted(id2label.items())}")
            return idx
        if isinstance(positive_label, str):
            if positive_label.lstrip("-").isdigit() and positive_label not in id2label.values():
                return ClassifierReward.resolve_label(config, int(positive_label))
            matches = [i for i, name in id2label.items() if name == positive_label]
            if not matches:
                matches = [i for i, name in id2label.items() if name.lower() == positive_label.lower()]
            if len(matches) != 1:
                raise UserError(f"positive_label {positive_label!r} is not one of the classifier's labels "
                                f"{[id2label[i] for i in sorted(id2label)]}")
            return matches[0]
        raise UserError(f"positive_label must be a class index or label name, got {positive_label!r}")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, positive_label: int | str = 1,
                        dtype: str | torch.dtype | None = None, max_length: int = 512, batch_size: int = 32,
                        trust_remote_code: bool = False) -> ClassifierReward:
        model = load_sequence_classifier(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(name_or_path, padding_side="right", trust_remote_code=trust_remote_code)
        model.eval()
        return cls(model, tokenizer, positive_label=positive_label, max_length=max_length, batch_size=batch_size)

    def score_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positive-class logit [B] (float32) at each sequence's last real token."""
        return sequence_logits(self.model, input_ids, attention_mask)[:, self.label_index].float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score_tokens(input_ids, attention_mask)

    @torch.no_grad()
    def reward(self, texts: list[str], keep: str = "start") -> torch.Tensor:
        """Positive-class logits [B] of texts, tokenised with the tokenizer's special tokens; a text longer than the
        model's context keeps its first tokens (`keep="start"`) or its last ones (`keep="end"`, for a prompt +
        completion whose completion must be seen)."""
        if keep not in ("start", "end"):
            raise ValueError(f"keep must be 'start' or 'end', got {keep!r}")
        if self.tokenizer is None:
            raise UserError("ClassifierReward needs a tokenizer to score texts (pass tokenizer=...)")
        if isinstance(texts, str):
            texts = [texts]
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        limit = context_length(self.model, self.tokenizer)
        max_length = self.max_length if limit is None else min(self.max_length, limit)
        out = []
        side = self.tokenizer.truncation_side
        try:
            self.tokenizer.truncation_side = "right" if keep == "start" else "left"
            for i in range(0, len(texts), self.batch_size):
                # right padding: encoder classifiers pool their first token (decoders read the mask either way)
                enc = self.tokenizer(list(texts[i:i + self.batch_size]), return_tensors="pt", padding=True,
                                     truncation=True, max_length=max_length, padding_side="right")
                scores = self.score_tokens(enc["input_ids"].to(device), enc["attention_mask"].to(device))
                out.append(scores.float().cpu())
        finally:
            self.tokenizer.truncation_side = side
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, *args, **kwargs):
        # texts -> reward(texts); tensors -> nn.Module call (score_tokens)
        if args and (isinstance(args[0], str) or (isinstance(args[0], (list, tuple))
                                                   and all(isinstance(t, str) for t in args[0]))):
            return self.reward(*args, **kwargs)
        return super().__call__(*args, **kwargs)
