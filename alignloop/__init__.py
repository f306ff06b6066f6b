"""alignloop: the whole RLHF loop, from a base model and prompts to a model aligned with human preferences."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Trainers are imported lazily so `import alignloop` stays fast and the CLI's --help is quick.
_LAZY = {
    "SFTConfig": "alignloop.trainers.sft", "SFTTrainer": "alignloop.trainers.sft",
    "RewardConfig": "alignloop.trainers.rm", "RewardTrainer": "alignloop.trainers.rm",
    "PRMConfig": "alignloop.trainers.prm", "PRMTrainer": "alignloop.trainers.prm",
    "PPOConfig": "alignloop.trainers.ppo", "PPOTrainer": "alignloop.trainers.ppo",
    "DPOConfig": "alignloop.trainers.dpo", "DPOTrainer": "alignloop.trainers.dpo",
    "KTOConfig": "alignloop.trainers.kto", "KTOTrainer": "alignloop.trainers.kto",
    "PPOExperience": "alignloop.trainers.ppo", "TrainResult": "alignloop.training.run",
    "RSConfig": "alignloop.recipes.rejection_sampling",
    "RejectionSamplingTrainer": "alignloop.recipes.rejection_sampling",
    "BestOfNConfig": "alignloop.recipes.best_of_n", "best_of_n": "alignloop.recipes.best_of_n",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignloop' has no attribute {name!r}")
