"""`alignloop ppo`: PPO of a policy against a reward (model, function or weighted sum), with a KL penalty to the
reference.

    alignloop ppo --config ppo.yaml
    alignloop ppo --model ./sft --reward-model ./rm --train-file prompts.jsonl \\
                  --total-updates 200 --kl-coef 0.05 --output-dir runs/ppo
    alignloop ppo ... --reward-model ./rm=0.7 --reward-model mypkg.rewards:length_penalty=0.3   # a weighted sum
    alignloop ppo ... --reward-granularity process --reward-model runs/prm/final   # step rewards (a PRM, or a
                                                   # step function module:function fn(prompts, step_lists))

Every field of `alignloop.trainers.ppo.PPOConfig` is a flag (`--field-name`) and a YAML key; flags override YAML.
The old names (`--model-name-or-path`, `--reward-model-name-or-path`, `--dataset`, ...) still work for one release,
with a warning. Prints one JSON line: updates run, stop reason, the last update's reward/mean and objective/kl.
"""
from __future__ import annotations

import json

import click

from alignloop.errors import ConfigError
from alignloop.trainers.ppo import PPOConfig, PPOTrainer
from alignloop.training.config import make_config_command


def run(cfg: PPOConfig) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in ("model", "reward_model", "train_file")
               if getattr(cfg, n) in (None, "", [])]
    if missing:
        raise ConfigError(f"alignloop ppo needs {', '.join(missing)} (as flags or in the --config YAML)")
    trainer = PPOTrainer(args=cfg)
    result = trainer.train()
    if trainer.acc.is_main_process:
        click.echo(json.dumps({"updates": result.steps, "stop_reason": result.stop_reason,
                               "reward/mean": result.metrics.get("reward/mean"),
                               "objective/kl": result.metrics.get("objective/kl"), "output_dir": cfg.output_dir}))


ppo = make_config_command("ppo", PPOConfig, run, help=__doc__.split("\n\n")[0] + "\n\nEvery field of PPOConfig is "
                          "a flag and a YAML key (flags override the YAML). See alignloop/trainers/ppo.py.")
