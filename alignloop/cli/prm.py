"""`alignloop prm`: train a process reward model (or, with --outcome, an outcome reward model on the same rows);
every config field is a flag; `--config x.yaml` loads a file first."""
from __future__ import annotations

import json

import click
from accelerate import PartialState

from alignloop.trainers.prm import PRMConfig, PRMTrainer
from alignloop.training import make_config_command


def _run(cfg: PRMConfig) -> None:
    result = PRMTrainer(args=cfg).train()
    if PartialState().is_main_process:   # under `accelerate launch` every process trains; one result line
        click.echo(json.dumps({"model": result.output_dir, "steps": result.steps, **result.metrics}))


prm = make_config_command("prm", PRMConfig, _run,
                          "Train a process reward model: an LM with a head scoring each step at its separator "
                          "token (BCE or 3-class cross-entropy), on step-level labels (prompt, completions = steps, "
                          "labels +1/0/-1). Reports per-step accuracy and first-error accuracy. --outcome trains an "
                          "outcome reward model on the same rows (only the final step labelled).")
