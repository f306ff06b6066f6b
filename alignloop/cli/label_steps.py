"""`alignloop label-steps`: automatic step labels by Monte Carlo rollouts (Math-Shepherd, Wang et al. 2024). For each
step of each solution the policy continues --rollouts times from the steps so far; the step is good (+1) when any
rollout reaches an answer the --verifier accepts, and its soft label is the fraction that do.

    alignloop label-steps --model ./policy --input prompts.jsonl --samples-per-prompt 4 --rollouts 8 \\
        --verifier alignloop.demo.arithmetic:verify_answer --output steps.jsonl
    alignloop label-steps --model ./policy --input solutions.jsonl --rollouts 16 --verifier mymod:check

--input holds prompts ({prompt} rows: the policy writes --samples-per-prompt solutions each, split into steps at
newlines) or step rows ({prompt, completions: [steps]}). Writes step rows {prompt, completions, labels, soft_labels}
(alignloop.data's step format) to --output and prints one JSON line (counts, share of good steps, share solved).
"""
from __future__ import annotations

from alignloop.recipes.math_shepherd import LabelStepsConfig, run_label_steps
from alignloop.training.config import make_config_command

label_steps = make_config_command(
    "label-steps", LabelStepsConfig, run_label_steps,
    help=__doc__.split("\n\n")[0] + "\n\nEvery field of LabelStepsConfig is a flag and a YAML key (flags override "
    "the YAML). --input: prompts or step rows; --verifier module:function (prompt, solution_text) -> bool. See "
    "alignloop/recipes/math_shepherd.py.")
