"""`alignloop dpo`, `alignloop generate` (best-of-N) and `alignloop rs` (rejection-sampling fine-tuning).

Each is built from its config dataclass: `--config x.yaml` plus one flag per field (same names as the Python API).
"""
from __future__ import annotations

from alignloop.trainers.dpo import DPOConfig, run_dpo
from alignloop.training import make_config_command

dpo = make_config_command(
    "dpo", DPOConfig, run_dpo,
    help="Direct preference optimisation (sigmoid/cDPO/IPO/reference-free) on {prompt, chosen, rejected} pairs.")

from alignloop.recipes.best_of_n import BestOfNConfig, run_generate  # noqa: E402

generate = make_config_command(
    "generate", BestOfNConfig, run_generate,
    help="Sample completions for prompts; with --best-of N --reward-model PATH, N per prompt, every candidate and "
         "its score written to JSONL, the best marked; prints the analytic KL of best-of-N, log N - (N-1)/N.")

from alignloop.recipes.rejection_sampling import RSConfig, run_rs  # noqa: E402

rs = make_config_command(
    "rs", RSConfig, run_rs,
    help="Rejection-sampling fine-tuning: sample N per prompt from the latest model, score with --reward-model, keep "
         "the top k per prompt and/or all above --score-threshold, SFT on them; repeat for --rounds.")
