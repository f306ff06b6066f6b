"""PPO with a KL penalty to a frozen reference (Ziegler et al. 2019; Ouyang et al. 2022), read top to bottom.

    trainer = PPOTrainer(model=policy_or_path, reward=reward_model_or_fn, args=PPOConfig(...),
                         train_dataset=prompts, tokenizer=tok)
    trainer.train()

One update (`PPOTrainer.train`):
 1. generate: sample responses for `rollout_batch_size` prompts with the `Sampler` (KV cache, eval mode);
 2. score: reward model / classifier / function at the response's last real token -> normalise, clip, no-EOS penalty;
 3. old log-probs and values (policy, no grad), reference log-probs (frozen copy, or the LoRA base with the adapter
    disabled); per-token rewards r_t = -β·KL_t, plus the score on the last real response token;
 4. GAE(γ, λ) -> advantages (whitened over the valid tokens of the global batch) and returns;
 5. `num_ppo_epochs` × `num_mini_batches` optimizer steps (each minibatch split into `gradient_accumulation_steps`
    micro-batches): loss = L_policy(clipped surrogate) + vf_coef·L_value(clipped) − ent_coef·H, i.e. the objective
    L_clip − c1·L_VF + c2·H maximised; gradient-norm clipping; optional early stop of the update when approx-KL
    passes `target_kl`;
 6. KL coefficient update (fixed or adaptive), metrics, reward-hacking guard, sample table, checkpoint, stop tests.

Choices (documented, as the checklist asks):
- Dropout is off in every model for the whole run (policy included, as in OpenAI's lm-human-preferences), so the
  first minibatch of the first epoch has ratio = 1: the old log-probs are computed with the very forward pass the
  training step makes (same micro-batches, same shapes), so approx-KL = 0 and clipfrac = 0 there exactly.
- Training log-probs use the sampling temperature; `old_logprobs` are those of the temperature-scaled full
  distribution (`Rollout.policy_logprobs`' definition). With top-k/top-p the sampled distribution is truncated; PPO
  still uses the full one (the sampling log-probs are kept in `Rollout.logprobs`).
- Losses are token-level averages: each micro-batch's per-token sums are divided by the number of valid tokens of the
  whole minibatch over all processes (× world size, since DDP averages gradients), so gradient accumulation and
  process count do not change the loss.
- KL metric: `objective/kl` is the per-sequence sum of the same estimator the reward uses (`kl_estimator`), averaged
  over sequences; the adaptive controller is fed that number.
- The learning rate is scheduled per update (not per minibatch), so early stopping does not shift the schedule.
- Reward threshold stop: moving average (over `reward_threshold_window` updates) of the **raw** mean score.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from alignloop.errors import ConfigError, UserError
from alignloop.losses import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae, kl_penalty,
                              logprobs_from_logits, masked_mean, masked_sum, masked_whiten, ppo_policy_loss,
                              ppo_value_loss)
from alignloop.models import (CausalLMWithValueHead, LoraOptions, has_adapter, model_forward,
                              reference_mode, unwrap_model)
from alignloop.rollout import HFSampler, Rollout, Sampler, SamplingParams
from alignloop.scoring import RewardTransform, build_scorer
from alignloop.training.guard import RewardHackingGuard, RewardHackingWarning, SampleTable


@dataclass
class PPOConfig:
    # --- models and data (used by the CLI; from Python, pass objects to PPOTrainer instead) ---
    model_name_or_path: str | None = field(default=None, metadata={"help": "Policy: hub id or local folder."})
    reward_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Reward model (scalar-head sequence classifier) folder or hub id."})
    gold_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Optional held-out/gold reward model, never trained on; used by the reward-hacking guard."})
    dataset: str | None = field(default=None, metadata={"help": "Prompt data (file or hub id) for the CLI."})
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
    adam_eps: float = field(default=1e-5, metadata={"help": "Adam epsilon (1e-5 as in the original code)."})
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
    positive_label: int = field(default=1, metadata={"help": "Positive class of a multi-label classifier reward."})
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
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter; the reference is the base "
                                                            "model with the adapter disabled (no second copy)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA target modules."})
    # --- logging and checkpoints ---
    tensorboard: bool = field(default=True, metadata={"help": "Write TensorBoard logs too."})
    progress_bar: bool = field(default=True, metadata={"help": "Show a progress bar."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N updates (0 = only at the end)."})
    keep_last: int | None = field(default=2, metadata={"help": "Checkpoints kept (None = all)."})
    resume_from: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    save_final: bool = field(default=True, metadata={"help": "Save OUTPUT_DIR/final in HF format "
                                                             "(+ value_head.safetensors)."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "torch threads for training on CPU (None = leave torch's setting, normally every core)."})
    generation_threads: int | None = field(default=0, metadata={
        "help": "torch threads while sampling on CPU: 0 = auto (1 for models narrower than 256, whose decode ops are "
                "too small to gain from more; every thread otherwise); N = N; None = leave as is."})
    fused_gelu: bool = field(default=True, metadata={
        "help": "Run GPT-2's gelu_new as PyTorch's fused tanh GELU (same function, faster), and attention in fp32 under CPU bf16 autocast (alignloop.models.fast)."})

    def __post_init__(self):
        if self.rollout_batch_size < 1 or self.num_mini_batches < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("rollout_batch_size, num_mini_batches and gradient_accumulation_steps must be >= 1")
        if self.num_ppo_epochs < 1 or self.total_updates < 1:
            raise ConfigError("num_ppo_epochs and total_updates must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")

    def sampling_params(self, tokenizer) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, eos_token_id=tokenizer.eos_token_id if tokenizer else None,
                              stop_token_ids=list(self.stop_token_ids), stop_strings=list(self.stop_strings),
                              pad_token_id=tokenizer.pad_token_id if tokenizer else None)


class ActorCritic(nn.Module):
    """forward(input_ids, attention_mask) -> (logits [B,T,V], values [B,T]): the policy's value head, or a
    separate critic. `lm` is the causal LM that samples."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.policy, self.critic = policy, critic

    @property
    def lm(self) -> nn.Module:
        return self.policy.lm if isinstance(self.policy, CausalLMWithValueHead) else self.policy

    def forward(self, input_ids, attention_mask):
        if self.critic is None:
            out = self.policy(input_ids, attention_mask)
            return out.logits, out.values
        return model_forward(self.lm, input_ids, attention_mask), self.critic(input_ids, attention_mask).float()


def _prompt_texts(dataset, tokenizer) -> list[str]:
    """Strings from: list[str], list[{"prompt": str | messages}], or a datasets.Dataset with a prompt column."""
    out = []
    for i, row in enumerate(dataset):
        p = row.get("prompt") if isinstance(row, dict) else row
        if isinstance(p, list) and p and isinstance(p[0], dict):
            p = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        if not isinstance(p, str) or not p:
            raise UserError(f"train_dataset row {i}: expected a non-empty prompt string (or chat messages), got "
                            f"{type(p).__name__}")
        out.append(p)
    if not out:
        raise UserError("train_dataset is empty")
    return out


class PPOTrainer:
    def __init__(self, model: nn.Module | str, reward: nn.Module | Callable | str, args: PPOConfig,
                 train_dataset: Sequence, tokenizer=None, ref_model: nn.Module | None = None,
                 gold_reward: nn.Module | Callable | str | None = None, reward_tokenizer=None,
                 sampler: Sampler | None = None, accelerator=None):
        from alignloop.models import RewardModel, load_tokenizer
        from alignloop.training import make_accelerator, seed_everything

        self.args = cfg = args
        self.acc = accelerator or make_accelerator(cfg.mixed_precision)
        world = self.acc.num_processes
        if cfg.rollout_batch_size % world:
            raise ConfigError(f"rollout_batch_size ({cfg.rollout_batch_size}) must be divisible by the number of "
                              f"processes ({world})")
        if cfg.rollout_batch_size // world < cfg.num_mini_batches * cfg.gradient_accumulation_steps:
            raise ConfigError(f"each process has {cfg.rollout_batch_size // world} rollouts per update, fewer than "
                              f"num_mini_batches × gradient_accumulation_steps = "
                              f"{cfg.num_mini_batches * cfg.gradient_accumulation_steps}")
        seed_everything(cfg.seed, self.acc.process_index)
        lora = LoraOptions(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0,
                           target_modules=cfg.lora_target_modules) if cfg.use_lora else None
        if isinstance(model, str):
            tokenizer = tokenizer or load_tokenizer(model, padding_side="left")
            model = CausalLMWithValueHead.from_pretrained(model, dtype=cfg.dtype, lora=lora)
        elif lora is not None and not has_adapter(model):
            from alignloop.models import apply_lora
            if isinstance(model, CausalLMWithValueHead):
                model.lm = apply_lora(model.lm, lora)
            else:
                model = apply_lora(model, lora)
        if tokenizer is None:
            raise UserError("PPOTrainer needs the policy's tokenizer (tokenizer=...)")
        self.tokenizer = tokenizer
        self.scorer = build_scorer(reward, reward_tokenizer, policy_tokenizer=tokenizer,
                                   positive_label=cfg.positive_label, batch_size=64, dtype=cfg.dtype,
                                   device=self.acc.device)
        self.gold_scorer = build_scorer(gold_reward, policy_tokenizer=tokenizer, positive_label=cfg.positive_label,
                                        batch_size=64, dtype=cfg.dtype, device=self.acc.device)
        reward_model = getattr(self.scorer, "model", None)

        # policy + value function
        critic = None
        if cfg.value_model == "reward":
            if reward_model is None:
                raise ConfigError("value_model='reward' needs a reward model, not a function")
            from alignloop.models import critic_from_reward_model
            critic = critic_from_reward_model(RewardModel(reward_model))
            if isinstance(model, CausalLMWithValueHead):
                model = model.lm
        elif not isinstance(model, CausalLMWithValueHead):
            model = CausalLMWithValueHead(model)
        self.model = ActorCritic(model, critic).to(self.acc.device)
        self.model.eval()  # dropout off for the whole run (see module doc)

        # reference: LoRA base with the adapter off, or a frozen copy
        self.lora = has_adapter(self.model.lm)
        if self.lora:
            self.ref_model = None
        else:
            self.ref_model = (ref_model if ref_model is not None else copy.deepcopy(unwrap_model(self.model.lm)))
            self.ref_model.to(self.acc.device).eval().requires_grad_(False)

        if cfg.fused_gelu:
            from alignloop.models.fast import speed_up
            for m in (self.model, self.ref_model, reward_model, getattr(self.gold_scorer, "model", None)):
                speed_up(m)
        self.transform = RewardTransform(cfg.reward_normalization, cfg.reward_clip, cfg.missing_eos_penalty,
                                         cfg.missing_eos_penalty_mode)
        self.sampler = sampler or HFSampler(self.model.lm, tokenizer, cpu_threads=cfg.generation_threads)
        self.sampling = cfg.sampling_params(tokenizer)

        # data: prompt strings and their token ids (left-truncated)
        self.prompts = _prompt_texts(train_dataset, tokenizer)
        self.prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-cfg.max_prompt_length:]
                           for p in self.prompts]

        from alignloop.training import build_optimizer, build_scheduler
        self.optimizer = build_optimizer(self.model, cfg.learning_rate, cfg.weight_decay, eps=cfg.adam_eps)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, cfg.warmup_updates, cfg.total_updates)
        self.ddp_model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.guard = RewardHackingGuard(cfg.kl_budget, cfg.guard_window, cfg.guard_action, cfg.guard_min_t)
        self.samples = SampleTable(cfg.output_dir, cfg.sample_rows)
        self.state: dict[str, Any] = {"update": 0, "data_epoch": 0, "data_pos": 0, "raw_reward_history": [],
                                      "stop_reason": None}
        self.history: list[dict] = []

    # ------------------------------------------------------------------ helpers
    @property
    def world(self) -> int:
        return self.acc.num_processes

    def _sum_all(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, reduction="sum") if self.world > 1 else x

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(x) if self.world > 1 else x

    def _next_prompt_indices(self) -> list[int]:
        """The global batch of prompt indices (identical on every process), walking shuffled epochs of the data."""
        from alignloop.training import epoch_order
        out = []
        while len(out) < self.args.rollout_batch_size:
            order = epoch_order(len(self.prompts), self.args.seed, self.state["data_epoch"])
            take = order[self.state["data_pos"]:self.state["data_pos"] + self.args.rollout_batch_size - len(out)]
            out += take
            self.state["data_pos"] += len(take)
            if self.state["data_pos"] >= len(self.prompts):
                self.state["data_epoch"] += 1
                self.state["data_pos"] = 0
        return out

    def _ref_logprobs(self, input_ids, attention_mask, P, R) -> torch.Tensor:
        if self.lora:
            with reference_mode(self.model.lm):
                logits = model_forward(self.model.lm, input_ids, attention_mask)
        else:
            logits = model_forward(self.ref_model, input_ids, attention_mask)
        return logprobs_from_logits(logits[:, P - 1:P + R - 1], input_ids[:, P:P + R], self.args.temperature)

    @staticmethod
    def _trim(rollout: Rollout, rows) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """Micro-batch tensors without all-pad columns: (input_ids, attention_mask, P', R', prompt offset)."""
        pm, rm = rollout.prompt_mask[rows], rollout.response_mask[rows]
        p0 = int((~pm).all(0).long().cumprod(0).sum())   # leading prompt columns that are pad in every row
        R = int(rm.any(0).sum())
        ids = torch.cat([rollout.prompt_ids[rows, p0:], rollout.response_ids[rows, :R]], 1)
        mask = torch.cat([pm[:, p0:], rm[:, :R]], 1).long()
        return ids, mask, pm.shape[1] - p0, R, p0

    def _micro_batches(self, order: torch.Tensor) -> list[list[torch.Tensor]]:
        """order [B] -> minibatches, each a list of micro-batch row-index tensors."""
        mbs = order.chunk(self.args.num_mini_batches)
        return [list(mb.chunk(self.args.gradient_accumulation_steps)) for mb in mbs]

    # ------------------------------------------------------------------ one update
    def _score(self, rollout: Rollout, idx: list[int], responses: list[str]):
        prompts = [self.prompts[i] for i in idx]
        raw = self.scorer.score_rollout(rollout, prompts, responses).float()
        gold = self.gold_scorer.score_rollout(rollout, prompts, responses).float() if self.gold_scorer else None
        return raw, gold

    def _fit_reward_normalization(self) -> None:
        """Ziegler et al.: gain and bias so that samples from the starting policy score mean 0, std 1."""
        raws = []
        n = 0
        while n < self.args.normalization_samples:
            g = self._next_prompt_indices()
            local = self._shard(g)
            rollout = self.sampler.generate([self.prompt_ids[i] for i in local], self.sampling)
            raw, _ = self._score(rollout, local, self._decode(rollout))
            raws.append(self._gather(raw))
            n += len(g)
        self.transform.fit(torch.cat(raws)[:self.args.normalization_samples])
        self.state["data_epoch"], self.state["data_pos"] = 0, 0  # training sees the data from the start

    def _shard(self, global_idx: list[int]) -> list[int]:
        from alignloop.training import shard
        return shard(global_idx, self.acc.process_index, self.world)

    def _decode(self, rollout: Rollout) -> list[str]:
        return [self.tokenizer.decode(r[m].tolist(), skip_special_tokens=True)
                for r, m in zip(rollout.response_ids, rollout.response_mask)]

    def train(self) -> list[dict]:
        cfg, acc = self.args, self.acc
        threads = torch.get_num_threads()
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        try:
            return self._train()
        finally:
            torch.set_num_threads(threads)

    def _train(self) -> list[dict]:
        from alignloop.training import MetricsLogger, Progress, resolve_resume
        cfg, acc = self.args, self.acc
        resume = resolve_resume(cfg.resume_from, cfg.output_dir)
        if resume is not None:
            self._load(resume)
        elif cfg.reward_normalization == "fit" and not self.transform.fitted:
            self._fit_reward_normalization()
        logger = MetricsLogger(cfg.output_dir, enabled=acc.is_main_process, tensorboard=cfg.tensorboard,
                               config=asdict(cfg), resume_step=self.state["update"] if resume else None)
        progress = Progress(cfg.total_updates, "ppo", enabled=acc.is_main_process and cfg.progress_bar,
                            start=self.state["update"])
        try:
            while self.state["update"] < cfg.total_updates and self.state["stop_reason"] is None:
                metrics = self._update()
                self.state["update"] += 1
                step = self.state["update"]
                self.history.append(metrics)
                logger.log(metrics, step)
                if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1) and acc.is_main_process:
                    logger.log_text("samples", self._last_table(step), step)
                self._check_stop(metrics, logger, step)
                progress.update(1, f"reward {metrics['reward/mean']:+.3f} kl {metrics['objective/kl']:.3f}")
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save_checkpoint()
        finally:
            progress.close()
            logger.close()
        if cfg.save_every or cfg.save_final:
            self.save_checkpoint()
        if cfg.save_final:
            self.save_model(Path(cfg.output_dir) / "final")
        return self.history

    def _last_table(self, step: int) -> str:
        p, r, s, raw, gold = self._last_samples
        return self.samples.write(step, p, r, s, raw, gold)

    def _check_stop(self, metrics: dict, logger, step: int) -> None:
        cfg = self.args
        hist = self.state["raw_reward_history"]
        hist.append(metrics["reward/raw_mean"])
        window = hist[-cfg.reward_threshold_window:]
        if (cfg.reward_threshold is not None and len(window) == cfg.reward_threshold_window
                and sum(window) / len(window) >= cfg.reward_threshold):
            self.state["stop_reason"] = (f"reward threshold: moving average {sum(window) / len(window):.4f} >= "
                                         f"{cfg.reward_threshold}")
        for msg in self.guard.update(step, metrics["reward/raw_mean"], metrics["objective/kl"],
                                     metrics.get("reward/gold_mean")):
            import warnings
            warnings.warn(msg, RewardHackingWarning, stacklevel=2)
            logger.log_text("guard", msg, step)
        if self.guard.should_stop and self.state["stop_reason"] is None:
            self.state["stop_reason"] = "reward-hacking guard: " + self.guard.alerts[-1][1]
        if self.state["stop_reason"] and self.acc.is_main_process:
            logger.log_text("stop", self.state["stop_reason"], step)

    def _update(self) -> dict[str, float]:
        cfg, acc = self.args, self.acc
        t_start = time.perf_counter()

        # 1. generate --------------------------------------------------------------------------------------------
        idx = self._shard(self._next_prompt_indices())
        rollout = self.sampler.generate([self.prompt_ids[i] for i in idx], self.sampling)
        rollout = _to(rollout, acc.device)
        B, P, R = rollout.response_ids.shape[0], rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
        mask = rollout.response_mask
        t_gen = time.perf_counter()

        # 2. score -----------------------------------------------------------------------------------------------
        responses = self._decode(rollout)
        raw, gold = self._score(rollout, idx, responses)
        scores = self.transform(raw, rollout.stopped, self._gather(raw) if self.world > 1 else None)
        self._last_samples = ([self.prompts[i] for i in idx], responses, scores.tolist(), raw.tolist(),
                              gold.tolist() if gold is not None else None)
        t_score = time.perf_counter()

        # 3. old log-probs and values (in epoch 0's micro-batch layout, so ratio = 1 there), reference log-probs
        orders = [torch.randperm(B, device=acc.device) for _ in range(cfg.num_ppo_epochs)]
        old_logprobs = torch.zeros(B, R, device=acc.device)
        old_values = torch.zeros(B, R, device=acc.device)
        ref_logprobs = torch.zeros(B, R, device=acc.device)
        entropy = torch.zeros(B, R, device=acc.device)
        # With one micro-batch per update (1 minibatch, no accumulation) the first training forward *is* the old
        # forward: run it once with grad and reuse it (saves a forward; ratio = 1 there by construction).
        cached = None
        if cfg.num_mini_batches == 1 and cfg.gradient_accumulation_steps == 1:
            rows = orders[0]
            ids, am, p, r, _ = self._trim(rollout, rows)
            logits, values = self.ddp_model(ids, am)
            logits, values = logits[:, p - 1:p + r - 1], values[:, p - 1:p + r - 1].float()
            logprobs = logprobs_from_logits(logits, ids[:, p:], cfg.temperature)
            cached = (ids, am, p, r, logits, values, logprobs)
            with torch.no_grad():
                old_logprobs[rows, :r] = logprobs.detach()
                old_values[rows, :r] = values.detach()
                entropy[rows, :r] = entropy_from_logits(logits.detach(), cfg.temperature)
                ref_logprobs[rows, :r] = self._ref_logprobs(ids, am, p, r)
        else:
            with torch.no_grad():
                for mb in self._micro_batches(orders[0]):
                    for rows in mb:
                        ids, am, p, r, _ = self._trim(rollout, rows)
                        logits, values = self.model(ids, am)
                        logits = logits[:, p - 1:p + r - 1]
                        old_logprobs[rows, :r] = logprobs_from_logits(logits, ids[:, p:], cfg.temperature)
                        entropy[rows, :r] = entropy_from_logits(logits, cfg.temperature)
                        old_values[rows, :r] = values[:, p - 1:p + r - 1].float()
                        ref_logprobs[rows, :r] = self._ref_logprobs(ids, am, p, r)
        maskf = mask.float()
        old_logprobs, old_values, ref_logprobs = old_logprobs * maskf, old_values * maskf, ref_logprobs * maskf

        # 4. rewards and advantages ------------------------------------------------------------------------------
        kl = kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * maskf
        beta = self.kl_ctl.value
        non_score = -beta * kl
        last = (mask.long().cumsum(1) * mask).argmax(1)                 # last real response token (from the mask)
        rewards = non_score.clone()
        rewards[torch.arange(B, device=acc.device), last] += scores
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = self._whiten(advantages, mask)

        self.last_rollout = rollout
        self.last_batch = {"scores": scores, "raw_scores": raw, "kl": kl, "rewards": rewards, "returns": returns,
                           "advantages": advantages, "old_values": old_values, "old_logprobs": old_logprobs,
                           "ref_logprobs": ref_logprobs}

        # 5. PPO epochs ------------------------------------------------------------------------------------------
        stats = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approxkl", "ratio", "grad_norm",
                                 "ent")}
        first = {}
        stopped_early, epochs_done = False, 0
        for epoch in range(cfg.num_ppo_epochs):
            for mb in self._micro_batches(orders[epoch]):
                n_tok = self._sum_all(torch.stack([mask[rows].sum() for rows in mb]).sum().float())
                scale = self.world / n_tok.clamp(min=1)
                acc_kl = acc_n = 0.0
                for i, rows in enumerate(mb):
                    sync = contextlib.nullcontext() if i == len(mb) - 1 else acc.no_sync(self.ddp_model)
                    with sync:
                        if cached is not None:
                            ids, am, p, r, logits, values, logprobs = cached
                            cached = None
                        else:
                            ids, am, p, r, _ = self._trim(rollout, rows)
                            logits, values = self.ddp_model(ids, am)
                            logits = logits[:, p - 1:p + r - 1]
                            values = values[:, p - 1:p + r - 1].float()
                            logprobs = logprobs_from_logits(logits, ids[:, p:], cfg.temperature)
                        m = mask[rows, :r]
                        pg, clipped, approx = ppo_policy_loss(logprobs, old_logprobs[rows, :r],
                                                              advantages[rows, :r], cfg.cliprange)
                        vf, vclipped = ppo_value_loss(values, old_values[rows, :r], returns[rows, :r],
                                                      cfg.cliprange_value)
                        loss_tok = pg + cfg.vf_coef * vf
                        if cfg.ent_coef:
                            ent = entropy_from_logits(logits, cfg.temperature)
                            loss_tok = loss_tok - cfg.ent_coef * ent
                            stats["ent"].append(masked_mean(ent.detach(), m).item())
                        loss = masked_sum(loss_tok, m) * scale
                        acc.backward(loss)
                    ratio = torch.exp(logprobs.detach() - old_logprobs[rows, :r])
                    stats["pg_loss"].append(masked_mean(pg.detach(), m).item())
                    stats["vf_loss"].append(masked_mean(vf.detach(), m).item())
                    stats["clipfrac"].append(masked_mean(clipped, m).item())
                    stats["vf_clipfrac"].append(masked_mean(vclipped, m).item())
                    stats["approxkl"].append(masked_mean(approx, m).item())
                    stats["ratio"].append(masked_mean(ratio, m).item())
                    acc_kl += masked_sum(approx, m).item()
                    acc_n += m.sum().item()
                    if not first:
                        first = {"policy/approxkl_first": stats["approxkl"][-1],
                                 "policy/clipfrac_first": stats["clipfrac"][-1],
                                 "policy/max_abs_ratio_minus_1_first": masked_max_abs(ratio - 1, m)}
                if cfg.max_grad_norm:
                    norm = acc.clip_grad_norm_(self.ddp_model.parameters(), cfg.max_grad_norm)
                    stats["grad_norm"].append(float(norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                mb_kl = self._sum_all(torch.tensor([acc_kl, acc_n], device=acc.device))
                if cfg.target_kl is not None and (mb_kl[0] / mb_kl[1].clamp(min=1)).item() > cfg.target_kl:
                    stopped_early = True
                    break
            epochs_done += 1
            if stopped_early:
                break
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update used
        self.scheduler.step()
        t_train = time.perf_counter()

        # 6. KL controller, metrics ------------------------------------------------------------------------------
        seq_kl = self._gather(kl.sum(1))
        kl_mean = seq_kl.mean().item()
        self.kl_ctl.update(kl_mean, cfg.rollout_batch_size)
        all_scores, all_raw = self._gather(scores), self._gather(raw)
        resp_len = self._gather(mask.sum(1).float())
        n_gen = resp_len.sum().item()
        var_ret = self._masked_var_all(returns, mask)
        explained = 1.0 - self._masked_var_all(returns - old_values, mask) / max(var_ret, 1e-8)
        mean = lambda xs: sum(xs) / max(len(xs), 1)
        metrics = {
            "objective/kl": kl_mean,
            "objective/kl_coef": beta,
            "objective/entropy": self._masked_mean_all(entropy, mask),
            "objective/non_score_reward": self._gather(non_score.sum(1)).mean().item(),
            "objective/rlhf_reward": (all_scores + self._gather(non_score.sum(1))).mean().item(),
            "reward/mean": all_scores.mean().item(),
            "reward/std": all_scores.std(unbiased=False).item(),
            "reward/raw_mean": all_raw.mean().item(),
            "policy/clipfrac": mean(stats["clipfrac"]),
            "policy/approxkl": mean(stats["approxkl"]),
            "policy/ratio_mean": mean(stats["ratio"]),
            "policy/ppo_epochs_done": epochs_done,
            "policy/early_stopped": float(stopped_early),
            "loss/policy": mean(stats["pg_loss"]),
            "loss/value": mean(stats["vf_loss"]),
            "val/clipfrac": mean(stats["vf_clipfrac"]),
            "val/explained_variance": explained,
            "val/mean": self._masked_mean_all(old_values, mask),
            "response/length_mean": resp_len.mean().item(),
            "response/eos_share": self._gather(rollout.stopped.float()).mean().item(),
            "optim/lr": lr,
            "optim/grad_norm": mean(stats["grad_norm"]),
            "time/generate": t_gen - t_start,
            "time/score": t_score - t_gen,
            "time/train": t_train - t_score,
            "time/update": t_train - t_start,
            "perf/generated_tokens_per_sec": n_gen / max(t_gen - t_start, 1e-9),
            "perf/tokens_per_sec": (n_gen + self._gather(rollout.prompt_mask.sum(1).float()).sum().item())
                                   / max(t_train - t_start, 1e-9),
            "perf/episodes_per_sec": cfg.rollout_batch_size / max(t_train - t_start, 1e-9),
            **first,
        }
        if stats["ent"]:
            metrics["loss/entropy"] = mean(stats["ent"])
        if gold is not None:
            metrics["reward/gold_mean"] = self._gather(gold).mean().item()
        return metrics

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return masked_whiten(x, mask)
        mu = self._masked_mean_all(x, mask)
        var = self._masked_var_all(x, mask)
        return (x - mu) * torch.rsqrt(torch.tensor(var + 1e-8, device=x.device)) * mask

    def _masked_mean_all(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        s = self._sum_all(torch.stack([masked_sum(x.float(), mask), mask.sum().float()]))
        return (s[0] / s[1].clamp(min=1)).item()

    def _masked_var_all(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        mu = self._masked_mean_all(x, mask)
        return self._masked_mean_all((x.float() - mu) ** 2, mask)

    # ------------------------------------------------------------------ checkpoints and saving
    def _trainer_state(self) -> dict:
        return {**self.state, "kl_coef": self.kl_ctl.value, "transform": self.transform.state_dict(),
                "guard": self.guard.state_dict(), "scheduler": self.scheduler.state_dict(), "config": asdict(self.args)}

    def save_checkpoint(self) -> Path:
        from alignloop.training import save_checkpoint
        return save_checkpoint(self.args.output_dir, self.state["update"], accelerator=self.acc,
                               modules={"model": self.model}, optimizer=self.optimizer, scheduler=None,
                               trainer_state=self._trainer_state(), keep_last=self.args.keep_last)

    def _load(self, path: Path) -> None:
        from alignloop.training import load_checkpoint
        st = load_checkpoint(path, accelerator=self.acc, modules={"model": self.model}, optimizer=self.optimizer)
        for k in ("update", "data_epoch", "data_pos", "raw_reward_history", "stop_reason"):
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


def masked_max_abs(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(x.abs().masked_fill(~mask.bool(), 0).max()) if mask.any() else 0.0


def _to(rollout: Rollout, device) -> Rollout:
    for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs", "policy_logprobs", "stopped"):
        setattr(rollout, k, getattr(rollout, k).to(device))
    return rollout
