"""`alignloop sft` and `alignloop rm`: every config field is a flag; `--config x.yaml` loads a file first."""
from __future__ import annotations

import json

import click
from accelerate import PartialState

from alignloop.trainers.rm import RewardConfig, RewardTrainer
from alignloop.trainers.sft import SFTConfig, SFTTrainer
from alignloop.training import make_config_command


def _report(result) -> None:
    # under `accelerate launch` every process trains; one result line (the trainer's accelerator set the state up)
    if PartialState().is_main_process:
        click.echo(json.dumps({"model": result.output_dir, "steps": result.steps, **result.metrics}))


def _run_sft(cfg: SFTConfig) -> None:
    result = SFTTrainer(args=cfg).train()
    _report(result)


def _run_rm(cfg: RewardConfig) -> None:
    result = RewardTrainer(args=cfg).train()
    _report(result)


sft = make_config_command("sft", SFTConfig, _run_sft,
                          "Supervised fine-tuning on demonstrations, with the loss on completion tokens only. "
                          "Writes OUTPUT_DIR/final (loadable with transformers), metrics.jsonl and TensorBoard logs.")
rm = make_config_command("rm", RewardConfig, _run_rm,
                         "Train a reward model (LM backbone + scalar head) on preference pairs or rankings with the "
                         "Bradley-Terry (or Plackett-Luce) loss. Reports held-out pairwise accuracy and mean margin. "
                         "--heads-by criterion|group|labeler trains one head per criterion, labeler group or labeler "
                         "on a shared backbone (--population-head adds one trained on every pair); accuracy per "
                         "head.")
