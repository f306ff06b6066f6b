"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024): alignment from thumbs up / thumbs down, unpaired
completions each labelled desirable or undesirable. The loss is `alignloop.losses.kto_loss` (TRL 1.16's "kto"); this
module feeds it.

    trainer = KTOTrainer(model="path/to/sft", args=KTOConfig(output_dir="out", beta=0.1), train_dataset="thumbs.jsonl")
    result = trainer.train()   # -> out/final (save_pretrained), out/metrics.jsonl, out/checkpoints/step-N/
    alignloop kto --model path/to/sft --train-file thumbs.jsonl --output-dir out --beta 0.1
    alignloop kto --config kto.yaml --beta 0.1

Data: TRL's unpaired format `{"prompt", "completion", "label": bool}`, plain text or conversational (chat-templated
with the model's tokenizer), as `alignloop feedback export --format unpaired` writes it from a thumbs project.
Preference pairs or rankings are unpaired as TRL does (chosen -> desirable, rejected -> undesirable;
`alignloop.data.groups_to_unpaired`).

Choices (TRL 1.16's KTOTrainer unless said otherwise):
- Log-probs are **sums over completion tokens** (prompt masked), EOS appended by the one rule of every trainer.
- The reference point z₀ = max(0, mean log-ratio of mismatched (prompt, completion) pairs), detached
  (`kto_reference_point`). Each example x_i is paired with the completion y_j of its neighbour in a batch, rotated
  by one as TRL rotates them ((x_1, y_n), (x_2, y_1), ...). Here the rotation is within each **global batch** of the
  first epoch (TRL: within each per-device batch, in dataset order; it cannot shuffle), and z₀ is the mean over the
  whole global batch, all micro-batches and processes: 1 x 8 == 4 x 2 accumulation == 2 processes x 4. Later epochs
  keep each example's partner, so the reference log-probs of the mismatched pairs are computed once. The policy's
  mismatched log-probs are computed without gradients at the start of each optimizer step, before its backward
  passes (TRL computes them under no_grad too).
- Loss: the mean over the global batch's rows of λ_D·(1 − σ(β(r − z₀))) (desirable) and λ_U·(1 − σ(β(z₀ − r)))
  (undesirable), each micro-batch's sum divided by the global batch size. Global batch >= 2 (with 1 the mismatched
  pair is the matched one, TRL refuses it too). A warning when λ_D·n_D / (λ_U·n_U) lies outside [1, 4/3], the
  paper's advice (TRL's check).
- The reference: `ref_model` when given (with or without LoRA); else the starting policy: for a LoRA policy its
  adapter's starting values kept frozen (`keep_reference`, swapped in by `reference_mode`: a policy that starts
  from a trained adapter is compared with itself, not with its base), else its initial weights. Eval mode, no
  gradients. `precompute_ref_logps=True` (default) computes the
  reference log-probs of every example and of its mismatched pair once, at the start of `train()` (in memory, not
  cached on disk; TRL's default computes them each step); False computes them each step (a frozen copy of the
  initial policy is kept when there is no adapter and no `ref_model`).
- Evaluation: z₀ over the whole held-out set (each example paired with its predecessor's completion), then the
  same loss and metrics, as `eval/...`.
- Metrics (as TRL): `loss/kto`, `rewards/chosen` / `rewards/rejected` (mean β·r of the desirable / undesirable
  rows; chosen = desirable), `rewards/margins` (their difference), `logps/chosen`, `logps/rejected`, `kl/z0` (the
  reference point, TRL's `kl`) and `kl/estimate` (the mean before clamping), `train/...`, `perf/examples_per_sec`.
- Speed: padded rows, the LM head applied at completion positions only (`alignloop.models.logps`), the fused GELU and
  fp32 CPU attention under bf16 autocast (`fast_gelu`), dropout off (`disable_dropout`), no HF Trainer. What
  accelerate prepares (DDP/FSDP) is the policy as a `CompletionLogps` module (trunk and completion-position LM head
  in one forward): DDP averages the gradients on the last micro-batch of a step (`no_sync` before), each
  micro-batch's loss multiplied by the number of processes.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from alignloop.data import (
    IGNORE_INDEX,
    DataError,
    SFTCollator,
    groups_to_unpaired,
    load_records,
    tokenize_sft,
    truncate,
)
from alignloop.data.errors import DataStats
from alignloop.errors import ConfigError
from alignloop.losses import kto_loss, kto_reference_point, masked_mean
from alignloop.models import apply_lora, has_adapter, keep_reference, load_causal_lm, reference_context
from alignloop.models.fast import disable_dropout, speed_up
from alignloop.models.logps import CompletionLogps, completion_logps
from alignloop.training import (
    computed_in_shards,
    global_batches,
    optimizer_step,
    plan_epoch,
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


@dataclass
class KTOConfig(TrainingArgs):
    """KTO settings (plus the shared `TrainingArgs` fields). Every field is also a CLI flag of `alignloop kto`
    (`desirable_weight` -> `--desirable-weight`). Global batch = per_device_batch_size x gradient_accumulation_steps x
    processes (examples per optimizer step; at least 2: the reference point needs mismatched pairs)."""

    model: str = field(default="", metadata={"help": "Policy to train: hub id or local folder (the Python API also "
                                                     "takes a model object)."})
    ref_model: str | None = field(default=None, metadata={"help": "Reference model; default: the starting policy "
                                  "(with LoRA: the adapter's starting values, kept frozen)."})
    train_file: str | None = field(default=None, metadata={"help": "Unpaired rows {prompt, completion, label: bool} "
                                   "(thumbs up = true), plain or conversational; preference pairs are unpaired "
                                   "(JSONL/JSON/Parquet/CSV, a datasets folder or a hub id)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out rows for evaluation (optional)."})
    output_dir: str = field(default="runs/kto", metadata={"help": "Where checkpoints, metrics and the final model "
                                                                   "(OUTPUT_DIR/final) go."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of AdamW."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint (the beta of KTO)."})
    desirable_weight: float = field(default=1.0, metadata={"help": "λ_D, weight of the desirable rows' losses (the "
                                    "paper: λ_D·n_D / (λ_U·n_U) in [1, 4/3])."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "λ_U, weight of the undesirable rows' losses."})
    precompute_ref_logps: bool = field(default=True, metadata={
        "help": "Compute reference log-probs (rows and their mismatched pairs) once before training instead of "
                "each step."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "With truncation keep_end: keep at least "
                                          "this many prompt tokens (default max_length // 2)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Rows per forward pass in evaluation and in the "
                                                               "reference precomputation."})
    fast_gelu: bool = field(default=True, metadata={"help": "Speed-ups that keep the function (alignloop.models.fast): "
                                                            "GPT-2's gelu_new as one fused kernel (same to ~2e-7); "
                                                            "attention in fp32 under CPU bf16 autocast."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability of the policy to 0 "
                                                                  "(the implicit reward is then 0 at step 0)."})
    save_final: bool = field(default=True, metadata={"help": "save_pretrained the trained model into "
                                                             "OUTPUT_DIR/final."})

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0 or not (
                self.desirable_weight or self.undesirable_weight):
            raise ConfigError(f"desirable_weight and undesirable_weight must be >= 0 and not both 0, got "
                              f"{self.desirable_weight} and {self.undesirable_weight}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


# ----------------------------------------------------------------------------------------------- data


def load_unpaired_examples(source, tokenizer, args: KTOConfig) -> tuple[list[dict], DataStats, DataStats]:
    """A path / rows -> tokenised examples {"input_ids", "labels" (-100 on the prompt), "prompt_length", "label":
    bool} (desirable ones first, then undesirable: the training order is shuffled anyway). Unpaired rows are read by
    `alignloop.data.load_records` (file, line and field named in errors); preference pairs and rankings are unpaired
    (`groups_to_unpaired`). Returns (examples, read stats, tokenisation stats)."""
    records, stats = load_records(source, tokenizer=tokenizer, skip_bad_rows=args.skip_bad_rows)
    if stats.kind in ("preference", "ranking"):
        records = groups_to_unpaired(records)
    elif stats.kind not in ("unpaired", None):
        raise DataError(f"{source if isinstance(source, (str, os.PathLike)) else 'train_dataset'}: expected unpaired "
                        f"rows {{prompt, completion, label}} (or preference pairs), but the columns are those of "
                        f"{stats.kind} data")
    tstats = DataStats(kind="unpaired")
    examples = []
    for label in (True, False):
        toks, _ = tokenize_sft([r for r in records if bool(r["label"]) == label], tokenizer, max_length=args.max_length,
                               truncation=args.truncation, max_prompt_length=args.max_prompt_length,
                               all_assistant_turns=False, stats=tstats)
        examples += [{**ex, "label": label} for ex in toks]
    return examples, stats, tstats


def kl_partners(n: int, global_batch: int, seed: int) -> list[int]:
    """partner[i]: the example whose completion is paired with example i's prompt for the reference point. Each
    global batch of the first epoch (`plan_epoch`) rotated by one, as TRL rotates a batch: b[m] takes b[m-1]'s
    completion. A batch of one (the epoch's last, short) takes the completion of the example before it."""
    partner = list(range(n))
    batches = plan_epoch(n, global_batch, seed, 0)
    for k, b in enumerate(batches):
        if len(b) > 1:
            for m, i in enumerate(b):
                partner[i] = b[m - 1]
        elif k > 0:
            partner[b[0]] = batches[k - 1][-1]
    return partner


def add_kl_sequences(examples: list[dict], partner: list[int], args: KTOConfig) -> None:
    """Give each example its mismatched sequence: its own prompt + its partner's completion ("kl_input_ids",
    "kl_labels"), truncated by the same policy (keep_end when the policy is drop: a partner is never dropped)."""
    for ex, j in zip(examples, partner, strict=True):
        p = ex["input_ids"][:ex["prompt_length"]]
        other = examples[j]
        c = other["input_ids"][other["prompt_length"]:]
        fitted = truncate(p, [c], args.max_length, args.truncation, args.max_prompt_length)
        if fitted is None:
            fitted = truncate(p, [c], args.max_length, "keep_end", args.max_prompt_length)
        p, (c,), _ = fitted
        ex["kl_input_ids"] = p + c
        ex["kl_labels"] = [IGNORE_INDEX] * len(p) + c


# ----------------------------------------------------------------------------------------------- trainer

# the sums a micro-batch adds to a logging window (divided by the right counts in `_means`)
_SUMS = ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps", "chosen", "rejected")


class KTOTrainer:
    """`KTOTrainer(model, args, train_dataset, eval_dataset=None, ref_model=None, tokenizer=None).train()`.

    model: a path / hub id or a causal LM (a peft model: its adapter is trained, its start is the reference);
    default `args.model`. train_dataset / eval_dataset: a path, a list of rows or a `datasets.Dataset` of unpaired
    rows (or preference pairs; default `args.train_file` / `args.eval_file`; without an eval set, `eval_fraction`
    holds out a share of the training rows). ref_model: a path or a model (default `args.ref_model`; see the module
    docstring). tokenizer: needed when `model` is an object without a `_name_or_path`."""

    def __init__(self, model: Any = None, args: KTOConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, ref_model: Any = None, tokenizer: Any = None):
        self.args = a = args if args is not None else KTOConfig()
        self.run = prepare_run(a, "kto")
        self.accelerator = acc = self.run.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.global_batch = a.per_device_batch_size * a.gradient_accumulation_steps * self.world
        if self.global_batch < 2:
            raise ConfigError("per_device_batch_size x gradient_accumulation_steps x processes must be >= 2: KTO's "
                              "reference point pairs each prompt with another row's completion")
        model = model if model is not None else a.model
        if model is None or model == "":
            raise ConfigError("model: give a hub id or a local folder (KTOConfig.model / --model)")
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
        self.policy: torch.nn.Module = CompletionLogps(self.model)

        # The reference: ref_model > the starting policy (LoRA: the adapter's start, kept; else its initial weights).
        ref_model = ref_model if ref_model is not None else a.ref_model
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = load_causal_lm(ref_model, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
        if ref_model is None and self.use_adapter:
            keep_reference(self.model)  # the start may be a trained adapter: its base is not the starting policy
        elif ref_model is None and not a.precompute_ref_logps:
            ref_model = copy.deepcopy(self.model)  # on the fly, no adapter: a frozen copy of the start
        if ref_model is not None:
            ref_model = ref_model.to(acc.device).eval().requires_grad_(False)
            if a.fast_gelu:
                speed_up(ref_model)
        self.ref_model = ref_model

        train_dataset = train_dataset if train_dataset is not None else a.train_file
        eval_dataset = eval_dataset if eval_dataset is not None else a.eval_file
        if train_dataset is None:
            raise ConfigError("train_file: give the unpaired rows {prompt, completion, label} to train on "
                              "(--train-file)")
        self.train_examples, eval_examples, *self.data_stats = train_and_eval_examples(
            lambda source: load_unpaired_examples(source, self.tokenizer, a), train_dataset, eval_dataset, a,
            "rows")
        self.eval_examples: list[dict] = eval_examples or []
        if len(self.train_examples) < 2:
            raise ConfigError("KTO needs at least 2 training rows: its reference point pairs each prompt with "
                              "another row's completion")
        add_kl_sequences(self.train_examples, kl_partners(len(self.train_examples), self.global_batch, a.seed), a)
        n_eval = len(self.eval_examples)
        add_kl_sequences(self.eval_examples, [(i - 1) % n_eval for i in range(n_eval)], a)
        self._check_weights()
        self.state: dict[str, Any] = {}
        self._eval_ref: torch.Tensor | None = None

    def _check_weights(self) -> None:
        """TRL's warning: λ_D·n_D / (λ_U·n_U) outside [1, 4/3] (the paper's advice), with the weights that fit."""
        a = self.args
        n_d = max(sum(ex["label"] for ex in self.train_examples), 1)
        n_u = max(len(self.train_examples) - n_d, 1)
        ratio = a.desirable_weight * n_d / max(a.undesirable_weight * n_u, 1e-12)
        if not 1.0 <= ratio <= 4 / 3 + 1e-9:
            self.run.log.warning(
                "%d desirable and %d undesirable rows: λ_D·n_D / (λ_U·n_U) = %.2f, outside the paper's [1, 4/3]; "
                "consider desirable_weight in [%.2f, %.2f] or undesirable_weight in [%.2f, %.2f] (not both)",
                n_d, n_u, ratio, a.undesirable_weight * n_u / n_d, a.undesirable_weight * n_u / n_d * 4 / 3,
                a.desirable_weight * n_d / n_u * 3 / 4, a.desirable_weight * n_d / n_u)

    # -- log-probs ----------------------------------------------------------------------------------------

    def _batch(self, exs: list[dict], kl: bool = False) -> dict[str, torch.Tensor]:
        """Padded rows (to a multiple of 8: fewer distinct matmul shapes) of the examples' own sequences, or of their
        mismatched ones (`kl`), on the device, with response_mask = completion tokens."""
        key = "kl_" if kl else ""
        b = SFTCollator(self.tokenizer.pad_token_id, pad_to_multiple_of=8)(
            [{"input_ids": ex[f"{key}input_ids"], "labels": ex[f"{key}labels"]} for ex in exs])
        b["response_mask"] = b["labels"] != IGNORE_INDEX
        return {k: b[k].to(self.accelerator.device) for k in ("input_ids", "attention_mask", "position_ids",
                                                               "response_mask")}

    def _ref_context(self):
        """A context whose value is the reference model, in eval mode (`models.reference_context`)."""
        return reference_context(self.model, self.ref_model, self.use_adapter)

    @torch.inference_mode()
    def _ref_logps_for(self, examples: list[dict], indices: list[int]) -> torch.Tensor:
        """Reference log-probs [len(indices), 2] (own sequence, mismatched sequence), in batches sorted by length."""
        out = torch.zeros(len(indices), 2)
        order = sorted(range(len(indices)), key=lambda j: len(examples[indices[j]]["input_ids"]))
        with self._ref_context() as ref, self.accelerator.autocast():
            for lo in range(0, len(order), self.args.eval_batch_size):
                js = order[lo:lo + self.args.eval_batch_size]
                exs = [examples[indices[j]] for j in js]
                out[js, 0] = completion_logps(ref, self._batch(exs)).cpu()
                out[js, 1] = completion_logps(ref, self._batch(exs, kl=True)).cpu()
        return out

    def precompute_ref_logps(self, examples: list[dict]) -> torch.Tensor:
        """Reference log-probs of every example -> [N, 2] (own, mismatched). Each process computes its share and the
        shares are gathered. Call before training when the reference is the policy's own initial weights (`train()`
        does)."""
        if not examples:
            return torch.zeros(0, 2)
        return computed_in_shards(len(examples), self.rank, self.world,
                                  lambda mine: self._ref_logps_for(examples, mine))

    def reference_logps(self, examples: list[dict], indices: list[int],
                        ref_table: torch.Tensor | None = None) -> torch.Tensor:
        """Reference log-probs [k, 2] (own, mismatched) of examples[indices]: from `ref_table` or computed now."""
        if ref_table is not None:
            return ref_table[indices]
        return self._ref_logps_for(examples, indices)

    def mismatched_logps(self, examples: list[dict], indices: list[int]) -> torch.Tensor:
        """Policy log-probs [k] of the mismatched sequences of examples[indices], without gradients (they only enter
        the detached reference point)."""
        with torch.no_grad(), self.accelerator.autocast():
            return self._policy_logps(self._batch([examples[i] for i in indices], kl=True), grad=False).cpu()

    def _policy_logps(self, batch: dict[str, torch.Tensor], grad: bool) -> torch.Tensor:
        """Completion log-probs of the policy: with `grad` (training) through the prepared `self.policy`, so that
        DDP/FSDP see the forward; without, the model called directly (DDP's forward would expect a backward),
        unless its parameters are sharded (FSDP)."""
        if grad or is_sharded(self.accelerator):
            return self.policy(batch)
        return completion_logps(self.model, batch)

    def reference_point(self, policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(z₀, the mean before clamping) over every process's mismatched pairs (`kto_reference_point`)."""
        reduce = (lambda t: self.accelerator.reduce(t.to(self.accelerator.device), "sum").cpu()) \
            if self.world > 1 else None
        rows = torch.ones_like(policy_kl, dtype=torch.bool)
        z0 = kto_reference_point(policy_kl, ref_kl, reduce=reduce)
        return z0, float(masked_mean(policy_kl - ref_kl, rows, reduce=reduce))

    def row_terms(self, examples: list[dict], indices: list[int], reference_point: torch.Tensor,
                  ref_logps: torch.Tensor, grad: bool = True):
        """Policy forward over examples[indices] -> (losses [k], rewards [k], logps [k] detached, desirable [k])
        through `alignloop.losses.kto_loss`; ref_logps [k]: the reference log-probs of the same rows; `grad`: for a
        backward (training) or not (evaluation, under no_grad)."""
        a = self.args
        with self.accelerator.autocast():
            logps = self._policy_logps(self._batch([examples[i] for i in indices]), grad)
        desirable = torch.tensor([examples[i]["label"] for i in indices], device=logps.device)
        losses, rewards = kto_loss(logps, ref_logps.to(logps.device), desirable, reference_point.to(logps.device),
                                   a.beta, a.desirable_weight, a.undesirable_weight)
        return losses, rewards, logps.detach(), desirable

    @staticmethod
    def _sums(losses, rewards, logps, desirable) -> torch.Tensor:
        d = desirable.float()
        return torch.stack([losses.detach().sum(), (rewards * d).sum(), (rewards * (1 - d)).sum(),
                            (logps * d).sum(), (logps * (1 - d)).sum(), d.sum(), (1 - d).sum()]).float().cpu()

    def _means(self, sums: torch.Tensor) -> dict[str, float]:
        """The metrics of a window's sums (summed over processes): per-class means as TRL logs them."""
        if self.world > 1:
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), "sum").cpu()
        s = dict(zip(_SUMS, sums.tolist(), strict=True))
        n_d, n_u = s["chosen"], s["rejected"]
        out = {"loss/kto": s["loss"] / max(n_d + n_u, 1)}
        if n_d:
            out.update({"rewards/chosen": s["chosen_rewards"] / n_d, "logps/chosen": s["chosen_logps"] / n_d})
        if n_u:
            out.update({"rewards/rejected": s["rejected_rewards"] / n_u, "logps/rejected": s["rejected_logps"] / n_u})
        if n_d and n_u:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    # -- evaluation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, rewards and reference point (policy in eval mode; z₀ over the whole held-out set)
        -> {"eval/<metric>": value}."""
        if not self.eval_examples:
            return {}
        a = self.args
        if self._eval_ref is None and a.precompute_ref_logps:
            self._eval_ref = self.precompute_ref_logps(self.eval_examples)
        was = self.model.training
        self.model.eval()
        try:
            # as many micro-batches on every process: under FSDP each forward gathers parameters (a collective), so
            # a process with fewer rows runs the missing ones on row 0 and drops their results
            padded = step_micro_batches(list(range(len(self.eval_examples))), self.rank, self.world,
                                        a.eval_batch_size)
            mbs = [mb for mb in padded if mb]
            sharded, extra = is_sharded(self.accelerator), len(padded) - len(mbs)
            refs = [self.reference_logps(self.eval_examples, mb, self._eval_ref) for mb in mbs]
            policy_kl = torch.cat([self.mismatched_logps(self.eval_examples, mb) for mb in mbs] or [torch.zeros(0)])
            for _ in range(extra if sharded else 0):
                self.mismatched_logps(self.eval_examples, [0])
            ref_kl = torch.cat([r[:, 1] for r in refs] or [torch.zeros(0)])
            z0, raw = self.reference_point(policy_kl, ref_kl)
            sums = torch.zeros(len(_SUMS))
            for mb, ref in zip(mbs, refs, strict=True):
                sums += self._sums(*self.row_terms(self.eval_examples, mb, z0, ref[:, 0], grad=False))
            for _ in range(extra if sharded else 0):
                self.row_terms(self.eval_examples, [0], z0, refs[0][:, 0] if refs else torch.zeros(1), grad=False)
        finally:
            self.model.train(was)
        return {f"eval/{k}": v for k, v in {**self._means(sums), "kl/z0": float(z0), "kl/estimate": raw}.items()}

    # -- training -----------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        a, acc = self.args, self.accelerator
        t0 = time.perf_counter()
        n = len(self.train_examples)

        # Reference log-probs first: before any update the policy's weights may be the reference.
        train_ref = None
        if a.precompute_ref_logps:
            train_ref = self.precompute_ref_logps(self.train_examples)
            if self.eval_examples:
                self._eval_ref = self.precompute_ref_logps(self.eval_examples)
        ref_seconds = time.perf_counter() - t0

        self.model.train()
        # accelerate prepares the CompletionLogps module (DDP/FSDP): gradients are averaged in its backward
        opt = setup_optimization(a, self.run, self.policy, n, "kto")
        self.policy = opt.model
        optimizer, scheduler, logger, progress = opt.optimizer, opt.scheduler, opt.logger, opt.progress
        per_epoch, total, step = opt.per_epoch, opt.total, opt.step
        self.state = opt.state
        if not self.state:
            logger.log({"time/ref_logps": ref_seconds}, step=0)
        last: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        window, kl_sums = torch.zeros(len(_SUMS)), [0.0, 0.0, 0]
        window_rows, t_train = 0, time.perf_counter()
        for epoch, pos, batch, epoch_end in global_batches(n, self.global_batch, a.seed, epoch=opt.epoch,
                                                           batch_in_epoch=opt.pos):
            if step >= total:
                break
            # as many micro-batches on every process (empty ones: a process with no row left, weight 0 below)
            mbs = step_micro_batches(batch, self.rank, self.world, a.per_device_batch_size)
            # 1. the reference point of this optimizer step: every mismatched pair of the global batch, no gradient
            real = [mb for mb in mbs if mb]
            refs = [self.reference_logps(self.train_examples, mb, train_ref) for mb in real]
            policy_kl = torch.cat([self.mismatched_logps(self.train_examples, mb or batch[:1])[:len(mb)] for mb in mbs]
                                  or [torch.zeros(0)])  # (an empty micro-batch: row 0's, dropped; FSDP needs it)
            z0, raw = self.reference_point(policy_kl, torch.cat([r[:, 1] for r in refs] or [torch.zeros(0)]))
            # 2. the loss of each micro-batch, summed and divided by the global batch size
            #    (times the processes: DDP averages; gradients synchronised on the last micro-batch only)
            for k, mb in enumerate(mbs):
                with sync_context(acc, self.policy, k, len(mbs)):
                    if mb:
                        terms = self.row_terms(self.train_examples, mb, z0, refs[k][:, 0])
                        acc.backward(terms[0].sum() / len(batch) * acc.num_processes)
                        window += self._sums(*terms)
                    else:  # no row left for this process: one with weight 0 (every process takes part in DDP)
                        ref = self.reference_logps(self.train_examples, batch[:1], train_ref)
                        acc.backward(self.row_terms(self.train_examples, batch[:1], z0, ref[:, 0])[0].sum() * 0.0)
            window_rows += len(batch)
            kl_sums = [kl_sums[0] + float(z0), kl_sums[1] + raw, kl_sums[2] + 1]
            grad_norm = optimizer_step(acc, self.model, optimizer, scheduler, a.max_grad_norm)
            step += 1
            progress.update(1)
            if step % a.logging_steps == 0 or step == total:
                last = self._means(window)
                last.update({"kl/z0": kl_sums[0] / kl_sums[2], "kl/estimate": kl_sums[1] / kl_sums[2],
                             "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                             "train/epoch": epoch + pos / per_epoch,
                             "perf/examples_per_sec": window_rows / max(time.perf_counter() - t_train, 1e-9)})
                logger.log(last, step)
                window, kl_sums, window_rows, t_train = torch.zeros(len(_SUMS)), [0.0, 0.0, 0], 0, time.perf_counter()
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


def run_kto(config: KTOConfig) -> TrainResult:
    """The `alignloop kto` entry point: train with `config`, print where the model went and the last metrics."""
    trainer = KTOTrainer(args=config)
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        print(json.dumps({"output_dir": result.output_dir, "steps": result.steps,
                          **{k: round(v, 6) for k, v in result.metrics.items()}}))
    return result
