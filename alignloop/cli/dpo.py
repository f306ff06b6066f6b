"""`alignloop dpo`, `alignloop generate` (best-of-N) and `alignloop rs` (rejection-sampling fine-tuning).

Each is built from its config dataclass: `--config x.yaml` plus one flag per field (same names as the Python API).
"""
from __future__ import annotations

from alignloop.trainers.dpo import DPOConfig, run_dpo
from alignloop.training import make_config_command

dpo = make_config_command(
    "dpo", DPOConfig, run_dpo,
    help="Direct preference optimisation (sigmoid/cDPO/IPO/reference-free) on {prompt, chosen, rejected} pairs.")
