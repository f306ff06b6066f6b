"""Supervised fine-tuning on demonstrations, with the loss on completion tokens only.

    SFTTrainer(model="path-or-hub-id", args=SFTConfig(output_dir="runs/sft"), train_dataset="demos.jsonl").train()
    alignloop sft --model path --train-file demos.jsonl --output-dir runs/sft

Loss: token-level mean of -log p(completion token) over every completion token of the global batch (all processes,
all accumulation steps), so batch 8 == batch 4 x 2 accumulation == 2 processes x 4 exactly.

Shapes: B = micro-batch, T = padded length, V = vocab.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from alignloop.data import load_sft, pack_sft, tokenize_sft
from alignloop.errors import ConfigError
from alignloop.losses import logprobs_from_logits, masked_sum
from alignloop.models import load_causal_lm
from alignloop.models.fast import is_wide, speed_up
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


@dataclass
class SFTConfig(TrainingArgs):
    """SFT settings (plus the shared `TrainingArgs` fields)."""
    model: str = field(default="", metadata={"help": "Causal LM to fine-tune: a hub id or a local folder."})
    train_file: str | None = field(default=None, metadata={
        "help": "Demonstrations (JSONL/JSON/Parquet/CSV, a datasets save_to_disk folder or a hub id) in TRL's SFT "
                "formats: text, prompt+completion, or conversational messages."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out demonstrations (same formats)."})
    output_dir: str = field(default="runs/sft", metadata={"help": "Where checkpoints, metrics and the final model go."})
    completion_only_loss: bool = field(default=True, metadata={
        "help": "Loss on completion tokens only (prompt tokens masked). False trains on every token."})
    packing: Literal["auto", "on", "off"] = field(default="off", metadata={
        "help": "on: padding-free packing (auto: on for models with hidden size >= 256, compute-bound; a bare "
                "--packing means on): concatenate examples into rows of max_length, positions restarting per "
                "example and no token predicting across examples."})
    add_eos: bool = field(default=True, metadata={"help": "Append EOS to each completion so the model learns to stop."})
    all_assistant_turns: bool = field(default=True, metadata={
        "help": "Conversational data: the loss covers every assistant turn (TRL's assistant-only loss), not only the "
                "last one. Needs a fast tokenizer and a template that renders each prefix of the conversation as a "
                "prefix of the whole (else only the last turn is trained)."})


def _batch_tensors(examples: list[dict[str, Any]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids, attention_mask, position_ids (restart per packed example), loss_mask
    (True where the token is a target), packed (rows hold several examples)."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    tgt = torch.zeros(B, T, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        attn[i, :n] = 1
        pos[i, :n] = torch.tensor(e["position_ids"]) if "position_ids" in e else torch.arange(n)
        tgt[i, :n] = torch.tensor([lab != -100 for lab in e["labels"]])
    tensors = {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "loss_mask": tgt}
    out = {k: v.to(device) for k, v in tensors.items()}
    out["packed"] = any("seq_lens" in e for e in examples)
    return out


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p of each target token -> (nll [B,T-1], mask [B,T-1]). Logits at t predict token t+1.
    Packed rows use block attention through position ids restarting at 0 (flash/sdpa varlen where supported);
    labels at example boundaries are already -100, so no token is trained to predict across examples."""
    # Packed rows: no attention mask, so transformers builds a block-diagonal causal mask from the restarting
    # position ids (trailing padding is harmless: causal attention never looks ahead, and pads are not targets).
    attn = None if batch["packed"] else batch["attention_mask"]
    out = model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:]
    return -logprobs_from_logits(logits, targets), mask


class SFTTrainer:
    """`SFTTrainer(model=..., args=SFTConfig(...), train_dataset=..., eval_dataset=...).train()`.

    model: a hub id / local folder, or an already-loaded causal LM (then pass `tokenizer`).
    train_dataset / eval_dataset: a path or hub id, a list of dicts, or a `datasets.Dataset`; default: the
    config's train_file / eval_file."""

    def __init__(self, model: Any = None, args: SFTConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, tokenizer: Any = None):
        self.args = args or SFTConfig()
        self.model_arg = model if model is not None else self.args.model
        self.train_source = train_dataset if train_dataset is not None else self.args.train_file
        self.eval_source = eval_dataset if eval_dataset is not None else self.args.eval_file
        self.tokenizer = tokenizer
        if not self.model_arg:
            raise ConfigError("model: give a hub id or a local folder (SFTConfig.model / --model)")
        if self.train_source is None:
            raise ConfigError("train_file: give the demonstrations to train on (--train-file)")

    def _tokenize(self, source, tokenizer):
        records, stats = load_sft(source, tokenizer=tokenizer, skip_bad_rows=self.args.skip_bad_rows)
        examples, tstats = tokenize_sft(records, tokenizer, max_length=self.args.max_length,
                                        truncation=self.args.truncation, add_eos=self.args.add_eos,
                                        all_assistant_turns=self.args.all_assistant_turns)
        if not self.args.completion_only_loss:
            for e in examples:
                e["labels"] = list(e["input_ids"])
        return examples, stats, tstats

    def train(self) -> TrainResult:
        a = self.args
        run = prepare_run(a, "sft")
        acc, log = run.accelerator, run.log
        tokenizer = resolve_tokenizer(self.model_arg, self.tokenizer, padding_side="right")

        # ---- data
        train_ex, eval_ex, stats, tstats = train_and_eval_examples(
            lambda source: self._tokenize(source, tokenizer), self.train_source, self.eval_source, a, "examples")
        model = self.model_arg if not isinstance(self.model_arg, (str, Path)) else load_causal_lm(
            self.model_arg, dtype=a.dtype, lora=build_lora(a), gradient_checkpointing=a.gradient_checkpointing,
            trust_remote_code=a.trust_remote_code)
        packing = a.packing == "on" or (a.packing == "auto" and is_wide(model))
        if packing:
            train_ex = pack_sft(train_ex, a.max_length)
        log.info("%s; %s; %d training %s", stats.summary(), tstats.summary(), len(train_ex),
                 "packed rows" if packing else "examples")

        # ---- optimizer, schedule
        speed_up(model)  # same function, faster kernels
        opt = setup_optimization(a, run, model, len(train_ex), "sft")
        model, optimizer, scheduler = opt.model, opt.optimizer, opt.scheduler
        logger, progress = opt.logger, opt.progress
        global_batch, per_epoch, total = opt.global_batch, opt.per_epoch, opt.total
        step, epoch, pos = opt.step, opt.epoch, opt.pos
        pad_id = tokenizer.pad_token_id

        def evaluate() -> dict[str, float]:
            model.eval()
            nll_sum = torch.zeros((), device=acc.device)
            count = torch.zeros((), device=acc.device)
            # the same number of forwards on every process (FSDP's forward is a collective); dummies are not counted
            micro = even_micro_batches(list(range(len(eval_ex))), acc.process_index, acc.num_processes,
                                       a.per_device_batch_size)
            with torch.no_grad():
                for mb, w in micro:
                    nll, mask = token_nll(model, _batch_tensors([eval_ex[i] for i in mb], pad_id, acc.device))
                    if not w:
                        continue
                    nll_sum += masked_sum(nll, mask)
                    count += mask.sum()
            model.train()
            nll_sum, count = acc.reduce(nll_sum, "sum"), acc.reduce(count, "sum")
            loss = (nll_sum / count.clamp(min=1)).item()
            return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

        # ---- train
        model.train()
        t0, tokens_seen, window = time.perf_counter(), 0, []
        last_eval: dict[str, float] = {}
        stream = global_batches(len(train_ex), global_batch, a.seed, epoch=epoch, batch_in_epoch=pos)
        for epoch, pos, batch, epoch_end in stream:
            if step >= total:
                break
            # every process counts the targets of the whole global batch: the normaliser is identical everywhere
            n_targets = sum(sum(1 for lab in train_ex[i]["labels"][1:] if lab != -100) for i in batch)
            # as many micro-batches on every process (a short last batch: dummies of weight 0, zero gradient)
            micro = even_micro_batches(batch, acc.process_index, acc.num_processes, a.per_device_batch_size)
            loss_sum = torch.zeros((), device=acc.device)
            for k, (mb, w) in enumerate(micro):
                tensors = _batch_tensors([train_ex[i] for i in mb], pad_id, acc.device)
                with sync_context(acc, model, k, len(micro)), acc.autocast():
                    nll, mask = token_nll(model, tensors)
                    loss = masked_sum(nll, mask) / max(n_targets, 1) * w
                    # DDP and FSDP average gradients over processes: scale by their number to get the global mean.
                    acc.backward(loss * acc.num_processes)
                loss_sum += loss.detach()
                tokens_seen += int(tensors["attention_mask"].sum()) if w else 0
            grad_norm = optimizer_step(acc, model, optimizer, scheduler, a.max_grad_norm)
            step += 1
            window.append(acc.reduce(loss_sum, "sum").item())
            progress.update(1, info=f"loss {window[-1]:.4f}")
            if step % a.logging_steps == 0 or step == total:
                elapsed = time.perf_counter() - t0
                logger.log({"loss/sft": sum(window) / len(window), "train/grad_norm": grad_norm,
                            "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch + pos / per_epoch,
                            "perf/tokens_per_sec": tokens_seen * acc.num_processes / max(elapsed, 1e-9)}, step)
                window = []
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

