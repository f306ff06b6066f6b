"""Critic-free RL from one sampled group per prompt: REINFORCE with a baseline, RLOO, GRPO and Dr. GRPO, read top to
bottom. No value model: each completion's advantage comes from the other completions of its prompt (or a baseline).

    trainer = GRPOTrainer(model=policy_or_path, reward=reward_model_or_fn_or_spec,
                          args=GRPOConfig(estimator="rloo", num_generations=4), train_dataset=prompts, tokenizer=tok)
    result = trainer.train()          # alignloop.training.run.TrainResult; result.history: metrics per update
    alignloop grpo --model ./sft --reward-model ./rm --train-file prompts.jsonl     # `alignloop rloo`: estimator rloo

One update (`GRPOTrainer._update`):
 1. generate: `rollout_batch_size` prompts (over all processes), each sampled `num_generations` (K) times; a
    prompt's K completions are adjacent rows and stay on one process (the `Sampler` of PPO, KV cache, eval mode);
 2. score: the reward (`alignloop.scoring`: reward model, classifier, `module:function` such as a verifiable
    exact-match reward, or a weighted sum, each part logged as `reward/<name>`) -> `RewardTransform`;
 3. log-probs before the update and the reference's (`ref_model`, or the starting policy: a frozen copy, or with
    LoRA the adapter's starting values); with one optimizer step per update the training forward itself gives them;
 4. the sequence reward (the score, minus β·Σ_t KL_t when the KL is in the reward) and its advantage, one number per
    completion put on each of its tokens (`alignloop.losses`):
      reinforce  A = R − b(x): b a moving average of past batches' mean reward, or a learned baseline (a value head
                 on the policy's trunk read at the last prompt token, regressed on R; `baseline`);
      rloo       A_i = R_i − mean of the other K−1 rewards of its prompt (Ahmadian et al. 2024);
      grpo       A_i = (R_i − mean_group) / (std_group + ε) (Shao et al. 2024);
      dr_grpo    A_i = R_i − mean_group, token sums divided by a constant (Liu et al. 2025);
 5. `num_iterations` × `num_mini_batches` optimizer steps of the clipped ratio objective (PPO's surrogate; with one
    step per update the ratio is 1 and it is the plain policy gradient), + β·k3 per token when the KL is a loss term,
    each minibatch's token losses aggregated as `loss_aggregation` says over the whole global minibatch (so
    gradient accumulation and the number of processes do not change the step);
 6. metrics (`reward/*`, `objective/kl`, `loss/policy`, `loss/kl`, `policy/clipfrac`, `group/zero_std_share`,
    `time/generate|score|train`, ...).
Then the loop PPO runs too (`alignloop.rl.run_updates`): log, sample table, callbacks, reward threshold,
reward-hacking guard, checkpoints; `resume_from` continues exactly (weights, optimizer, schedule, baseline, RNG,
prompt stream).

KL to the reference (`kl_in`): "reward" (RLOO's and REINFORCE's form: R = score − β·Σ_t KL_t with `kl_estimator`,
the completion is one action) or "loss" (GRPO's: β·k3 per token added to the loss, k3 = π_ref/π − log(π_ref/π) − 1,
an unbiased non-negative estimate whose gradient pulls towards the reference). `objective/kl` is in both cases the
per-sequence sum of `kl_estimator` (k1 by default) between the policy before the update and the reference.

Process supervision (`reward_granularity="process"`; DeepSeekMath, Shao et al. 2024, §4.1.3): the reward scores
each reasoning step (a process reward model, or a step function `module:function` fn(prompts, step_lists) ->
list[list[float]]; `alignloop.rl.step_rewards`: steps split on newlines, each reward on the token that ends its
step, the last step on the response's last token, a response without a step gets its outcome score). Step 4 then
works per step (`alignloop.losses.critic_free`): with the KL in the reward each step pays β·Σ KL of its own tokens
(`step_kl_rewards`); the step rewards of a group are normalised together (grpo: (r − mean)/std over all the group's
steps; dr_grpo: r − mean), or get the leave-one-out mean of the other completions' step rewards (rloo) or a moving
average of past batches' mean step reward (reinforce) as their baseline; and each token's advantage is the sum of
the advantages of the steps ending at or after it (`step_advantages_to_tokens`), so a step is credited with its own
reward and the later ones. `scores` and `reward/mean` are then each response's summed step rewards;
`reward/raw_mean` the reward's own whole-response score; `reward/steps_mean` and `reward/steps_per_response` the mean
step score and steps per response. With one step per completion this is exactly the outcome form.

Choices: dropout is off in every model (as in PPO); log-probs use the sampling temperature; a group whose rewards are
all equal has advantage exactly 0 (no NaN; counted in `group/zero_std_share`); the learning rate is scheduled per
update.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignloop.errors import ConfigError
from alignloop.losses import (
    AGGREGATIONS,
    MovingAverageBaseline,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    reinforce_advantages,
    rloo_advantages,
    sequence_kl_reward,
    token_loss_weights,
)
from alignloop.losses.critic_free import (
    grpo_step_advantages,
    reinforce_step_advantages,
    rloo_step_advantages,
    step_advantages_to_tokens,
    step_kl_rewards,
)
from alignloop.models import ActorCritic, CausalLMWithValueHead, model_forward
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
from alignloop.training.guard import SampleTable
from alignloop.training.loop import make_accelerator, seed_everything, sync_context
from alignloop.training.run import TrainResult, save_final

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce")
# what each estimator does when the config leaves it open (None): the papers' own choices
DEFAULT_KL_IN = {"grpo": "loss", "dr_grpo": "loss", "rloo": "reward", "reinforce": "reward"}
DEFAULT_AGGREGATION = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                       "rloo": "seq-mean-token-sum", "reinforce": "seq-mean-token-sum"}


@dataclass
class GRPOConfig(OnlineRLArgs):
    """Critic-free RL settings: the fields every online trainer shares (`alignloop.rl.OnlineRLArgs`: models,
    rollouts, reward, KL, stop rules, guard, LoRA, logging, checkpoints) and these. Every field is also a flag of
    `alignloop grpo` / `alignloop rloo` and a YAML key. `rollout_batch_size` counts prompts; each update trains on
    rollout_batch_size × num_generations completions."""
    output_dir: str = field(default="grpo-output", metadata={"help": "Metrics, samples, checkpoints, final model."})
    estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce"] = field(default="grpo", metadata={
        "help": "Advantage: grpo (group mean and std), dr_grpo (group mean, no std; constant length "
                "normalisation), rloo (leave-one-out mean of the other completions), reinforce (a baseline)."})
    num_generations: int = field(default=4, metadata={
        "help": "K: completions sampled per prompt (a group). >= 2 for grpo, dr_grpo and rloo."})
    num_iterations: int = field(default=1, metadata={
        "help": "μ: passes over each update's completions (GRPO's inner steps; > 1 makes the ratio clip matter)."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches (optimizer steps) per pass."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip ε (ε_low)."})
    cliprange_high: float | None = field(default=None, metadata={
        "help": "Upper clip ε_high (DAPO's clip-higher; None = cliprange)."})
    kl_in: Literal["reward", "loss"] | None = field(default=None, metadata={
        "help": "Where the KL to the reference goes: reward (R − β·Σ KL_t, kl_estimator) or loss (β·k3 per token); "
                "None = the estimator's paper: loss for grpo/dr_grpo, reward for rloo/reinforce. Note: grpo's std "
                "scaling with the KL in the reward makes a group of equal scores differ by ±1 on its KL alone, "
                "whatever β (β cancels in (R − mean)/std)."})
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                              "seq-mean-token-sum-norm"] | None = field(default=None, metadata={
        "help": "How token losses become the loss: token-mean (DAPO), seq-mean-token-mean (GRPO), "
                "seq-mean-token-sum (REINFORCE/RLOO: sequence log-prob × advantage), seq-mean-token-sum-norm "
                "(Dr. GRPO: token sums ÷ max_new_tokens); None = the estimator's paper."})
    scale_rewards: bool | None = field(default=None, metadata={
        "help": "Divide group-centred rewards by the group's std (None: yes for grpo, no for dr_grpo)."})
    baseline: Literal["moving_average", "learned"] = field(default="moving_average", metadata={
        "help": "reinforce's baseline b(x): moving_average of past batches' mean reward (0 before the first "
                "update), or learned (a value head at the last prompt token, regressed on the reward)."})
    baseline_decay: float = field(default=0.9, metadata={"help": "Decay of the moving-average baseline."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the learned baseline's squared error."})
    reward_granularity: Literal["outcome", "process"] = field(default="outcome", metadata={
        "help": REWARD_GRANULARITY_HELP})
    step_reward: Literal["score", "delta"] = field(default="score", metadata={"help": STEP_REWARD_HELP})

    def __post_init__(self):
        super().__post_init__()
        check_reward_granularity(self)
        if self.step_reward == "delta":
            raise ConfigError("step_reward='delta' is PPO's: the critic-free estimators normalise each step reward "
                              "over the group, and a baseline taken from negative increments pays every extra step; "
                              "use step_reward='score' (DeepSeekMath's process supervision)")
        if self.reward_granularity == "process" and self.learned_baseline:
            raise ConfigError("reward_granularity='process' with reinforce takes baseline='moving_average' (a learned "
                              "baseline is one value per prompt, regressed on whole-response rewards)")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator: expected one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.num_generations < (1 if self.estimator == "reinforce" else 2):
            raise ConfigError(f"num_generations must be >= 2 for {self.estimator} (a group's baseline comes from its "
                              f"other completions), got {self.num_generations}")
        if self.num_iterations < 1 or self.num_mini_batches < 1:
            raise ConfigError("num_iterations and num_mini_batches must be >= 1")
        if self.loss_aggregation is not None and self.loss_aggregation not in AGGREGATIONS:
            raise ConfigError(f"loss_aggregation: expected one of {', '.join(AGGREGATIONS)}")
        if self.kl_in not in (None, "reward", "loss"):
            raise ConfigError(f"kl_in: expected reward or loss, got {self.kl_in!r}")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ConfigError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.cliprange <= 0 or (self.cliprange_high is not None and self.cliprange_high <= 0) or self.vf_coef < 0:
            raise ConfigError("cliprange and cliprange_high must be > 0 and vf_coef >= 0")
        if self.baseline == "learned" and self.estimator != "reinforce":
            raise ConfigError(f"baseline='learned' is reinforce's baseline; {self.estimator} takes its baseline from "
                              f"the group (use estimator='reinforce')")
        if self.scale_rewards is not None and self.estimator not in ("grpo", "dr_grpo"):
            raise ConfigError(f"scale_rewards applies to grpo and dr_grpo, not {self.estimator}")

    @property
    def kl_placement(self) -> str:
        return self.kl_in or DEFAULT_KL_IN[self.estimator]

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation or DEFAULT_AGGREGATION[self.estimator]

    @property
    def std_scaling(self) -> bool:
        return self.scale_rewards if self.scale_rewards is not None else self.estimator == "grpo"

    @property
    def learned_baseline(self) -> bool:
        return self.estimator == "reinforce" and self.baseline == "learned"


@dataclass
class GRPOExperience(ExperienceAccess):
    """One update's batch on this process, as `GRPOTrainer(callbacks=[fn])` hands it to `fn` after the update.
    B = this process's completions (prompts × K, a prompt's K adjacent), R = the longest response."""
    step: int
    rollout: Rollout
    prompts: list[str]                        # [B]
    responses: list[str]                      # [B]
    raw_scores: torch.Tensor                  # [B] the reward's output (Σ weight · part)
    scores: torch.Tensor                      # [B] after normalisation, clipping, no-EOS penalty
    reward_parts: dict[str, torch.Tensor]     # {name: [B]}
    gold_scores: torch.Tensor | None          # [B]
    old_logprobs: torch.Tensor                # [B,R] before the update (temperature-scaled)
    ref_logprobs: torch.Tensor                # [B,R]
    kl: torch.Tensor                          # [B,R] per-token `kl_estimator` (old vs reference)
    sequence_rewards: torch.Tensor            # [B] R: the score, minus β·Σ KL when the KL is in the reward
                                              # (process: Σ of the step rewards, each minus its tokens' β·KL)
    baselines: torch.Tensor | None            # [B] reinforce's b(x)
    advantages: torch.Tensor                  # [B] one per completion (process: [B,R] one per token)
    metrics: dict[str, float] = field(default_factory=dict)
    steps: StepRewards | None = None          # process supervision: the step rewards and their step-end tokens
    step_advantages: torch.Tensor | None = None   # [B,S] process supervision: each step's advantage


@dataclass
class _Forward:
    """A micro-batch's forward sliced to its response: R' = the rows' longest response, P' = trimmed prompt width."""
    rows: torch.Tensor
    input_ids: torch.Tensor      # [b, P'+R']
    attention_mask: torch.Tensor
    p: int
    r: int
    logprobs: torch.Tensor       # [b, R'] at the sampling temperature (with grad when trained on)
    values: torch.Tensor | None  # [b] the learned baseline at the last prompt token


class GRPOTrainer:
    """`GRPOTrainer(model, reward, args, train_dataset, tokenizer=None, ref_model=None, gold_reward=None,
    reward_tokenizer=None, sampler=None, accelerator=None, callbacks=()).train() -> TrainResult`; the arguments are
    PPOTrainer's (see `alignloop.trainers.ppo`)."""

    def __init__(self, model: nn.Module | str | None = None, reward: Any = None, args: GRPOConfig | None = None,
                 train_dataset: Any = None, tokenizer=None, ref_model: nn.Module | None = None,
                 gold_reward: Any = None, reward_tokenizer=None, sampler: Sampler | None = None, accelerator=None,
                 callbacks: Sequence[Callable[[GRPOExperience], Any]] = ()):
        self.args = cfg = args if args is not None else GRPOConfig()
        self.acc = accelerator or make_accelerator(cfg.mixed_precision)
        self.coll = Collective(self.acc)
        check_batch_sizes(cfg, self.acc.num_processes, cfg.num_generations,
                          cfg.num_mini_batches * cfg.gradient_accumulation_steps)
        seed_everything(cfg.seed, self.acc.process_index)
        name = cfg.estimator.upper()
        policy, self.tokenizer = load_policy(model if model is not None else cfg.model, tokenizer, cfg, name,
                                             value_head=cfg.learned_baseline)
        self.scorer, self.gold_scorer = build_scorers(reward, gold_reward, reward_tokenizer, cfg, self.tokenizer,
                                                      self.acc.device, name,
                                                      steps=cfg.reward_granularity == "process")
        if cfg.learned_baseline:
            self.model = ActorCritic(policy if isinstance(policy, CausalLMWithValueHead)
                                     else CausalLMWithValueHead(policy))
        else:
            self.model = policy.lm if isinstance(policy, CausalLMWithValueHead) else policy
        self.model.to(self.acc.device).eval()  # dropout off for the whole run
        self.lm = self.model.lm if cfg.learned_baseline else self.model
        self.ref_model = frozen_reference(self.lm, ref_model if ref_model is not None else cfg.ref_model,
                                          self.acc.device, cfg.dtype)
        speed_up_models(cfg, self.model, self.ref_model, self.scorer, self.gold_scorer)
        self.transform = cfg.reward_transform()
        self.baseline = MovingAverageBaseline(cfg.baseline_decay)
        self.sampler = sampler or HFSampler(self.lm, self.tokenizer, cpu_threads=cfg.generation_threads)
        self.sampling = cfg.sampling_params(self.tokenizer)
        self.prompts, self.prompt_ids = encoded_prompts(train_dataset, cfg, self.tokenizer, name)
        self.ddp_model, self.optimizer, self.scheduler = prepared_optimization(self.model, cfg, self.acc)
        self.guard = cfg.guard()
        self.samples = SampleTable(cfg.output_dir, cfg.sample_rows)
        self.callbacks = list(callbacks)
        self.state: dict[str, Any] = new_state()
        self.history: list[dict] = []

    # ------------------------------------------------------------------ one update, step by step
    def _update(self) -> GRPOExperience:
        cfg, K = self.args, self.args.num_generations
        t_start = time.perf_counter()
        local = [i for i in local_prompts(self.state, cfg, len(self.prompts), self.acc) for _ in range(K)]
        rollout = self.sampler.generate([self.prompt_ids[i] for i in local], self.sampling)   # 1. generate
        rollout.to(self.acc.device)
        t_gen = time.perf_counter()
        process = cfg.reward_granularity == "process"
        scored = score_rollout(self.scorer, self.gold_scorer, self.tokenizer, [self.prompts[i] for i in local],
                               rollout, steps=process)                                        # 2. score
        scores = self.transform(scored.raw, rollout.stopped,
                                self.coll.gather(scored.raw) if self.coll.world > 1 else None)
        steps = step_rewards(scored, scores, rollout, self.tokenizer, cfg) if process else None
        if steps is not None:
            scores = steps.totals()
        t_score = time.perf_counter()
        B = len(local)
        orders = [torch.randperm(B, device=self.acc.device) for _ in range(cfg.num_iterations)]
        single = cfg.num_iterations == 1 and cfg.num_mini_batches == 1 and cfg.gradient_accumulation_steps == 1
        old, cached = self._old_and_reference(rollout, orders[0], single)                     # 3. log-probs
        exp = self._experience(rollout, scored, scores, old, steps)                           # 4. advantages
        stats = defaultdict(list)
        for order in orders:                                                                  # 5. optimizer steps
            for micro in minibatch_layout(order, cfg.num_mini_batches, cfg.gradient_accumulation_steps):
                self._train_minibatch(exp, micro, cached, stats)
                cached = None
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        t_train = time.perf_counter()
        times = {"generate": t_gen - t_start, "score": t_score - t_gen, "train": t_train - t_score,
                 "update": t_train - t_start}
        exp.metrics = {**reward_metrics(self.coll, scores, scored), **self._metrics(exp, stats, lr),   # 6. metrics
                       **perf_metrics(self.coll, rollout, times, cfg.rollout_batch_size * K)}
        if steps is not None:
            exp.metrics.update(step_metrics(self.coll, steps))
        return exp

    def _forward(self, model: nn.Module, rollout: Rollout, rows: torch.Tensor) -> _Forward:
        """Forward the rollout's `rows` (without their all-pad columns): response log-probs and, with a learned
        baseline, its value at the last prompt token."""
        ids, am, p, r = rollout.rows(rows)
        values = None
        if self.args.learned_baseline:
            logits, token_values = model(ids, am)
            values = token_values[:, p - 1].float()
        else:
            logits = model_forward(model, ids, am)
        return _Forward(rows, ids, am, p, r, response_logprobs_from(logits, ids, p, r, self.args.temperature)[1],
                        values)

    def _old_and_reference(self, rollout: Rollout, order: torch.Tensor, single: bool):
        """Step 3 -> ({old_logprobs, ref_logprobs}: [B,R], 0 on padding; old_values [B] or None; the forward to reuse
        or None). With one optimizer step per update (`single`) the forward that computes the old log-probs is the
        training forward (with grad, through the prepared model): ratio exactly 1, one forward saved."""
        B, R = rollout.response_ids.shape
        out = {k: torch.zeros(B, R, device=self.acc.device) for k in ("old_logprobs", "ref_logprobs")}
        values = torch.zeros(B, device=self.acc.device) if self.args.learned_baseline else None
        cached = None
        layout = minibatch_layout(order, self.args.num_mini_batches, self.args.gradient_accumulation_steps)
        micro = [order] if single else [rows for mb in layout for rows in mb]
        for rows in micro:
            if single:
                f = cached = self._forward(self.ddp_model, rollout, rows)
            else:
                with torch.no_grad():
                    f = self._forward(self.model, rollout, rows)
            out["old_logprobs"][rows, :f.r] = f.logprobs.detach()
            out["ref_logprobs"][rows, :f.r] = reference_logprobs(self.acc, self.lm, self.ref_model, f.input_ids,
                                                                 f.attention_mask, f.p, f.r, self.args.temperature)
            if values is not None:
                values[rows] = f.values.detach()
        maskf = rollout.response_mask.float()
        return {**{k: v * maskf for k, v in out.items()}, "old_values": values}, cached

    def _experience(self, rollout: Rollout, scored: ScoredRollout, scores: torch.Tensor, old,
                    steps: StepRewards | None = None) -> GRPOExperience:
        """Step 4: the sequence reward and each completion's advantage (process supervision: `_step_experience`)."""
        cfg, mask = self.args, rollout.response_mask
        kl = kl_penalty(old["old_logprobs"], old["ref_logprobs"], cfg.kl_estimator) * mask.float()
        if steps is not None:
            return self._step_experience(rollout, scored, scores, old, steps, kl)
        rewards = sequence_kl_reward(scores, kl, mask, cfg.kl_coef) if cfg.kl_placement == "reward" else scores
        baselines = None
        if cfg.estimator == "rloo":
            advantages = rloo_advantages(rewards, cfg.num_generations)
        elif cfg.estimator in ("grpo", "dr_grpo"):
            advantages = grpo_advantages(rewards, cfg.num_generations, "std" if cfg.std_scaling else "none")
        else:
            if cfg.learned_baseline:
                baselines = old["old_values"]
            else:  # the baseline of past batches only (0 before the first): it must not depend on these samples
                value = self.baseline.value
                baselines = torch.full_like(rewards, 0.0 if value is None else value)
                self.baseline.update(self.coll.gather(rewards).mean().item())
            advantages = reinforce_advantages(rewards, baselines)
        return GRPOExperience(step=self.state["update"] + 1, rollout=rollout, prompts=scored.prompts,
                              responses=scored.responses, raw_scores=scored.raw, scores=scores,
                              reward_parts=scored.parts, gold_scores=scored.gold, old_logprobs=old["old_logprobs"],
                              ref_logprobs=old["ref_logprobs"], kl=kl, sequence_rewards=rewards, baselines=baselines,
                              advantages=advantages)

    def _step_experience(self, rollout: Rollout, scored: ScoredRollout, scores: torch.Tensor, old,
                         steps: StepRewards, kl: torch.Tensor) -> GRPOExperience:
        """Step 4 with step rewards: each step's reward (minus β·KL of its tokens when the KL is in the reward), its
        advantage by the estimator's process form, and each token's advantage = the sum of the advantages of the
        steps ending at or after it."""
        cfg, mask, K = self.args, rollout.response_mask, self.args.num_generations
        if cfg.kl_placement == "reward":
            rewards = step_kl_rewards(steps.rewards, steps.mask, steps.ends, kl, mask, cfg.kl_coef)
        else:
            rewards = steps.rewards
        baselines = None
        if cfg.estimator == "rloo":
            step_adv = rloo_step_advantages(rewards, steps.mask, K)
        elif cfg.estimator in ("grpo", "dr_grpo"):
            step_adv = grpo_step_advantages(rewards, steps.mask, K, "std" if cfg.std_scaling else "none")
        else:   # a moving average of past batches' mean STEP reward (0 before the first)
            value = self.baseline.value
            baselines = torch.full((len(rewards),), 0.0 if value is None else value, device=rewards.device)
            step_adv = reinforce_step_advantages(rewards, steps.mask, baselines[:, None])
            total_n = self.coll.sum(torch.stack([(rewards * steps.mask).sum(), steps.mask.sum().float()]))
            self.baseline.update((total_n[0] / total_n[1].clamp(min=1.0)).item())
        advantages = step_advantages_to_tokens(step_adv, steps.mask, steps.ends, mask)
        return GRPOExperience(step=self.state["update"] + 1, rollout=rollout, prompts=scored.prompts,
                              responses=scored.responses, raw_scores=scored.raw, scores=scores,
                              reward_parts=scored.parts, gold_scores=scored.gold, old_logprobs=old["old_logprobs"],
                              ref_logprobs=old["ref_logprobs"], kl=kl, sequence_rewards=(rewards * steps.mask).sum(1),
                              baselines=baselines, advantages=advantages, steps=steps, step_advantages=step_adv)

    def _train_minibatch(self, exp: GRPOExperience, micro: list[torch.Tensor], cached: _Forward | None,
                         stats: dict[str, list[float]]) -> None:
        """Accumulate the micro-batches' gradients (weights from the global minibatch's token and sequence counts),
        clip, step."""
        cfg, acc, mask = self.args, self.acc, exp.response_mask
        # [valid tokens, sequences] of the minibatch over every process (on the rollout's device: a GPU run too)
        per_micro = [torch.stack([mask[rows].sum(), mask.new_tensor(len(rows), dtype=torch.long)]) for rows in micro]
        counts = self.coll.sum(torch.stack(per_micro).sum(0).float())
        n_tok, n_seq = counts[0].clamp(min=1), counts[1].clamp(min=1)
        for i, rows in enumerate(micro):
            with sync_context(acc, self.ddp_model, i, len(micro)):
                f = cached if cached is not None else self._forward(self.ddp_model, exp.rollout, rows)
                cached = None
                m = mask[rows, :f.r]
                loss_tok, terms = self._token_loss(f, exp)
                w = token_loss_weights(m, cfg.aggregation, n_tok, n_seq, cfg.max_new_tokens)
                loss = (loss_tok * w).sum()
                if f.values is not None:   # the learned baseline's regression, a mean over the global minibatch
                    v_loss = 0.5 * (f.values - exp.sequence_rewards[rows]).pow(2)
                    loss = loss + cfg.vf_coef * v_loss.sum() / n_seq
                    terms["baseline_loss"] = v_loss[:, None].expand_as(m)
                acc.backward(loss * self.coll.world)   # DDP averages gradients over processes
            for key, x in terms.items():
                stats[key].append(masked_mean(x.detach(), m).item())
        if cfg.max_grad_norm:
            stats["grad_norm"].append(float(acc.clip_grad_norm_(self.ddp_model.parameters(), cfg.max_grad_norm)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _token_loss(self, f: _Forward, exp: GRPOExperience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token loss [b,R'] of a micro-batch: the clipped surrogate with the completion's advantage on each
        token, + β·k3 when the KL is a loss term."""
        cfg, rows, r = self.args, f.rows, f.r
        if exp.advantages.dim() == 2:   # process supervision: one advantage per token
            adv = exp.advantages[rows, :r]
        else:
            adv = exp.advantages[rows, None].expand(-1, r)
        pg, clipped, approx = ppo_policy_loss(f.logprobs, exp.old_logprobs[rows, :r], adv, cfg.cliprange,
                                              clip_range_high=cfg.cliprange_high)
        terms = {"pg_loss": pg, "clipfrac": clipped, "approxkl": approx,
                 "ratio": torch.exp(f.logprobs.detach() - exp.old_logprobs[rows, :r])}
        loss = pg
        if cfg.kl_placement == "loss" and cfg.kl_coef:
            kl = kl_penalty(f.logprobs, exp.ref_logprobs[rows, :r], "k3")
            loss = loss + cfg.kl_coef * kl
            terms["kl_loss"] = kl
        return loss, terms

    def _metrics(self, exp: GRPOExperience, stats: dict[str, list[float]], lr: float) -> dict[str, float]:
        cfg, K = self.args, self.args.num_generations
        mean = lambda key: sum(stats[key]) / max(len(stats[key]), 1)   # noqa: E731 - a local shorthand
        rewards = self.coll.gather(exp.sequence_rewards)
        groups = rewards.view(-1, K) if K > 1 else None
        if exp.advantages.dim() == 2:   # process supervision: over every real token of the batch
            mask, reduce = exp.response_mask, self.coll.reduce
            adv_mean = masked_mean(exp.advantages, mask, reduce=reduce).item()
            adv_std = masked_var(exp.advantages, mask, reduce=reduce).clamp(min=0).sqrt().item()
        else:
            adv_mean = self.coll.gather(exp.advantages).mean().item()
            adv_std = self.coll.gather(exp.advantages).std(unbiased=False).item()
        metrics = {
            "objective/kl": self.coll.gather(exp.kl.sum(1)).mean().item(),
            "objective/kl_coef": cfg.kl_coef,
            "objective/sequence_reward": rewards.mean().item(),
            "advantage/mean": adv_mean,
            "advantage/std": adv_std,
            "loss/policy": mean("pg_loss"),
            "policy/clipfrac": mean("clipfrac"),
            "policy/approxkl": mean("approxkl"),
            "policy/ratio_mean": mean("ratio"),
            "optim/lr": lr,
            "optim/grad_norm": mean("grad_norm"),
        }
        if groups is not None and exp.step_advantages is not None:   # groups whose step advantages are all 0
            zero = (exp.step_advantages.view(-1, K * exp.step_advantages.shape[1]) == 0).all(1).float()
            metrics["group/zero_std_share"] = self.coll.gather(zero).mean().item()
            metrics["group/reward_std"] = groups.std(1).mean().item()
        elif groups is not None:
            metrics["group/zero_std_share"] = (groups.max(1).values == groups.min(1).values).float().mean().item()
            metrics["group/reward_std"] = groups.std(1).mean().item()
        if stats.get("kl_loss"):
            metrics["loss/kl"] = mean("kl_loss")
        if stats.get("baseline_loss"):
            metrics["loss/baseline"] = mean("baseline_loss")
        if exp.baselines is not None:
            metrics["baseline/mean"] = self.coll.gather(exp.baselines).mean().item()
        return metrics

    # ------------------------------------------------------------------ the run
    def train(self) -> TrainResult:
        """Run updates until `total_updates`, the reward threshold or the guard stops; checkpoint and save."""
        loop = UpdateLoop(self.args.estimator, self._update, self.save_checkpoint, self._load, self._sample_raw_scores,
                          lambda: save_final(self.acc, self.lm, self.tokenizer, self.args.output_dir), self.transform,
                          self.guard, self.samples, self.callbacks)
        return train_online(loop, self.args, self.acc, self.state, self.history)

    def _sample_raw_scores(self) -> torch.Tensor:
        """One batch of prompts from the starting policy, scored: raw scores over every process (reward fitting)."""
        local = local_prompts(self.state, self.args, len(self.prompts), self.acc)
        rollout = self.sampler.generate([self.prompt_ids[i] for i in local], self.sampling)
        return self.coll.gather(score_rollout(self.scorer, self.gold_scorer, self.tokenizer,
                                              [self.prompts[i] for i in local], rollout).raw)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        return save_online_checkpoint(self.args, self.acc, self.state, self.model, self.optimizer, self.scheduler,
                                      self.transform, self.guard,
                                      baseline=self.baseline.state_dict())

    def _load(self, path: Path) -> None:
        saved = load_online_checkpoint(path, self.acc, self.state, self.model, self.optimizer, self.scheduler,
                                       self.transform, self.guard)
        self.baseline.load_state_dict(saved["baseline"])


@dataclass
class RLOOConfig(GRPOConfig):
    """`GRPOConfig` with RLOO's defaults (`alignloop rloo`): the leave-one-out baseline, KL in the reward, the
    sequence log-prob sum times the advantage."""
    output_dir: str = field(default="rloo-output", metadata={"help": "Metrics, samples, checkpoints, final model."})
    estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce"] = field(default="rloo", metadata={
        "help": "Advantage: rloo (leave-one-out mean of the other completions), grpo, dr_grpo, reinforce."})
