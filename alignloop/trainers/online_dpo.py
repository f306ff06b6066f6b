"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"), read top to bottom: the
policy samples two completions per prompt, a reward (or any scorer) judges them, the better one becomes `chosen`,
and the policy takes a DPO step on those pairs against a frozen reference.

    trainer = OnlineDPOTrainer(model=policy_or_path, reward=reward_model_or_fn_or_spec,
                               args=OnlineDPOConfig(beta=0.1), train_dataset=prompts, tokenizer=tok)
    result = trainer.train()          # alignloop.training.run.TrainResult; result.history: metrics per update
    alignloop online-dpo --model ./sft --reward-model ./rm --train-file prompts.jsonl --beta 0.1

One update (`OnlineDPOTrainer._update`):
 1. generate: `rollout_batch_size` prompts (over all processes), each sampled twice from the current policy; a
    prompt's two completions are adjacent rows and stay on one process (the `Sampler` of PPO, KV cache, eval mode);
 2. score: the reward (`alignloop.scoring`: reward model, classifier, `module:function`, or a weighted sum, each
    part logged as `reward/<name>`) -> `RewardTransform` (normalisation, clipping, the no-EOS penalty);
 3. pairs (`preference_pairs`): of each prompt's two completions the higher score is `chosen`, the other
    `rejected`; a tie (equal scores) is left out of the loss (`ties="drop"`, the default) or kept with the first
    completion as chosen (`ties="first"`, TRL's `first_half >= second_half`); either way counted in
    `objective/tie_share`;
 4. log-probs: the reference's (`ref_model`, or the starting policy: a frozen copy, or with LoRA the adapter's
    starting values) and the policy's (with one optimizer step per update the training forward gives the policy's
    log-probs before the step; otherwise a forward without gradient first);
 5. the DPO loss (`alignloop.losses.dpo_loss`: sigmoid, conservative DPO with `label_smoothing`, or IPO) on each
    pair's sequence log-probs (the sum over the response tokens), averaged over the update's trained pairs over
    all processes; `num_mini_batches` optimizer steps per update (1 by default: one step on all pairs), each
    accumulated over `gradient_accumulation_steps` micro-batches of pairs weighted by the global minibatch's pair
    count, so that accumulation and the number of processes do not change the step. A minibatch whose pairs are
    all ties (with `ties="drop"`) takes no optimizer step;
 6. metrics: `loss/dpo`, the implicit rewards β·(log π − log π_ref) of the trained pairs (`rewards/chosen`,
    `rewards/rejected`, `rewards/margins`, `rewards/accuracies`), `logps/chosen|rejected`, `objective/kl` (the
    per-sequence sum of `kl_estimator`, k1 by default, between the policy before the step and the reference, mean
    over sequences), `objective/entropy`, `objective/rlhf_reward` (score − β·KL), `objective/scores_margin`
    (score of chosen − rejected, all pairs), `objective/tie_share`, `reward/*` and `time/*`.
Then the loop every online trainer runs (`alignloop.rl.run_updates`): log, sample table, callbacks, reward
threshold, reward-hacking guard, checkpoints; `resume_from` continues exactly (weights, optimizer, schedule, reward
transform, guard, RNG, prompt stream).

Choices (TRL 1.16's `OnlineDPOTrainer` does the same, unless said otherwise):
 - log-probs are those of the policy's own distribution, temperature 1, whatever the sampling temperature (TRL's
   `_forward` takes `log_softmax` of the raw logits): DPO's implicit reward β·log π/π_ref is defined on the model,
   not on the tempered sampler. The temperature only changes which completions are sampled;
 - the KL strength is `beta` (the DPO β); `kl_coef` of the shared fields is not used and must stay 0;
 - `missing_eos_penalty` is subtracted from the score by default (`missing_eos_penalty_mode="subtract"`, TRL's
   `rewards[~contain_eos_token] -= penalty`), before the pair is chosen;
 - ties: TRL keeps them (first as chosen); here they are dropped by default: a tie says nothing about which
   completion is better, and with a discrete reward (e.g. a verifiable 0/1 reward) most pairs of a weak policy
   tie, so keeping them trains on label noise. `ties="first"` restores TRL's behaviour;
 - dropout is off in every model (TRL's `disable_dropout=True`); the learning rate is scheduled per update.
"""
from __future__ import annotations

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
from alignloop.losses import dpo_loss, kl_penalty, masked_sum
from alignloop.models import model_forward
from alignloop.rl import (
    Collective,
    ExperienceAccess,
    OnlineRLArgs,
    ScoredRollout,
    UpdateLoop,
    build_scorers,
    check_batch_sizes,
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
    train_online,
)
from alignloop.rollout import HFSampler, Rollout, Sampler
from alignloop.training.guard import SampleTable
from alignloop.training.loop import make_accelerator, seed_everything, sync_context
from alignloop.training.run import TrainResult, save_final

LOGPROB_TEMPERATURE = 1.0  # DPO's log π: the policy's own distribution (see the module doc)


@dataclass
class OnlineDPOConfig(OnlineRLArgs):
    """Online DPO settings: the fields every online trainer shares (`alignloop.rl.OnlineRLArgs`: models, rollouts,
    reward, stop rules, guard, LoRA, logging, checkpoints) and these. Every field is also a flag of
    `alignloop online-dpo` and a YAML key. `rollout_batch_size` counts prompts; each is sampled twice, so an update
    trains on rollout_batch_size pairs (fewer with dropped ties)."""
    output_dir: str = field(default="online-dpo-output", metadata={
        "help": "Metrics, samples, checkpoints, final model."})
    beta: float = field(default=0.1, metadata={
        "help": "DPO's β: the strength of the KL to the reference (implicit reward β·log π/π_ref)."})
    loss_type: Literal["sigmoid", "ipo"] = field(default="sigmoid", metadata={
        "help": "sigmoid: −log σ(β·h) (DPO); ipo: (h − 1/(2β))² (Azar et al.), h = the pair's log-ratio margin."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "Conservative DPO's ε in [0, 0.5): the share of pairs assumed mislabelled (sigmoid only)."})
    ties: Literal["drop", "first"] = field(default="drop", metadata={
        "help": "Pairs whose scores are equal: drop (left out of the loss) or first (the first completion is chosen, "
                "as TRL does). Counted in objective/tie_share either way."})
    num_mini_batches: int = field(default=1, metadata={
        "help": "Optimizer steps per update, each on a share of the pairs (1 = one step on all pairs)."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature. The DPO log-probs are the policy's own (temperature 1) whatever it is."})
    kl_coef: float = field(default=0.0, metadata={
        "help": "Not used by online DPO, whose KL strength is beta; must stay 0."})
    missing_eos_penalty_mode: Literal["replace", "subtract"] = field(default="subtract", metadata={
        "help": "subtract (TRL's online DPO): score − missing_eos_penalty; replace: the score becomes "
                "missing_eos_penalty."})

    def __post_init__(self):
        super().__post_init__()
        if self.kl_coef:
            raise ConfigError(f"online DPO's KL strength is beta (--beta); kl_coef is not used, got {self.kl_coef}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"loss_type: expected sigmoid or ipo, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("label_smoothing applies to loss_type sigmoid only")
        if self.ties not in ("drop", "first"):
            raise ConfigError(f"ties: expected drop or first, got {self.ties!r}")
        if self.num_mini_batches < 1:
            raise ConfigError("num_mini_batches must be >= 1")


def preference_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores [2N] of N prompts' two completions (adjacent rows) -> (chosen rows [N], rejected rows [N], tied [N]
    bool). The higher score is chosen; on a tie the first completion is (and `tied` says so)."""
    if scores.dim() != 1 or len(scores) % 2:
        raise ValueError(f"expected scores [2N] of adjacent pairs, got shape {tuple(scores.shape)}")
    first, second = scores[0::2], scores[1::2]
    keep_first = first >= second
    base = torch.arange(0, len(scores), 2, device=scores.device)
    chosen = base + (~keep_first).long()
    rejected = base + keep_first.long()
    return chosen, rejected, first == second


@dataclass
class OnlineDPOExperience(ExperienceAccess):
    """One update's batch on this process, as `OnlineDPOTrainer(callbacks=[fn])` hands it to `fn` after the update.
    B = this process's completions (2 per prompt, adjacent), N = B/2 pairs, R = the longest response."""
    step: int
    rollout: Rollout
    prompts: list[str]                        # [B]
    responses: list[str]                      # [B]
    raw_scores: torch.Tensor                  # [B] the reward's output (Σ weight · part)
    scores: torch.Tensor                      # [B] after normalisation, clipping, no-EOS penalty: what is compared
    reward_parts: dict[str, torch.Tensor]     # {name: [B]}
    gold_scores: torch.Tensor | None          # [B]
    chosen: torch.Tensor                      # [N] row of each pair's chosen completion
    rejected: torch.Tensor                    # [N] row of its rejected one
    tied: torch.Tensor                        # [N] bool: equal scores
    trained: torch.Tensor                     # [N] bool: the pair is in the loss
    logprobs: torch.Tensor                    # [B,R] the policy's before the update (temperature 1), 0 on padding
    ref_logprobs: torch.Tensor                # [B,R] the reference's (temperature 1), 0 on padding
    kl: torch.Tensor                          # [B,R] per-token `kl_estimator` (policy before the update vs reference)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Forward:
    """A micro-batch's forward: its pairs' chosen rows then rejected rows, sliced to their longest response R'."""
    pairs: torch.Tensor          # [b] pair indices
    rows: torch.Tensor           # [2b] chosen rows, then rejected rows
    input_ids: torch.Tensor      # [2b, P'+R']
    attention_mask: torch.Tensor
    p: int
    r: int
    logprobs: torch.Tensor       # [2b, R'] at temperature 1 (with grad when trained on)


class OnlineDPOTrainer:
    """`OnlineDPOTrainer(model, reward, args, train_dataset, tokenizer=None, ref_model=None, gold_reward=None,
    reward_tokenizer=None, sampler=None, accelerator=None, callbacks=()).train() -> TrainResult`; the arguments are
    PPOTrainer's (see `alignloop.trainers.ppo`): `model` a causal LM or its path, `reward` anything
    `alignloop.scoring.build_scorer` takes (a reward model, a classifier, a function, a spec), `train_dataset` the
    prompts (any source of `alignloop.data.prompt_texts`)."""

    def __init__(self, model: nn.Module | str | None = None, reward: Any = None, args: OnlineDPOConfig | None = None,
                 train_dataset: Any = None, tokenizer=None, ref_model: nn.Module | None = None,
                 gold_reward: Any = None, reward_tokenizer=None, sampler: Sampler | None = None, accelerator=None,
                 callbacks: Sequence[Callable[[OnlineDPOExperience], Any]] = ()):
        self.args = cfg = args if args is not None else OnlineDPOConfig()
        self.acc = accelerator or make_accelerator(cfg.mixed_precision)
        self.coll = Collective(self.acc)
        check_batch_sizes(cfg, self.acc.num_processes, 1, cfg.num_mini_batches * cfg.gradient_accumulation_steps)
        seed_everything(cfg.seed, self.acc.process_index)
        name = "online DPO"
        self.model, self.tokenizer = load_policy(model if model is not None else cfg.model, tokenizer, cfg, name)
        self.scorer, self.gold_scorer = build_scorers(reward, gold_reward, reward_tokenizer, cfg, self.tokenizer,
                                                      self.acc.device, name)
        self.model.to(self.acc.device).eval()  # dropout off for the whole run
        self.ref_model = frozen_reference(self.model, ref_model if ref_model is not None else cfg.ref_model,
                                          self.acc.device, cfg.dtype)
        speed_up_models(cfg, self.model, self.ref_model, self.scorer, self.gold_scorer)
        self.transform = cfg.reward_transform()
        self.sampler = sampler or HFSampler(self.model, self.tokenizer, cpu_threads=cfg.generation_threads)
        self.sampling = cfg.sampling_params(self.tokenizer)
        self.prompts, self.prompt_ids = encoded_prompts(train_dataset, cfg, self.tokenizer, name)
        self.ddp_model, self.optimizer, self.scheduler = prepared_optimization(self.model, cfg, self.acc)
        self.guard = cfg.guard()
        self.samples = SampleTable(cfg.output_dir, cfg.sample_rows)
        self.callbacks = list(callbacks)
        self.state: dict[str, Any] = new_state()
        self.history: list[dict] = []

    # ------------------------------------------------------------------ one update, step by step
    def _update(self) -> OnlineDPOExperience:
        cfg = self.args
        t_start = time.perf_counter()
        local = [i for i in local_prompts(self.state, cfg, len(self.prompts), self.acc) for _ in range(2)]
        rollout = self.sampler.generate([self.prompt_ids[i] for i in local], self.sampling)   # 1. generate
        rollout.to(self.acc.device)
        t_gen = time.perf_counter()
        scored = score_rollout(self.scorer, self.gold_scorer, self.tokenizer, [self.prompts[i] for i in local],
                               rollout)                                                       # 2. score
        scores = self.transform(scored.raw, rollout.stopped,
                                self.coll.gather(scored.raw) if self.coll.world > 1 else None)
        chosen, rejected, tied = preference_pairs(scores)                                     # 3. pairs
        t_score = time.perf_counter()
        order = torch.randperm(len(chosen), device=self.acc.device)
        single = cfg.num_mini_batches == 1 and cfg.gradient_accumulation_steps == 1
        exp, cached = self._experience(rollout, scored, scores, (chosen, rejected, tied), order, single)  # 4.
        stats: dict[str, Any] = defaultdict(list)
        per_pair = {k: torch.zeros(len(chosen), device=self.acc.device)
                    for k in ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps")}
        for micro in minibatch_layout(order, cfg.num_mini_batches, cfg.gradient_accumulation_steps):   # 5. steps
            self._train_minibatch(exp, micro, cached, per_pair, stats)
            cached = None
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():   # the schedule counts updates, also one whose pairs all tied (no step)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        t_train = time.perf_counter()
        times = {"generate": t_gen - t_start, "score": t_score - t_gen, "train": t_train - t_score,
                 "update": t_train - t_start}
        exp.metrics = {**reward_metrics(self.coll, scores, scored), **self._metrics(exp, per_pair, stats, lr),
                       **perf_metrics(self.coll, rollout, times, 2 * cfg.rollout_batch_size)}           # 6. metrics
        return exp

    def _forward(self, model: nn.Module, rollout: Rollout, chosen: torch.Tensor, rejected: torch.Tensor,
                 pairs: torch.Tensor) -> _Forward:
        """Forward the `pairs`' chosen rows then rejected rows (without their all-pad columns): response log-probs at
        temperature 1."""
        rows = torch.cat([chosen[pairs], rejected[pairs]])
        ids, am, p, r = rollout.rows(rows)
        logits = model_forward(model, ids, am)
        return _Forward(pairs, rows, ids, am, p, r,
                        response_logprobs_from(logits, ids, p, r, LOGPROB_TEMPERATURE)[1])

    def _experience(self, rollout: Rollout, scored: ScoredRollout, scores: torch.Tensor, pairs, order: torch.Tensor,
                    single: bool) -> tuple[OnlineDPOExperience, _Forward | None]:
        """Step 4: the policy's log-probs before the update and the reference's ([B,R], 0 on padding), the per-token
        KL. With one optimizer step per update (`single`) the forward that computes the policy's log-probs is the
        training forward (with grad, through the prepared model), returned to be reused."""
        cfg = self.args
        chosen, rejected, tied = pairs
        B, R = rollout.response_ids.shape
        out = {k: torch.zeros(B, R, device=self.acc.device) for k in ("logprobs", "ref_logprobs")}
        cached = None
        layout = minibatch_layout(order, cfg.num_mini_batches, cfg.gradient_accumulation_steps)
        micro = [order] if single else [m for mb in layout for m in mb]
        for pair_idx in micro:
            if single:
                f = cached = self._forward(self.ddp_model, rollout, chosen, rejected, pair_idx)
            else:
                with torch.no_grad():
                    f = self._forward(self.model, rollout, chosen, rejected, pair_idx)
            out["logprobs"][f.rows, :f.r] = f.logprobs.detach()
            out["ref_logprobs"][f.rows, :f.r] = reference_logprobs(self.acc, self.model, self.ref_model, f.input_ids,
                                                                   f.attention_mask, f.p, f.r, LOGPROB_TEMPERATURE)
        mask = rollout.response_mask
        out = {k: v * mask.float() for k, v in out.items()}
        kl = kl_penalty(out["logprobs"], out["ref_logprobs"], cfg.kl_estimator) * mask.float()
        trained = ~tied if cfg.ties == "drop" else torch.ones_like(tied)
        exp = OnlineDPOExperience(step=self.state["update"] + 1, rollout=rollout, prompts=scored.prompts,
                                  responses=scored.responses, raw_scores=scored.raw, scores=scores,
                                  reward_parts=scored.parts, gold_scores=scored.gold, chosen=chosen,
                                  rejected=rejected, tied=tied, trained=trained, logprobs=out["logprobs"],
                                  ref_logprobs=out["ref_logprobs"], kl=kl)
        return exp, cached

    def _train_minibatch(self, exp: OnlineDPOExperience, micro: list[torch.Tensor], cached: _Forward | None,
                         per_pair: dict[str, torch.Tensor], stats: dict[str, list]) -> None:
        """Accumulate the micro-batches' gradients (each pair weighted 1 / the global minibatch's trained pairs),
        clip, step; no step when the minibatch has no trained pair on any process."""
        cfg, acc, mask = self.args, self.acc, exp.response_mask
        n = self.coll.sum(torch.stack([exp.trained[pairs].sum() for pairs in micro]).sum().float().to(acc.device))
        for i, pairs in enumerate(micro):
            with sync_context(acc, self.ddp_model, i, len(micro)):
                f = cached if cached is not None else self._forward(self.ddp_model, exp.rollout, exp.chosen,
                                                                    exp.rejected, pairs)
                cached = None
                m = mask[f.rows, :f.r]
                logps = masked_sum(f.logprobs, m, dim=1)                              # [2b] sequence log-probs
                ref = masked_sum(exp.ref_logprobs[f.rows, :f.r], m, dim=1)
                b = len(pairs)
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    logps[:b], logps[b:], ref[:b], ref[b:], cfg.beta, label_smoothing=cfg.label_smoothing,
                    loss_type=cfg.loss_type)
                loss = (losses * exp.trained[pairs].float()).sum() / n.clamp(min=1)
                acc.backward(loss * self.coll.world)   # DDP averages gradients over processes
            for key, x in (("loss", losses), ("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards),
                           ("chosen_logps", logps[:b]), ("rejected_logps", logps[b:])):
                per_pair[key][pairs] = x.detach().float()
        if n.item() == 0:   # every pair of this minibatch tied: nothing to learn from, no step
            self.optimizer.zero_grad(set_to_none=True)
            stats["skipped_steps"].append(1)
            return
        if cfg.max_grad_norm:
            stats["grad_norm"].append(float(acc.clip_grad_norm_(self.ddp_model.parameters(), cfg.max_grad_norm)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _metrics(self, exp: OnlineDPOExperience, per_pair: dict[str, torch.Tensor], stats: dict[str, list],
                 lr: float) -> dict[str, float]:
        """The DPO terms over the trained pairs of every process (0 when there are none), the objective over all."""
        cfg, g = self.args, self.coll.gather
        trained = g(exp.trained.long()).bool()   # gloo gathers no bool
        n = int(trained.sum().item())
        mean = lambda x: (g(x)[trained].sum() / max(n, 1)).item()   # noqa: E731 - a local shorthand
        margins = per_pair["chosen_rewards"] - per_pair["rejected_rewards"]
        seq_kl = exp.kl.sum(1)
        entropy = -masked_sum(exp.logprobs, exp.response_mask, dim=1)
        return {
            "loss/dpo": mean(per_pair["loss"]),
            "rewards/chosen": mean(per_pair["chosen_rewards"]),
            "rewards/rejected": mean(per_pair["rejected_rewards"]),
            "rewards/margins": mean(margins),
            "rewards/accuracies": mean((margins > 0).float()),
            "logps/chosen": mean(per_pair["chosen_logps"]),
            "logps/rejected": mean(per_pair["rejected_logps"]),
            "objective/kl": g(seq_kl).mean().item(),
            "objective/entropy": g(entropy).mean().item(),
            "objective/rlhf_reward": g(exp.scores - cfg.beta * seq_kl).mean().item(),
            "objective/scores_margin": g(exp.scores[exp.chosen] - exp.scores[exp.rejected]).mean().item(),
            "objective/tie_share": g(exp.tied.float()).mean().item(),
            "objective/trained_pairs": float(n),
            "objective/beta": cfg.beta,
            "optim/lr": lr,
            "optim/grad_norm": sum(stats["grad_norm"]) / len(stats["grad_norm"]) if stats["grad_norm"] else 0.0,
            "optim/skipped_steps": float(len(stats["skipped_steps"])),
        }

    # ------------------------------------------------------------------ the run
    def train(self) -> TrainResult:
        """Run updates until `total_updates`, the reward threshold or the guard stops; checkpoint and save."""
        loop = UpdateLoop("online-dpo", self._update, self.save_checkpoint, self._load, self._sample_raw_scores,
                          lambda: save_final(self.acc, self.model, self.tokenizer, self.args.output_dir),
                          self.transform, self.guard, self.samples, self.callbacks)
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
                                      self.transform, self.guard)

    def _load(self, path: Path) -> None:
        load_online_checkpoint(path, self.acc, self.state, self.model, self.optimizer, self.scheduler, self.transform,
                               self.guard)

