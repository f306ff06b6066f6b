"""Direct preference optimisation (Rafailov et al. 2023) and its variants: conservative DPO (label smoothing), IPO,
reference-free. The loss is `alignloop.losses.dpo_loss`; this module feeds it.

    trainer = DPOTrainer(model="path/to/sft", args=DPOConfig(output_dir="out", beta=0.1), train_dataset="pairs.jsonl")
    trainer.train()          # -> out/ (save_pretrained folder), out/metrics.jsonl, out/checkpoints/step-N/

Choices (see the DPO section of the implementation-details reference):
- Log-probabilities are **sums over completion tokens** (the prompt is masked out). For IPO, `ipo_average_logps`
  (default True) averages them over the completion's tokens instead, as the IPO authors asked; set it False to use
  sums for IPO too. Sigmoid / cDPO / reference-free always use sums.
- The reference is, in this order: the base model with the LoRA adapter disabled (`reference_mode`, no second model in
  memory) when the policy has an adapter; else `ref_model` when given; else the policy's own initial weights. Its
  log-probs are computed in eval mode (dropout off) and under `torch.inference_mode`.
- `precompute_ref_logps=True` (default) computes them once before training, for the train and eval sets, and caches
  them on disk under `ref_cache_dir`, keyed by a hash of the reference weights, the tokenised data and the settings
  that change them; a later run with the same key reuses the file. With no `ref_model` and no adapter this needs no
  copy of the model (the policy's weights before the first step *are* the reference). `False` computes them on the
  fly each step (a frozen copy of the initial policy is kept when there is no adapter and no `ref_model`).
- Chosen and rejected are run in one concatenated forward ([chosen; rejected] rows, padded to the longest row of
  the micro-batch). The LM head is applied only at completion positions when the architecture allows it.
- Batch planning: `batch_size` pairs per optimizer step in total (over processes and accumulation); each process
  takes its contiguous slice, split into micro-batches of `micro_batch_size`. The loss of a micro-batch is the sum
  of its pairs' losses divided by the global batch size, and gradients are summed over processes, so 1 process with
  batch 8 equals 4 x 2 accumulation equals 2 processes x 4 (exactly, up to float summation order).
- Dropout in the policy is switched off by default (`disable_dropout`), as the DPO reference implementation does:
  otherwise the implicit reward at step 0 is not 0.
- `margin`/`pair_weight` columns of the data are ignored (DPO has no margin term).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignloop.errors import ConfigError, UserError
from alignloop.losses import dpo_loss, logprobs_from_logits, masked_mean, masked_sum
from alignloop.training import (MetricsLogger, Progress, build_optimizer, build_scheduler, load_checkpoint,
                                make_accelerator, micro_batches, optimizer_step, plan_epoch, resolve_resume,
                                save_checkpoint, save_config, seed_everything, shard, steps_per_epoch)

CACHE_VERSION = 1


@dataclass
class DPOConfig:
    """Every field is also a CLI flag of `alignloop dpo` (`learning_rate` -> `--learning-rate`)."""

    output_dir: str = field(default="dpo-out", metadata={"help": "Where the model, metrics and checkpoints go."})
    model: str | None = field(default=None, metadata={"help": "Policy to train: hub id or local folder (CLI; the "
                                                              "Python API also takes a model object)."})
    ref_model: str | None = field(default=None, metadata={"help": "Reference model; default: the policy's initial "
                                                                  "weights (or the base model when using LoRA)."})
    train_file: str | None = field(default=None, metadata={"help": "Preference pairs {prompt, chosen, rejected} "
                                                                   "(JSONL/JSON/Parquet/CSV or a datasets folder)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out pairs for evaluation (optional)."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint (the β of DPO/IPO)."})
    loss_type: Literal["sigmoid", "ipo"] = field(default="sigmoid", metadata={"help": "sigmoid (DPO; with "
                                                 "label_smoothing > 0: cDPO) or ipo."})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO: assumed probability that a label is "
                                                                  "flipped, in [0, 0.5); 0 = plain DPO."})
    reference_free: bool = field(default=False, metadata={"help": "Use a uniform reference (reference log-probs 0)."})
    ipo_average_logps: bool = field(default=True, metadata={"help": "IPO only: average completion log-probs over "
                                                                    "tokens (the IPO paper) instead of summing."})
    precompute_ref_logps: bool = field(default=True, metadata={"help": "Compute reference log-probs once before "
                                                                       "training (cached on disk) instead of each step."})
    ref_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for reference log-probs; default "
                                      "$ALIGNLOOP_CACHE/ref_logps or ~/.cache/alignloop/ref_logps; 'none' = no cache."})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens of prompt + completion (longer "
                                                           "completions are cut at the end)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep at most this many prompt tokens "
                                                                          "(the last ones); None = no limit."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per optimizer step, over all processes and "
                                                         "accumulation steps (the global batch)."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Pairs per forward pass on one process; "
                                         "None = the whole per-process batch (no accumulation)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Pairs per forward pass in evaluation and reference "
                                                               "precomputation."})
    num_epochs: int = field(default=1, metadata={"help": "Passes over the training pairs."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps (overrides "
                                                                  "num_epochs when set)."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    lr_scheduler: str = field(default="linear", metadata={"help": "Learning-rate schedule after warmup: linear, "
                                                                  "cosine, constant, ..."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Clip the gradient norm (None/0 = no clip)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability of the policy to 0."})
    shuffle: bool = field(default=True, metadata={"help": "Shuffle the pairs each epoch (same order on all processes)."})
    seed: int = field(default=42, metadata={"help": "Seed for data order and initialisation."})
    dtype: str | None = field(default=None, metadata={"help": "Load dtype: float32 (default), bfloat16, float16, auto."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={"help": "Autocast (GPU)."})
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter; the reference is then the base model."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    merge_lora: bool = field(default=True, metadata={"help": "Save the final model with the adapter merged in "
                                                             "(False: save the adapter only)."})
    logging_steps: int = field(default=1, metadata={"help": "Log training metrics every N steps."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (and always at the end "
                                                                   "when there is an eval set)."})
    save_steps: int | None = field(default=None, metadata={"help": "Write a checkpoint every N steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to resume from."})
    save_final: bool = field(default=True, metadata={"help": "save_pretrained the trained model into output_dir."})
    tensorboard: bool = field(default=True, metadata={"help": "Also write TensorBoard scalars."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self):
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing applies to the sigmoid loss only (cDPO), not to ipo")
        for name in ("batch_size", "eval_batch_size", "num_epochs", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")

    @property
    def average_logps(self) -> bool:
        return self.loss_type == "ipo" and self.ipo_average_logps


# ----------------------------------------------------------------------------------------------- data


def _rows(data) -> list[dict]:
    if data is None:
        return []
    if isinstance(data, (str, os.PathLike)):
        from alignloop.data.readers import read_rows

        return list(read_rows(data))
    return [dict(r) for r in data]


def _split_row(row: dict, tokenizer, where: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) strings from a TRL preference row: explicit or implicit prompt, text or messages."""
    from alignloop.data.errors import DataError

    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing field '{key}' (expected {{prompt, chosen, rejected}} rows)")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(chosen, list):  # conversational
        from alignloop.data.chat import check_chat_template, render_completion, render_prompt
        from alignloop.data.conversions import implicit_messages_prompt

        check_chat_template(tokenizer, where)
        if prompt is None:
            prompt, chosen, rejected = implicit_messages_prompt(chosen, rejected)
        p = render_prompt(prompt, tokenizer)
        return p, render_completion(prompt, chosen, tokenizer, p), render_completion(prompt, rejected, tokenizer, p)
    if prompt is None:
        from alignloop.data.conversions import implicit_text_prompt

        return implicit_text_prompt(chosen, rejected)
    for key, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(v, str):
            raise DataError(f"{where}, field '{key}': expected a string or a list of messages, got {type(v).__name__}")
    return prompt, chosen, rejected


def tokenize_pairs(data, tokenizer, max_length: int, max_prompt_length: int | None = None) -> list[dict]:
    """Rows -> [{"prompt_ids", "chosen_ids", "rejected_ids"}]: prompt tokenised with the tokenizer's special tokens
    (BOS where it adds one; none for chat-templated prompts, whose template has them), each completion without
    them plus EOS. The prompt keeps its last `max_prompt_length` tokens; completions are cut so that
    prompt + completion <= max_length."""
    from alignloop.data.errors import DataError

    out = []
    eos = tokenizer.eos_token_id
    for i, row in enumerate(_rows(data)):
        where = getattr(row, "where", f"row {i}")
        prompt, chosen, rejected = _split_row(row, tokenizer, where)
        templated = isinstance(row.get("chosen"), list)
        p = tokenizer(prompt, add_special_tokens=not templated)["input_ids"] if prompt else []
        if max_prompt_length is not None:
            p = p[-max_prompt_length:] if max_prompt_length > 0 else []
        room = max_length - len(p)
        if room < 1:
            raise DataError(f"{where}: the prompt alone has {len(p)} tokens, max_length is {max_length}; raise "
                            f"max_length or set max_prompt_length")
        ex = {"prompt_ids": p}
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            ex[f"{key}_ids"] = ids[:room]
        if not p and (len(ex["chosen_ids"]) < 2 or len(ex["rejected_ids"]) < 2):
            raise DataError(f"{where}: an empty prompt needs completions of at least 2 tokens")
        out.append(ex)
    return out


def collate_pairs(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """[chosen_0..chosen_{k-1}, rejected_0..rejected_{k-1}] right-padded to the longest row -> input_ids [2k,T],
    attention_mask [2k,T], response_mask [2k,T-1] (True where the *next* token, input_ids[:, 1:], is a
    completion token), labels = input_ids[:, 1:]."""
    seqs, starts = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            seqs.append(ex["prompt_ids"] + ex[key])
            starts.append(len(ex["prompt_ids"]))
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    response_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
        response_mask[i, max(st, 1):len(s)] = True  # a first token with no context cannot be scored
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids[:, 1:],
            "response_mask": response_mask[:, 1:]}


# ----------------------------------------------------------------------------------------------- log-probs


def _lm_parts(model: nn.Module):
    """(backbone, lm_head) when the LM head can be applied to selected positions only (plain decoder LMs whose logits
    are lm_head(last hidden state)); None otherwise (then the full forward is used)."""
    from alignloop.models import unwrap_model

    hf = unwrap_model(model)
    cfg = getattr(hf, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    backbone = getattr(hf, "base_model", None)
    if head is None or backbone is None or backbone is hf:
        return None
    return backbone, head


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """Sum (or, with `average`, mean) of the log-probs of the completion tokens of every row -> [rows] float32.
    Position ids come from the attention mask. The LM head runs only at completion positions when possible."""
    from alignloop.models import model_forward, position_ids_from_attention_mask

    ids, mask, labels, rmask = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["response_mask"]
    parts = _lm_parts(model)
    if parts is None:
        logits = model_forward(model, ids, mask)[:, :-1]
        logps = logprobs_from_logits(logits, labels)
    else:
        backbone, head = parts
        out = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask),
                       use_cache=False)
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, :-1]
        picked = head(hidden[rmask])                                    # [N, V], completion positions only
        token_logps = logprobs_from_logits(picked[None], labels[rmask][None])[0]
        logps = torch.zeros(rmask.shape, dtype=token_logps.dtype, device=token_logps.device)
        logps = logps.masked_scatter(rmask, token_logps)
    return masked_mean(logps, rmask, dim=1) if average else masked_sum(logps, rmask, dim=1)


def _disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _weights_hash(model: nn.Module) -> str:
    """sha256 of the model's weights (LoRA adapter tensors excluded: the reference is the base)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.replace("base_model.model.", "").encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _data_hash(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]]).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- trainer


class DPOTrainer:
    """`DPOTrainer(model, args, train_dataset, eval_dataset=None, ref_model=None, tokenizer=None).train()`.

    model: a path / hub id or a causal LM (peft models: the adapter is trained, the base is the reference).
    train_dataset / eval_dataset: a file path or a list of {prompt, chosen, rejected} rows (text or messages; no
    prompt = implicit prompt); default `args.train_file` / `args.eval_file`. ref_model: a path or a model
    (default `args.ref_model`, else see the module docstring). tokenizer: needed when `model` is an object."""

    def __init__(self, model=None, args: DPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 ref_model=None, tokenizer=None):
        from alignloop.models import LoraOptions, has_adapter, load_causal_lm, load_tokenizer

        self.args = args = args if args is not None else DPOConfig()
        self.accelerator = make_accelerator(args.mixed_precision)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        seed_everything(args.seed, self.rank)
        model = model if model is not None else args.model
        if model is None:
            raise ConfigError("no model given: pass model=... (or --model)")
        lora = LoraOptions(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout) if args.lora else None
        if isinstance(model, (str, os.PathLike)):
            self.model_path = str(model)
            self.tokenizer = tokenizer or load_tokenizer(model)
            model = load_causal_lm(model, dtype=args.dtype, lora=lora)
        else:
            self.model_path = None
            if tokenizer is None:
                raise ConfigError("pass tokenizer=... together with a model object")
            self.tokenizer = tokenizer
            if lora is not None and not has_adapter(model):
                from alignloop.models import apply_lora

                model = apply_lora(model, lora)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(self.accelerator.device)
        if args.disable_dropout:
            _disable_dropout(self.model)
        self.use_adapter = has_adapter(self.model)

        ref_model = ref_model if ref_model is not None else args.ref_model
        if args.reference_free or self.use_adapter:
            ref_model = None
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = load_causal_lm(ref_model, dtype=args.dtype)
        if ref_model is None and not (args.reference_free or self.use_adapter or args.precompute_ref_logps):
            ref_model = copy.deepcopy(self.model)  # on the fly without an adapter: a frozen copy of the start
        if ref_model is not None:
            ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)
        self.ref_model = ref_model

        train_dataset = train_dataset if train_dataset is not None else args.train_file
        eval_dataset = eval_dataset if eval_dataset is not None else args.eval_file
        if train_dataset is None:
            raise ConfigError("no training data: pass train_dataset=... (or --train-file)")
        self.train_examples = tokenize_pairs(train_dataset, self.tokenizer, args.max_length, args.max_prompt_length)
        self.eval_examples = (tokenize_pairs(eval_dataset, self.tokenizer, args.max_length, args.max_prompt_length)
                              if eval_dataset is not None else [])
        if not self.train_examples:
            raise UserError("the training data has no pairs")
        self.state: dict[str, Any] = {"step": 0}
        self._eval_ref: torch.Tensor | None = None

    # -- reference log-probs ------------------------------------------------------------------------------

    def _ref_context(self):
        """A context in which `self._ref_module()` is the reference, in eval mode, without gradients."""
        import contextlib

        from alignloop.models import reference_mode

        if self.use_adapter:
            return reference_mode(self.model)
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)

        @contextlib.contextmanager
        def policy_as_reference():  # only before the first optimizer step (precompute)
            was = self.model.training
            self.model.eval()
            try:
                yield self.model
            finally:
                self.model.train(was)

        return policy_as_reference()

    @torch.inference_mode()
    def _ref_logps_for(self, examples: list[dict], indices: list[int]) -> torch.Tensor:
        """Reference log-probs [len(indices), 2] (chosen, rejected), batched by length to avoid padding waste."""
        out = torch.zeros(len(indices), 2)
        order = sorted(range(len(indices)), key=lambda j: len(examples[indices[j]]["prompt_ids"])
                       + max(len(examples[indices[j]]["chosen_ids"]), len(examples[indices[j]]["rejected_ids"])))
        with self._ref_context() as ref, self.accelerator.autocast():
            for lo in range(0, len(order), self.args.eval_batch_size):
                js = order[lo:lo + self.args.eval_batch_size]
                batch = self._batch([examples[indices[j]] for j in js])
                lp = completion_logps(ref, batch, self.args.average_logps).float().cpu()
                out[js, 0], out[js, 1] = lp[:len(js)], lp[len(js):]
        return out

    def _cache_path(self, examples: list[dict]) -> Path | None:
        d = self.args.ref_cache_dir
        if d is not None and str(d).lower() == "none":
            return None
        if d is None:
            d = Path(os.environ.get("ALIGNLOOP_CACHE", Path.home() / ".cache" / "alignloop")) / "ref_logps"
        ref = self.ref_model if self.ref_model is not None else self.model
        key = hashlib.sha256(json.dumps({
            "v": CACHE_VERSION, "weights": _weights_hash(ref), "data": _data_hash(examples),
            "average": self.args.average_logps, "mixed_precision": self.args.mixed_precision,
            "dtype": str(next(ref.parameters()).dtype)}).encode()).hexdigest()[:32]
        return Path(d) / f"{key}.pt"

    def precompute_ref_logps(self, examples: list[dict]) -> torch.Tensor:
        """Reference log-probs of every example -> [N, 2], from the disk cache when present. Each process computes
        its share; the shares are gathered."""
        if not examples:
            return torch.zeros(0, 2)
        path = self._cache_path(examples)
        if path is not None and path.is_file():
            return torch.load(path)["ref_logps"]
        mine = shard(list(range(len(examples))), self.rank, self.world)
        part = self._ref_logps_for(examples, mine)
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, (mine, part))
            full = torch.zeros(len(examples), 2)
            for idx, vals in gathered:
                full[idx] = vals
        else:
            full = part
        if path is not None and self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"ref_logps": full}, tmp)
            os.replace(tmp, path)
        return full

    # -- one micro-batch ----------------------------------------------------------------------------------

    def _batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        b = collate_pairs(examples, self.tokenizer.pad_token_id)
        return {k: v.to(self.accelerator.device) for k, v in b.items()}

    def _pair_terms(self, examples, indices, ref_table):
        """Policy forward of a micro-batch -> (losses [k], chosen_rewards [k], rejected_rewards [k],
        chosen_logps [k], rejected_logps [k]); the reference from `ref_table` or computed now."""
        k = len(indices)
        batch = self._batch([examples[i] for i in indices])
        with self.accelerator.autocast():
            logps = completion_logps(self.model, batch, self.args.average_logps).float()
        ref = self.reference_logps(examples, indices, ref_table, batch).to(logps.device)
        losses, chosen_r, rejected_r = dpo_loss(logps[:k], logps[k:], ref[:k], ref[k:], self.args.beta,
                                                self.args.label_smoothing, self.args.loss_type,
                                                self.args.reference_free)
        return losses, chosen_r, rejected_r, logps[:k].detach(), logps[k:].detach()

    def reference_logps(self, examples, indices, ref_table=None, batch=None) -> torch.Tensor:
        """Reference log-probs [2k] ([chosen; rejected]) of examples[indices]: from `ref_table` (precomputed) or
        computed now (eval mode, no grad); zeros when reference-free."""
        k = len(indices)
        if self.args.reference_free:
            return torch.zeros(2 * k)
        if ref_table is not None:
            return torch.cat([ref_table[indices, 0], ref_table[indices, 1]])
        batch = batch if batch is not None else self._batch([examples[i] for i in indices])
        with torch.no_grad(), self._ref_context() as ref_model, self.accelerator.autocast():
            return completion_logps(ref_model, batch, self.args.average_logps).float()

    @staticmethod
    def _metric_sums(losses, chosen_r, rejected_r, chosen_lp, rejected_lp) -> torch.Tensor:
        return torch.stack([losses.detach().sum(), chosen_r.sum(), rejected_r.sum(),
                            (chosen_r > rejected_r).float().sum(), (chosen_r - rejected_r).sum(),
                            chosen_lp.sum(), rejected_lp.sum()]).float()

    _METRICS = ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")

    def _reduce(self, sums: torch.Tensor, n: int) -> dict[str, float]:
        if self.world > 1:
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), "sum")
        return {name: float(v) / max(n, 1) for name, v in zip(self._METRICS, sums.cpu())}

    def _all_reduce_grads(self) -> None:
        """Sum gradients over processes (one flat buffer): each process's loss is already divided by the global
        batch size, so the sum is the gradient of the global batch."""
        if self.world == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        off = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[off:off + n].view_as(p))
            off += n

    # -- evaluation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, implicit rewards, accuracy and margin (policy in eval mode) -> {"eval/...": value}."""
        if not self.eval_examples:
            return {}
        if self._eval_ref is None and not self.args.reference_free and self.args.precompute_ref_logps:
            self._eval_ref = self.precompute_ref_logps(self.eval_examples)
        was = self.model.training
        self.model.eval()
        mine = shard(list(range(len(self.eval_examples))), self.rank, self.world)
        sums = torch.zeros(len(self._METRICS))
        try:
            for mb in micro_batches(mine, self.args.eval_batch_size):
                if mb:
                    sums += self._metric_sums(*self._pair_terms(self.eval_examples, mb, self._eval_ref)).cpu()
        finally:
            self.model.train(was)
        return {f"eval/{k}": v for k, v in self._reduce(sums, len(self.eval_examples)).items()}

    # -- training -----------------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        args, acc = self.args, self.accelerator
        out_dir = Path(args.output_dir)
        if acc.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_config(args, out_dir / "dpo_config.yaml")
        n = len(self.train_examples)
        per_epoch = steps_per_epoch(n, args.batch_size)
        total = args.max_steps if args.max_steps is not None else per_epoch * args.num_epochs
        micro = args.micro_batch_size or math.ceil(args.batch_size / self.world)

        self.model.train()
        optimizer = build_optimizer(self.model, args.learning_rate, args.weight_decay)
        scheduler = build_scheduler(optimizer, args.lr_scheduler, args.warmup_steps, total)
        resume = resolve_resume(args.resume_from, out_dir)

        # Reference log-probs before any update (the policy's initial weights may be the reference).
        t0 = time.perf_counter()
        train_ref = None
        if args.precompute_ref_logps and not args.reference_free:
            train_ref = self.precompute_ref_logps(self.train_examples)
            if self.eval_examples:
                self._eval_ref = self.precompute_ref_logps(self.eval_examples)
        ref_seconds = time.perf_counter() - t0

        if resume is not None:
            self.state = load_checkpoint(resume, accelerator=acc, modules={"model": self.model}, optimizer=optimizer,
                                         scheduler=scheduler)
        step = int(self.state.get("step", 0))
        logger = MetricsLogger(out_dir, enabled=acc.is_main_process, tensorboard=args.tensorboard,
                               config=asdict(args), resume_step=step if resume is not None else None)
        if resume is None and acc.is_main_process:
            logger.log({"time/ref_logps": ref_seconds}, step=0)
        progress = Progress(total, "dpo", enabled=args.progress and acc.is_main_process, start=step)
        last: dict[str, float] = {}
        t_start = time.perf_counter()
        while step < total:
            epoch, pos = divmod(step, per_epoch)
            global_batch = plan_epoch(n, args.batch_size, args.seed, epoch, args.shuffle)[pos]
            sums = torch.zeros(len(self._METRICS))
            for mb in micro_batches(shard(global_batch, self.rank, self.world), micro):
                if not mb:
                    continue
                terms = self._pair_terms(self.train_examples, mb, train_ref)
                (terms[0].sum() / len(global_batch)).backward()
                sums += self._metric_sums(*terms).cpu()
            self._all_reduce_grads()
            grad_norm = optimizer_step(acc, self.model, optimizer, scheduler, args.max_grad_norm)
            step += 1
            self.state = {"step": step, "epoch": epoch, "batch_in_epoch": pos + 1}
            if step % args.logging_steps == 0 or step == total:
                last = self._reduce(sums, len(global_batch))
                last.update({"grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "epoch": step / per_epoch,
                             "time/pairs_per_sec": step * args.batch_size / (time.perf_counter() - t_start)})
                logger.log(last, step)
            if args.eval_steps and step % args.eval_steps == 0 and step != total:
                logger.log(self.evaluate(), step)
            if args.save_steps and step % args.save_steps == 0:
                save_checkpoint(out_dir, step, accelerator=acc, modules={"model": self.model}, optimizer=optimizer,
                                scheduler=scheduler, keep_last=args.save_total_limit,
                                trainer_state={**self.state, "config": asdict(args)})
            progress.update(1, info=f"loss {last.get('loss/dpo', float('nan')):.4f}")
        progress.close()
        final = self.evaluate()
        if final:
            logger.log(final, step)
            last.update(final)
        logger.close()
        if args.save_final:
            self.save_model(out_dir)
        return last

    def save_model(self, path: str | os.PathLike) -> None:
        """save_pretrained the policy (+ tokenizer) into `path` (main process). With LoRA and `merge_lora`, a merged
        copy is saved; otherwise the adapter only."""
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return
        model = self.model
        if self.use_adapter and self.args.merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.accelerator.wait_for_everyone()


def run_dpo(config: DPOConfig) -> dict[str, float]:
    """The `alignloop dpo` entry point: train with `config` and print the final metrics."""
    trainer = DPOTrainer(args=config)
    metrics = trainer.train()
    if trainer.accelerator.is_main_process:
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}))
    return metrics
