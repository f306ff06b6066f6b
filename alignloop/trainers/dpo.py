"""Direct preference optimisation (Rafailov et al. 2023) and its variants: conservative DPO (label smoothing), IPO,
reference-free. The loss is `alignloop.losses.dpo_loss`; this module feeds it.

    trainer = DPOTrainer(model="path/to/sft", args=DPOConfig(output_dir="out", beta=0.1), train_dataset="pairs.jsonl")
    result = trainer.train()   # -> out/final (save_pretrained), out/metrics.jsonl, out/checkpoints/step-N/
    alignloop dpo --model path/to/sft --train-file pairs.jsonl --output-dir out --beta 0.1
    accelerate launch --num_processes 2 $(which alignloop) dpo ...                       (GPUs)
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 $(which alignloop) dpo ...      (CPU processes, gloo)

Choices (see the DPO section of the implementation-details reference):
- Log-probabilities are **sums over completion tokens** (the prompt is masked out). For IPO, `ipo_average_logps`
  (default True) averages them over the completion's tokens instead, as the IPO authors asked; set it False to use
  sums for IPO too. Sigmoid / cDPO / reference-free always use sums.
- The reference is `ref_model` when given (with or without LoRA; `reference_free` with a `ref_model` is refused);
  else the starting policy: for a LoRA policy, its adapter's starting values kept frozen (`keep_reference`: a copy
  the adapter's size, swapped in for the reference pass by `reference_mode`; a policy that starts from a trained
  adapter folder is thus compared with itself, not with its base), else the policy's own initial weights. Its
  log-probs are computed in eval mode (dropout off) and under `torch.inference_mode`.
- `precompute_ref_logps=True` (default) computes them once before training, for the train and eval sets, and caches
  them on disk under `ref_cache_dir`, keyed by a hash of the reference's weights (adapter included), the tokenised
  data and the settings
  that change them; a later run with the same key reuses the file. With no `ref_model` and no adapter this needs no
  copy of the model (the policy's weights before the first step *are* the reference). `False` computes them on the
  fly each step (a frozen copy of the initial policy is kept when there is no adapter and no `ref_model`).
- Chosen and rejected are run in one concatenated forward ([chosen; rejected] rows, padded to the longest row of
  the micro-batch), or, for wide models (`packing`), packed padding-free into near-equal rows of about 256 tokens
  with attention kept within each sequence; with `share_prompt` each pair's prompt is run once and both
  completions attend to it through a block mask. The loss and its gradient are the same in every layout. The LM
  head is applied only at completion positions when the architecture allows it. The reference pass uses the same
  layout.
- Batch planning (`alignloop.training`): the global batch of an optimizer step is per_device_batch_size x
  gradient_accumulation_steps x processes pairs; each process takes its contiguous slice, split into micro-batches
  of per_device_batch_size. The loss of a micro-batch is the sum of its pairs' losses divided by the global batch
  size (times the number of processes, which DDP's averaging divides out); accelerate prepares the policy as a
  `CompletionLogps` module (trunk and completion-position LM head in one forward), so DDP averages the gradients
  on the last micro-batch of a step (`no_sync` before), and 1 process x 8 == 1 x 4 x 2 accumulation == 2 processes
  x 4 (up to float summation order). fp16 is untested here: on GPU use bf16.
- Speed (CPU and GPU): fused AdamW kernel; GPT-2's gelu_new through the fused tanh-GELU kernel (`fast_gelu`, same
  function to ~2e-7); reference log-probs under inference_mode in length-sorted batches; no HF Trainer.
- Dropout in the policy is switched off by default (`disable_dropout`), as the DPO reference implementation does:
  otherwise the implicit reward at step 0 is not 0.
- Data: `alignloop.data` (TRL formats, chat templates, truncation policy). A ranking of K completions gives its
  C(K,2) pairs, each weighted like a plain pair; ties are skipped; `margin` is ignored (DPO has no margin term).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignloop.data import PreferenceCollator, load_preferences, tokenize_preferences
from alignloop.errors import ConfigError
from alignloop.losses import dpo_loss
from alignloop.models import (
    apply_lora,
    has_adapter,
    keep_reference,
    load_causal_lm,
    reference_context,
    unwrap_model,
)
from alignloop.models.fast import CPU_SDPA, disable_dropout, is_wide, speed_up
from alignloop.models.logps import (
    CompletionLogps,
    batch_logps,
    completion_logps,
    lm_head_parts,
)
from alignloop.training import (
    computed_in_shards,
    global_batches,
    optimizer_step,
    step_micro_batches,
    sync_context,
)
from alignloop.training.checkpoint import is_sharded
from alignloop.training.run import (
    TrainingArgs,
    TrainResult,
    build_lora,
    checkpoint_if_due,
    eval_due,
    finish,
    prepare_run,
    resolve_tokenizer,
    setup_optimization,
    train_and_eval_examples,
)

CACHE_VERSION = 1
_REF_AND_FREE = ("ref_model: reference_free uses no reference model (its log-probs are 0); give ref_model or "
                 "reference_free, not both")


@dataclass
class DPOConfig(TrainingArgs):
    """DPO settings (plus the shared `TrainingArgs` fields). Every field is also a CLI flag of `alignloop dpo`
    (`learning_rate` -> `--learning-rate`). Global batch = per_device_batch_size x gradient_accumulation_steps x
    processes (pairs per optimizer step)."""

    model: str = field(default="", metadata={"help": "Policy to train: hub id or local folder (the Python API also "
                                                     "takes a model object)."})
    ref_model: str | None = field(default=None, metadata={"help": "Reference model; default: the starting policy "
                                  "(with LoRA: the adapter's starting values, kept frozen)."})
    train_file: str | None = field(default=None, metadata={"help": "Preference pairs {prompt, chosen, rejected} or "
                                   "rankings (JSONL/JSON/Parquet/CSV, a datasets folder or a hub id)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out pairs for evaluation (optional)."})
    output_dir: str = field(default="runs/dpo", metadata={"help": "Where checkpoints, metrics and the final model "
                                                                   "(OUTPUT_DIR/final) go."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of AdamW."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint (the beta of DPO/IPO)."})
    loss_type: Literal["sigmoid", "ipo"] = field(default="sigmoid", metadata={"help": "sigmoid (DPO; with "
                                                 "label_smoothing > 0: cDPO) or ipo."})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO: assumed probability that a label is "
                                                                  "flipped, in [0, 0.5); 0 = plain DPO."})
    reference_free: bool = field(default=False, metadata={"help": "Use a uniform reference (reference log-probs 0)."})
    ipo_average_logps: bool = field(default=True, metadata={"help": "IPO only: average completion log-probs over "
                                                                    "tokens (the IPO paper) instead of summing."})
    precompute_ref_logps: bool = field(default=True, metadata={
        "help": "Compute reference log-probs once before training (cached on disk) instead of each step."})
    ref_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for reference log-probs; default "
                                      "$ALIGNLOOP_CACHE/ref_logps or ~/.cache/alignloop/ref_logps; 'none' = no cache."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "With truncation keep_end: keep at least "
                                          "this many prompt tokens (default max_length // 2)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Pairs per forward pass in evaluation and in the "
                                                               "reference precomputation."})
    packing: Literal["auto", "on", "off"] = field(default="auto", metadata={"help": "Padding-free policy forward: "
                                  "the micro-batch's sequences packed into near-equal rows of ~256 tokens "
                                  "(block-diagonal attention from restarting position ids); auto = on for models "
                                  "with hidden size >= 256 (compute-bound), off for smaller ones."})
    share_prompt: bool = field(default=True, metadata={"help": "With packing: run each pair's prompt once, both "
                                                               "completions attending to it through a block mask "
                                                               "(same log-probs and gradients, fewer tokens)."})
    fast_gelu: bool = field(default=True, metadata={"help": "Speed-ups that keep the function (alignloop.models.fast): "
                                                            "GPT-2's gelu_new as one fused kernel (same to ~2e-7); "
                                                            "attention in fp32 under CPU bf16 autocast."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability of the policy to 0 "
                                                                  "(the implicit reward is then 0 at step 0)."})
    save_final: bool = field(default=True, metadata={"help": "save_pretrained the trained model into "
                                                             "OUTPUT_DIR/final (LoRA: merged, and the adapter into "
                                                             "OUTPUT_DIR/adapter)."})

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing applies to the sigmoid loss only (cDPO), not to ipo")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.reference_free and self.ref_model:
            raise ConfigError(_REF_AND_FREE)

    @property
    def average_logps(self) -> bool:
        return self.loss_type == "ipo" and self.ipo_average_logps


# ----------------------------------------------------------------------------------------------- data


def load_pairs(source, tokenizer, args: DPOConfig) -> tuple[list[dict], Any, Any]:
    """A path / rows -> flat list of tokenised pairs (`alignloop.data.tokenize_preferences`; a ranking gives all its
    C(K,2) pairs, each weighted 1 like a plain pair; ties are skipped: DPO has no tie term). Returns
    (pairs, read stats, tokenisation stats)."""
    groups, stats = load_preferences(source, tokenizer=tokenizer, skip_bad_rows=args.skip_bad_rows)
    tokenised, tstats = tokenize_preferences(groups, tokenizer, max_length=args.max_length,
                                             truncation=args.truncation, max_prompt_length=args.max_prompt_length)
    pairs = [p for g in tokenised for p in g["pairs"] if not p.get("tie")]
    return pairs, stats, tstats


# ----------------------------------------------------------------------------------------------- log-probs


def _bins(sizes: list[int], bin_tokens: int, multiple: int) -> tuple[list[list[int]], int]:
    """Split items of `sizes` tokens into ceil(total / bin_tokens) bins of near-equal load (largest first, each to
    the least-loaded bin) -> (the items of each bin, the bin length: the largest load rounded up to `multiple`).
    Few tokens of padding, few distinct shapes (oneDNN builds a kernel for each new matmul shape, ~1 ms each) and
    short rows (attention is quadratic in the row length)."""
    n = max(1, -(-sum(sizes) // bin_tokens))
    bins: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for j in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        b = min(range(n), key=load.__getitem__)
        bins[b].append(j)
        load[b] += sizes[j]
    return [b for b in bins if b], -(-max(load) // multiple) * multiple


def _packed_pairs(exs: list[dict], device, share_prompt: bool, pad_token_id: int = 0, bin_tokens: int = 256,
                  multiple: int = 32) -> dict[str, torch.Tensor]:
    """Pack the chosen and rejected sequences of the pairs `exs` padding-free into `_bins`. Rows: 0..k-1 chosen,
    k..2k-1 rejected.

    Without `share_prompt`, every sequence is a segment of its own and position ids restart at 0 for each
    (transformers then attends within each sequence only): no attention mask. With `share_prompt`, each pair is one
    segment [prompt | chosen completion | rejected completion]: the completions attend to the prompt and to
    themselves (never to each other), position ids continue from the prompt in each branch, so every token sees
    exactly what it sees in its own unshared sequence and log-probs and gradients are those of the unshared
    forward; this needs the block mask `attention_mask` [B,1,C,C] bool (True = may attend). A pair whose chosen and
    rejected prompts differ (truncated differently) or that has no prompt is packed as two separate sequences.
    The tail of a bin is filler, never scored, whose position ids restart every `multiple` tokens (short sequences
    of its own, always within the model's positions; not the pad id, so transformers does not warn about padding
    without an attention mask).

    Returns input_ids, position_ids [B,C] (+ attention_mask with `share_prompt`) and, for the N scored tokens:
    `src` [N] (flat index b*C+t of the position whose logits predict it), `labels` [N], `row` [N]."""
    k = len(exs)
    # a segment: (shared prefix ids, [(branch ids, row, first scored index in the branch)])
    segments: list[tuple[list[int], list[tuple[list[int], int, int]]]] = []
    for i, ex in enumerate(exs):
        c, r, p = ex["chosen_input_ids"], ex["rejected_input_ids"], ex["prompt_length"]
        if share_prompt and p >= 1 and c[:p] == r[:p] and len(c) > p and len(r) > p:
            segments.append((c[:p], [(c[p:], i, 0), (r[p:], k + i, 0)]))
        else:
            segments.append(([], [(c, i, max(p, 1))]))
            segments.append(([], [(r, k + i, max(p, 1))]))
    size = [len(pre) + sum(len(b) for b, _, _ in br) for pre, br in segments]
    bins, C = _bins(size, bin_tokens, multiple)
    B = len(bins)
    input_ids = torch.full((B, C), 0 if pad_token_id != 0 else 1, dtype=torch.long)
    position_ids = torch.zeros((B, C), dtype=torch.long)
    mask = torch.zeros((B, C, C), dtype=torch.bool) if share_prompt else None
    src, labels, rows = [], [], []

    def causal(b: int, lo: int, n: int) -> None:
        if mask is not None:
            mask[b, lo:lo + n, lo:lo + n] = torch.ones(n, n, dtype=torch.bool).tril()

    for b, members in enumerate(bins):
        off = 0
        for j in members:
            prefix, branches = segments[j]
            n_pre = len(prefix)
            input_ids[b, off:off + n_pre] = torch.tensor(prefix, dtype=torch.long)
            position_ids[b, off:off + n_pre] = torch.arange(n_pre)
            causal(b, off, n_pre)
            start = off + n_pre
            for ids, row, first in branches:
                n = len(ids)
                input_ids[b, start:start + n] = torch.tensor(ids, dtype=torch.long)
                position_ids[b, start:start + n] = torch.arange(n_pre, n_pre + n)
                causal(b, start, n)
                if mask is not None:
                    mask[b, start:start + n, off:off + n_pre] = True      # the branch sees the whole prefix
                for t in range(first, n):  # the logits at the previous position predict token t
                    src.append(b * C + (start + t - 1 if t > 0 else off + n_pre - 1))
                    labels.append(ids[t])
                    rows.append(row)
                start += n
            off = start
        causal(b, off, C - off)  # the filler attends to itself only (no fully masked rows)
        position_ids[b, off:] = torch.arange(C - off) % multiple
    out = {"input_ids": input_ids, "position_ids": position_ids, "src": torch.tensor(src, dtype=torch.long),
           "labels": torch.tensor(labels, dtype=torch.long), "row": torch.tensor(rows, dtype=torch.long)}
    if mask is not None:
        out["attention_mask"] = mask[:, None]
    return {key: v.to(device) for key, v in out.items()}


def _weights_hash(model: nn.Module) -> str:
    """sha256 of the model's weights, adapter included (called on the reference: inside `reference_mode` a LoRA
    policy's state dict holds the reference's adapter values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.replace("base_model.model.", "").encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _data_hash(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["chosen_input_ids"], ex["rejected_input_ids"], ex["prompt_length"]]).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- trainer

_METRICS = ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")


class DPOTrainer:
    """`DPOTrainer(model, args, train_dataset, eval_dataset=None, ref_model=None, tokenizer=None).train()`.

    model: a path / hub id or a causal LM (a peft model: its adapter is trained, its start is the reference);
    default `args.model`. train_dataset / eval_dataset: a path, a list of rows or a `datasets.Dataset` in TRL's
    preference formats (default `args.train_file` / `args.eval_file`; without an eval set, `eval_fraction` holds
    out a share of the training pairs). ref_model: a path or a model (default `args.ref_model`; see the module
    docstring). tokenizer: needed when `model` is an object without a `_name_or_path`."""

    def __init__(self, model: Any = None, args: DPOConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, ref_model: Any = None, tokenizer: Any = None):
        self.args = a = args if args is not None else DPOConfig()
        self.run = prepare_run(a, "dpo")
        self.accelerator = acc = self.run.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        model = model if model is not None else a.model
        if model is None or model == "":
            raise ConfigError("model: give a hub id or a local folder (DPOConfig.model / --model)")
        self.tokenizer = resolve_tokenizer(model, tokenizer, padding_side="right")
        if isinstance(model, (str, os.PathLike)):
            model = load_causal_lm(model, dtype=a.dtype, lora=build_lora(a),
                                   gradient_checkpointing=a.gradient_checkpointing,
                                   trust_remote_code=a.trust_remote_code)
        elif build_lora(a) is not None and not has_adapter(model):
            model = apply_lora(model, build_lora(a))
        self.model = model.to(acc.device)
        if a.disable_dropout:
            disable_dropout(self.model)
        if a.fast_gelu:
            speed_up(self.model)
        self.use_adapter = has_adapter(self.model)
        # what accelerate prepares (DDP/FSDP) in train(): the policy's log-probs, LM head included, in one forward
        self.policy: nn.Module = CompletionLogps(self.model)

        # The reference: ref_model > the starting policy (LoRA: the adapter's start, kept; else its initial weights).
        ref_model = ref_model if ref_model is not None else a.ref_model
        if a.reference_free and ref_model is not None:
            raise ConfigError(_REF_AND_FREE)
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = load_causal_lm(ref_model, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
        if ref_model is None and self.use_adapter and not a.reference_free:
            keep_reference(self.model)  # the start may be a trained adapter: its base is not the starting policy
        elif ref_model is None and not (a.reference_free or a.precompute_ref_logps):
            ref_model = copy.deepcopy(self.model)  # on the fly, no adapter: a frozen copy of the start
        if ref_model is not None:
            ref_model = ref_model.to(acc.device).eval().requires_grad_(False)
            if a.fast_gelu:
                speed_up(ref_model)
        self.ref_model = ref_model

        train_dataset = train_dataset if train_dataset is not None else a.train_file
        eval_dataset = eval_dataset if eval_dataset is not None else a.eval_file
        if train_dataset is None:
            raise ConfigError("train_file: give the preference pairs to train on (--train-file)")
        self.train_examples, eval_examples, *self.data_stats = train_and_eval_examples(
            lambda source: load_pairs(source, self.tokenizer, a), train_dataset, eval_dataset, a, "pairs")
        self.eval_examples: list[dict] = eval_examples or []
        self.state: dict[str, Any] = {}
        self._eval_ref: torch.Tensor | None = None

    # -- reference log-probs ------------------------------------------------------------------------------

    def _ref_context(self):
        """A context whose value is the reference model, in eval mode (`models.reference_context`)."""
        return reference_context(self.model, self.ref_model, self.use_adapter)

    def _batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        # a multiple of 8: fewer distinct shapes (oneDNN builds a kernel per new matmul shape, ~1 ms each)
        b = PreferenceCollator(self.tokenizer.pad_token_id, pad_to_multiple_of=8)(examples)
        return {k: b[k].to(self.accelerator.device) for k in ("input_ids", "attention_mask", "position_ids",
                                                               "response_mask")}

    @torch.inference_mode()
    def _ref_logps_for(self, examples: list[dict], indices: list[int]) -> torch.Tensor:
        """Reference log-probs [len(indices), 2] (chosen, rejected), batched by length to avoid padding waste."""
        out = torch.zeros(len(indices), 2)
        length = lambda j: max(len(examples[indices[j]]["chosen_input_ids"]),  # noqa: E731
                               len(examples[indices[j]]["rejected_input_ids"]))
        order = sorted(range(len(indices)), key=length)
        with self._ref_context() as ref, self.accelerator.autocast():
            for lo in range(0, len(order), self.args.eval_batch_size):
                js = order[lo:lo + self.args.eval_batch_size]
                lp = self._logps(ref, [examples[indices[j]] for j in js])[0].float().cpu()
                out[js, 0], out[js, 1] = lp[:len(js)], lp[len(js):]
        return out

    def _cache_path(self, examples: list[dict]) -> Path | None:
        d = self.args.ref_cache_dir
        if d is not None and str(d).lower() == "none":
            return None
        if d is None:
            d = Path(os.environ.get("ALIGNLOOP_CACHE", Path.home() / ".cache" / "alignloop")) / "ref_logps"
        with self._ref_context() as ref:  # the reference's weights as its pass sees them
            weights, dtype = _weights_hash(ref), str(next(ref.parameters()).dtype)
        key = hashlib.sha256(json.dumps({
            "v": CACHE_VERSION, "weights": weights, "data": _data_hash(examples),
            "average": self.args.average_logps, "mixed_precision": self.args.mixed_precision,
            "dtype": dtype}).encode()).hexdigest()[:32]
        return Path(d) / f"{key}.pt"

    def precompute_ref_logps(self, examples: list[dict]) -> torch.Tensor:
        """Reference log-probs of every example -> [N, 2] (chosen, rejected), from the disk cache when there. Each
        process computes its share and the shares are gathered. Call before training when the reference is the
        policy's own initial weights (`train()` does)."""
        if not examples:
            return torch.zeros(0, 2)
        path = self._cache_path(examples)
        if path is not None and path.is_file():
            return torch.load(path)["ref_logps"]
        full = computed_in_shards(len(examples), self.rank, self.world,
                                  lambda mine: self._ref_logps_for(examples, mine))
        if path is not None and self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"ref_logps": full}, tmp)
            os.replace(tmp, path)
        return full

    def reference_logps(self, examples: list[dict], indices: list[int], ref_table: torch.Tensor | None = None,
                        batch: dict | None = None) -> torch.Tensor:
        """Reference log-probs [2k] ([chosen; rejected]) of examples[indices]: from `ref_table` (precomputed) or
        computed now (eval mode, no grad); zeros when reference-free."""
        k = len(indices)
        if self.args.reference_free:
            return torch.zeros(2 * k)
        if ref_table is not None:
            return torch.cat([ref_table[indices, 0], ref_table[indices, 1]])
        with torch.no_grad(), self._ref_context() as ref_model, self.accelerator.autocast():
            if batch is not None:  # the policy's padded rows, reused
                return completion_logps(ref_model, batch, self.args.average_logps).float()
            return self._logps(ref_model, [examples[i] for i in indices])[0].float()

    # -- one micro-batch ----------------------------------------------------------------------------------

    def _use_packing(self, model: nn.Module | None = None) -> bool:
        model = model if model is not None else self.model
        on = self.args.packing == "on" or (self.args.packing == "auto" and is_wide(model))
        return on and lm_head_parts(model) is not None

    def _share_prompt(self, model: nn.Module | None = None) -> bool:
        """Prompt computed once per pair (`share_prompt`): needs a custom 4D attention mask, which transformers'
        SDPA and eager attention take as is (flash-attention kernels do not)."""
        model = model if model is not None else self.model
        impl = getattr(getattr(unwrap_model(model), "config", None), "_attn_implementation", None)
        return self.args.share_prompt and impl in ("sdpa", "eager", CPU_SDPA)

    def _logps(self, model: nn.Module, exs: list[dict], scorer: nn.Module | None = None
               ) -> tuple[torch.Tensor, dict | None]:
        """Completion log-probs [2k] ([chosen; rejected]) of the pairs `exs` under `model`, in one forward: padded
        rows (returned too, for reuse by an on-the-fly reference), or packed (`packing`; prompts once with
        `share_prompt`; None returned). `scorer`: the module that runs it (the prepared `CompletionLogps` of
        `model`); default `batch_logps(model, ...)` called directly."""
        a = self.args
        score = scorer if scorer is not None else (lambda *args: batch_logps(model, *args))
        if not self._use_packing(model):
            batch = self._batch(exs)
            return score(batch, a.average_logps), batch
        packed = _packed_pairs(exs, self.accelerator.device, self._share_prompt(model), self.tokenizer.pad_token_id)
        return score(packed, a.average_logps, 2 * len(exs)), None

    def policy_logps(self, exs: list[dict], grad: bool = True) -> tuple[torch.Tensor, dict | None]:
        """Policy completion log-probs [2k] of the pairs `exs` (see `_logps`). With `grad` (training) through the
        prepared `self.policy`, so that DDP/FSDP see the forward; without (evaluation), the model is called
        directly (DDP's forward would expect a backward), unless its parameters are sharded (FSDP)."""
        scorer = self.policy if grad or is_sharded(self.accelerator) else None
        with self.accelerator.autocast():
            logps, batch = self._logps(self.model, exs, scorer)
            return logps.float(), batch

    def pair_terms(self, examples: list[dict], indices: list[int], ref_table: torch.Tensor | None = None,
                   grad: bool = True):
        """Policy forward over examples[indices] (chosen and rejected together) -> (losses [k], chosen_rewards [k],
        rejected_rewards [k], chosen_logps [k], rejected_logps [k]) through `alignloop.losses.dpo_loss`; `grad`:
        for a backward (training) or not (evaluation, under no_grad)."""
        k = len(indices)
        logps, batch = self.policy_logps([examples[i] for i in indices], grad)
        ref = self.reference_logps(examples, indices, ref_table, batch).to(logps.device)
        a = self.args
        losses, chosen_r, rejected_r = dpo_loss(logps[:k], logps[k:], ref[:k], ref[k:], a.beta, a.label_smoothing,
                                                a.loss_type, a.reference_free)
        return losses, chosen_r, rejected_r, logps[:k].detach(), logps[k:].detach()

    @staticmethod
    def _metric_sums(losses, chosen_r, rejected_r, chosen_lp, rejected_lp) -> torch.Tensor:
        return torch.stack([losses.detach().sum(), chosen_r.sum(), rejected_r.sum(),
                            (chosen_r > rejected_r).float().sum(), (chosen_r - rejected_r).sum(),
                            chosen_lp.sum(), rejected_lp.sum()]).float().cpu()

    def _reduce(self, sums: torch.Tensor, n: int) -> dict[str, float]:
        if self.world > 1:
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), "sum").cpu()
        return {name: float(v) / max(n, 1) for name, v in zip(_METRICS, sums, strict=True)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, implicit rewards, accuracy and margin (policy in eval mode) -> {"eval/<metric>": value}."""
        if not self.eval_examples:
            return {}
        a = self.args
        if self._eval_ref is None and not a.reference_free and a.precompute_ref_logps:
            self._eval_ref = self.precompute_ref_logps(self.eval_examples)
        was = self.model.training
        self.model.eval()
        sums = torch.zeros(len(_METRICS))
        try:
            sharded = is_sharded(self.accelerator)
            for mb in step_micro_batches(list(range(len(self.eval_examples))), self.rank, self.world,
                                         a.eval_batch_size):
                if mb:
                    sums += self._metric_sums(*self.pair_terms(self.eval_examples, mb, self._eval_ref, grad=False))
                elif sharded:  # FSDP gathers parameters in each forward: every process runs as many (result unused)
                    self.pair_terms(self.eval_examples, [0], self._eval_ref, grad=False)
        finally:
            self.model.train(was)
        return {f"eval/{k}": v for k, v in self._reduce(sums, len(self.eval_examples)).items()}

    # -- training -----------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        a, acc = self.args, self.accelerator
        t0 = time.perf_counter()
        n = len(self.train_examples)

        # Reference log-probs first: before any update the policy's weights may be the reference.
        train_ref = None
        if a.precompute_ref_logps and not a.reference_free:
            train_ref = self.precompute_ref_logps(self.train_examples)
            if self.eval_examples:
                self._eval_ref = self.precompute_ref_logps(self.eval_examples)
        ref_seconds = time.perf_counter() - t0

        self.model.train()
        # accelerate prepares the CompletionLogps module (DDP/FSDP): gradients are averaged in its backward
        opt = setup_optimization(a, self.run, self.policy, n, "dpo")
        self.policy = opt.model
        optimizer, scheduler, logger, progress = opt.optimizer, opt.scheduler, opt.logger, opt.progress
        global_batch, per_epoch, total = opt.global_batch, opt.per_epoch, opt.total
        step = opt.step
        self.state = opt.state
        if not self.state:
            logger.log({"time/ref_logps": ref_seconds}, step=0)
        last: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        window = torch.zeros(len(_METRICS))
        window_pairs, t_train = 0, time.perf_counter()
        for epoch, pos, batch, epoch_end in global_batches(n, global_batch, a.seed, epoch=opt.epoch,
                                                           batch_in_epoch=opt.pos):
            if step >= total:
                break
            for k, mb in enumerate(mbs := step_micro_batches(batch, self.rank, self.world, a.per_device_batch_size)):
                with sync_context(acc, self.policy, k, len(mbs)):
                    # the loss: this micro-batch's share of the global batch's mean, times the processes (DDP
                    # averages them); a process with no pair left runs one with weight 0 (DDP needs each to take part)
                    terms = self.pair_terms(self.train_examples, mb or batch[:1], train_ref)
                    acc.backward(terms[0].sum() / len(batch) * (acc.num_processes if mb else 0.0))
                    if mb:
                        window += self._metric_sums(*terms)
            window_pairs += len(batch)
            grad_norm = optimizer_step(acc, self.model, optimizer, scheduler, a.max_grad_norm)
            step += 1
            progress.update(1)
            if step % a.logging_steps == 0 or step == total:
                last = self._reduce(window, window_pairs)
                last.update({"train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                             "train/epoch": epoch + pos / per_epoch,
                             "perf/pairs_per_sec": window_pairs / max(time.perf_counter() - t_train, 1e-9)})
                logger.log(last, step)
                window, window_pairs, t_train = torch.zeros(len(_METRICS)), 0, time.perf_counter()
            if self.eval_examples and eval_due(a, step, epoch_end):
                last_eval = self.evaluate()
                logger.log(last_eval, step)
            checkpoint_if_due(a, acc, step, epoch, pos, epoch_end, {"model": self.model}, optimizer, scheduler,
                              self.run.config_dict)
        if self.eval_examples and not last_eval:
            last_eval = self.evaluate()
            logger.log(last_eval, step)
        return finish(a, acc, self.model, self.tokenizer, logger, progress, step, {**last, **last_eval},
                      time.perf_counter() - t0, *self.data_stats, save=a.save_final)


def run_dpo(config: DPOConfig) -> TrainResult:
    """The `alignloop dpo` entry point: train with `config`, print where the model went and the last metrics."""
    trainer = DPOTrainer(args=config)
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        print(json.dumps({"output_dir": result.output_dir, "steps": result.steps,
                          **{k: round(v, 6) for k, v in result.metrics.items()}}))
    return result
