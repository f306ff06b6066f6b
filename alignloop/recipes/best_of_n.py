"""Best-of-N sampling (`alignloop generate`): draw N completions per prompt from a policy, score them with a reward,
keep the best.

    from alignloop.recipes.best_of_n import BestOfNConfig, best_of_n
    rows, summary = best_of_n(policy, tokenizer, prompts, n=8, reward=load_scorer("runs/rm/final"),
                              params=SamplingParams(max_new_tokens=64, temperature=1.0))
    alignloop generate --model POLICY --prompts-file prompts.jsonl --best-of 8 --reward-model RM --output-file out.jsonl

Sampling goes through `alignloop.rollout.sample_completions` (KV cache, `batch_size` prompts x N completions per
call), scoring through `alignloop.scoring` (`score_batch_size` sequences per reward-model forward): a reward model
scores prompt + completion + EOS exactly as the reward-model trainer tokenised its pairs, so the score is read at an
EOS token as in training (`add_eos`; an EOS already at the end is not doubled; `--no-add-eos` for a reward model
trained with `--no-add-eos`). Completions are decoded without special tokens, so one that stopped at EOS and one cut
at `max_new_tokens` both get exactly one EOS; the candidate's `stopped` flag tells them apart.

Output JSONL, one line per prompt: {"prompt", "candidates": [{"completion", "score", "stopped", "length"}, ... N],
"best_index", "best_completion", "best_score"}; a reward of several parts (a multi-head reward model's heads, a
weighted sum) adds each candidate's "parts" {name: score}, and the summary each part's mean over the candidates,
"reward/<name>" (the RL trainers' metric names). The summary reports the mean best and mean candidate score and the
analytic KL of the best-of-N distribution to the base policy, log N - (N-1)/N nats (Stiennon et al. 2020; an upper
bound, Beirami et al. 2024).

Personalized generation: `--user NAME` tags every prompt with `--user-tag` (default `alignloop.data.USER_TAG`,
"<user:NAME> ") so a user-conditioned policy (trained with `user_tag`) answers for that user, and the reward scores
the untagged prompt with that user's weights over a multi-head reward model's heads (`alignloop.scoring`,
`UserTagScorer`). `--user-tag` alone tags the prompt rows that have a `user` field. Rows keep "user" and the tagged
"prompt" the policy saw.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from alignloop.data import (
    USER_TAG,
    DataError,
    check_user,
    check_writable,
    prompt_texts,
    split_user_tag,
    tag_prompt,
    write_rows,
)
from alignloop.errors import ConfigError
from alignloop.evaluation import best_of_n_kl
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.rollout import Completion, SamplingParams, sample_completions
from alignloop.scoring import (
    STEP_AGGREGATION_HELP,
    build_scorer,
    check_step_aggregation,
    check_user_template,
    load_scorer,
    score_with_parts,
)


@dataclass
class BestOfNConfig:
    """`alignloop generate`: sample completions; with --best-of N > 1, N per prompt scored by --reward-model."""

    model: str = field(default="", metadata={"help": "Policy to sample from: hub id or local folder."})
    prompts_file: str = field(default="", metadata={"help": "Prompts ({prompt} rows, text or messages; "
                                                            "JSONL/JSON/Parquet/CSV or a datasets folder)."})
    output_file: str = field(default="generations.jsonl", metadata={"help": "Where to write one JSON line per "
                                                                            "prompt (every candidate and its score)."})
    best_of: int = field(default=1, metadata={"help": "N: completions per prompt; the reward picks the best."})
    reward_model: str | list[str] | None = field(default=None, metadata={
        "help": "The reward scoring the N candidates: a reward model or classifier (folder or hub id), a Python "
                "function module:function, or several SPEC=WEIGHT (a weighted sum)."})
    positive_label: str | int = field(default="1", metadata={"help": "Positive class (index or label name) of a "
                                                                "classifier with several labels used as the reward."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens generated per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_k: int = field(default=0, metadata={"help": "Top-k truncation (0 = none)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus mass (1.0 = none)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last N prompt tokens."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation call (x best_of sequences)."})
    score_batch_size: int = field(default=32, metadata={"help": "Sequences per reward-model forward."})
    step_aggregation: str | None = field(default=None, metadata={"help": STEP_AGGREGATION_HELP})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    dtype: str | None = field(default=None, metadata={"help": "Load dtype: float32 (default), bfloat16, auto."})
    add_eos: bool = field(default=True, metadata={
        "help": "Score prompt + completion + EOS, as the reward-model trainer appends EOS to every completion (its "
                "add_eos); an EOS already there is not doubled. Off for a reward model trained with --no-add-eos."})
    user: str | None = field(default=None, metadata={
        "help": "Generate for this user: every prompt tagged with user_tag (a policy trained with user_tag), scored "
                "with the user's weights over a multi-head reward model's heads."})
    user_tag: str | None = field(default=None, metadata={
        "help": "The user tag template (default with --user: '<user:{user}> '); alone, prompt rows with a `user` "
                "field are tagged."})

    def __post_init__(self):
        if self.best_of < 1:
            raise ConfigError(f"best_of must be >= 1, got {self.best_of}")
        if self.batch_size < 1 or self.score_batch_size < 1:
            raise ConfigError("batch_size and score_batch_size must be >= 1")
        check_step_aggregation(self.step_aggregation)
        if self.user is not None:
            try:
                check_user(self.user, self.tag_template)
            except DataError as e:
                raise ConfigError(f"user: {e}") from None
        if self.user_tag is not None:
            check_user_template(self.user_tag)

    @property
    def tag_template(self) -> str | None:
        """The user tag template in use: user_tag, else USER_TAG when a user is named, else None (no tags)."""
        return self.user_tag or (USER_TAG if self.user else None)


def best_of_n(policy, tokenizer, prompts: list[str], n: int, reward=None, params: SamplingParams | None = None,
              batch_size: int = 8, max_prompt_length: int | None = None,
              user_tag: str | None = None) -> tuple[list[dict], dict[str, float]]:
    """Sample n completions per prompt, score them with `reward` (a scorer of `alignloop.scoring`, a model or a
    function `f(prompts, completions) -> scores`), keep the best. Returns (rows, summary); see the module docstring
    for the row layout. With n == 1 and no reward, plain sampling (scores None). `user_tag`: the prompts carry user
    tags of this template; the reward scores them untagged with each user's weights (`UserTagScorer`)."""
    scorer = build_scorer(reward, policy_tokenizer=tokenizer, user_tag=user_tag)
    if n > 1 and scorer is None:
        raise ConfigError("best-of-N with N > 1 needs a reward (--reward-model) to pick the best")
    groups = sample_completions(policy, tokenizer, prompts, n, params, batch_size=batch_size * n,
                                max_prompt_length=max_prompt_length, user_tag=user_tag)
    flat_p = [p for p, g in zip(prompts, groups, strict=True) for _ in g]
    flat_c = [c.text for g in groups for c in g]
    scores, parts = [None] * len(flat_c), {}
    if scorer is not None:
        total, parts = score_with_parts(scorer, flat_p, flat_c)
        scores, parts = total.tolist(), ({k: v.tolist() for k, v in parts.items()} if len(parts) > 1 else {})
    candidates = scored_candidates(groups, scores, parts)
    rows = []
    for p, cs in zip(prompts, candidates, strict=True):
        best = max(range(len(cs)), key=lambda j: cs[j]["score"]) if scorer is not None else 0
        rows.append({"prompt": p, "candidates": cs, "best_index": best, "best_completion": cs[best]["completion"],
                     "best_score": cs[best]["score"]})
    summary = {"n": n, "prompts": len(rows), "kl_best_of_n": best_of_n_kl(n)}
    if scorer is not None:
        summary["mean_best_score"] = sum(r["best_score"] for r in rows) / max(len(rows), 1)
        summary["mean_score"] = sum(scores) / max(len(scores), 1)
        summary.update(part_means(candidates))
    return rows, summary


def scored_candidates(groups: list[list[Completion]], scores: list, parts: dict[str, list]) -> list[list[dict]]:
    """Each prompt's candidates as rows {"completion", "stopped", "length", "score"}, plus "parts" {name: score}
    for a reward of several parts; `scores` and each part's list are flat, in the groups' order."""
    out, start = [], 0
    for g in groups:
        out.append([{"completion": c.text, "stopped": c.stopped, "length": c.length, "score": scores[i],
                     **({"parts": {k: v[i] for k, v in parts.items()}} if parts else {})}
                    for i, c in enumerate(g, start)])
        start += len(g)
    return out


def part_means(candidates: list[list[dict]]) -> dict[str, float]:
    """reward/<name>: each part's mean over the candidates (those with "parts": a reward of several parts)."""
    parts = [c["parts"] for cs in candidates for c in cs if "parts" in c]
    return {f"reward/{k}": sum(p[k] for p in parts) / len(parts) for k in (parts[0] if parts else {})}


def user_prompts(config: BestOfNConfig, tokenizer) -> list[str]:
    """The prompts to sample for: with `user`, every prompt tagged for that user (a `user` field of the rows is
    overridden); with `user_tag` alone, the rows that have a `user` field tagged; else as they are."""
    template = config.tag_template
    prompts = prompt_texts(config.prompts_file, tokenizer=tokenizer, max_prompts=config.max_prompts,
                           user_tag=None if config.user else template)
    return [tag_prompt(p, config.user, template) for p in prompts] if config.user else prompts


def run_generate(config: BestOfNConfig) -> dict[str, float]:
    """The `alignloop generate` entry point."""
    if not config.model:
        raise ConfigError("model: give the policy to sample from (--model)")
    if not config.prompts_file:
        raise ConfigError("prompts_file: give the prompts (--prompts-file)")
    if config.best_of > 1 and not config.reward_model:
        raise ConfigError("--best-of N > 1 needs --reward-model (a folder, hub id or module:function) to score the "
                          "candidates")
    check_writable(config.output_file)   # before any work: the format follows the suffix
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model, padding_side="left")
    policy = load_causal_lm(config.model, dtype=config.dtype).eval()
    template = config.tag_template
    scorer = load_scorer(config.reward_model, dtype=config.dtype, positive_label=config.positive_label,
                         batch_size=config.score_batch_size, add_eos=config.add_eos,
                         step_aggregation=config.step_aggregation, user_tag=template) if config.reward_model else None
    prompts = user_prompts(config, tokenizer)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                            top_k=config.top_k, top_p=config.top_p)
    rows, summary = best_of_n(policy, tokenizer, prompts, config.best_of, scorer, params, config.batch_size,
                              config.max_prompt_length, user_tag=template)
    for row in rows if template else ():
        user = split_user_tag(row["prompt"], template)[0]
        if user is not None:
            row["user"] = user
    write_rows(rows, config.output_file)
    summary["output_file"] = str(config.output_file)
    print(json.dumps(summary))
    return summary
