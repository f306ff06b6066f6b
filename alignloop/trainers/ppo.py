"""PPO with a KL penalty to a frozen reference (Ziegler et al. 2019; Ouyang et al. 2022), read top to bottom.

    trainer = PPOTrainer(model=policy_or_path, reward=reward_model_or_fn_or_spec, args=PPOConfig(...),
                         train_dataset=prompts, tokenizer=tok, callbacks=[fn, ...])
    result = trainer.train()          # alignloop.training.run.TrainResult; result.history: metrics per update

One update (`PPOTrainer._update`), each step one call:
 1. generate: sample responses for `rollout_batch_size` prompts with the `Sampler` (KV cache, eval mode);
 2. score: the reward (`alignloop.scoring`: reward model, classifier, function or a weighted sum of them) of each
    response -> normalise, clip, no-EOS penalty (`RewardTransform`);
 3. old log-probs, values and entropy (policy, epoch 0's micro-batches), reference log-probs (`ref_model` when
    given; else the starting policy: a frozen copy, or with LoRA the adapter's starting values, `keep_reference`);
 4. per-token rewards r_t = −β·KL_t plus the score on the last real response token (`losses.ppo_rewards`),
    GAE(γ, λ) -> advantages (whitened over the valid tokens of the global batch) and returns;
 5. `num_ppo_epochs` × `num_mini_batches` optimizer steps (each minibatch split into `gradient_accumulation_steps`
    micro-batches): loss = L_policy(clipped surrogate) + vf_coef·L_value(clipped) − ent_coef·H, i.e. the objective
    L_clip − c1·L_VF + c2·H maximised; gradient-norm clipping; optional early stop of the update when approx-KL
    passes `target_kl`;
 6. metrics, KL coefficient update (fixed or adaptive).
Then (`_train`): log, sample table, `callbacks`, reward threshold and reward-hacking guard, checkpoint.

Callbacks: `PPOTrainer(..., callbacks=[fn])` calls `fn(experience)` once per update, on every process, with that
process's `PPOExperience` (rollout, scores, KL, rewards, advantages, returns, old values and log-probs, the update's
metrics, ...; see the class). For custom logging and analysis; what it holds is that update's, not a copy.

Choices (documented, as the checklist asks):
- Dropout is off in every model for the whole run (policy included, as in OpenAI's lm-human-preferences; so
  `lora_dropout` has no effect here), so the first minibatch of the first epoch has ratio = 1: the old log-probs are
  computed with the very forward pass the training step makes (same micro-batches, same shapes), so approx-KL = 0
  and clipfrac = 0 there exactly. With one micro-batch per update (num_mini_batches == gradient_accumulation_steps
  == 1) that forward *is* the first training forward: it runs once, with grad, and the first step reuses it.
- Training log-probs use the sampling temperature; `old_logprobs` are those of the temperature-scaled full
  distribution (`Rollout.policy_logprobs`' definition). With top-k/top-p the sampled distribution is truncated; PPO
  still uses the full one (the sampling log-probs are kept in `Rollout.logprobs`).
- Losses are token-level averages: each micro-batch's per-token sums are divided by the number of valid tokens of the
  whole minibatch over all processes (× world size, since DDP averages gradients), so gradient accumulation and
  process count do not change the loss. Whitening and token means over the global batch use the masked reductions
  of `alignloop.losses` with a summing `reduce` across processes.
- KL metric: `objective/kl` is the per-sequence sum of the same estimator the reward uses (`kl_estimator`), averaged
  over sequences; the adaptive controller is fed that number.
- The learning rate is scheduled per update (not per minibatch), so early stopping does not shift the schedule.
- Reward threshold stop: moving average (over `reward_threshold_window` updates) of the **raw** mean score.
- A weighted reward (several `SPEC=WEIGHT`) logs each part's mean (before weighting) as `reward/<name>`.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignloop.data import prompt_texts
from alignloop.errors import ConfigError, UserError
from alignloop.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_max,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
)
from alignloop.models import (
    ActorCritic,
    CausalLMWithValueHead,
    RewardModel,
    apply_lora,
    critic_from_reward_model,
    has_adapter,
    keep_reference,
    load_tokenizer,
    model_forward,
    reference_mode,
    unwrap_model,
)
from alignloop.models.fast import speed_up
from alignloop.rollout import HFSampler, Rollout, Sampler, SamplingParams, decode_responses, encode_prompts
from alignloop.scoring import RewardTransform, build_scorer, total
from alignloop.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from alignloop.training.config import renamed_fields
from alignloop.training.guard import RewardHackingGuard, SampleTable, reward_threshold_stop
from alignloop.training.logging import MetricsLogger, Progress
from alignloop.training.loop import make_accelerator, seed_everything, shard, sync_context, take_indices
from alignloop.training.optim import build_optimizer, build_scheduler
from alignloop.training.run import TrainResult, build_lora, save_adapter


@renamed_fields({"model_name_or_path": "model", "reward_model_name_or_path": "reward_model",
                 "gold_model_name_or_path": "gold_model", "dataset": "train_file", "adam_eps": "adam_epsilon",
                 "progress_bar": "progress", "save_every": "save_steps", "keep_last": "save_total_limit",
                 "fused_gelu": "fast_gelu"})
@dataclass
class PPOConfig:
    """PPO settings. Every field is also a flag of `alignloop ppo` (`kl_coef` -> `--kl-coef`) and a YAML key; the
    names are those of the other trainers' configs for the same knobs. PPO's unit of progress is the update."""
    # --- models and data (used by the CLI; from Python, objects can be passed to PPOTrainer instead) ---
    model: str | None = field(default=None, metadata={"help": "Policy: hub id or local folder."})
    reward_model: str | list[str] | None = field(default=None, metadata={
        "help": "The reward: a reward model or classifier (folder or hub id), a Python function module:function, "
                "or several SPEC=WEIGHT (a weighted sum; each part is logged as reward/<name>)."})
    gold_model: str | list[str] | None = field(default=None, metadata={
        "help": "Optional held-out/gold reward (same forms as reward_model), never trained on; logged as "
                "reward/gold_mean and watched by the reward-hacking guard."})
    train_file: str | None = field(default=None, metadata={
        "help": "Prompts ({prompt} rows; JSONL/JSON/Parquet/CSV, a datasets folder or a hub id) for the CLI."})
    output_dir: str = field(default="ppo-output", metadata={"help": "Metrics, samples, checkpoints, final model."})
    seed: int = field(default=0, metadata={"help": "Seed (data order, sampling; each process adds an offset)."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype when loading by name (default float32)."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={
        "help": "Accelerate autocast: no, bf16, fp16 (GPU)."})
    # --- rollouts ---
    rollout_batch_size: int = field(default=16, metadata={"help": "Prompts per PPO update, over all processes."})
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts are truncated from the left to this."})
    max_new_tokens: int = field(default=48, metadata={"help": "Maximum response length in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also used in training "
                                                               "log-probs)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off; keep 0 for on-policy PPO)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0 = off; keep 1.0 for on-policy PPO)."})
    stop_token_ids: list[int] = field(default_factory=list, metadata={"help": "Token ids ending a response "
                                                                                "(EOS always does)."})
    stop_strings: list[str] = field(default_factory=list, metadata={"help": "Strings ending a response."})
    # --- optimisation ---
    num_ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs over each batch of rollouts."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches (optimizer steps) per PPO epoch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per minibatch."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Adam learning rate."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "Adam epsilon (1e-5 as in the original code)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler: str = field(default="linear", metadata={"help": "Schedule over updates: linear, cosine, constant."})
    warmup_updates: int = field(default=0, metadata={"help": "Warmup updates of the learning rate."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient-norm clipping (None = off)."})
    # --- PPO objective ---
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip ε."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip ε_v (around the old values)."})
    vf_coef: float = field(default=0.1, metadata={"help": "c1: value-loss coefficient."})
    ent_coef: float = field(default=0.0, metadata={"help": "c2: entropy-bonus coefficient."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ."})
    lam: float = field(default=0.95, metadata={"help": "GAE λ."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over valid tokens."})
    target_kl: float | None = field(default=None, metadata={
        "help": "Early-stop an update's remaining minibatches when the minibatch approx-KL exceeds this."})
    # --- KL penalty ---
    kl_coef: float = field(default=0.05, metadata={"help": "β: KL penalty coefficient (initial one when adaptive)."})
    kl_estimator: Literal["k1", "k2", "k3"] = field(default="k1", metadata={
        "help": "Per-token KL estimator in the reward and metrics: k1 (unbiased), k2, k3 (unbiased, >= 0)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt β towards kl_target (Ziegler et al.)."})
    kl_target: float = field(default=6.0, metadata={"help": "Adaptive KL target (nats per sequence)."})
    kl_horizon: float = field(default=10000, metadata={"help": "Adaptive KL horizon (episodes)."})
    # --- value function ---
    value_model: Literal["head", "reward"] = field(default="head", metadata={
        "help": "head: zero-initialised value head on the policy trunk (one forward for logits and values); "
                "reward: a separate critic initialised from the reward model."})
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
    # --- when to stop ---
    total_updates: int = field(default=100, metadata={"help": "Step budget: number of PPO updates."})
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
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (no effect in PPO, which runs with "
                                                                "dropout off; kept for one vocabulary)."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "LoRA target modules: 'all-linear' or comma-separated module names."})
    use_lora: bool | None = field(default=None, metadata={
        "help": "Deprecated (removed in 0.3): use lora_r > 0. True with lora_r 0 means lora_r 8 (the old default); "
                "False turns LoRA off whatever lora_r says."})
    # --- logging and checkpoints ---
    tensorboard: bool = field(default=True, metadata={"help": "Write TensorBoard logs too."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar with ETA."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N updates (0 = only at the end)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (None = all)."})
    resume_from: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    save_final: bool = field(default=True, metadata={"help": "Save OUTPUT_DIR/final in HF format "
                                                             "(+ value_head.safetensors; LoRA: merged, and the "
                                                             "adapter into OUTPUT_DIR/adapter)."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "torch threads for training on CPU (None = leave torch's setting, normally every core)."})
    generation_threads: int | None = field(default=0, metadata={
        "help": "torch threads while sampling on CPU: 0 = auto (1 for models narrower than 256, whose decode ops are "
                "too small to gain from more; every thread otherwise); N = N; None = leave as is."})
    fast_gelu: bool = field(default=True, metadata={
        "help": "Speed-ups that keep the function (alignloop.models.fast): GPT-2's gelu_new as one fused kernel; "
                "attention in fp32 under CPU bf16 autocast."})

    def __post_init__(self):
        if self.rollout_batch_size < 1 or self.num_mini_batches < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("rollout_batch_size, num_mini_batches and gradient_accumulation_steps must be >= 1")
        if self.num_ppo_epochs < 1 or self.total_updates < 1:
            raise ConfigError("num_ppo_epochs and total_updates must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = no LoRA), got {self.lora_r}")
        if self.use_lora is not None:
            warnings.warn("PPOConfig: 'use_lora' (--use-lora) is deprecated and will be removed in alignloop 0.3: "
                          "LoRA is on when lora_r > 0 (--lora-r)", FutureWarning, stacklevel=4)
            if self.use_lora and self.lora_r == 0:
                self.lora_r = 8
            elif not self.use_lora:
                self.lora_r = 0

    def sampling_params(self, tokenizer) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, eos_token_id=tokenizer.eos_token_id if tokenizer else None,
                              stop_token_ids=list(self.stop_token_ids), stop_strings=list(self.stop_strings),
                              pad_token_id=tokenizer.pad_token_id if tokenizer else None)


@dataclass
class PPOExperience:
    """One update's batch on this process, as `PPOTrainer(callbacks=[fn])` hands it to `fn` after the update.

    B = this process's rollouts, R = response length (the rollout's longest); every [B, R] tensor is 0 where
    `rollout.response_mask` is False. Fields can also be read as `experience["scores"]`."""
    step: int                                 # the update (1-based)
    rollout: Rollout                          # prompt/response token ids and masks, `stopped`, sampling log-probs
    prompts: list[str]                        # [B] prompt texts
    responses: list[str]                      # [B] response texts (no special tokens)
    raw_scores: torch.Tensor                  # [B] the reward's output (Σ weight · part)
    scores: torch.Tensor                      # [B] after normalisation, clipping, no-EOS penalty: what PPO optimises
    reward_parts: dict[str, torch.Tensor]     # {name: [B]} each reward of a weighted sum, before weighting
    gold_scores: torch.Tensor | None          # [B] the held-out scorer's, when there is one
    old_logprobs: torch.Tensor                # [B,R] the policy's before the update (temperature-scaled)
    ref_logprobs: torch.Tensor                # [B,R] the reference's
    old_values: torch.Tensor                  # [B,R] the value function's before the update
    entropy: torch.Tensor                     # [B,R] the policy's entropy before the update
    kl: torch.Tensor                          # [B,R] per-token KL estimate (`kl_estimator`)
    kl_coef: float                            # β used in this update's rewards
    non_score_rewards: torch.Tensor           # [B,R] −β·KL
    rewards: torch.Tensor                     # [B,R] non-score rewards + the score on the last real token
    advantages: torch.Tensor                  # [B,R] GAE, whitened when `whiten_advantages`
    returns: torch.Tensor                     # [B,R] advantages (before whitening) + old values
    metrics: dict[str, float] = field(default_factory=dict)   # the update's logged metrics (global)

    @property
    def response_mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]


@dataclass
class _Forward:
    """A micro-batch's forward, sliced to its response: R' = the rows' longest response, P' = trimmed prompt width."""
    rows: torch.Tensor
    input_ids: torch.Tensor       # [b, P'+R']
    attention_mask: torch.Tensor  # [b, P'+R']
    p: int
    r: int
    logits: torch.Tensor          # [b, R', V] (predicting each response token)
    values: torch.Tensor          # [b, R'] float32
    logprobs: torch.Tensor        # [b, R'] at the sampling temperature


@dataclass
class _EpochStats:
    """Per-micro-batch statistics of the PPO epochs of one update."""
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    first: dict[str, float] = field(default_factory=dict)
    epochs_done: int = 0
    early_stopped: bool = False

    def mean(self, key: str) -> float:
        xs = self.values.get(key, [])
        return sum(xs) / max(len(xs), 1)


Callback = Callable[[PPOExperience], Any]


class PPOTrainer:
    """`PPOTrainer(model, reward, args, train_dataset, tokenizer=None, ref_model=None, gold_reward=None,
    reward_tokenizer=None, sampler=None, accelerator=None, callbacks=()).train() -> TrainResult`.

    model: a folder / hub id (default `args.model`) or a causal LM / `CausalLMWithValueHead` (with `tokenizer`).
    reward / gold_reward: anything `alignloop.scoring.build_scorer` takes (a spec or list of `SPEC=WEIGHT`, a reward
    model or classifier with `reward_tokenizer`, a function `f(prompts, completions)`, a scorer); default
    `args.reward_model` / `args.gold_model`. train_dataset: prompts (strings, rows, a path or a hub id; default
    `args.train_file`). callbacks: functions called with each update's `PPOExperience`."""

    def __init__(self, model: nn.Module | str | None = None, reward: Any = None, args: PPOConfig | None = None,
                 train_dataset: Any = None, tokenizer=None, ref_model: nn.Module | None = None,
                 gold_reward: Any = None, reward_tokenizer=None, sampler: Sampler | None = None, accelerator=None,
                 callbacks: Sequence[Callback] = ()):
        self.args = cfg = args if args is not None else PPOConfig()
        self.acc = accelerator or make_accelerator(cfg.mixed_precision)
        self._check_batch_sizes()
        seed_everything(cfg.seed, self.acc.process_index)
        policy, self.tokenizer = self._load_policy(model if model is not None else cfg.model, tokenizer)
        self.scorer, self.gold_scorer = self._build_scorers(reward, gold_reward, reward_tokenizer)
        self.model = self._actor_critic(policy)
        self.lora = has_adapter(self.model.lm)
        self.ref_model = self._frozen_reference(ref_model)
        if cfg.fast_gelu:
            for m in (self.model, self.ref_model, getattr(self.scorer, "model", None),
                      getattr(self.gold_scorer, "model", None)):
                speed_up(m)
        self.transform = RewardTransform(cfg.reward_normalization, cfg.reward_clip, cfg.missing_eos_penalty,
                                         cfg.missing_eos_penalty_mode)
        self.sampler = sampler or HFSampler(self.model.lm, self.tokenizer, cpu_threads=cfg.generation_threads)
        self.sampling = cfg.sampling_params(self.tokenizer)
        source = train_dataset if train_dataset is not None else cfg.train_file
        if source is None:
            raise ConfigError("PPO needs prompts: train_dataset=... (or --train-file)")
        self.prompts = prompt_texts(source, tokenizer=self.tokenizer)
        self.prompt_ids = encode_prompts(self.tokenizer, self.prompts, cfg.max_prompt_length)
        self.optimizer = build_optimizer(self.model, cfg.learning_rate, cfg.weight_decay, eps=cfg.adam_epsilon)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, cfg.warmup_updates, cfg.total_updates)
        self.ddp_model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.guard = RewardHackingGuard(cfg.kl_budget, cfg.guard_window, cfg.guard_action, cfg.guard_min_t)
        self.samples = SampleTable(cfg.output_dir, cfg.sample_rows)
        self.callbacks = list(callbacks)
        self.state: dict[str, Any] = {"update": 0, "data_epoch": 0, "data_pos": 0, "raw_reward_history": [],
                                      "stop_reason": None}
        self.history: list[dict] = []

    # ------------------------------------------------------------------ set-up
    def _check_batch_sizes(self) -> None:
        cfg, world = self.args, self.acc.num_processes
        if cfg.rollout_batch_size % world:
            raise ConfigError(f"rollout_batch_size ({cfg.rollout_batch_size}) must be divisible by the number of "
                              f"processes ({world})")
        if cfg.rollout_batch_size // world < cfg.num_mini_batches * cfg.gradient_accumulation_steps:
            raise ConfigError(f"each process has {cfg.rollout_batch_size // world} rollouts per update, fewer than "
                              f"num_mini_batches × gradient_accumulation_steps = "
                              f"{cfg.num_mini_batches * cfg.gradient_accumulation_steps}")

    def _load_policy(self, model, tokenizer) -> tuple[nn.Module, Any]:
        """The policy (LoRA applied when lora_r > 0) and its tokenizer (left padding when loaded here)."""
        lora = build_lora(self.args)
        if model is None or model == "":
            raise ConfigError("PPO needs a policy: model=... (or --model)")
        if isinstance(model, (str, os.PathLike)):
            tokenizer = tokenizer or load_tokenizer(str(model), padding_side="left")
            model = CausalLMWithValueHead.from_pretrained(str(model), dtype=self.args.dtype, lora=lora)
        elif lora is not None and not has_adapter(model):
            if isinstance(model, CausalLMWithValueHead):
                model.lm = apply_lora(model.lm, lora)
            else:
                model = apply_lora(model, lora)
        if tokenizer is None:
            raise UserError("PPOTrainer needs the policy's tokenizer (tokenizer=...)")
        return model, tokenizer

    def _build_scorers(self, reward, gold_reward, reward_tokenizer):
        cfg = self.args
        reward = reward if reward is not None else cfg.reward_model
        if reward is None:
            raise ConfigError("PPO needs a reward: reward=... (or --reward-model: a reward model, module:function "
                              "or several SPEC=WEIGHT)")
        common = {"policy_tokenizer": self.tokenizer, "positive_label": cfg.positive_label,
                  "batch_size": cfg.score_batch_size, "dtype": cfg.dtype, "device": self.acc.device}
        gold = gold_reward if gold_reward is not None else cfg.gold_model
        return build_scorer(reward, reward_tokenizer, **common), build_scorer(gold, **common)

    def _actor_critic(self, policy: nn.Module) -> ActorCritic:
        """The policy with its value function: a value head on its trunk, or a critic from the reward model."""
        critic = None
        if self.args.value_model == "reward":
            reward_model = getattr(self.scorer, "model", None)
            if reward_model is None:
                raise ConfigError("value_model='reward' needs one reward model to start the critic from (a function "
                                  "or a weighted sum has none)")
            if not isinstance(reward_model, RewardModel):
                reward_model = RewardModel(reward_model)
            critic = critic_from_reward_model(reward_model)
            if isinstance(policy, CausalLMWithValueHead):
                policy = policy.lm
        elif not isinstance(policy, CausalLMWithValueHead):
            policy = CausalLMWithValueHead(policy)
        model = ActorCritic(policy, critic).to(self.acc.device)
        model.eval()  # dropout off for the whole run (see module doc)
        return model

    def _frozen_reference(self, ref_model: nn.Module | None) -> nn.Module | None:
        """The reference: `ref_model` when given; else the starting policy: with LoRA its adapter's starting values
        (`keep_reference`, swapped in by `reference_mode`; None returned), else a frozen copy of it."""
        if ref_model is None and self.lora:
            keep_reference(self.model.lm)  # the start may be a trained adapter: its base is not the starting policy
            return None
        ref = ref_model if ref_model is not None else copy.deepcopy(unwrap_model(self.model.lm))
        return ref.to(self.acc.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------ across processes
    @property
    def world(self) -> int:
        return self.acc.num_processes

    def _sum_all(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, reduction="sum") if self.world > 1 else x

    @property
    def _reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The `reduce` of the masked reductions: a sum over processes (None with one process)."""
        return self._sum_all if self.world > 1 else None

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(x) if self.world > 1 else x

    # ------------------------------------------------------------------ data
    def _next_prompt_indices(self) -> list[int]:
        """The global batch of prompt indices (identical on every process), walking shuffled epochs of the data."""
        idx, self.state["data_epoch"], self.state["data_pos"] = take_indices(
            len(self.prompts), self.args.rollout_batch_size, self.args.seed, self.state["data_epoch"],
            self.state["data_pos"])
        return idx

    def _micro_batches(self, order: torch.Tensor) -> list[list[torch.Tensor]]:
        """order [B] -> minibatches, each a list of micro-batch row-index tensors."""
        mbs = order.chunk(self.args.num_mini_batches)
        return [list(mb.chunk(self.args.gradient_accumulation_steps)) for mb in mbs]

    # ------------------------------------------------------------------ one update, step by step
    def _update(self) -> PPOExperience:
        cfg = self.args
        t_start = time.perf_counter()
        idx = shard(self._next_prompt_indices(), self.acc.process_index, self.world)
        rollout = self.sampler.generate([self.prompt_ids[i] for i in idx], self.sampling)      # 1. generate
        rollout.to(self.acc.device)
        t_gen = time.perf_counter()
        prompts, responses, parts, raw, gold = self._score(rollout, idx)                        # 2. score
        scores = self.transform(raw, rollout.stopped, self._gather(raw) if self.world > 1 else None)
        t_score = time.perf_counter()
        orders = [torch.randperm(len(idx), device=self.acc.device) for _ in range(cfg.num_ppo_epochs)]
        old, cached = self._old_logprobs_and_values(rollout, orders[0])                        # 3. old pass
        exp = self._experience(rollout, prompts, responses, parts, raw, scores, gold, old)      # 4. rewards, GAE
        stats = self._ppo_epochs(exp, orders, cached)                                           # 5. PPO epochs
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update used
        self.scheduler.step()
        t_train = time.perf_counter()
        times = {"generate": t_gen - t_start, "score": t_score - t_gen, "train": t_train - t_score,
                 "update": t_train - t_start}
        exp.metrics = {**self._reward_metrics(exp), **self._optim_metrics(stats, lr),            # 6. metrics
                       **self._perf_metrics(exp, times)}
        self.kl_ctl.update(exp.metrics["objective/kl"], cfg.rollout_batch_size)
        return exp

    def _score(self, rollout: Rollout, idx: list[int]):
        """(prompts, responses, reward parts {name: [B]}, raw scores [B], gold scores [B] or None)."""
        prompts = [self.prompts[i] for i in idx]
        responses = decode_responses(self.tokenizer, rollout)
        parts = self.scorer.rollout_parts(rollout, prompts, responses)
        raw = total(parts, self.scorer.weights).float()
        gold = self.gold_scorer.score_rollout(rollout, prompts, responses).float() if self.gold_scorer else None
        return prompts, responses, parts, raw, gold

    def _forward(self, model: nn.Module, rollout: Rollout, rows: torch.Tensor) -> _Forward:
        """Forward the rollout's `rows` (without their all-pad columns) and slice logits, values and log-probs to the
        response tokens."""
        ids, am, p, r = rollout.rows(rows)
        logits, values = model(ids, am)
        logits = logits[:, p - 1:p + r - 1]
        logprobs = logprobs_from_logits(logits, ids[:, p:], self.args.temperature)
        return _Forward(rows, ids, am, p, r, logits, values[:, p - 1:p + r - 1].float(), logprobs)

    def _ref_logprobs(self, f: _Forward) -> torch.Tensor:
        # under the policy's autocast (accelerate puts it on the prepared model's forward only): a reference run in
        # another precision makes KL != 0 before the policy has moved
        with self.acc.autocast():
            if self.ref_model is None:
                with reference_mode(self.model.lm):
                    logits = model_forward(self.model.lm, f.input_ids, f.attention_mask)
            else:
                logits = model_forward(self.ref_model, f.input_ids, f.attention_mask)
        return logprobs_from_logits(logits[:, f.p - 1:f.p + f.r - 1], f.input_ids[:, f.p:f.p + f.r],
                                    self.args.temperature)

    def _old_logprobs_and_values(self, rollout: Rollout, order: torch.Tensor):
        """Step 3, in epoch 0's micro-batch layout (so the ratio is exactly 1 on the first minibatch) ->
        ({old_logprobs, old_values, entropy, ref_logprobs}: [B,R] each, 0 on padding; the cached forward or None).
        With one micro-batch per update its forward is the first training forward: run with grad through the
        prepared model and returned, for the first optimizer step to reuse (one forward saved)."""
        B, R = rollout.response_ids.shape
        out = {k: torch.zeros(B, R, device=self.acc.device)
               for k in ("old_logprobs", "old_values", "entropy", "ref_logprobs")}
        reuse = self.args.num_mini_batches == 1 and self.args.gradient_accumulation_steps == 1
        cached = None
        for rows in (rows for mb in self._micro_batches(order) for rows in mb):
            if reuse:
                f = cached = self._forward(self.ddp_model, rollout, rows)
            else:
                with torch.no_grad():
                    f = self._forward(self.model, rollout, rows)
            with torch.no_grad():
                out["old_logprobs"][rows, :f.r] = f.logprobs.detach()
                out["old_values"][rows, :f.r] = f.values.detach()
                out["entropy"][rows, :f.r] = entropy_from_logits(f.logits.detach(), self.args.temperature)
                out["ref_logprobs"][rows, :f.r] = self._ref_logprobs(f)
        maskf = rollout.response_mask.float()
        return {k: v * maskf for k, v in out.items()}, cached

    def _experience(self, rollout, prompts, responses, parts, raw, scores, gold, old) -> PPOExperience:
        """Step 4: per-token KL and rewards (`ppo_rewards`), GAE advantages (whitened over the global batch) and
        returns."""
        cfg, mask = self.args, rollout.response_mask
        kl = kl_penalty(old["old_logprobs"], old["ref_logprobs"], cfg.kl_estimator) * mask.float()
        beta = self.kl_ctl.value
        rewards, non_score = ppo_rewards(scores, kl, mask, beta)
        advantages, returns = gae(rewards, old["old_values"], mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce=self._reduce)
        return PPOExperience(step=self.state["update"] + 1, rollout=rollout, prompts=prompts, responses=responses,
                             raw_scores=raw, scores=scores, reward_parts=parts, gold_scores=gold, kl=kl,
                             kl_coef=beta, non_score_rewards=non_score, rewards=rewards, advantages=advantages,
                             returns=returns, **old)

    def _ppo_epochs(self, exp: PPOExperience, orders: list[torch.Tensor], cached: _Forward | None) -> _EpochStats:
        """Step 5: an optimizer step per minibatch, epoch after epoch; stops the update early past `target_kl`."""
        stats = _EpochStats()
        for order in orders:
            stats.epochs_done += 1
            for mb in self._micro_batches(order):
                approx_kl = self._train_minibatch(exp, mb, cached, stats)
                cached = None
                if self.args.target_kl is not None and approx_kl > self.args.target_kl:
                    stats.early_stopped = True
                    return stats
        return stats

    def _train_minibatch(self, exp: PPOExperience, mb: list[torch.Tensor], cached: _Forward | None,
                         stats: _EpochStats) -> float:
        """Accumulate the micro-batches' gradients (token sums over the minibatch's global token count), clip, step.
        Returns the minibatch's approx-KL over every process."""
        cfg, acc, mask = self.args, self.acc, exp.response_mask
        n_tok = self._sum_all(torch.stack([mask[rows].sum() for rows in mb]).sum().float())
        scale = self.world / n_tok.clamp(min=1)
        kl_sum = n_sum = 0.0
        for i, rows in enumerate(mb):
            with sync_context(acc, self.ddp_model, i, len(mb)):
                f = cached if cached is not None else self._forward(self.ddp_model, exp.rollout, rows)
                cached = None
                m = mask[rows, :f.r]
                loss_tok, terms = self._loss(f, exp)
                acc.backward(masked_sum(loss_tok, m) * scale)
            terms["ratio"] = torch.exp(f.logprobs.detach() - exp.old_logprobs[rows, :f.r])
            for key, x in terms.items():
                stats.values[key].append(masked_mean(x.detach(), m).item())
            kl_sum += masked_sum(terms["approxkl"], m).item()
            n_sum += m.sum().item()
            if not stats.first:
                stats.first = {"policy/approxkl_first": stats.values["approxkl"][-1],
                               "policy/clipfrac_first": stats.values["clipfrac"][-1],
                               "policy/max_abs_ratio_minus_1_first": float(masked_max((terms["ratio"] - 1).abs(), m))}
        if cfg.max_grad_norm:
            stats.values["grad_norm"].append(float(acc.clip_grad_norm_(self.ddp_model.parameters(),
                                                                       cfg.max_grad_norm)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        kl_n = self._sum_all(torch.tensor([kl_sum, n_sum], device=acc.device))
        return (kl_n[0] / kl_n[1].clamp(min=1)).item()

    def _loss(self, f: _Forward, exp: PPOExperience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token loss of a micro-batch [b,R'] and its terms for the metrics (policy and value losses, clipped
        tokens, approx-KL; entropy when it is in the loss)."""
        cfg, rows, r = self.args, f.rows, f.r
        pg, clipped, approx = ppo_policy_loss(f.logprobs, exp.old_logprobs[rows, :r], exp.advantages[rows, :r],
                                              cfg.cliprange)
        vf, vclipped = ppo_value_loss(f.values, exp.old_values[rows, :r], exp.returns[rows, :r], cfg.cliprange_value)
        loss_tok = pg + cfg.vf_coef * vf
        terms = {"pg_loss": pg, "vf_loss": vf, "clipfrac": clipped, "vf_clipfrac": vclipped, "approxkl": approx}
        if cfg.ent_coef:
            terms["ent"] = entropy_from_logits(f.logits, cfg.temperature)
            loss_tok = loss_tok - cfg.ent_coef * terms["ent"]
        return loss_tok, terms

    # ------------------------------------------------------------------ metrics
    def _reward_metrics(self, exp: PPOExperience) -> dict[str, float]:
        mask, reduce = exp.response_mask, self._reduce
        all_scores, non_score = self._gather(exp.scores), self._gather(exp.non_score_rewards.sum(1))
        var_ret = masked_var(exp.returns, mask, reduce=reduce).item()
        var_err = masked_var(exp.returns - exp.old_values, mask, reduce=reduce).item()
        metrics = {
            "objective/kl": self._gather(exp.kl.sum(1)).mean().item(),
            "objective/kl_coef": exp.kl_coef,
            "objective/entropy": masked_mean(exp.entropy, mask, reduce=reduce).item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (all_scores + non_score).mean().item(),
            "reward/mean": all_scores.mean().item(),
            "reward/std": all_scores.std(unbiased=False).item(),
            "reward/raw_mean": self._gather(exp.raw_scores).mean().item(),
            "val/explained_variance": 1.0 - var_err / max(var_ret, 1e-8),
            "val/mean": masked_mean(exp.old_values, mask, reduce=reduce).item(),
        }
        if exp.gold_scores is not None:
            metrics["reward/gold_mean"] = self._gather(exp.gold_scores).mean().item()
        if len(exp.reward_parts) > 1:
            for name, part in exp.reward_parts.items():
                key = f"reward/{name}" if f"reward/{name}" not in metrics else f"reward/{name}_part"
                metrics[key] = self._gather(part.float()).mean().item()
        return metrics

    def _optim_metrics(self, stats: _EpochStats, lr: float) -> dict[str, float]:
        metrics = {
            "policy/clipfrac": stats.mean("clipfrac"),
            "policy/approxkl": stats.mean("approxkl"),
            "policy/ratio_mean": stats.mean("ratio"),
            "policy/ppo_epochs_done": stats.epochs_done,
            "policy/early_stopped": float(stats.early_stopped),
            "loss/policy": stats.mean("pg_loss"),
            "loss/value": stats.mean("vf_loss"),
            "val/clipfrac": stats.mean("vf_clipfrac"),
            "optim/lr": lr,
            "optim/grad_norm": stats.mean("grad_norm"),
            **stats.first,
        }
        if stats.values.get("ent"):
            metrics["loss/entropy"] = stats.mean("ent")
        return metrics

    def _perf_metrics(self, exp: PPOExperience, times: dict[str, float]) -> dict[str, float]:
        rollout = exp.rollout
        resp_len = self._gather(rollout.response_mask.sum(1).float())
        n_gen = resp_len.sum().item()
        n_prompt = self._gather(rollout.prompt_mask.sum(1).float()).sum().item()
        return {
            "response/length_mean": resp_len.mean().item(),
            "response/eos_share": self._gather(rollout.stopped.float()).mean().item(),
            **{f"time/{k}": v for k, v in times.items()},
            "perf/generated_tokens_per_sec": n_gen / max(times["generate"], 1e-9),
            "perf/tokens_per_sec": (n_gen + n_prompt) / max(times["update"], 1e-9),
            "perf/episodes_per_sec": self.args.rollout_batch_size / max(times["update"], 1e-9),
        }

    # ------------------------------------------------------------------ the run
    def train(self) -> TrainResult:
        """Run updates until `total_updates`, the reward threshold or the guard stops; checkpoint and save."""
        threads = torch.get_num_threads()
        if self.args.cpu_threads:
            torch.set_num_threads(self.args.cpu_threads)
        t0 = time.perf_counter()
        try:
            final = self._train()
        finally:
            torch.set_num_threads(threads)
        return TrainResult(output_dir=str(final), steps=self.state["update"],
                           metrics=self.history[-1] if self.history else {}, seconds=time.perf_counter() - t0,
                           stop_reason=self.state["stop_reason"], history=list(self.history))

    def _train(self) -> Path:
        cfg, acc = self.args, self.acc
        resume = resolve_resume(cfg.resume_from, cfg.output_dir)
        if resume is not None:
            self._load(resume)
        elif cfg.reward_normalization == "fit" and not self.transform.fitted:
            self._fit_reward_normalization()
        logger = MetricsLogger(cfg.output_dir, enabled=acc.is_main_process, tensorboard=cfg.tensorboard,
                               config=asdict(cfg), resume_step=self.state["update"] if resume else None)
        progress = Progress(cfg.total_updates, "ppo", enabled=acc.is_main_process and cfg.progress,
                            start=self.state["update"])
        try:
            while self.state["update"] < cfg.total_updates and self.state["stop_reason"] is None:
                exp = self._update()
                self.state["update"] = step = exp.step
                self.history.append(exp.metrics)
                logger.log(exp.metrics, step)
                if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1) and acc.is_main_process:
                    logger.log_text("samples", self._sample_table(exp), step)
                for fn in self.callbacks:
                    fn(exp)
                self._check_stop(exp.metrics, logger, step)
                progress.update(1, f"reward {exp.metrics['reward/mean']:+.3f} kl {exp.metrics['objective/kl']:.3f}")
                if cfg.save_steps and step % cfg.save_steps == 0:
                    self.save_checkpoint()
        finally:
            progress.close()
            logger.close()
        if cfg.save_steps or cfg.save_final:
            self.save_checkpoint()
        if not cfg.save_final:
            return Path(cfg.output_dir)
        self.save_model(Path(cfg.output_dir) / "final")
        if self.acc.is_main_process:  # LoRA: the adapter too (+ value head), as every trainer saves it
            save_adapter(self.model.policy, self.tokenizer, Path(cfg.output_dir) / "adapter")
        return Path(cfg.output_dir) / "final"

    def _fit_reward_normalization(self) -> None:
        """Ziegler et al.: gain and bias so that samples from the starting policy score mean 0, std 1."""
        raws = []
        n = 0
        while n < self.args.normalization_samples:
            g = self._next_prompt_indices()
            local = shard(g, self.acc.process_index, self.world)
            rollout = self.sampler.generate([self.prompt_ids[i] for i in local], self.sampling)
            _, _, _, raw, _ = self._score(rollout, local)
            raws.append(self._gather(raw))
            n += len(g)
        self.transform.fit(torch.cat(raws)[:self.args.normalization_samples])
        self.state["data_epoch"], self.state["data_pos"] = 0, 0  # training sees the data from the start

    def _sample_table(self, exp: PPOExperience) -> str:
        gold = exp.gold_scores.tolist() if exp.gold_scores is not None else None
        return self.samples.write(exp.step, exp.prompts, exp.responses, exp.scores.tolist(), exp.raw_scores.tolist(),
                                  gold)

    def _check_stop(self, metrics: dict, logger, step: int) -> None:
        """Reward threshold (moving average of the raw mean score), then the reward-hacking guard's alarms."""
        cfg = self.args
        history = self.state["raw_reward_history"]
        history.append(metrics["reward/raw_mean"])
        reason = reward_threshold_stop(history, cfg.reward_threshold, cfg.reward_threshold_window)
        if reason is not None:
            self.state["stop_reason"] = reason
        for msg in self.guard.observe(step, metrics):
            logger.log_text("guard", msg, step)
        if self.guard.should_stop and self.state["stop_reason"] is None:
            self.state["stop_reason"] = "reward-hacking guard: " + self.guard.alerts[-1][1]
        if self.state["stop_reason"] and self.acc.is_main_process:
            logger.log_text("stop", self.state["stop_reason"], step)

    # ------------------------------------------------------------------ checkpoints and saving
    def _trainer_state(self) -> dict:
        return {**self.state, "kl_coef": self.kl_ctl.value, "transform": self.transform.state_dict(),
                "guard": self.guard.state_dict(), "scheduler": self.scheduler.state_dict(), "config": asdict(self.args)}

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.args.output_dir, self.state["update"], accelerator=self.acc,
                               modules={"model": self.model}, optimizer=self.optimizer, scheduler=None,
                               trainer_state=self._trainer_state(), keep_last=self.args.save_total_limit)

    def _load(self, path: Path) -> None:
        st = load_checkpoint(path, accelerator=self.acc, modules={"model": self.model}, optimizer=self.optimizer)
        for k in ("update", "data_epoch", "data_pos", "raw_reward_history"):
            self.state[k] = st[k]
        self.state["stop_reason"] = None
        self.kl_ctl.value = st["kl_coef"]
        self.transform.load_state_dict(st["transform"])
        self.guard.load_state_dict(st["guard"])
        self.scheduler.load_state_dict(st["scheduler"])

    def save_model(self, path: str | Path) -> None:
        """HF format: the policy LM (LoRA merged) + value_head.safetensors (or critic/ for a separate critic)."""
        if not self.acc.is_main_process:
            return
        path = Path(path)
        pol = self.model.policy
        if isinstance(pol, CausalLMWithValueHead):
            pol.save_pretrained(path, tokenizer=self.tokenizer)
        else:
            lm = copy.deepcopy(pol).merge_and_unload() if has_adapter(pol) else pol
            lm.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            self.model.critic.save_pretrained(path / "critic")

