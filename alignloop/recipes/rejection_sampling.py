"""Rejection-sampling fine-tuning (Llama 2's "rejection sampling", a.k.a. best-of-N distillation / RAFT).

A recipe, not a training loop of its own: it composes the shared verbs with the SFT trainer. For each of `rounds`
rounds: sample `samples_per_prompt` completions per prompt from the *latest* model (`alignloop.rollout.
sample_completions`), score them with the reward (`alignloop.scoring`: a reward model sees prompt + completion + EOS
as in its training), keep the best `keep_top_k` per prompt and/or every completion scoring at least
`score_threshold`, and fine-tune on the kept (prompt, completion) pairs with the SFT trainer
(`alignloop.trainers.sft.SFTTrainer`, loss on completion tokens only). The next round samples from the model that
SFT produced.

    RejectionSamplingTrainer(model="sft-model", args=RSConfig(output_dir="runs/rs", rounds=2),
                             train_dataset="prompts.jsonl", reward_model="rm").train()
    alignloop rs --model sft-model --reward-model rm --train-file prompts.jsonl --rounds 2 --output-dir runs/rs

Layout: OUTPUT_DIR/round-R/samples.jsonl (every candidate, its score and whether it was kept), OUTPUT_DIR/round-R/
(the SFT run: metrics.jsonl, final/), OUTPUT_DIR/metrics.jsonl (one line per round: rs/mean_score of the fresh
samples, rs/mean_best_score, rs/kept, rs/kl_best_of_n when exactly the best of each prompt is kept, reward/<name>
per part of a reward of several parts, e.g. a multi-head reward model's heads, and sft loss), OUTPUT_DIR/final ->
the last round's model.
With `eval_final`, the last model is sampled once more and `final/mean_score` reports the mean reward of fresh
samples (comparable with round 0's rs/mean_score, which is the starting model's).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from alignloop.data import prompt_texts, write_rows
from alignloop.errors import ConfigError
from alignloop.evaluation import best_of_n_kl
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.recipes.best_of_n import part_means, scored_candidates
from alignloop.rollout import SamplingParams, sample_completions
from alignloop.scoring import STEP_AGGREGATION_HELP, build_scorer, check_step_aggregation, score_with_parts
from alignloop.trainers.sft import SFTConfig, SFTTrainer
from alignloop.training import MetricsLogger, renamed_fields
from alignloop.training.run import TrainResult


@renamed_fields({"prompts_file": "train_file"})
@dataclass
class RSConfig:
    """`alignloop rs` settings; every field is a flag (`keep_top_k` -> `--keep-top-k`)."""

    model: str = field(default="", metadata={"help": "Starting policy: hub id or local folder."})
    reward_model: str | list[str] | None = field(default=None, metadata={
        "help": "The reward scoring the samples: a reward model or classifier (folder or hub id), a Python function "
                "module:function, or several SPEC=WEIGHT (a weighted sum)."})
    positive_label: str | int = field(default="1", metadata={"help": "Positive class (index or label name) of a "
                                                                "classifier with several labels used as the reward."})
    train_file: str = field(default="", metadata={"help": "Prompts ({prompt} rows; JSONL/JSON/Parquet/CSV, a datasets "
                                                          "folder or a hub id)."})
    output_dir: str = field(default="runs/rs", metadata={"help": "Where the rounds' samples and models go."})
    rounds: int = field(default=1, metadata={"help": "R: sample -> select -> SFT rounds, each from the latest model."})
    samples_per_prompt: int = field(default=4, metadata={"help": "N completions sampled per prompt each round."})
    keep_top_k: int = field(default=1, metadata={"help": "Keep the k best completions of each prompt (0 = no "
                                                         "per-prompt limit; then score_threshold decides)."})
    score_threshold: float | None = field(default=None, metadata={"help": "Keep only completions scoring at least "
                                                                          "this (combined with keep_top_k)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens per sampled completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Top-k truncation (0 = none)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0 = none)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Keep the last N prompt tokens."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation call (x samples_per_prompt)."})
    score_batch_size: int = field(default=32, metadata={"help": "Sequences per reward-model forward."})
    step_aggregation: str | None = field(default=None, metadata={"help": STEP_AGGREGATION_HELP})
    sft_learning_rate: float = field(default=1e-5, metadata={"help": "SFT learning rate each round."})
    sft_epochs: int = field(default=1, metadata={"help": "SFT epochs over the kept samples each round."})
    sft_batch_size: int = field(default=8, metadata={"help": "SFT examples per optimizer step."})
    sft_max_length: int = field(default=512, metadata={"help": "SFT maximum tokens per example."})
    eval_final: bool = field(default=True, metadata={"help": "Sample the final model once more and report the mean "
                                                             "reward of fresh samples (final/mean_score)."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling and SFT."})
    dtype: str | None = field(default=None, metadata={"help": "Load dtype: float32 (default), bfloat16, auto."})
    progress: bool = field(default=True, metadata={"help": "Show the SFT progress bars."})
    add_eos: bool = field(default=True, metadata={
        "help": "Score prompt + completion + EOS, as the reward-model trainer appends EOS to every completion (its "
                "add_eos); an EOS already there is not doubled. Off for a reward model trained with --no-add-eos. "
                "(A Python function gets the text as is.)"})

    def __post_init__(self):
        if self.rounds < 1 or self.samples_per_prompt < 1:
            raise ConfigError("rounds and samples_per_prompt must be >= 1")
        if self.keep_top_k < 0:
            raise ConfigError(f"keep_top_k must be >= 0, got {self.keep_top_k}")
        if self.keep_top_k == 0 and self.score_threshold is None:
            raise ConfigError("give keep_top_k >= 1 or a score_threshold (or both) to say which samples to keep")
        check_step_aggregation(self.step_aggregation)


def select(candidates: list[dict], keep_top_k: int, score_threshold: float | None) -> list[int]:
    """Indices of the kept candidates of one prompt: the `keep_top_k` best (0 = all), and of those only the ones
    scoring >= `score_threshold` (when set). Ties keep the earlier sample."""
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i]["score"], i))
    if keep_top_k:
        order = order[:keep_top_k]
    if score_threshold is not None:
        order = [i for i in order if candidates[i]["score"] >= score_threshold]
    return sorted(order)


class RejectionSamplingTrainer:
    """`RejectionSamplingTrainer(model, args, train_dataset=prompts, reward_model=None, reward_fn=None,
    tokenizer=None).train() -> TrainResult` (its `history`: one summary per round).

    model: a path / hub id or a causal LM (with `tokenizer`). train_dataset: prompts (a path, rows or strings;
    default `args.train_file`). The reward: `reward_fn(prompts, completions) -> scores`, or `reward_model`: a spec
    (folder, hub id, module:function, SPEC=WEIGHT list; default `args.reward_model`), a loaded `RewardModel` /
    sequence classifier (then with `reward_tokenizer`), or any scorer of `alignloop.scoring`."""

    def __init__(self, model: Any = None, args: RSConfig | None = None, train_dataset: Any = None,
                 reward_model: Any = None, reward_fn=None, tokenizer: Any = None, reward_tokenizer: Any = None):
        self.args = a = args if args is not None else RSConfig()
        model = model if model is not None else a.model
        if model is None or model == "":
            raise ConfigError("model: give the starting policy (--model)")
        if isinstance(model, (str, os.PathLike)):
            self.tokenizer = tokenizer or load_tokenizer(model)
            model = load_causal_lm(model, dtype=a.dtype)
        elif tokenizer is None:
            raise ConfigError("pass tokenizer=... together with a model object")
        else:
            self.tokenizer = tokenizer
        self.model = model
        reward = reward_fn if reward_fn is not None else reward_model if reward_model is not None else a.reward_model
        if reward is None:
            raise ConfigError("rejection sampling needs a reward: --reward-model PATH or module:function "
                              "(or reward_fn=...)")
        if isinstance(reward, nn.Module) and reward_tokenizer is None and not hasattr(reward, "tokenizer"):
            raise ConfigError("pass reward_tokenizer=... together with a reward model object")
        self.scorer = build_scorer(reward, reward_tokenizer, positive_label=a.positive_label,
                                   batch_size=a.score_batch_size, add_eos=a.add_eos, dtype=a.dtype,
                                   step_aggregation=a.step_aggregation)
        source = train_dataset if train_dataset is not None else a.train_file
        if not source:
            raise ConfigError("train_file: give the prompts to sample for (--train-file)")
        self.prompts = prompt_texts(source, tokenizer=self.tokenizer, max_prompts=a.max_prompts)

    def _sample_and_score(self, round_seed: int) -> list[list[dict]]:
        a = self.args
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                top_p=a.top_p)
        self.tokenizer.padding_side = "left"
        groups = sample_completions(self.model, self.tokenizer, self.prompts, a.samples_per_prompt, params,
                                    batch_size=a.batch_size * a.samples_per_prompt,
                                    max_prompt_length=a.max_prompt_length, seed=round_seed)
        flat_p = [p for p, g in zip(self.prompts, groups, strict=True) for _ in g]
        scores, parts = score_with_parts(self.scorer, flat_p, [c.text for g in groups for c in g])
        # a reward of several parts (a multi-head model's heads): each candidate keeps them, each round logs them
        named = {k: v.tolist() for k, v in parts.items()} if len(parts) > 1 else {}
        return scored_candidates(groups, scores.tolist(), named)

    def train(self) -> TrainResult:
        a = self.args
        out = Path(a.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(out, tensorboard=False)
        t_start = time.perf_counter()
        summaries: list[dict[str, Any]] = []
        n = a.samples_per_prompt
        for r in range(a.rounds):
            t0 = time.perf_counter()
            round_dir = out / f"round-{r}"
            candidates = self._sample_and_score(a.seed + 1000 * r)
            rows, sft_rows = [], []
            for p, cs in zip(self.prompts, candidates, strict=True):
                kept = select(cs, a.keep_top_k, a.score_threshold)
                for i, c in enumerate(cs):
                    c["kept"] = i in kept
                rows.append({"prompt": p, "candidates": cs})
                # a sample cut at max_new_tokens is fine-tuned without EOS: it must not teach stopping mid-answer
                sft_rows += [{"prompt": p, "completion": cs[i]["completion"], "add_eos": cs[i]["stopped"]}
                             for i in kept]
            write_rows(rows, round_dir / "samples.jsonl")
            scores = [c["score"] for cs in candidates for c in cs]
            summary: dict[str, Any] = {
                "round": r, "rs/mean_score": sum(scores) / len(scores),
                "rs/mean_best_score": sum(max(c["score"] for c in cs) for cs in candidates) / len(candidates),
                "rs/kept": len(sft_rows), "time/sample": time.perf_counter() - t0,
                **part_means(candidates)}
            if a.keep_top_k == 1 and a.score_threshold is None:
                # the analytic KL of the best-of-N policy: only what is fine-tuned on when exactly the best is kept
                summary["rs/kl_best_of_n"] = best_of_n_kl(n)
            if sft_rows:
                sft = SFTTrainer(model=self.model, tokenizer=self.tokenizer, train_dataset=sft_rows, args=SFTConfig(
                    output_dir=str(round_dir), learning_rate=a.sft_learning_rate, num_epochs=a.sft_epochs,
                    per_device_batch_size=a.sft_batch_size, max_length=a.sft_max_length, seed=a.seed + r,
                    progress=a.progress, tensorboard=False, save_total_limit=1))
                self.tokenizer.padding_side = "right"
                result = sft.train()
                summary["sft/steps"] = result.steps
                summary["model"] = result.output_dir
                # the next round samples from the model SFT just produced
                self.model = load_causal_lm(result.output_dir, dtype=a.dtype)
            else:
                summary["model"] = None  # nothing passed the threshold: the model is unchanged this round
            summary["time/round"] = time.perf_counter() - t0
            logger.log({k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=r + 1)
            summaries.append(summary)
        if a.eval_final:
            fresh = self._sample_and_score(a.seed + 1000 * a.rounds)
            scores = [c["score"] for cs in fresh for c in cs]
            final = {"final/mean_score": sum(scores) / len(scores)}
            logger.log(final, step=a.rounds + 1)
            summaries[-1].update(final)
        logger.close()
        self.model.save_pretrained(out / "final")
        self.tokenizer.save_pretrained(out / "final")
        (out / "summary.json").write_text(json.dumps(summaries, indent=1, default=str))
        return TrainResult(output_dir=str(out / "final"), steps=a.rounds,
                           metrics={k: v for k, v in summaries[-1].items() if isinstance(v, (int, float))},
                           seconds=time.perf_counter() - t_start, history=summaries)


def run_rs(config: RSConfig) -> TrainResult:
    """The `alignloop rs` entry point."""
    result = RejectionSamplingTrainer(args=config).train()
    for s in result.history:
        print(json.dumps(s, default=str))
    return result
