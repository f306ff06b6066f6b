"""`alignloop ppo`: PPO of a policy against a reward model, with a KL penalty to the reference.

    alignloop ppo --config ppo.yaml
    alignloop ppo --model-name-or-path ./sft --reward-model-name-or-path ./rm --dataset prompts.jsonl \\
                  --total-updates 200 --kl-coef 0.05 --output-dir runs/ppo

Every field of `alignloop.trainers.ppo.PPOConfig` is a flag (`--field-name`) and a YAML key; flags override YAML.
"""
from __future__ import annotations

import json

import click

from alignloop.errors import ConfigError
from alignloop.trainers.ppo import PPOConfig
from alignloop.training.config import make_config_command


def run(cfg: PPOConfig) -> None:
    from alignloop.data import load_prompts
    from alignloop.trainers.ppo import PPOTrainer

    missing = [f"--{n.replace('_', '-')}" for n in ("model_name_or_path", "reward_model_name_or_path", "dataset")
               if getattr(cfg, n) is None]
    if missing:
        raise ConfigError(f"alignloop ppo needs {', '.join(missing)} (as flags or in the --config YAML)")
    records, _ = load_prompts(cfg.dataset)
    trainer = PPOTrainer(model=cfg.model_name_or_path, reward=cfg.reward_model_name_or_path, args=cfg,
                         train_dataset=records, gold_reward=cfg.gold_model_name_or_path)
    history = trainer.train()
    if trainer.acc.is_main_process:
        last = history[-1] if history else {}
        click.echo(json.dumps({"updates": trainer.state["update"], "stop_reason": trainer.state["stop_reason"],
                               "reward/mean": last.get("reward/mean"), "objective/kl": last.get("objective/kl"),
                               "output_dir": cfg.output_dir}))


ppo = make_config_command("ppo", PPOConfig, run, help=__doc__.split("\n\n")[0] + "\n\nEvery field of PPOConfig is "
                          "a flag and a YAML key (flags override the YAML). See alignloop/trainers/ppo.py.")
