"""What the trainers share (functions, not a base class): the offline trainers' config fields (`TrainingArgs`), the
result every `train()` returns (`TrainResult`), run set-up, tokenizer, LoRA options, resume, checkpoints, final save."""
from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignloop.errors import ConfigError
from alignloop.models import LoraOptions, has_adapter, load_tokenizer
from alignloop.training.checkpoint import is_sharded, load_checkpoint, resolve_resume, save_checkpoint
from alignloop.training.config import on_off_from_bools, save_config
from alignloop.training.logging import MetricsLogger, Progress, read_metrics
from alignloop.training.loop import make_accelerator, seed_everything, steps_per_epoch
from alignloop.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("alignloop")


@dataclass
class TrainingArgs:
    """Fields every offline trainer (SFT, reward model, DPO) shares: data handling, optimisation, precision, LoRA,
    logging, checkpoints. Each trainer's config extends it with its own fields."""
    eval_fraction: float = field(default=0.0, metadata={
        "help": "Without eval_file: the share of train rows held out for evaluation (0 = no evaluation)."})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per example (prompt + completion)."})
    truncation: Literal["keep_end", "keep_start", "drop"] = field(default="keep_end", metadata={
        "help": "Too-long examples: keep_end cuts the prompt from the left first (then the completion's end), "
                "keep_start keeps the first max_length tokens, drop removes them. The numbers are logged."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip malformed rows (and report the count) "
                                                                 "instead of stopping at the first one."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler: str = field(default="linear", metadata={
        "help": "Schedule after warmup: linear, cosine, constant, constant_with_warmup, ... (transformers)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps (optimizer steps)."})
    num_epochs: int = field(default=1, metadata={"help": "Passes over the training data."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: num_epochs)."})
    per_device_batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch on each process."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step. Global batch = per_device_batch_size x this x processes."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (0 = no clipping)."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={
        "help": "Autocast on GPU: bf16 or fp16 (fp16 needs a GPU). 'no' = full precision."})
    dtype: str | None = field(default=None, metadata={
        "help": "Dtype to load weights in: float32, bfloat16, float16 or auto (default: the checkpoint's)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "LoRA target modules: 'all-linear' or comma-separated module names."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and dropout."})
    logging_steps: int = field(default=10, metadata={"help": "Log training metrics every N optimizer steps."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0 = at the end of each epoch)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps for exact resume (0 = never)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from: str | None = field(default=None, metadata={
        "help": "Resume exactly from a checkpoint folder, or 'latest' (the newest in output_dir, if any)."})
    tensorboard: bool = field(default=True, metadata={"help": "Also write metrics to TensorBoard."})
    wandb: bool = field(default=False, metadata={"help": "Also log to Weights & Biases (needs wandb installed)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar with ETA."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})

    def __post_init__(self):
        on_off_from_bools(self)
        if self.max_length < 2:
            raise ConfigError("max_length: expected at least 2")
        if self.per_device_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("per_device_batch_size and gradient_accumulation_steps must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("eval_fraction: expected a number in [0, 1)")


@dataclass
class TrainResult:
    """What every trainer's `train()` returns: where the final model is (`output_dir`, a folder plain transformers
    loads), how many steps ran (optimizer steps; PPO: updates; rejection sampling: rounds), the last metrics
    (evaluation metrics where there is an eval set), the wall time, why the run stopped early (None: it used its
    budget) and `history`, the metrics of every logged step (`metrics.jsonl`'s rows: SFT/RM/DPO every
    `logging_steps` and each evaluation; PPO one dict per update; rejection sampling one per round; empty on the
    processes other than the main one).
    Indexing and iterating the result go through `history` (`result[-1]` is the last update's metrics)."""
    output_dir: str
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    stop_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return True   # a result, however short its history

    def __getitem__(self, i):
        return self.history[i]

    def __len__(self) -> int:
        return len(self.history)

    def __iter__(self):
        return iter(self.history)


@dataclass
class Run:
    accelerator: Any
    log: logging.LoggerAdapter
    config_dict: dict[str, Any]


class _Prefixed(logging.LoggerAdapter):
    """Prefix each message with the trainer's name, so lines of consecutive trainers in one process stay apart."""

    def process(self, msg, kwargs):
        return f"[{self.extra['name']}] {msg}", kwargs


def prepare_run(args, name: str) -> Run:
    """Accelerator, seeds, output folder, the resolved config saved as `config.yaml` beside the results."""

    acc = make_accelerator(args.mixed_precision)
    seed_everything(args.seed, acc.process_index)
    out = Path(args.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(args, out / "config.yaml")
    if not logging.getLogger().handlers:
        # alignloop's own INFO lines on the main process; other libraries stay at WARNING (their INFO is noise)
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        log.setLevel(logging.INFO if acc.is_main_process else logging.WARNING)
    return Run(acc, _Prefixed(log, {"name": name}), asdict(args))


def resolve_tokenizer(model_arg: Any, tokenizer: Any, padding_side: str):
    if tokenizer is not None:
        tokenizer.padding_side = padding_side
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if not isinstance(model_arg, (str, Path)):
        path = getattr(getattr(model_arg, "config", None), "_name_or_path", None)
        if not path:
            raise ConfigError("a model object was given without a tokenizer: pass tokenizer=...")
        model_arg = path

    return load_tokenizer(str(model_arg), padding_side=padding_side)


def build_lora(args):
    """LoRA options from a config's lora_* fields (None when lora_r == 0)."""
    if not getattr(args, "lora_r", 0):
        return None

    targets = args.lora_target_modules
    return LoraOptions(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                       target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])


def maybe_resume(args, accelerator, modules: dict, optimizer, scheduler) -> dict[str, Any]:
    """Restore the checkpoint named by `resume_from` (a folder or 'latest'); {} for a fresh run."""

    path = resolve_resume(args.resume_from, args.output_dir)
    if path is None:
        return {}
    state = load_checkpoint(path, accelerator=accelerator, modules=modules, optimizer=optimizer, scheduler=scheduler)
    log.info("resumed from %s at step %d", path, state["step"])
    return state


def train_and_eval_examples(tokenize: Callable[[Any], tuple[list, Any, Any]], train_source, eval_source, args,
                            what: str) -> tuple[list, list | None, Any, Any]:
    """(training examples, held-out examples or None, read stats, tokenisation stats) of an offline trainer:
    `tokenize(source) -> (examples, stats, tstats)` on the training data; the held-out set is `eval_source`'s, else
    `args.eval_fraction` of the training examples (a deterministic split). No training example left is a
    ConfigError (`what`: what the examples are, for the message)."""
    train, stats, tstats = tokenize(train_source)
    held = None
    if eval_source is not None:
        held = tokenize(eval_source)[0]
    elif args.eval_fraction > 0:
        train, held = split_eval(train, args.eval_fraction, args.seed)
    if not train:
        raise ConfigError(f"no training {what} left after reading and tokenisation (all dropped by truncation?)")
    return train, held, stats, tstats


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split (the same on every process)."""
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def save_adapter(model, tokenizer, folder: str | Path) -> Path | None:
    """A LoRA model's peft adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer into `folder`,
    loadable with `PeftModel.from_pretrained(base, folder)` (or as `--model folder`: base + adapter). Our wrappers
    save their own extras beside it (a reward model's score head is in the adapter's modules_to_save; a value head
    as value_head.safetensors). None, and nothing written, for a model without an adapter. Main process only."""
    if not has_adapter(model):
        return None
    folder = Path(folder)
    if getattr(model, "_alignloop_wrapper", False) and hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, tokenizer=tokenizer, merge_lora=False)
    else:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def save_final(accelerator, model, tokenizer, output_dir: str | Path, subdir: str = "final",
               adapter_subdir: str | None = "adapter") -> Path:
    """`save_pretrained` (safetensors) into OUTPUT_DIR/final, loadable by plain transformers. A LoRA model is saved
    merged into its base there, so that no peft is needed to load it, and, unless `adapter_subdir` is None, as its
    peft adapter (with the tokenizer) into OUTPUT_DIR/adapter (`save_adapter`). Under FSDP the full weights are
    gathered first (every process takes part) and the main process writes them."""

    final = Path(output_dir) / subdir
    accelerator.wait_for_everyone()
    full = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        m = accelerator.unwrap_model(model)
        if hasattr(m, "save_pretrained") and getattr(m, "_alignloop_wrapper", False):
            # our wrappers save their inner transformers model (`.model`): its keys without the prefix
            m.save_pretrained(final, **({} if full is None else
                                        {"state_dict": {k.removeprefix("model."): v for k, v in full.items()}}))
        elif full is not None:
            m.save_pretrained(final, state_dict=full, safe_serialization=True)
        else:
            merged = copy.deepcopy(m).merge_and_unload() if has_adapter(m) else m
            merged.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        if adapter_subdir is not None:
            save_adapter(m, tokenizer, Path(output_dir) / adapter_subdir)
    accelerator.wait_for_everyone()
    return final


def full_state_dict(accelerator, model) -> dict[str, Any] | None:
    """Under FSDP: the full (gathered) state dict on the main process, {} on the others; every process must call
    it (a collective). None without FSDP (the model holds its full weights)."""
    if not is_sharded(accelerator):
        return None
    full = accelerator.get_state_dict(model)
    # tied weights (an LM head sharing the embedding) come back as separate copies: keep the first name only, as
    # save_pretrained does for the tensors of an unsharded model
    seen: set[int] = set()
    for k, v in accelerator.unwrap_model(model).state_dict(keep_vars=True).items():
        if id(v) in seen:
            full.pop(k, None)
        seen.add(id(v))
    return full


def write_summary(accelerator, output_dir: str | Path, result: TrainResult, *stats) -> None:
    if accelerator.is_main_process:
        summary = {**{k: v for k, v in asdict(result).items() if k != "history"},   # history: metrics.jsonl
                   "data": [{k: v for k, v in vars(s).items() if k != "errors"} for s in stats]}
        (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def eval_due(args, step: int, epoch_end: bool) -> bool:
    """Evaluate every `eval_steps` optimizer steps, or at the end of each epoch when eval_steps is 0."""
    return bool(args.eval_steps and step % args.eval_steps == 0) or (not args.eval_steps and epoch_end)


def checkpoint_if_due(args, accelerator, step: int, epoch: int, pos: int, epoch_end: bool, modules: dict,
                      optimizer, scheduler, config_dict: dict, **extra_state) -> None:
    """Every `save_steps` steps: a checkpoint that resumes at the next batch (the next epoch's first after its last)."""
    if not (args.save_steps and step % args.save_steps == 0):
        return

    nxt_epoch, nxt_pos = (epoch + 1, 0) if epoch_end else (epoch, pos)
    save_checkpoint(args.output_dir, step, accelerator=accelerator, modules=modules, optimizer=optimizer,
                    scheduler=scheduler, keep_last=args.save_total_limit,
                    trainer_state={"step": step, "epoch": nxt_epoch, "batch_in_epoch": nxt_pos, "config": config_dict,
                                   **extra_state})


def finish(args, accelerator, model, tokenizer, logger, progress, step: int, metrics: dict, seconds: float,
           *stats, save: bool = True) -> TrainResult:
    """Close the progress bar and logs, save OUTPUT_DIR/final (and a LoRA model's OUTPUT_DIR/adapter), write
    summary.json; the TrainResult of the run."""
    progress.close()
    final = save_final(accelerator, model, tokenizer, args.output_dir) if save else Path(args.output_dir)
    logger.close()
    history = read_metrics(args.output_dir) if accelerator.is_main_process else []
    result = TrainResult(output_dir=str(final), steps=step, metrics=metrics, seconds=seconds, history=history)
    write_summary(accelerator, args.output_dir, result, *stats)
    return result


@dataclass
class Optimization:
    """What `setup_optimization` builds: the prepared model and optimizer, the schedule, the resume position
    (step, epoch, batch within the epoch), the logger and the progress bar."""
    model: Any
    optimizer: Any
    scheduler: Any
    global_batch: int
    per_epoch: int
    total: int
    state: dict
    step: int
    epoch: int
    pos: int
    logger: Any
    progress: Any


def setup_optimization(args, run: Run, model, n_examples: int, name: str, wrap: bool = True) -> Optimization:
    """Global batch and step budget, AdamW + schedule, accelerate.prepare (unless `wrap` is False: the model left as
    it is), resume, metrics logger, progress bar: the set-up every offline trainer (SFT, RM, DPO, KTO) shares."""

    a, acc = args, run.accelerator
    global_batch = a.per_device_batch_size * a.gradient_accumulation_steps * acc.num_processes
    per_epoch = steps_per_epoch(n_examples, global_batch)
    total = a.max_steps if a.max_steps > 0 else per_epoch * a.num_epochs
    optimizer = build_optimizer(model, a.learning_rate, a.weight_decay, (a.adam_beta1, a.adam_beta2), a.adam_epsilon)
    scheduler = build_scheduler(optimizer, a.lr_scheduler, a.warmup_steps, total)
    if is_sharded(acc):
        if not wrap:
            raise ConfigError(f"{name}: a model not prepared by accelerate (wrap=False) cannot run under FSDP")
        if has_adapter(model):
            raise ConfigError("LoRA under FSDP is not supported yet: train LoRA with DDP (its weights are small)")
        if getattr(model, "_no_split_modules", None) is None:
            # our wrappers (a reward model around a transformers classifier): accelerate's transformer-based wrap
            # reads the blocks to shard one by one from the root's `_no_split_modules`; without them it would shard
            # the whole model as one unit (all parameters gathered at once)
            model._no_split_modules = next((m._no_split_modules for m in model.modules()
                                            if getattr(m, "_no_split_modules", None)), None)
    if wrap:
        model, optimizer = acc.prepare(model, optimizer)  # FSDP2: shards the parameters and the optimizer's
    state = maybe_resume(a, acc, {"model": model}, optimizer, scheduler)
    step = state.get("step", 0)
    logger = MetricsLogger(a.output_dir, enabled=acc.is_main_process, tensorboard=a.tensorboard, wandb=a.wandb,
                           config=run.config_dict, resume_step=step if state else None)
    progress = Progress(total, name, enabled=a.progress and acc.is_main_process, start=step)
    return Optimization(model, optimizer, scheduler, global_batch, per_epoch, total, state, step,
                        state.get("epoch", 0), state.get("batch_in_epoch", 0), logger, progress)
