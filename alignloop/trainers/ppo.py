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

Process supervision (`reward_granularity="process"`; Lightman et al. 2023, Wang et al. 2024): the reward scores each
reasoning step (a process reward model, or a step function `module:function` fn(prompts, step_lists) ->
list[list[float]]); step 4's per-token rewards are then −β·KL_t plus each step's reward on the token that ends the
step (`losses.ppo_process_rewards`; where steps end and what a response without a step gets:
`alignloop.rl.step_rewards`), so GAE credits each step with its own reward and the later ones. `scores` and
`reward/mean` are each response's summed step rewards; `reward/raw_mean` the reward's own whole-response score;
`reward/steps_mean` and `reward/steps_per_response` the mean step score and steps per response. With one step per
response ending on its last token this is exactly the outcome form.

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
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignloop.errors import ConfigError
from alignloop.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_max,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
)
from alignloop.losses.ppo import ppo_process_rewards
from alignloop.models import (
    ActorCritic,
    CausalLMWithValueHead,
    RewardModel,
    critic_from_reward_model,
    has_adapter,
)
from alignloop.rl import (
    REWARD_GRANULARITY_HELP,
    STEP_REWARD_HELP,
    Collective,
    ExperienceAccess,
    OnlineRLArgs,
    ScoredRollout,
    StepRewards,
    UpdateLoop,
    build_scorers,
    check_batch_sizes,
    check_reward_granularity,
    encoded_prompts,
    frozen_reference,
    load_online_checkpoint,
    load_policy,
    local_prompts,
    minibatch_layout,
    new_state,
    perf_metrics,
    prepared_optimization,
    reference_logprobs,
    response_logprobs_from,
    reward_metrics,
    save_online_checkpoint,
    score_rollout,
    speed_up_models,
    step_metrics,
    step_rewards,
    train_online,
)
from alignloop.rollout import HFSampler, Rollout, Sampler
from alignloop.scoring import ProcessScorer
from alignloop.training.config import renamed_fields
from alignloop.training.guard import SampleTable
from alignloop.training.loop import make_accelerator, seed_everything, sync_context
from alignloop.training.run import TrainResult, save_adapter


@renamed_fields({"model_name_or_path": "model", "reward_model_name_or_path": "reward_model",
                 "gold_model_name_or_path": "gold_model", "dataset": "train_file", "adam_eps": "adam_epsilon",
                 "progress_bar": "progress", "save_every": "save_steps", "keep_last": "save_total_limit",
                 "fused_gelu": "fast_gelu"})
@dataclass
class PPOConfig(OnlineRLArgs):
    """PPO settings: the fields every online trainer shares (`alignloop.rl.OnlineRLArgs`: models, rollouts, reward,
    KL, stop rules, guard, LoRA, logging, checkpoints) and PPO's own below. Every field is also a flag of
    `alignloop ppo` (`kl_coef` -> `--kl-coef`) and a YAML key. PPO's unit of progress is the update."""
    output_dir: str = field(default="ppo-output", metadata={"help": "Metrics, samples, checkpoints, final model."})
    # --- PPO optimisation ---
    num_ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs over each batch of rollouts."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches (optimizer steps) per PPO epoch."})
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
    # --- adaptive KL penalty (kl_coef is the initial β) ---
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt β towards kl_target (Ziegler et al.)."})
    kl_target: float = field(default=6.0, metadata={"help": "Adaptive KL target (nats per sequence)."})
    kl_horizon: float = field(default=10000, metadata={"help": "Adaptive KL horizon (episodes)."})
    # --- value function ---
    value_model: Literal["head", "reward"] = field(default="head", metadata={
        "help": "head: zero-initialised value head on the policy trunk (one forward for logits and values); "
                "reward: a separate critic initialised from the reward model."})
    reward_granularity: Literal["outcome", "process"] = field(default="outcome", metadata={
        "help": REWARD_GRANULARITY_HELP})
    step_reward: Literal["score", "delta"] = field(default="score", metadata={"help": STEP_REWARD_HELP})
    use_lora: bool | None = field(default=None, metadata={
        "help": "Deprecated (removed in 0.3): use lora_r > 0. True with lora_r 0 means lora_r 8 (the old default); "
                "False turns LoRA off whatever lora_r says."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_mini_batches < 1 or self.num_ppo_epochs < 1:
            raise ConfigError("num_mini_batches and num_ppo_epochs must be >= 1")
        check_reward_granularity(self)
        if self.use_lora is not None:
            warnings.warn("PPOConfig: 'use_lora' (--use-lora) is deprecated and will be removed in alignloop 0.3: "
                          "LoRA is on when lora_r > 0 (--lora-r)", FutureWarning, stacklevel=4)
            if self.use_lora and self.lora_r == 0:
                self.lora_r = 8
            elif not self.use_lora:
                self.lora_r = 0


@dataclass
class PPOExperience(ExperienceAccess):
    """One update's batch on this process, as `PPOTrainer(callbacks=[fn])` hands it to `fn` after the update.

    B = this process's rollouts, R = response length (the rollout's longest); every [B, R] tensor is 0 where
    `rollout.response_mask` is False. Fields can also be read as `experience["scores"]`."""
    step: int                                 # the update (1-based)
    rollout: Rollout                          # prompt/response token ids and masks, `stopped`, sampling log-probs
    prompts: list[str]                        # [B] prompt texts
    responses: list[str]                      # [B] response texts (no special tokens)
    raw_scores: torch.Tensor                  # [B] the reward's output (Σ weight · part)
    scores: torch.Tensor                      # [B] after normalisation, clipping, no-EOS penalty: what PPO optimises
                                              # (process supervision: the response's summed step rewards)
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
                                              # (process supervision: each step's reward on its step-end token)
    advantages: torch.Tensor                  # [B,R] GAE, whitened when `whiten_advantages`
    returns: torch.Tensor                     # [B,R] advantages (before whitening) + old values
    metrics: dict[str, float] = field(default_factory=dict)   # the update's logged metrics (global)
    steps: StepRewards | None = None          # process supervision: the step rewards and their step-end tokens


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
        self.coll = Collective(self.acc)
        check_batch_sizes(cfg, self.acc.num_processes, 1, cfg.num_mini_batches * cfg.gradient_accumulation_steps)
        seed_everything(cfg.seed, self.acc.process_index)
        policy, self.tokenizer = load_policy(model if model is not None else cfg.model, tokenizer, cfg, "PPO",
                                             value_head=cfg.value_model == "head")
        self.scorer, self.gold_scorer = build_scorers(reward, gold_reward, reward_tokenizer, cfg, self.tokenizer,
                                                      self.acc.device, "PPO",
                                                      steps=cfg.reward_granularity == "process")
        self.model = self._actor_critic(policy)
        self.lora = has_adapter(self.model.lm)
        self.ref_model = frozen_reference(self.model.lm, ref_model if ref_model is not None else cfg.ref_model,
                                          self.acc.device, cfg.dtype)
        speed_up_models(cfg, self.model, self.ref_model, self.scorer, self.gold_scorer)
        self.transform = cfg.reward_transform()
        self.sampler = sampler or HFSampler(self.model.lm, self.tokenizer, cpu_threads=cfg.generation_threads)
        self.sampling = cfg.sampling_params(self.tokenizer)
        self.prompts, self.prompt_ids = encoded_prompts(train_dataset, cfg, self.tokenizer, "PPO")
        self.ddp_model, self.optimizer, self.scheduler = prepared_optimization(self.model, cfg, self.acc)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.guard = cfg.guard()
        self.samples = SampleTable(cfg.output_dir, cfg.sample_rows)
        self.callbacks = list(callbacks)
        self.state: dict[str, Any] = new_state()
        self.history: list[dict] = []

    # ------------------------------------------------------------------ set-up
    def _actor_critic(self, policy: nn.Module) -> ActorCritic:
        """The policy with its value function: a value head on its trunk, or a critic from the reward model."""
        critic = None
        if self.args.value_model == "reward":
            if isinstance(self.scorer, ProcessScorer):
                raise ConfigError("value_model='reward' starts the critic from a reward model (a sequence "
                                  "classifier); a process reward model is a token classifier: use value_model='head'")
            reward_model = getattr(self.scorer, "model", None)
            if reward_model is None:
                raise ConfigError("value_model='reward' needs one reward model to start the critic from (a function "
                                  "or a weighted sum has none)")
            if not isinstance(reward_model, RewardModel):
                reward_model = RewardModel(reward_model)
            if reward_model.num_heads > 1:  # which head would the values start from? none is the reward
                raise ConfigError(f"value_model='reward' starts the critic from a one-head reward model; this one has "
                                  f"{reward_model.num_heads} heads ({', '.join(reward_model.head_names)}): use "
                                  f"value_model='head'")
            critic = critic_from_reward_model(reward_model)
            if isinstance(policy, CausalLMWithValueHead):  # a policy object handed over with a head
                policy = policy.lm
        elif not isinstance(policy, CausalLMWithValueHead):
            policy = CausalLMWithValueHead(policy)
        model = ActorCritic(policy, critic).to(self.acc.device)
        model.eval()  # dropout off for the whole run (see module doc)
        return model

    # ------------------------------------------------------------------ data
    def _micro_batches(self, order: torch.Tensor) -> list[list[torch.Tensor]]:
        """order [B] -> minibatches, each a list of micro-batch row-index tensors."""
        return minibatch_layout(order, self.args.num_mini_batches, self.args.gradient_accumulation_steps)

    # ------------------------------------------------------------------ one update, step by step
    def _update(self) -> PPOExperience:
        cfg = self.args
        t_start = time.perf_counter()
        idx = local_prompts(self.state, self.args, len(self.prompts), self.acc)
        rollout = self.sampler.generate([self.prompt_ids[i] for i in idx], self.sampling)      # 1. generate
        rollout.to(self.acc.device)
        t_gen = time.perf_counter()
        process = cfg.reward_granularity == "process"
        scored = score_rollout(self.scorer, self.gold_scorer, self.tokenizer, [self.prompts[i] for i in idx],
                               rollout, steps=process)                                          # 2. score
        raw = scored.raw
        scores = self.transform(raw, rollout.stopped, self.coll.gather(raw) if self.coll.world > 1 else None)
        steps = step_rewards(scored, scores, rollout, self.tokenizer, cfg) if process else None
        if steps is not None:
            scores = steps.totals()
        t_score = time.perf_counter()
        orders = [torch.randperm(len(idx), device=self.acc.device) for _ in range(cfg.num_ppo_epochs)]
        old, cached = self._old_logprobs_and_values(rollout, orders[0])                        # 3. old pass
        exp = self._experience(rollout, scored, scores, old, steps)                             # 4. rewards, GAE
        stats = self._ppo_epochs(exp, orders, cached)                                           # 5. PPO epochs
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update used
        self.scheduler.step()
        t_train = time.perf_counter()
        times = {"generate": t_gen - t_start, "score": t_score - t_gen, "train": t_train - t_score,
                 "update": t_train - t_start}
        exp.metrics = {**reward_metrics(self.coll, scores, scored), **self._ppo_metrics(exp),   # 6. metrics
                       **self._optim_metrics(stats, lr), **perf_metrics(self.coll, rollout, times,
                                                                          cfg.rollout_batch_size)}
        if steps is not None:
            exp.metrics.update(step_metrics(self.coll, steps))
        self.kl_ctl.update(exp.metrics["objective/kl"], cfg.rollout_batch_size)
        return exp

    def _forward(self, model: nn.Module, rollout: Rollout, rows: torch.Tensor) -> _Forward:
        """Forward the rollout's `rows` (without their all-pad columns) and slice logits, values and log-probs to the
        response tokens."""
        ids, am, p, r = rollout.rows(rows)
        logits, values = model(ids, am)
        logits, logprobs = response_logprobs_from(logits, ids, p, r, self.args.temperature)
        return _Forward(rows, ids, am, p, r, logits, values[:, p - 1:p + r - 1].float(), logprobs)

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
                out["ref_logprobs"][rows, :f.r] = reference_logprobs(self.acc, self.model.lm, self.ref_model,
                                                                     f.input_ids, f.attention_mask, f.p, f.r,
                                                                     self.args.temperature)
        maskf = rollout.response_mask.float()
        return {k: v * maskf for k, v in out.items()}, cached

    def _experience(self, rollout: Rollout, scored: ScoredRollout, scores: torch.Tensor, old,
                    steps: StepRewards | None = None) -> PPOExperience:
        """Step 4: per-token KL and rewards (`ppo_rewards`; with step rewards `ppo_process_rewards`), GAE advantages
        (whitened over the global batch) and returns."""
        cfg, mask = self.args, rollout.response_mask
        kl = kl_penalty(old["old_logprobs"], old["ref_logprobs"], cfg.kl_estimator) * mask.float()
        beta = self.kl_ctl.value
        if steps is None:
            rewards, non_score = ppo_rewards(scores, kl, mask, beta)
        else:
            rewards, non_score = ppo_process_rewards(steps.rewards, steps.mask, steps.ends, kl, mask, beta)
        advantages, returns = gae(rewards, old["old_values"], mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce=self.coll.reduce)
        return PPOExperience(step=self.state["update"] + 1, rollout=rollout, prompts=scored.prompts,
                             responses=scored.responses, raw_scores=scored.raw, scores=scores,
                             reward_parts=scored.parts, gold_scores=scored.gold, kl=kl,
                             kl_coef=beta, non_score_rewards=non_score, rewards=rewards, advantages=advantages,
                             returns=returns, steps=steps, **old)

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
        n_tok = self.coll.sum(torch.stack([mask[rows].sum() for rows in mb]).sum().float())
        scale = self.coll.world / n_tok.clamp(min=1)
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
        kl_n = self.coll.sum(torch.tensor([kl_sum, n_sum], device=acc.device))
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
    def _ppo_metrics(self, exp: PPOExperience) -> dict[str, float]:
        mask, reduce = exp.response_mask, self.coll.reduce
        all_scores, non_score = self.coll.gather(exp.scores), self.coll.gather(exp.non_score_rewards.sum(1))
        var_ret = masked_var(exp.returns, mask, reduce=reduce).item()
        var_err = masked_var(exp.returns - exp.old_values, mask, reduce=reduce).item()
        return {
            "objective/kl": self.coll.gather(exp.kl.sum(1)).mean().item(),
            "objective/kl_coef": exp.kl_coef,
            "objective/entropy": masked_mean(exp.entropy, mask, reduce=reduce).item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (all_scores + non_score).mean().item(),
            "val/explained_variance": 1.0 - var_err / max(var_ret, 1e-8),
            "val/mean": masked_mean(exp.old_values, mask, reduce=reduce).item(),
        }

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

    # ------------------------------------------------------------------ the run
    def train(self) -> TrainResult:
        """Run updates until `total_updates`, the reward threshold or the guard stops; checkpoint and save."""
        loop = UpdateLoop("ppo", self._update, self.save_checkpoint, self._load, self._sample_raw_scores,
                          self._save_final, self.transform, self.guard, self.samples, self.callbacks)
        return train_online(loop, self.args, self.acc, self.state, self.history)

    def _sample_raw_scores(self) -> torch.Tensor:
        """One batch from the current policy, scored: its raw scores over every process (for reward fitting)."""
        local = local_prompts(self.state, self.args, len(self.prompts), self.acc)
        rollout = self.sampler.generate([self.prompt_ids[i] for i in local], self.sampling)
        return self.coll.gather(score_rollout(self.scorer, self.gold_scorer, self.tokenizer,
                                              [self.prompts[i] for i in local], rollout).raw)

    # ------------------------------------------------------------------ checkpoints and saving
    def save_checkpoint(self) -> Path:
        return save_online_checkpoint(self.args, self.acc, self.state, self.model, self.optimizer, self.scheduler,
                                      self.transform, self.guard, kl_coef=self.kl_ctl.value)

    def _load(self, path: Path) -> None:
        saved = load_online_checkpoint(path, self.acc, self.state, self.model, self.optimizer, self.scheduler,
                                       self.transform, self.guard)
        self.kl_ctl.value = saved["kl_coef"]

    def _save_final(self) -> Path:
        """OUTPUT_DIR/final (`save_model`) and, for LoRA, the adapter (+ value head) in OUTPUT_DIR/adapter."""
        final = Path(self.args.output_dir) / "final"
        self.save_model(final)
        if self.acc.is_main_process:
            save_adapter(self.model.policy, self.tokenizer, Path(self.args.output_dir) / "adapter")
        return final

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

