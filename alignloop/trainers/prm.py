"""Process reward model (PRM) training: an LM backbone with a per-token head, trained on step-level labels at the
step-end positions (the last token of each step's separator).

    PRMTrainer(model="path", args=PRMConfig(output_dir="runs/prm"), train_dataset="steps.jsonl").train()
    alignloop prm --model path --train-file steps.jsonl --output-dir runs/prm [--loss ce] [--outcome]

Data: the step format (`alignloop.data.steps`): prompt, completions (the steps), labels (+1/0/-1 or booleans; null =
unlabelled step), optional soft_labels. One example is one solution; its steps are scored in one forward.

Losses (pure functions in alignloop.losses.prm), per labelled step:
  bce: binary cross-entropy of one logit: good -> 1, bad -> 0, neutral -> `neutral` ("good" 1 by default, "bad" 0,
       a number in 0..1, or "ignore": left out); `target: soft` trains on the soft labels (Math-Shepherd's share of
       rollouts that reach the right answer) where a step has one, its hard target elsewhere.
  ce:  3-class cross-entropy (bad / neutral / good); neutral is its own class ("ignore" leaves it out).
The loss of a global batch is Σ step losses / (trained steps in the global batch): every labelled step weighs the
same, whatever the split into processes and accumulation steps.

`outcome: true` trains the outcome (ORM) view of the same rows (`alignloop.data.outcome_rows`: only the final step
labelled, with the solution's outcome), so an ORM shares the PRM's architecture, tokens and data; it is saved with
aggregation "last" (a `ProcessScorer` reads it at the final step end).

Evaluation (on the same view as training):
  eval/loss             the mean loss per trained step
  eval/step_accuracy    steps labelled good or bad (neutral excluded) predicted right: good when P(good) >= 0.5
                        (P(good) = σ(logit), or 1 - P(bad) with ce)
  eval/first_error_accuracy  the share of solutions whose first step predicted bad is their first step labelled bad,
                        over their labelled steps ("no error" matching "no error" counts as right; neutral is not an
                        error); solutions without a labelled step are left out
Shapes: B = solutions in a micro-batch, T = padded tokens, C = head outputs (1 bce, 3 ce).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from alignloop.data import STEP_SEPARATOR, DataStats, outcome_rows, read_steps, tokenize_step_records
from alignloop.errors import ConfigError
from alignloop.losses import good_probability, step_bce_loss, step_ce_loss, step_targets
from alignloop.models import batch_steps, build_prm, prm_info, prm_logits, unwrap_model
from alignloop.models.fast import disable_dropout, speed_up
from alignloop.training import global_batches, optimizer_step, sync_context
from alignloop.training.fsdp import even_micro_batches
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

NEUTRAL_NAMES = {"good": 1.0, "bad": 0.0, "ignore": None}


@dataclass
class PRMConfig(TrainingArgs):
    """Process reward model settings (plus the shared `TrainingArgs` fields)."""
    model: str = field(default="", metadata={
        "help": "Starting point: a causal LM (e.g. the SFT model; a token head is added) or a PRM to train further, "
                "as a hub id or a local folder."})
    train_file: str | None = field(default=None, metadata={
        "help": "Step-level labels: prompt, completions (a list of steps), labels (+1/0/-1 or true/false per step; "
                "null = unlabelled) [+ soft_labels in 0..1] (alignloop.data.steps)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out step-level labels (same format)."})
    output_dir: str = field(default="runs/prm", metadata={"help": "Where checkpoints, metrics and the final model go."})
    loss: Literal["bce", "ce"] = field(default="bce", metadata={
        "help": "bce: one logit per step (good vs bad); ce: 3-class cross-entropy (bad / neutral / good)."})
    neutral: str = field(default="good", metadata={
        "help": "Neutral (0) steps with bce: good (target 1: not an error), bad (target 0), ignore (left out), or a "
                "target in 0..1. With ce neutral is its own class unless ignore."})
    target: Literal["hard", "soft"] = field(default="hard", metadata={
        "help": "hard: targets from the labels; soft: from soft_labels where a step has one (Math-Shepherd's "
                "share of rollouts reaching the right answer), else from its label. soft needs loss bce."})
    outcome: bool = field(default=False, metadata={
        "help": "Train an outcome reward model (ORM) on the same rows: only the final step labelled, with the "
                "solution's outcome (its `outcome` column, else bad when any step is bad); read at the last step."})
    separator: str = field(default=STEP_SEPARATOR, metadata={
        "help": "The step separator: each step is followed by it; a step's score is read at its last token."})
    disable_dropout: bool = field(default=True, metadata={
        "help": "Set every dropout probability to 0 (as for reward models): a step's score depends on no mask."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of AdamW."})
    truncation: Literal["keep_end", "keep_start", "drop"] = field(default="keep_start", metadata={
        "help": "Too-long solutions: keep_start (as the scorer reads them) keeps the prompt whole and the steps that "
                "fit from the start; keep_end cuts the prompt from the left first (down to half of max_length); drop "
                "removes them. The numbers are logged."})

    def __post_init__(self):
        super().__post_init__()
        neutral_target(self.neutral)
        if self.target == "soft" and self.loss != "bce":
            raise ConfigError("target: soft targets need loss bce (ce has one class per label)")


def neutral_target(neutral: str | float) -> float | None:
    """The BCE target of a neutral step: "good" 1.0, "bad" 0.0, "ignore" None, or a number in 0..1."""
    if isinstance(neutral, str) and neutral in NEUTRAL_NAMES:
        return NEUTRAL_NAMES[neutral]
    try:
        value = float(neutral)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"neutral: expected good, bad, ignore or a number in 0..1, got {neutral!r}")
    return value


# ---------------------------------------------------------------- pieces
def first_error(bad: list[bool]) -> int | None:
    """The index of the first True (a bad step), None when there is none: [F, T, T] -> 1; [F, F] -> None."""
    return next((i for i, b in enumerate(bad) if b), None)


def first_error_hits(probs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(solutions whose first predicted-bad labelled step is their first labelled-bad step, solutions with a
    labelled step) of a batch; probs [B,T] = P(good). Only labelled steps count, neutral is not an error."""
    hits = n = 0
    for p, labels, mask in zip(probs, batch["step_labels"], batch["label_mask"], strict=True):
        if not mask.any():
            continue
        n += 1
        hits += first_error((p[mask] < 0.5).tolist()) == first_error((labels[mask] < 0).tolist())
    return hits, n


def trained_mask(batch: dict[str, torch.Tensor], neutral: float | None, soft: bool) -> torch.Tensor:
    """[B,T] bool: the step ends that give a loss term."""
    mask = batch["label_mask"]
    if neutral is None:
        mask = mask & (batch["step_labels"] != 0)
    return mask | batch["soft_mask"] if soft else mask


def step_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor], loss: str, neutral: float | None,
                soft: bool) -> torch.Tensor:
    """Per-token losses [B,T] (0 off the trained step ends) from the head's logits [B,T,C]."""
    mask = trained_mask(batch, neutral, soft)
    if loss == "ce":
        return step_ce_loss(logits, batch["step_labels"], mask)
    targets, _ = step_targets(batch["step_labels"], batch["label_mask"], 0.5 if neutral is None else neutral)
    if soft:
        targets = torch.where(batch["soft_mask"], batch["soft_targets"], targets)
    return step_bce_loss(logits[..., 0], targets, mask)


def count_trained(example: dict, neutral: float | None, soft: bool) -> int:
    """How many of an example's steps give a loss term (host side: the global batch's normaliser)."""
    return sum(1 for label, s in zip(example["labels"], example["soft_labels"], strict=True)
               if (label is not None and (label != 0 or neutral is not None)) or (soft and s is not None))


BATCH_KEYS = ("input_ids", "attention_mask", "step_labels", "label_mask", "soft_targets", "soft_mask")


class PRMTrainer:
    """`PRMTrainer(model=..., args=PRMConfig(...), train_dataset=..., eval_dataset=...).train()`.

    model: a hub id / local folder (a causal LM gets a token head; a PRM is trained further), or a transformers
    token classifier (then pass `tokenizer`). Datasets: a path or hub id, a list of dicts, or a `datasets.Dataset`
    in the step format; default: the config's train_file / eval_file."""

    def __init__(self, model: Any = None, args: PRMConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, tokenizer: Any = None):
        self.args = args or PRMConfig()
        self.model_arg = model if model is not None else self.args.model
        self.train_source = train_dataset if train_dataset is not None else self.args.train_file
        self.eval_source = eval_dataset if eval_dataset is not None else self.args.eval_file
        self.tokenizer = tokenizer
        if not self.model_arg:
            raise ConfigError("model: give a hub id or a local folder (PRMConfig.model / --model)")
        if self.train_source is None:
            raise ConfigError("train_file: give the step-level labels to train on (--train-file)")

    def _tokenize(self, source, tokenizer):
        a = self.args
        stats = DataStats()
        records = read_steps(source, separator=a.separator, tokenizer=tokenizer, skip_bad_rows=a.skip_bad_rows,
                             stats=stats)
        if a.outcome:
            records = outcome_rows(records)
        examples, tstats = tokenize_step_records(records, tokenizer, separator=a.separator,
                                                 max_length=a.max_length, truncation=a.truncation)
        neutral, soft = neutral_target(a.neutral), a.target == "soft"
        return [e for e in examples if count_trained(e, neutral, soft)], stats, tstats

    def _model(self):
        a = self.args
        if isinstance(self.model_arg, torch.nn.Module):
            if prm_info(self.model_arg) is None:
                raise ConfigError("model: a model object must be a PRM (a token classifier built with "
                                  "alignloop.models.build_prm)")
            return self.model_arg
        return build_prm(self.model_arg, a.loss, dtype=a.dtype, lora=build_lora(a),
                         gradient_checkpointing=a.gradient_checkpointing, trust_remote_code=a.trust_remote_code,
                         separator=a.separator)

    def train(self) -> TrainResult:
        a = self.args
        neutral, soft = neutral_target(a.neutral), a.target == "soft"
        run = prepare_run(a, "prm")
        acc = run.accelerator
        tokenizer = resolve_tokenizer(self.model_arg, self.tokenizer, padding_side="right")
        train_ex, eval_ex, stats, tstats = train_and_eval_examples(
            lambda source: self._tokenize(source, tokenizer), self.train_source, self.eval_source, a, "solutions")
        run.log.info("%s; %s; %d solutions, %d trained steps", stats.summary(), tstats.summary(), len(train_ex),
                     sum(count_trained(e, neutral, soft) for e in train_ex))

        # ---- model, optimizer, schedule
        model = self._model()
        info = dict(prm_info(model) or {}, aggregate="last" if a.outcome else "min",
                    view="outcome" if a.outcome else "process")
        unwrap_model(model).config.alignloop_prm = info   # saved with the model: how a ProcessScorer reads it
        speed_up(model)
        if a.disable_dropout:
            disable_dropout(model)
        opt = setup_optimization(a, run, model, len(train_ex), "prm")
        model, optimizer, scheduler = opt.model, opt.optimizer, opt.scheduler
        logger, progress = opt.logger, opt.progress
        global_batch, per_epoch, total = opt.global_batch, opt.per_epoch, opt.total
        step, epoch, pos = opt.step, opt.epoch, opt.pos

        def forward(examples: list) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
            batch = batch_steps(examples, tokenizer.pad_token_id, pad_to_multiple_of=8)
            b = {k: batch[k].to(acc.device) for k in BATCH_KEYS}
            logits = prm_logits(model, b["input_ids"], b["attention_mask"])
            return step_losses(logits, b, a.loss, neutral, soft), good_probability(logits.detach()).float(), b

        def accuracy(probs: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
            graded = b["label_mask"] & (b["step_labels"] != 0)
            right = ((probs >= 0.5) == (b["step_labels"] > 0)) & graded
            return torch.stack([right.sum().float(), graded.sum().float()])

        def evaluate() -> dict[str, float]:
            model.eval()
            sums = torch.zeros(6, device=acc.device)  # loss, trained steps, right, graded, first-error hits, n
            # the same number of forwards on every process (FSDP's forward is a collective); dummies are not counted
            micro = even_micro_batches(list(range(len(eval_ex))), acc.process_index, acc.num_processes,
                                       a.per_device_batch_size)
            with torch.no_grad():
                for mb, w in micro:
                    losses, probs, b = forward([eval_ex[i] for i in mb])
                    if not w:
                        continue
                    hits, n = first_error_hits(probs, b)
                    trained = trained_mask(b, neutral, soft).sum()
                    sums += torch.cat([torch.stack([losses.sum(), trained.float()]), accuracy(probs, b),
                                       torch.tensor([hits, n], dtype=sums.dtype, device=acc.device)])
            model.train()
            s = acc.reduce(sums, "sum")
            return {"eval/loss": (s[0] / s[1].clamp(min=1)).item(), "eval/step_accuracy": (s[2] / s[3].clamp(min=1))
                    .item(), "eval/first_error_accuracy": (s[4] / s[5].clamp(min=1)).item(),
                    "eval/steps": s[3].item(), "eval/solutions": s[5].item()}

        # ---- train
        model.train()
        t0, window, acc_window = time.perf_counter(), [], []
        last_eval: dict[str, float] = {}
        stream = global_batches(len(train_ex), global_batch, a.seed, epoch=epoch, batch_in_epoch=pos)
        for epoch, pos, batch, epoch_end in stream:
            if step >= total:
                break
            n_steps = max(1, sum(count_trained(train_ex[i], neutral, soft) for i in batch))
            # as many micro-batches on every process (a short last batch: dummies of weight 0, zero gradient)
            micro = even_micro_batches(batch, acc.process_index, acc.num_processes, a.per_device_batch_size)
            loss_sum = torch.zeros((), device=acc.device)
            graded = torch.zeros(2, device=acc.device)
            for k, (mb, w) in enumerate(micro):
                with sync_context(acc, model, k, len(micro)), acc.autocast():
                    losses, probs, b = forward([train_ex[i] for i in mb])
                    loss = losses.sum() / n_steps * w
                    acc.backward(loss * acc.num_processes)  # DDP and FSDP average over processes
                loss_sum += loss.detach()
                graded += accuracy(probs, b) * w
            grad_norm = optimizer_step(acc, model, optimizer, scheduler, a.max_grad_norm)
            step += 1
            window.append(acc.reduce(loss_sum, "sum").item())
            g = acc.reduce(graded, "sum")
            acc_window.append((g[0] / g[1].clamp(min=1)).item())
            progress.update(1, info=f"loss {window[-1]:.4f}")
            if step % a.logging_steps == 0 or step == total:
                logger.log({"loss/prm": sum(window) / len(window),
                            "train/step_accuracy": sum(acc_window) / len(acc_window), "train/grad_norm": grad_norm,
                            "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch + pos / per_epoch,
                            "perf/solutions_per_sec": step * global_batch / max(time.perf_counter() - t0, 1e-9)},
                           step)
                window, acc_window = [], []
            if eval_ex and eval_due(a, step, epoch_end):
                last_eval = evaluate()
                logger.log(last_eval, step)
            checkpoint_if_due(a, acc, step, epoch, pos, epoch_end, {"model": model}, optimizer, scheduler,
                              run.config_dict)
        if eval_ex and not last_eval:
            last_eval = evaluate()
            logger.log(last_eval, step)
        return finish(a, acc, model, tokenizer, logger, progress, step, last_eval, time.perf_counter() - t0,
                      stats, tstats)
