"""What the online RL trainers share: PPO (`trainers/ppo.py`), the critic-free trainer (`trainers/grpo.py`:
REINFORCE, RLOO, GRPO, Dr. GRPO) and online DPO (`trainers/online_dpo.py`). Functions and one config dataclass, no
base trainer: each trainer still reads top to bottom and calls these.

    args: OnlineRLArgs                     # the fields every online trainer has (rollouts, reward, KL, stop rules,
                                           # guard, LoRA, logging, checkpoints); each trainer's config extends it
    policy, tok = load_policy(model, tokenizer, args, "GRPO")
    scorer, gold = build_scorers(reward, gold_reward, reward_tokenizer, args, tok, device, "GRPO")
    ref = frozen_reference(policy, ref_model)           # None for LoRA: `reference_mode` swaps the start back in
    coll = Collective(accelerator)                       # sums / gathers across processes (no-ops on one)
    scored = score_rollout(scorer, gold, tok, prompts, rollout)       # texts, reward parts, raw and gold scores
    ref_logprobs = reference_logprobs(acc, policy, ref, ids, mask, p, r, temperature)
    metrics = {**reward_metrics(coll, scores, scored), **perf_metrics(coll, rollout, times, episodes)}
    return train_online(loop, args, acc, state, history)  # resume or reward fit; log, samples, callbacks, stop
                                                          # rules, guard, checkpoints; final/ -> TrainResult

Process supervision (`reward_granularity="process"`, PPO and the critic-free trainer): the reward scores each
reasoning step (`.step_scores(prompts, completions) -> list[list[float]]`: a process reward model, or a step
function `module:function` fn(prompts, step_lists) -> list[list[float]]):
    scorer, gold = build_scorers(..., steps=True)              # UserError for a reward that cannot score steps
    scored = score_rollout(scorer, gold, tok, prompts, rollout, steps=True)   # + each response's step scores
    steps = step_rewards(scored, scores, rollout, tok, args)   # [B,S] rewards, mask, step-end token of each
    metrics.update(step_metrics(coll, steps))                  # reward/steps_mean, reward/steps_per_response

Shapes: B = this process's responses, R = response length, P = prompt length.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import gather_object
from torch import nn

from alignloop.data import STEP_SEPARATOR, prompt_texts, split_steps
from alignloop.errors import ConfigError, UserError
from alignloop.losses import logprobs_from_logits
from alignloop.models import (
    CausalLMWithValueHead,
    apply_lora,
    has_adapter,
    keep_reference,
    load_causal_lm,
    load_tokenizer,
    model_forward,
    prm_info,
    reference_mode,
    unwrap_model,
)
from alignloop.models.fast import speed_up
from alignloop.rollout import Rollout, SamplingParams, decode_responses, encode_prompts, rollout_step_ends
from alignloop.scoring import (
    SCORERS,
    STEP_AGGREGATION_HELP,
    ProcessScorer,
    RewardTransform,
    UserTagScorer,
    aggregate_step_scores,
    build_scorer,
    check_step_aggregation,
    check_user_template,
    is_function_spec,
    total,
    weights_for,
)
from alignloop.training.checkpoint import is_sharded, load_checkpoint, resolve_resume, save_checkpoint
from alignloop.training.guard import RewardHackingGuard, SampleTable, reward_threshold_stop
from alignloop.training.logging import MetricsLogger, Progress
from alignloop.training.loop import shard, take_indices
from alignloop.training.optim import build_optimizer, build_scheduler
from alignloop.training.run import TrainResult, build_lora

USER_TAG_HELP = (
    "Personalized policy: a template such as '<user:{user}> ' (alignloop.data.USER_TAG). Each prompt row with a "
    "`user` field is tagged with it before sampling, so one policy learns to condition on the user; the reward "
    "scores the untagged prompt and weighs a multi-head reward model's heads by that user's weights "
    "(user_profiles.json beside the reward model; a user named like a head, or of a group with a head, gets that "
    "head; anyone else the population weights). None: prompts as they are.")


@dataclass
class OnlineRLArgs:
    """Fields every online RL trainer shares (PPO, the critic-free trainer, online DPO). Every field is also a flag
    (`kl_coef` -> `--kl-coef`) and a YAML key. Their unit of progress is the update: sample, score, train."""
    # --- models and data (used by the CLI; from Python, objects can be passed to the trainer instead) ---
    model: str | None = field(default=None, metadata={"help": "Policy: hub id or local folder."})
    ref_model: str | None = field(default=None, metadata={
        "help": "The reference the KL is measured to (hub id or local folder; e.g. the SFT model when the policy "
                "starts elsewhere). Default: the starting policy."})
    reward_model: str | list[str] | None = field(default=None, metadata={
        "help": "The reward: a reward model or classifier (folder or hub id), a Python function module:function "
                "(e.g. a verifiable exact-match reward), or several SPEC=WEIGHT (a weighted sum; each part is logged "
                "as reward/<name>)."})
    gold_model: str | list[str] | None = field(default=None, metadata={
        "help": "Optional held-out/gold reward (same forms as reward_model), never trained on; logged as "
                "reward/gold_mean and watched by the reward-hacking guard."})
    train_file: str | None = field(default=None, metadata={
        "help": "Prompts ({prompt} rows; JSONL/JSON/Parquet/CSV, a datasets folder or a hub id) for the CLI."})
    output_dir: str = field(default="rl-output", metadata={"help": "Metrics, samples, checkpoints, final model."})
    seed: int = field(default=0, metadata={"help": "Seed (data order, sampling; each process adds an offset)."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype when loading by name (default float32)."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={
        "help": "Accelerate autocast: no, bf16, fp16 (GPU)."})
    # --- rollouts ---
    rollout_batch_size: int = field(default=16, metadata={"help": "Prompts per update, over all processes."})
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts are truncated from the left to this."})
    max_new_tokens: int = field(default=48, metadata={"help": "Maximum response length in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also used in training "
                                                               "log-probs)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off; keep 0 for on-policy training)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0 = off; keep 1.0 for on-policy "
                                                        "training)."})
    stop_token_ids: list[int] = field(default_factory=list, metadata={"help": "Token ids ending a response "
                                                                                "(EOS always does)."})
    stop_strings: list[str] = field(default_factory=list, metadata={"help": "Strings ending a response."})
    # --- optimisation ---
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Adam learning rate."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "Adam epsilon (1e-5 as in the original code)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler: str = field(default="linear", metadata={"help": "Schedule over updates: linear, cosine, constant."})
    warmup_updates: int = field(default=0, metadata={"help": "Warmup updates of the learning rate."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient-norm clipping (None = off)."})
    # --- KL to the reference ---
    kl_coef: float = field(default=0.05, metadata={"help": "β: KL coefficient to the reference."})
    kl_estimator: Literal["k1", "k2", "k3"] = field(default="k1", metadata={
        "help": "Per-token KL estimator where KL enters the reward, and in the metrics: k1 (unbiased), k2, "
                "k3 (unbiased, >= 0)."})
    # --- reward ---
    reward_normalization: Literal["none", "running", "fit"] = field(default="none", metadata={
        "help": "none; running mean/std; fit: gain and bias fitted on samples from the starting policy."})
    normalization_samples: int = field(default=256, metadata={"help": "Samples used by reward_normalization=fit."})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip scores to ±this after normalisation."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Penalty for responses that end without a stop token (see missing_eos_penalty_mode)."})
    missing_eos_penalty_mode: Literal["replace", "subtract"] = field(default="replace", metadata={
        "help": "replace: the score becomes missing_eos_penalty (OpenAI); subtract: score - missing_eos_penalty."})
    positive_label: str | int = field(default="1", metadata={
        "help": "Positive class (index or label name) of a classifier with several labels used as the reward."})
    score_batch_size: int = field(default=64, metadata={"help": "Sequences per reward-model forward."})
    step_aggregation: str | None = field(default=None, metadata={"help": STEP_AGGREGATION_HELP})
    user_tag: str | None = field(default=None, metadata={"help": USER_TAG_HELP})
    # --- when to stop ---
    total_updates: int = field(default=100, metadata={"help": "Step budget: number of updates."})
    reward_threshold: float | None = field(default=None, metadata={
        "help": "Stop when the moving average of the raw mean score reaches this."})
    reward_threshold_window: int = field(default=10, metadata={"help": "Updates in that moving average."})
    # --- reward-hacking guard ---
    kl_budget: float | None = field(default=None, metadata={"help": "Alarm when objective/kl passes this."})
    guard_window: int = field(default=5, metadata={"help": "Updates over which proxy and gold trends are compared."})
    guard_min_t: float | None = field(default=None, metadata={
        "help": "t-statistic both trends must pass (None = one-sided 95% critical value for guard_window - 2 "
                "degrees of freedom; 0 = any opposite slopes)."})
    guard_action: Literal["warn", "stop"] = field(default="warn", metadata={"help": "On alarm: warn, or stop."})
    sample_every: int = field(default=10, metadata={"help": "Log a table of samples every N updates (0 = never)."})
    sample_rows: int = field(default=8, metadata={"help": "Rows in that table."})
    # --- LoRA ---
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning). With LoRA the reference is "
                                                     "the adapter's starting values (no second model)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (no effect: online RL runs with dropout "
                                                                "off; kept for one vocabulary)."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "LoRA target modules: 'all-linear' or comma-separated module names."})
    # --- logging and checkpoints ---
    tensorboard: bool = field(default=True, metadata={"help": "Write TensorBoard logs too."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar with ETA."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N updates (0 = only at the end)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (None = all)."})
    resume_from: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    save_final: bool = field(default=True, metadata={"help": "Save OUTPUT_DIR/final in HF format (LoRA: merged, and "
                                                             "the adapter into OUTPUT_DIR/adapter)."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "torch threads for training on CPU (None = leave torch's setting, normally every core)."})
    generation_threads: int | None = field(default=0, metadata={
        "help": "torch threads while sampling on CPU: 0 = auto (1 for models narrower than 256, whose decode ops are "
                "too small to gain from more; every thread otherwise); N = N; None = leave as is."})
    fast_gelu: bool = field(default=True, metadata={
        "help": "Speed-ups that keep the function (alignloop.models.fast): GPT-2's gelu_new as one fused kernel; "
                "attention in fp32 under CPU bf16 autocast."})

    def __post_init__(self):
        if self.rollout_batch_size < 1 or self.gradient_accumulation_steps < 1 or self.total_updates < 1:
            raise ConfigError("rollout_batch_size, gradient_accumulation_steps and total_updates must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = no LoRA), got {self.lora_r}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        check_step_aggregation(self.step_aggregation)
        if self.user_tag is not None:
            check_user_template(self.user_tag)

    def sampling_params(self, tokenizer) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, eos_token_id=tokenizer.eos_token_id if tokenizer else None,
                              stop_token_ids=list(self.stop_token_ids), stop_strings=list(self.stop_strings),
                              pad_token_id=tokenizer.pad_token_id if tokenizer else None)

    def reward_transform(self) -> RewardTransform:
        return RewardTransform(self.reward_normalization, self.reward_clip, self.missing_eos_penalty,
                               self.missing_eos_penalty_mode)

    def guard(self) -> RewardHackingGuard:
        return RewardHackingGuard(self.kl_budget, self.guard_window, self.guard_action, self.guard_min_t)


def new_state() -> dict[str, Any]:
    """An online trainer's resumable progress: updates done, the prompt stream's position, the raw mean scores the
    reward threshold averages, and why it stopped."""
    return {"update": 0, "data_epoch": 0, "data_pos": 0, "raw_reward_history": [], "stop_reason": None}


# ------------------------------------------------------------------------------------------------ processes
class Collective:
    """Sums and gathers over the processes of an accelerator; plain identities with one process."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.world = accelerator.num_processes

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, reduction="sum") if self.world > 1 else x

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The `reduce` of `alignloop.losses`' masked reductions: a sum over processes (None with one)."""
        return self.sum if self.world > 1 else None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(x) if self.world > 1 else x

    def gather_object(self, items: list) -> list:
        """A list from every process, concatenated in process order (as `gather` concatenates tensors)."""
        return gather_object(items) if self.world > 1 else items


# ------------------------------------------------------------------------------------------------ set-up
def load_policy(model, tokenizer, args: OnlineRLArgs, trainer: str, value_head: bool = False) -> tuple[nn.Module, Any]:
    """The policy (LoRA applied when lora_r > 0; with a value head on its trunk when `value_head`) and its tokenizer
    (left padding when loaded here)."""
    lora = build_lora(args)
    if model is None or model == "":
        raise ConfigError(f"{trainer} needs a policy: model=... (or --model)")
    if isinstance(model, (str, os.PathLike)):
        tokenizer = tokenizer or load_tokenizer(str(model), padding_side="left")
        loader = CausalLMWithValueHead.from_pretrained if value_head else load_causal_lm
        model = loader(str(model), dtype=args.dtype, lora=lora)
    elif lora is not None and not has_adapter(model):
        if isinstance(model, CausalLMWithValueHead):
            model.lm = apply_lora(model.lm, lora)
        else:
            model = apply_lora(model, lora)
    if tokenizer is None:
        raise UserError(f"{trainer} needs the policy's tokenizer (tokenizer=...)")
    return model, tokenizer


def build_scorers(reward, gold_reward, reward_tokenizer, args: OnlineRLArgs, policy_tokenizer, device, trainer: str,
                  steps: bool = False):
    """(the reward's scorer, the gold scorer or None) from objects or `args.reward_model` / `args.gold_model`.
    `steps` (process supervision): the reward must score steps (`step_scorer`); the gold scorer stays a sequence
    scorer."""
    reward = reward if reward is not None else args.reward_model
    if reward is None or reward == []:
        raise ConfigError(f"{trainer} needs a reward: reward=... (or --reward-model: a reward model, "
                          f"module:function or several SPEC=WEIGHT)")
    common = {"policy_tokenizer": policy_tokenizer, "positive_label": args.positive_label,
              "batch_size": args.score_batch_size, "dtype": args.dtype, "device": device,
              "step_aggregation": args.step_aggregation}
    tagged = {"user_tag": args.user_tag}   # tagged prompts: the reward and gold see them untagged, weighted per user
    gold = gold_reward if gold_reward is not None else args.gold_model
    scorer = step_scorer(reward, reward_tokenizer, trainer, **common) if steps else build_scorer(
        reward, reward_tokenizer, **common, **tagged)
    return scorer, build_scorer(gold, **common, **tagged)


def frozen_reference(lm: nn.Module, ref_model: nn.Module | str | None, device, dtype=None) -> nn.Module | None:
    """The reference: `ref_model` when given (a model, or a folder / hub id loaded here); else the starting policy:
    with LoRA its adapter's starting values (`keep_reference`, swapped in by `reference_mode`; None returned), else
    a frozen copy of it."""
    if isinstance(ref_model, (str, os.PathLike)) and str(ref_model):
        ref_model = load_causal_lm(str(ref_model), dtype=dtype)
    elif ref_model == "":
        ref_model = None
    if ref_model is None and has_adapter(lm):
        keep_reference(lm)  # the start may be a trained adapter: its base is not the starting policy
        return None
    ref = ref_model if ref_model is not None else copy.deepcopy(unwrap_model(lm))
    return ref.to(device).eval().requires_grad_(False)


def speed_up_models(args: OnlineRLArgs, *models) -> None:
    """`alignloop.models.fast.speed_up` (same function, faster) on each model that is there, when `fast_gelu`; a
    scorer stands for its model (a function scorer has none)."""
    if args.fast_gelu:
        for m in models:
            speed_up(m if m is None or isinstance(m, nn.Module) else getattr(m, "model", None))


def encoded_prompts(source, args: OnlineRLArgs, tokenizer, trainer: str) -> tuple[list[str], list[list[int]]]:
    """The training prompts (`train_dataset`, else `args.train_file`; any source of `alignloop.data.prompt_texts`;
    with `user_tag`, rows with a `user` field tagged with it) and their token ids, truncated from the left to
    `max_prompt_length` (which keeps the prompt's end, and a user tag at its start)."""
    source = source if source is not None else args.train_file
    if source is None:
        raise ConfigError(f"{trainer} needs prompts: train_dataset=... (or --train-file)")
    prompts = prompt_texts(source, tokenizer=tokenizer, user_tag=args.user_tag)
    return prompts, encode_prompts(tokenizer, prompts, args.max_prompt_length, args.user_tag)


def prepared_optimization(model: nn.Module, args: OnlineRLArgs, acc):
    """AdamW and its schedule over updates, prepared by accelerate -> (the prepared model, optimizer, scheduler)."""
    if is_sharded(acc):  # their rollouts, reference and value passes are not written for sharded parameters yet
        raise ConfigError("PPO, GRPO/RLOO/REINFORCE and online DPO do not run under FSDP yet: launch them with DDP "
                          "(accelerate launch --multi_gpu, or torchrun)")
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, eps=args.adam_epsilon)
    scheduler = build_scheduler(optimizer, args.lr_scheduler, args.warmup_updates, args.total_updates)
    ddp_model, optimizer = acc.prepare(model, optimizer)
    return ddp_model, optimizer, scheduler


# ------------------------------------------------------------------------------------------------ per update
class ExperienceAccess:
    """What an update's experience dataclass (PPO's, GRPO's, online DPO's) gives its callbacks besides its fields:
    `response_mask` (the rollout's) and dict-style reading, `experience["scores"]`, `experience.keys()`."""

    @property
    def response_mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]


def minibatch_layout(order: torch.Tensor, num_mini_batches: int, gradient_accumulation_steps: int):
    """Row indices `order` [B] -> minibatches (optimizer steps), each a list of micro-batch row-index tensors (sizes
    differ by at most one). The pass before training uses the same layout, so its forward of the first
    micro-batch is exactly the first training forward (ratio 1)."""
    return [list(mb.tensor_split(gradient_accumulation_steps)) for mb in order.tensor_split(num_mini_batches)]


@dataclass
class ScoredRollout:
    """A rollout's texts and scores on this process."""
    prompts: list[str]                    # [B]
    responses: list[str]                  # [B] (no special tokens)
    parts: dict[str, torch.Tensor]        # {name: [B]} each reward of a weighted sum, before weighting
    raw: torch.Tensor                     # [B] Σ weight · part (float32)
    gold: torch.Tensor | None             # [B] the held-out scorer's, or None
    step_scores: list[list[float]] | None = None   # [B][steps] the reward's score of each step (process supervision)
    step_separator: str = STEP_SEPARATOR           # what the reward split the responses' steps on
    users: list[str | None] | None = None          # [B] each prompt's user (a per-user reward), None untagged


def score_rollout(scorer, gold_scorer, tokenizer, prompts: list[str], rollout: Rollout,
                  steps: bool = False) -> ScoredRollout:
    """Decode the responses and score them with the reward (each part) and the gold scorer. `steps`: the reward's
    step scores too (`checked_step_scores`), and `raw` the reward's score of the whole response: a `ProcessScorer`'s
    aggregate of the same step scores (one pass of the process reward model: what its `.parts` gives, steps past
    its context 0), another step scorer's own `rollout_parts` when it has them, else the weakest step's score
    (`aggregate_step_scores`' "min"; 0 without a step)."""
    responses = decode_responses(tokenizer, rollout)
    device = rollout.response_ids.device
    if steps and isinstance(scorer, ProcessScorer):
        rows = scorer.score_steps(prompts, [split_steps(c, scorer.separator) for c in responses])
        step_scores = check_step_scores(scorer.name, [[v for v in row if v is not None] for row in rows], responses,
                                        scorer.separator)
        seen = [[0.0 if v is None else v for v in row] for row in rows]
        parts = {scorer.name: torch.tensor(aggregate_step_scores(seen, scorer.aggregate), dtype=torch.float32,
                                           device=device)}
        weights = scorer.weights
    elif steps and not hasattr(scorer, "rollout_parts"):
        step_scores = checked_step_scores(scorer, prompts, responses)
        name = getattr(scorer, "name", "step_reward")
        parts = {name: torch.tensor(aggregate_step_scores(step_scores, "min"), dtype=torch.float32, device=device)}
        weights = {name: 1.0}
    else:
        step_scores = checked_step_scores(scorer, prompts, responses) if steps else None
        parts = scorer.rollout_parts(rollout, prompts, responses)
        weights = weights_for(scorer, prompts)   # a per-user scorer's: one weight per row
    raw = total(parts, weights).float()
    gold = gold_scorer.score_rollout(rollout, prompts, responses).float() if gold_scorer else None
    users = scorer.split(prompts)[0] if isinstance(scorer, UserTagScorer) else None
    return ScoredRollout(prompts, responses, parts, raw, gold, step_scores,
                         getattr(scorer, "separator", STEP_SEPARATOR), users)


def response_logprobs_from(logits: torch.Tensor, input_ids: torch.Tensor, p: int, r: int,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward's logits [b, P+R, V] of prompt + response -> (the logits predicting each response token [b, R, V],
    their log-probs [b, R] at the sampling temperature)."""
    logits = logits[:, p - 1:p + r - 1]
    return logits, logprobs_from_logits(logits, input_ids[:, p:p + r], temperature)


def reference_logprobs(acc, policy_lm: nn.Module, ref_model: nn.Module | None, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, p: int, r: int, temperature: float) -> torch.Tensor:
    """The reference's log-probs [b, R] of the response tokens: `ref_model`, or the LoRA policy in `reference_mode`.
    Run under the policy's autocast (accelerate puts it on the prepared model's forward only): a reference run in
    another precision makes KL != 0 before the policy has moved."""
    with torch.no_grad(), acc.autocast():
        if ref_model is None:
            with reference_mode(policy_lm):
                logits = model_forward(policy_lm, input_ids, attention_mask)
        else:
            logits = model_forward(ref_model, input_ids, attention_mask)
    return response_logprobs_from(logits, input_ids, p, r, temperature)[1]


MAX_USER_METRICS = 32


def user_metrics(coll: Collective, raw: torch.Tensor, users: list[str | None]) -> dict[str, float]:
    """reward/user/<name>: each user's mean raw reward in this update (over every process; untagged prompts left
    out); nothing when the update holds more than MAX_USER_METRICS users (per-labeler personalization: one metric
    per person would drown the others)."""
    names, values = coll.gather_object(list(users)), coll.gather(raw.float()).tolist()
    by_user: dict[str, list[float]] = {}
    for name, v in zip(names, values, strict=True):
        if name is not None:
            by_user.setdefault(name, []).append(v)
    if len(by_user) > MAX_USER_METRICS:
        return {}
    return {f"reward/user/{name}": sum(v) / len(v) for name, v in sorted(by_user.items())}


def reward_metrics(coll: Collective, scores: torch.Tensor, scored: ScoredRollout) -> dict[str, float]:
    """reward/mean and reward/std (of what is optimised), reward/raw_mean, reward/gold_mean, reward/<name> per part
    (a multi-head reward model's heads), reward/user/<name> per user of user-tagged prompts (`user_metrics`)."""
    all_scores = coll.gather(scores)
    metrics = {"reward/mean": all_scores.mean().item(), "reward/std": all_scores.std(unbiased=False).item(),
               "reward/raw_mean": coll.gather(scored.raw).mean().item()}
    if scored.gold is not None:
        metrics["reward/gold_mean"] = coll.gather(scored.gold).mean().item()
    if len(scored.parts) > 1:
        for name, part in scored.parts.items():
            key = f"reward/{name}" if f"reward/{name}" not in metrics else f"reward/{name}_part"
            metrics[key] = coll.gather(part.float()).mean().item()
    if scored.users is not None:
        metrics.update(user_metrics(coll, scored.raw, scored.users))
    return metrics


def perf_metrics(coll: Collective, rollout: Rollout, times: dict[str, float], episodes: int) -> dict[str, float]:
    """Response length and EOS share, the time split (time/generate, time/score, time/train, time/update) and
    throughput; `episodes` = responses per update over all processes."""
    resp_len = coll.gather(rollout.response_mask.sum(1).float())
    n_gen = resp_len.sum().item()
    n_prompt = coll.gather(rollout.prompt_mask.sum(1).float()).sum().item()
    return {
        "response/length_mean": resp_len.mean().item(),
        "response/eos_share": coll.gather(rollout.stopped.float()).mean().item(),
        **{f"time/{k}": v for k, v in times.items()},
        "perf/generated_tokens_per_sec": n_gen / max(times["generate"], 1e-9),
        "perf/tokens_per_sec": (n_gen + n_prompt) / max(times["update"], 1e-9),
        "perf/episodes_per_sec": episodes / max(times["update"], 1e-9),
    }


def fit_reward_normalization(transform: RewardTransform, sample_raw: Callable[[], torch.Tensor], n: int) -> None:
    """Ziegler et al.: gain and bias so that samples from the starting policy score mean 0, std 1. `sample_raw()`
    samples one batch and returns its raw scores over all processes."""
    raws, seen = [], 0
    while seen < n:
        raw = sample_raw()
        raws.append(raw)
        seen += len(raw)
    transform.fit(torch.cat(raws)[:n])


# ------------------------------------------------------------------------------------------------ process supervision
REWARD_GRANULARITIES = ("outcome", "process")
REWARD_GRANULARITY_HELP = (
    "outcome: one reward per response, on its last token; process (process supervision, Lightman et al. 2023): one "
    "reward per reasoning step, each on the token that ends the step (steps: the response split on newlines, "
    "alignloop.data.split_steps). Process needs a reward that scores steps: a process reward model (alignloop prm) "
    "or a step function module:function fn(prompts, step_lists) -> list[list[float]]; reward_normalization none. "
    "A PRM's scores are probabilities in 0..1: see step_reward.")


STEP_REWARDS = ("score", "delta")
STEP_REWARD_HELP = (
    "With reward_granularity process, what each step is paid. score: its score (a PRM's probability that the "
    "solution is right so far; PPO's return sums them, so more and shorter steps pay more). delta: the change of "
    "the running minimum of the scores, min(s_1..s_j) - min(s_1..s_j-1), from 1 before the first step "
    "(potential-based shaping, Ng et al. 1999): the return is the min aggregate minus 1 whatever the number of "
    "steps, and the credit sits on the step where the score drops; scores in 0..1; PPO only (the critic-free "
    "estimators normalise each step reward over the group, which would pay extra steps).")


def step_reward_values(step_scores: list[float], form: str = "score") -> list[float]:
    """A response's step rewards from its step scores (see STEP_REWARD_HELP). By hand, scores [0.9, 0.95, 0.3, 0.4]:
    score -> the same; delta -> running min [0.9, 0.9, 0.3, 0.3] minus [1, 0.9, 0.9, 0.3] = [-0.1, 0, -0.6, 0],
    summing to 0.3 - 1."""
    if form == "score":
        return list(step_scores)
    if form != "delta":
        raise ConfigError(f"step_reward: expected one of {', '.join(STEP_REWARDS)}, got {form!r}")
    bad = [s for s in step_scores if not 0.0 <= s <= 1.0]
    if bad:
        raise UserError(f"step_reward='delta' takes step scores in 0..1 (a probability that the solution is right so "
                        f"far), got {bad[0]!r}: use step_reward='score' for other scales")
    out, low = [], 1.0
    for s in step_scores:
        new = min(low, s)
        out.append(new - low)
        low = new
    return out


def check_reward_granularity(args: OnlineRLArgs) -> None:
    """A config's `reward_granularity` is known, and process supervision has no sequence-score normalisation (its
    gain and bias would be fitted on whole-response scores; an added bias would pay per step)."""
    granularity = getattr(args, "reward_granularity", "outcome")
    if granularity not in REWARD_GRANULARITIES:
        raise ConfigError(f"reward_granularity: expected outcome or process, got {granularity!r}")
    if getattr(args, "step_reward", "score") not in STEP_REWARDS:
        raise ConfigError(f"step_reward: expected one of {', '.join(STEP_REWARDS)}, got {args.step_reward!r}")
    if granularity == "outcome" and getattr(args, "step_reward", "score") != "score":
        raise ConfigError("step_reward applies to reward_granularity='process' (an outcome reward has no steps)")
    if granularity == "process" and args.user_tag is not None:
        raise ConfigError("user_tag takes reward_granularity='outcome': a process reward scores the steps of the "
                          "tagged prompt's response with no per-user weights")
    if granularity == "process" and args.reward_normalization != "none":
        raise ConfigError(f"reward_granularity='process' takes reward_normalization='none' (got "
                          f"{args.reward_normalization!r}): step rewards are not normalised as sequence scores are "
                          f"(the critic-free estimators normalise them per group, PPO whitens its advantages)")


def step_scorer(reward, reward_tokenizer=None, trainer: str = "RL", **common):
    """The reward of process supervision: an object with `.step_scores` as it is (a `ProcessScorer`); a
    `module:function` spec or a plain function: a step function fn(prompts, step_lists) -> list[list[float]]
    (`ProcessScorer(fn)`); anything else (a folder: a process reward model) through `build_scorer`, which must give
    a scorer of steps. UserError otherwise (a reward model or classifier, an outcome function already wrapped as a
    scorer, a weighted sum: one score per response)."""
    if hasattr(reward, "step_scores"):
        return reward
    if (isinstance(reward, str) and is_function_spec(reward)) or (
            callable(reward) and not isinstance(reward, (nn.Module, *SCORERS))):
        return ProcessScorer(reward, aggregate=common.get("step_aggregation"))
    scorer = build_scorer(reward, reward_tokenizer, **common)
    if not hasattr(scorer, "step_scores"):
        what = type(scorer).__name__ + (f" of {reward!r}" if isinstance(reward, (str, list, tuple)) else "")
        raise UserError(f"{trainer}: reward_granularity='process' needs a reward that scores each step "
                        f"(.step_scores(prompts, completions)): a process reward model (a folder `alignloop prm` "
                        f"saved) or a step function module:function fn(prompts, step_lists) -> list[list[float]]; "
                        f"got a {what}, which gives one score per response (use reward_granularity='outcome')")
    if getattr(scorer, "model", None) is not None and (prm_info(scorer.model) or {}).get("view") == "outcome":
        warnings.warn(f"{trainer}: the process reward is an outcome reward model (`alignloop prm --outcome`): it was "
                      f"trained on final steps only, so its scores of the other steps are untrained", stacklevel=2)
    return scorer


def checked_step_scores(scorer, prompts: list[str], responses: list[str]) -> list[list[float]]:
    """`scorer.step_scores(prompts, responses)`, checked (`check_step_scores`)."""
    return check_step_scores(getattr(scorer, "name", type(scorer).__name__), scorer.step_scores(prompts, responses),
                             responses, getattr(scorer, "separator", STEP_SEPARATOR))


def check_step_scores(name: str, got, responses: list[str], separator: str = STEP_SEPARATOR) -> list[list[float]]:
    """A step scorer's output checked: one list of finite numbers per response, no more than the response has steps
    (`split_steps`; fewer: the scorer truncated the response, its later steps get no reward)."""
    if not isinstance(got, (list, tuple)) or len(got) != len(responses):
        raise UserError(f"step reward {name}: expected one list of step scores per response ({len(responses)}), "
                        f"got {type(got).__name__}" + (f" of {len(got)}" if isinstance(got, (list, tuple)) else ""))
    out = []
    for i, (row, response) in enumerate(zip(got, responses, strict=True)):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise UserError(f"step reward {name}: response {i}: expected a list of step scores, got "
                            f"{type(row).__name__} (an outcome reward gives one number per response: use "
                            f"reward_granularity='outcome', or a step function fn(prompts, step_lists) -> "
                            f"list[list[float]])")
        n = len(split_steps(response, separator))
        if len(row) > n:
            raise UserError(f"step reward {name}: response {i} has {n} steps but got {len(row)} step scores")
        values = [float(v) for v in row]
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"step reward {name}: response {i}: a step score is not a finite number: {values}")
        out.append(values)
    return out


@dataclass
class StepRewards:
    """A rollout's step rewards on this process, padded to S = the most steps of a row (the real steps first).
    Shapes: B responses, S steps."""
    rewards: torch.Tensor      # [B,S] float32: what is optimised per step (0 on padding)
    mask: torch.Tensor         # [B,S] bool: True = a real step
    ends: torch.Tensor         # [B,S] long: the response token where each step ends (0 on padding)
    counts: torch.Tensor       # [B] long: the reward's scored steps per response (0: none; its outcome stands in)
    scores: list[list[float]]  # [B][counts] the reward's step scores (before clipping and the no-EOS penalty)

    def totals(self) -> torch.Tensor:
        """[B] each response's summed step rewards: its return before the KL (PPO, γ = 1)."""
        return (self.rewards * self.mask).sum(1)


def step_rewards(scored: ScoredRollout, scores: torch.Tensor, rollout: Rollout, tokenizer,
                 args: OnlineRLArgs) -> StepRewards:
    """The step rewards of process supervision and the token each goes on.

    Each step of a response (`split_steps` of its text) ends at the token `step_end_positions` gives; the LAST
    scored step of a response that kept all its steps ends on the response's last real token instead (the stop
    token, or the tokens after the final separator, belong to the final step: they get its credit, and with one step
    per response process supervision is exactly outcome supervision). Steps past what the reward scored (a process
    reward model truncating a long response) are dropped. A response without any step (empty or whitespace-only
    text, e.g. one that stopped at once) gets one reward on its last token: its outcome score `scores` (the reward's
    score of the whole response, through the reward transform). Then, as the reward transform does for sequence
    scores: each step reward is clipped to ±reward_clip, and a response without a stop token gets the no-EOS
    penalty: "replace" makes its rewards one reward = the penalty on its last token, "subtract" takes the penalty off
    its last step's reward."""
    device = rollout.response_ids.device
    lengths = rollout.response_mask.sum(1).tolist()
    ends_per_row = rollout_step_ends(tokenizer, rollout, scored.step_separator)
    stopped = rollout.stopped.tolist()
    rows_r, rows_e, counts = [], [], []
    for i, (step_scores, ends) in enumerate(zip(scored.step_scores, ends_per_row, strict=True)):
        last = max(int(lengths[i]) - 1, 0)
        n = len(step_scores)
        counts.append(n)
        form = getattr(args, "step_reward", "score")
        if n == 0:   # delta: the outcome on the same scale as a response with steps (min - 1), never above one
            rows_r.append([float(scores[i]) if form == "score" else min(1.0, float(scores[i])) - 1.0])
            rows_e.append([last])
            continue
        rewards = step_reward_values(step_scores, form)
        ends = ends[:n]
        if n == len(ends_per_row[i]):
            ends[-1] = last
        if args.reward_clip is not None:
            rewards = [min(max(r, -args.reward_clip), args.reward_clip) for r in rewards]
        if args.missing_eos_penalty is not None and not stopped[i]:
            if args.missing_eos_penalty_mode == "replace":
                rewards, ends = [float(args.missing_eos_penalty)], [last]
            else:
                rewards[-1] -= args.missing_eos_penalty
        rows_r.append(rewards)
        rows_e.append(ends)
    S = max(len(r) for r in rows_r)
    rewards = torch.zeros(len(rows_r), S, dtype=torch.float32)
    ends = torch.zeros(len(rows_r), S, dtype=torch.long)
    mask = torch.zeros(len(rows_r), S, dtype=torch.bool)
    for i, (r, e) in enumerate(zip(rows_r, rows_e, strict=True)):
        rewards[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
        ends[i, :len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, :len(r)] = True
    return StepRewards(rewards.to(device), mask.to(device), ends.to(device),
                       torch.tensor(counts, dtype=torch.long, device=device), scored.step_scores)


def step_metrics(coll: Collective, steps: StepRewards) -> dict[str, float]:
    """reward/steps_mean (the reward's mean step score over every scored step of the batch), reward/steps_per_response
    (scored steps per response) and reward/no_steps_share (responses without a step), over every process."""
    device = steps.counts.device
    sums = torch.tensor([sum(sum(s) for s in steps.scores), float(steps.counts.sum()),
                         float((steps.counts == 0).sum()), float(len(steps.scores))], dtype=torch.float64,
                        device=device)
    total_score, n_steps, n_empty, n = coll.sum(sums).tolist()
    return {"reward/steps_mean": total_score / max(n_steps, 1.0), "reward/steps_per_response": n_steps / max(n, 1.0),
            "reward/no_steps_share": n_empty / max(n, 1.0)}


# ------------------------------------------------------------------------------------------------ the run
def check_batch_sizes(args: OnlineRLArgs, world: int, per_prompt: int, micro_per_update: int) -> None:
    """The prompts of an update split evenly over the processes, and each process has a sequence for every
    micro-batch (`per_prompt` sequences per prompt; `micro_per_update` micro-batches per update)."""
    if args.rollout_batch_size % world:
        raise ConfigError(f"rollout_batch_size ({args.rollout_batch_size}) must be divisible by the number of "
                          f"processes ({world})")
    per_process = args.rollout_batch_size // world * per_prompt
    if per_process < micro_per_update:
        raise ConfigError(f"each process has {per_process} sequences per update, fewer than its micro-batches per "
                          f"update ({micro_per_update}: minibatches × gradient_accumulation_steps)")


def local_prompts(state: dict, args: OnlineRLArgs, n_prompts: int, acc) -> list[int]:
    """The next global batch of prompt indices (the same on every process; a resumable walk over shuffled epochs of
    the data, its position kept in `state`), this process's contiguous share of it."""
    idx, state["data_epoch"], state["data_pos"] = take_indices(n_prompts, args.rollout_batch_size, args.seed,
                                                               state["data_epoch"], state["data_pos"])
    return shard(idx, acc.process_index, acc.num_processes)


@dataclass
class UpdateLoop:
    """What `train_online` needs from a trainer: `update()` returns that update's experience (with `.step`,
    `.metrics`, `.prompts`, `.responses`, `.scores`, `.raw_scores`, `.gold_scores`); `save_checkpoint()`,
    `load(path)` (a checkpoint folder), `sample_raw()` (one batch from the policy: its raw scores over every
    process, for reward fitting), `save_model()` (the final model; returns its folder)."""
    name: str
    update: Callable[[], Any]
    save_checkpoint: Callable[[], Any]
    load: Callable[[Path], None]
    sample_raw: Callable[[], torch.Tensor]
    save_model: Callable[[], Path]
    transform: RewardTransform
    guard: RewardHackingGuard
    samples: SampleTable
    callbacks: Sequence[Callable[[Any], Any]] = ()


def train_online(loop: UpdateLoop, args: OnlineRLArgs, acc, state: dict, history: list[dict]) -> TrainResult:
    """An online trainer's `train()`: resume (or fit the reward normalisation), run the updates, checkpoint, save
    `final/` -> TrainResult (steps = updates). Training runs with `cpu_threads` torch threads when set."""
    threads = torch.get_num_threads()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    t0 = time.perf_counter()
    try:
        resume = resolve_resume(args.resume_from, args.output_dir)
        if resume is not None:
            loop.load(resume)
        elif args.reward_normalization == "fit" and not loop.transform.fitted:
            fit_reward_normalization(loop.transform, loop.sample_raw, args.normalization_samples)
            state["data_epoch"], state["data_pos"] = 0, 0  # training sees the data from the start
        run_updates(loop, args, acc, state, history, resumed=resume is not None)
        if args.save_steps or args.save_final:
            loop.save_checkpoint()
        final = loop.save_model() if args.save_final else Path(args.output_dir)
    finally:
        torch.set_num_threads(threads)
    return TrainResult(output_dir=str(final), steps=state["update"], metrics=history[-1] if history else {},
                       seconds=time.perf_counter() - t0, stop_reason=state["stop_reason"], history=list(history))


def run_updates(loop: UpdateLoop, args: OnlineRLArgs, acc, state: dict, history: list[dict],
                resumed: bool) -> None:
    """Updates until `total_updates`, the reward threshold or the guard stops: log each update's metrics, a sample
    table every `sample_every` (this process's rows), the callbacks, the stop rules, a checkpoint every
    `save_steps`."""
    logger = MetricsLogger(args.output_dir, enabled=acc.is_main_process, tensorboard=args.tensorboard,
                           config=asdict(args), resume_step=state["update"] if resumed else None)
    progress = Progress(args.total_updates, loop.name, enabled=acc.is_main_process and args.progress,
                        start=state["update"])
    try:
        while state["update"] < args.total_updates and state["stop_reason"] is None:
            exp = loop.update()
            state["update"] = step = exp.step
            history.append(exp.metrics)
            logger.log(exp.metrics, step)
            if args.sample_every and (step % args.sample_every == 0 or step == 1) and acc.is_main_process:
                gold = exp.gold_scores.tolist() if exp.gold_scores is not None else None
                logger.log_text("samples", loop.samples.write(step, exp.prompts, exp.responses, exp.scores.tolist(),
                                                              exp.raw_scores.tolist(), gold), step)
            for fn in loop.callbacks:
                fn(exp)
            check_stop(state, loop.guard, args, exp.metrics, logger, step, acc.is_main_process)
            progress.update(1, f"reward {exp.metrics['reward/mean']:+.3f} kl {exp.metrics['objective/kl']:.3f}")
            if args.save_steps and step % args.save_steps == 0:
                loop.save_checkpoint()
    finally:
        progress.close()
        logger.close()


def check_stop(state: dict, guard: RewardHackingGuard, args: OnlineRLArgs, metrics: dict, logger, step: int,
               is_main: bool) -> None:
    """Reward threshold (moving average of the raw mean score), then the reward-hacking guard's alarms."""
    history = state["raw_reward_history"]
    history.append(metrics["reward/raw_mean"])
    reason = reward_threshold_stop(history, args.reward_threshold, args.reward_threshold_window)
    if reason is not None:
        state["stop_reason"] = reason
    for msg in guard.observe(step, metrics):
        logger.log_text("guard", msg, step)
    if guard.should_stop and state["stop_reason"] is None:
        state["stop_reason"] = "reward-hacking guard: " + guard.alerts[-1][1]
    if state["stop_reason"] and is_main:
        logger.log_text("stop", state["stop_reason"], step)


def save_online_checkpoint(args: OnlineRLArgs, acc, state: dict, model: nn.Module, optimizer, scheduler,
                           transform: RewardTransform, guard: RewardHackingGuard, **extra) -> Path:
    """Everything exact resume needs: the model, optimizer, RNG (`save_checkpoint`), and the trainer state: progress
    and prompt position, the schedule, the reward transform, the guard, `extra` (e.g. PPO's KL coefficient)."""
    trainer_state = {**state, "transform": transform.state_dict(), "guard": guard.state_dict(),
                     "scheduler": scheduler.state_dict(), "config": asdict(args), **extra}
    return save_checkpoint(args.output_dir, state["update"], accelerator=acc, modules={"model": model},
                           optimizer=optimizer, scheduler=None, trainer_state=trainer_state,
                           keep_last=args.save_total_limit)


def load_online_checkpoint(path: Path, acc, state: dict, model: nn.Module, optimizer, scheduler,
                           transform: RewardTransform, guard: RewardHackingGuard) -> dict:
    """Restore what `save_online_checkpoint` wrote into the trainer's objects; returns the saved trainer state (for
    the trainer's own extras). A resumed run has not stopped."""
    saved = load_checkpoint(path, accelerator=acc, modules={"model": model}, optimizer=optimizer)
    for k in ("update", "data_epoch", "data_pos", "raw_reward_history"):
        state[k] = saved[k]
    state["stop_reason"] = None
    transform.load_state_dict(saved["transform"])
    guard.load_state_dict(saved["guard"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved
