"""`alignloop grpo` and `alignloop rloo`: critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE with a baseline) of a
policy against a reward (model, classifier, `module:function` such as a verifiable reward, or a weighted sum).

    alignloop grpo --model ./sft --reward-model ./rm --train-file prompts.jsonl --num-generations 4 \\
                   --total-updates 200 --kl-coef 0.04 --output-dir runs/grpo
    alignloop rloo --config rloo.yaml                                # estimator rloo unless the YAML says otherwise
    alignloop grpo ... --estimator dr_grpo
    alignloop grpo ... --reward-model mypkg.rewards:exact_match=1.0 --reward-model ./rm=0.5     # a weighted sum
    alignloop rloo ... --reward-granularity process --reward-model mypkg.steps:verify_steps     # step rewards

Every field of `alignloop.trainers.grpo.GRPOConfig` is a flag (`--field-name`) and a YAML key; flags override YAML.
Prints one JSON line: updates run, stop reason, the last update's reward/mean and objective/kl.
"""
from __future__ import annotations

import json

import click

from alignloop.errors import ConfigError
from alignloop.trainers.grpo import GRPOConfig, GRPOTrainer, RLOOConfig
from alignloop.training.config import make_config_command


def run(cfg: GRPOConfig) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in ("model", "reward_model", "train_file")
               if getattr(cfg, n) in (None, "", [])]
    if missing:
        raise ConfigError(f"alignloop {cfg.estimator} needs {', '.join(missing)} (as flags or in the --config YAML)")
    trainer = GRPOTrainer(args=cfg)
    result = trainer.train()
    if trainer.acc.is_main_process:
        click.echo(json.dumps({"estimator": cfg.estimator, "updates": result.steps, "stop_reason": result.stop_reason,
                               "reward/mean": result.metrics.get("reward/mean"),
                               "objective/kl": result.metrics.get("objective/kl"), "output_dir": cfg.output_dir}))


_HELP = ("\n\nEvery field of GRPOConfig is a flag and a YAML key (flags override the YAML). "
         "See alignloop/trainers/grpo.py.")
grpo = make_config_command("grpo", GRPOConfig, run, help=__doc__.split("\n\n")[0] + _HELP)
rloo = make_config_command("rloo", RLOOConfig, run, help="RLOO (the leave-one-out baseline; `alignloop grpo "
                           "--estimator rloo`)." + _HELP)
