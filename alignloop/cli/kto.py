"""`alignloop kto`: Kahneman-Tversky optimisation on thumbs up / thumbs down data (unpaired rows).

    alignloop kto --model ./sft --train-file thumbs.jsonl --output-dir runs/kto --beta 0.1
    alignloop kto --config kto.yaml --beta 0.1          # flags override the YAML

Every field of `alignloop.trainers.kto.KTOConfig` is a flag (`--field-name`) and a YAML key. Prints one JSON line:
where the model went, the steps run and the last metrics.
"""
from __future__ import annotations

from alignloop.trainers.kto import KTOConfig, run_kto
from alignloop.training import make_config_command

kto = make_config_command(
    "kto", KTOConfig, run_kto,
    help="Kahneman-Tversky optimisation (KTO) on unpaired {prompt, completion, label} rows: thumbs up / down, "
         "plain or conversational (preference pairs are unpaired). No reward model.")
