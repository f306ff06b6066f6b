"""Automatic step labels by Monte Carlo rollouts (Math-Shepherd, Wang et al. 2024): `alignloop label-steps`.

For each solution (a prompt and its steps) and each step k, the policy continues M times from the prompt and the
steps up to and including k; a rollout is correct when the verifier accepts the prompt with the solution text
`join_steps(steps[:k+1]) + continuation`. Step k's labels:
  hard  +1 when at least one of the M rollouts reaches a correct final answer, else −1 (Math-Shepherd's "HE",
        hard estimation: the step can still lead to the answer)
  soft  the fraction of the M rollouts that do (Math-Shepherd's "SE", soft estimation), in 0..1
The last step needs no rollout: the solution is complete, so its labels are the verifier's verdict on the solution
itself (hard ±1, soft 1.0 / 0.0), also written as the row's `outcome` (±1: what an outcome reward model trains on,
`alignloop.data.outcome_rows`). Rows come out in the contract's step format (`alignloop.data`): {"prompt",
"completions": [steps], "labels": [±1], "soft_labels": [fractions], "outcome"} plus the input row's other fields.

Hard labels are optimistic: a wrong step from which the policy often recovers (or reaches the right answer by luck)
is labeled good, and a right step from which the policy rarely finishes well may be labeled bad when M is small;
Wang et al. report hard estimation with M = 8 - 16 works best for training.

    from alignloop.recipes.math_shepherd import math_shepherd_labels, policy_continuer
    cont = policy_continuer(model, tokenizer, SamplingParams(max_new_tokens=64), batch_size=256, seed=0)
    rows = math_shepherd_labels(step_rows, verifier, cont, rollouts=8)
    alignloop label-steps --model ./policy --input prompts.jsonl --samples-per-prompt 4 --rollouts 8 \\
        --verifier alignloop.demo.arithmetic:verify_answer --output steps.jsonl

Sampling is injectable: a `Continuer` is any callable (prefix texts, m) -> m continuation texts per prefix (a
deterministic stub in the tests; `policy_continuer` samples from a model through `alignloop.rollout
.sample_completions`, the one home of "N completions per prompt", in batches of `batch_size` sequences). All the
rollouts of a call are one batched sampling: every prefix of every solution at once. Identical prefixes (solutions
of one prompt often share their first steps) are rolled out once and share their labels (`dedupe`, on by default:
the same estimate, fewer rollouts).

Starting from prompts, `sample_solutions` draws `samples_per_prompt` solutions per prompt with the same continuer
and splits them into steps (`alignloop.data.split_steps`; a solution with no step is dropped).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from alignloop.data import (
    STEP_SEPARATOR,
    check_writable,
    join_steps,
    prompt_texts,
    read_rows,
    read_steps,
    split_steps,
    write_rows,
)
from alignloop.errors import ConfigError, UserError
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.rollout import SamplingParams, sample_completions
from alignloop.scoring import load_function

Continuer = Callable[[Sequence[str], int], list[list[str]]]
Verifier = Callable[[str, str], bool]


def policy_continuer(model, tokenizer, params: SamplingParams | None = None, batch_size: int = 64,
                     seed: int | None = None, max_prompt_length: int | None = None) -> Continuer:
    """A Continuer sampling from `model` (`sample_completions`; `seed` seeds torch's RNG on each call, None: not)."""
    def continue_(prefixes: Sequence[str], m: int) -> list[list[str]]:
        if not prefixes:
            return []
        groups = sample_completions(model, tokenizer, list(prefixes), m, params, batch_size=batch_size, seed=seed,
                                    max_prompt_length=max_prompt_length)
        return [[c.text for c in g] for g in groups]
    return continue_


def resolve_verifier(verifier: str | Verifier) -> Verifier:
    """A callable (prompt, solution_text) -> bool, or its `module:function` spec."""
    if isinstance(verifier, str):
        return load_function(verifier)
    if not callable(verifier):
        raise ConfigError(f"verifier: expected module:function or a callable, got {verifier!r}")
    return verifier


def sample_solutions(prompts: Sequence[str], continuer: Continuer, samples_per_prompt: int,
                     separator: str = STEP_SEPARATOR) -> list[dict]:
    """`samples_per_prompt` solutions per prompt as step rows {"prompt", "completions"} (prompt order; a solution
    with no step is dropped)."""
    rows = []
    for p, texts in zip(prompts, continuer(list(prompts), samples_per_prompt), strict=True):
        for t in texts:
            steps = split_steps(t, separator)
            if steps:
                rows.append({"prompt": p, "completions": steps})
    return rows


def math_shepherd_labels(rows: Sequence[dict], verifier: str | Verifier, continuer: Continuer, rollouts: int,
                         dedupe: bool = True, separator: str = STEP_SEPARATOR) -> list[dict]:
    """Hard and soft labels of every step of every row (see the module docstring). `rows`: step rows
    {"prompt": str, "completions": [steps], ...}; their other fields are kept, existing labels replaced. The
    prefixes and the texts the verifier reads join the steps with `separator`."""
    if rollouts < 1:
        raise ConfigError(f"rollouts must be >= 1, got {rollouts}")
    verify = resolve_verifier(verifier)
    # every prefix that needs rollouts: steps[:k+1] for k < last
    keys: list[tuple[str, tuple[str, ...]]] = []
    index: dict[tuple[str, tuple[str, ...]], int] = {}
    where: list[list[int]] = []
    for r in rows:
        steps = tuple(r["completions"])
        slots = []
        for k in range(len(steps) - 1):
            key = (r["prompt"], steps[:k + 1])
            if not dedupe or key not in index:
                index[key] = len(keys)
                keys.append(key)
            slots.append(index[key])
        where.append(slots)
    texts = continuer([p + join_steps(s, separator) for p, s in keys], rollouts) if keys else []
    if len(texts) != len(keys) or any(len(t) != rollouts for t in texts):
        raise ValueError(f"the continuer returned {[len(t) for t in texts][:8]}... continuations for {len(keys)} "
                         f"prefixes; expected {rollouts} each")
    fractions = [sum(bool(verify(p, join_steps(s, separator) + c)) for c in conts) / rollouts
                 for (p, s), conts in zip(keys, texts, strict=True)]
    out = []
    for r, slots in zip(rows, where, strict=True):
        soft = [fractions[j] for j in slots]
        if r["completions"]:
            soft.append(1.0 if verify(r["prompt"], join_steps(r["completions"], separator)) else 0.0)
        row = {**r, "completions": list(r["completions"]), "labels": [1 if f > 0 else -1 for f in soft],
               "soft_labels": soft}
        if soft:
            row["outcome"] = 1 if soft[-1] > 0 else -1
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ the command
@dataclass
class LabelStepsConfig:
    """`alignloop label-steps` settings; every field is a flag (`samples_per_prompt` -> `--samples-per-prompt`)."""

    model: str = field(default="", metadata={"help": "The policy that rolls out (and, from prompts, writes the "
                                                     "solutions): hub id or local folder."})
    input: str = field(default="", metadata={
        "help": "Step rows {prompt, completions: [steps]} to label, or prompts ({prompt} rows; the policy writes "
                "samples_per_prompt solutions each). JSONL/JSON/Parquet/CSV."})
    verifier: str = field(default="", metadata={
        "help": "module:function (prompt, solution_text) -> bool: whether a solution's final answer is right."})
    output: str = field(default="steps.jsonl", metadata={
        "help": "Where the labeled step rows go (prompt, completions, labels ±1, soft_labels)."})
    rollouts: int = field(default=8, metadata={"help": "M: rollouts from each step prefix."})
    samples_per_prompt: int = field(default=4, metadata={"help": "Solutions sampled per prompt (prompt input)."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts / rows."})
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum tokens of a solution or a rollout."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_k: int = field(default=0, metadata={"help": "Top-k truncation (0 = none)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus mass (1.0 = none)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last N tokens of each prefix."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per generation call."})
    dedupe: bool = field(default=True, metadata={"help": "Roll out identical prefixes once (they share labels)."})
    separator: str = field(default=STEP_SEPARATOR, metadata={
        "help": "The step separator: solutions are split on it and prefixes joined with it (each step followed by "
                "it), as `alignloop prm --separator`."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    dtype: str | None = field(default=None, metadata={"help": "Load dtype: float32 (default), bfloat16, auto."})

    def __post_init__(self):
        for name in ("rollouts", "samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


def is_step_file(path: str) -> bool:
    """Whether a data file holds step rows (a `completions` column, a list or, in CSV, its JSON text) rather than
    prompts."""
    rows = read_rows(path)
    return bool(rows) and dict(rows[0]).get("completions") is not None


def run_label_steps(config: LabelStepsConfig, continuer: Continuer | None = None) -> dict:
    """The `alignloop label-steps` entry point (`continuer`: a stub instead of the model, for tests)."""
    for name in ("input", "verifier") + (() if continuer is not None else ("model",)):
        if not getattr(config, name):
            raise ConfigError(f"{name}: required (--{name})")
    check_writable(config.output)
    verify = resolve_verifier(config.verifier)
    tok = None
    if continuer is None:
        torch.manual_seed(config.seed)
        tok = load_tokenizer(config.model, padding_side="left")
        model = load_causal_lm(config.model, dtype=config.dtype).eval()
        params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                top_k=config.top_k, top_p=config.top_p)
        continuer = policy_continuer(model, tok, params, batch_size=config.batch_size,
                                     max_prompt_length=config.max_prompt_length)
    if is_step_file(config.input):
        rows = [dict(r) for r in read_steps(config.input, require_labels=False,
                                            separator=config.separator)][:config.max_prompts]
        for i, r in enumerate(rows):
            if not isinstance(r["prompt"], str):
                raise UserError(f"{config.input}: row {i}: the prompt is a list of messages; label-steps needs "
                                f"prompt text")
        sampled = 0
    else:
        prompts = prompt_texts(config.input, tokenizer=tok, max_prompts=config.max_prompts)
        rows = sample_solutions(prompts, continuer, config.samples_per_prompt, config.separator)
        sampled = len(rows)
    labeled = math_shepherd_labels(rows, verify, continuer, config.rollouts, dedupe=config.dedupe,
                                   separator=config.separator)
    write_rows(labeled, config.output)
    steps = [x for r in labeled for x in r["labels"]]
    summary = {"output": str(config.output), "solutions": len(labeled), "sampled": sampled, "steps": len(steps),
               "good_steps": sum(x > 0 for x in steps) / max(len(steps), 1),
               "solved": sum(bool(r["labels"]) and r["labels"][-1] > 0 for r in labeled) / max(len(labeled), 1)}
    print(json.dumps(summary))
    return summary
