"""`alignloop online-dpo`: online DPO (Guo et al. 2024) of a policy against a reward (model, classifier,
`module:function`, or a weighted sum) that judges two fresh completions per prompt.

    alignloop online-dpo --model ./sft --reward-model ./rm --train-file prompts.jsonl --beta 0.1 \\
                         --total-updates 200 --output-dir runs/online-dpo
    alignloop online-dpo --config online_dpo.yaml --loss-type ipo
    alignloop online-dpo ... --reward-model mypkg.rewards:exact_match=1.0 --reward-model ./rm=0.5  # a weighted sum

Every field of `alignloop.trainers.online_dpo.OnlineDPOConfig` is a flag (`--field-name`) and a YAML key; flags
override YAML. Prints one JSON line: updates run, stop reason, the last update's reward/mean, objective/kl and
loss/dpo.
"""
from __future__ import annotations

import json

import click

from alignloop.errors import ConfigError
from alignloop.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignloop.training.config import make_config_command


def run(cfg: OnlineDPOConfig) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in ("model", "reward_model", "train_file")
               if getattr(cfg, n) in (None, "", [])]
    if missing:
        raise ConfigError(f"alignloop online-dpo needs {', '.join(missing)} (as flags or in the --config YAML)")
    trainer = OnlineDPOTrainer(args=cfg)
    result = trainer.train()
    if trainer.acc.is_main_process:
        click.echo(json.dumps({"updates": result.steps, "stop_reason": result.stop_reason,
                               "reward/mean": result.metrics.get("reward/mean"),
                               "objective/kl": result.metrics.get("objective/kl"),
                               "loss/dpo": result.metrics.get("loss/dpo"), "output_dir": cfg.output_dir}))


online_dpo = make_config_command("online-dpo", OnlineDPOConfig, run, help=__doc__.split("\n\n")[0] + (
    "\n\nEvery field of OnlineDPOConfig is a flag and a YAML key (flags override the YAML). "
    "See alignloop/trainers/online_dpo.py."))
