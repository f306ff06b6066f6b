"""Shared training utilities: config, checkpoints, metrics, optimizer, loop pieces. Functions, not a base class.

What the trainers share beyond these (TrainingArgs, TrainResult, run set-up, final save) is `alignloop.training.run`;
the reward-hacking guard is `alignloop.training.guard`.
"""
from alignloop.training.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from alignloop.training.config import (
    click_options_from_dataclass,
    config_from_cli,
    load_config,
    make_config_command,
    renamed_fields,
    save_config,
)
from alignloop.training.fsdp import even_micro_batches, step_micro_batches
from alignloop.training.logging import MetricsLogger, Progress, read_metrics
from alignloop.training.loop import (
    computed_in_shards,
    epoch_order,
    global_batches,
    make_accelerator,
    micro_batches,
    optimizer_step,
    plan_epoch,
    seed_everything,
    set_threads,
    shard,
    steps_per_epoch,
    sync_context,
    take_indices,
)
from alignloop.training.optim import build_optimizer, build_scheduler

__all__ = [
    "MetricsLogger",
    "Progress",
    "build_optimizer",
    "build_scheduler",
    "click_options_from_dataclass",
    "computed_in_shards",
    "config_from_cli",
    "epoch_order",
    "even_micro_batches",
    "global_batches",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "make_accelerator",
    "make_config_command",
    "micro_batches",
    "optimizer_step",
    "plan_epoch",
    "read_metrics",
    "renamed_fields",
    "resolve_resume",
    "save_checkpoint",
    "save_config",
    "seed_everything",
    "set_threads",
    "shard",
    "step_micro_batches",
    "steps_per_epoch",
    "sync_context",
    "take_indices",
]
