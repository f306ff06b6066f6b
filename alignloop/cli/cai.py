"""`alignloop cai`: the supervised stage of Constitutional AI (Bai et al. 2022). Sample a response per prompt from
the policy, critique and revise it against randomly drawn principles for --rounds rounds (the policy itself, or
--critic-model), write the revisions as SFT data (and the chains for inspection); --sft fine-tunes the policy on them.

    alignloop cai --model ./sft --train-file prompts.jsonl --rounds 2 --output-dir runs/cai
    alignloop cai --config cai.yaml --constitution my_principles.yaml --critic-model ./big --sft \\
                  --sft-args '{learning_rate: 1e-5, num_epochs: 2}'

Every field of `alignloop.ai_feedback.cai.CAIConfig` is a flag (`--field-name`) and a YAML key; flags override YAML.
Writes OUTPUT_DIR/revisions.jsonl ({prompt, completion} SFT rows), chains.jsonl, summary.json (and sft/final with
--sft); prints one JSON line with the paths and counts.
"""
from __future__ import annotations

from alignloop.ai_feedback.cai import CAIConfig, run_cai
from alignloop.training.config import make_config_command

cai = make_config_command(
    "cai", CAIConfig, run_cai,
    help=__doc__.split("\n\n")[0] + "\n\nEvery field of CAIConfig is a flag and a YAML key (flags override the "
    "YAML). Writes OUTPUT_DIR/revisions.jsonl (SFT rows), chains.jsonl (prompt, initial, chain of {round, "
    "principle, critique, revision}, final) and summary.json; with --sft, OUTPUT_DIR/sft/final. See "
    "alignloop/ai_feedback/cai.py.")
