"""Scoring rollouts for PPO: a reward model, a classifier, or a plain Python function -> one score per sequence.

    scorer = build_scorer(reward, policy_tokenizer)            # reward: nn.Module | ClassifierReward | callable
    scores = scorer(rollout, prompts_text, responses_text)      # [B] float32

- A scalar-head reward model (e.g. `GPT2ForSequenceClassification(num_labels=1)` or alignloop's `RewardModel`) scores
  prompt + response **at the response's last real token**, found from the attention mask (never by searching for the
  pad id, so a pad == EOS tokenizer works). With a reward tokenizer different from the policy's, the text is
  re-tokenised as the reward-model trainer does (prompt and response apart, the reward tokenizer's EOS appended
  where the policy stopped, right-padded).
- A classifier with several labels gives its positive-class logit (`positive_label`, default 1).
- A function `f(prompts: list[str], responses: list[str]) -> list[float]`.

`RewardTransform` then applies, in this order: normalisation (none / running mean-std / gain and bias fitted on
samples from the starting policy, Ziegler et al. 2019), clipping to ±`clip`, and the no-EOS penalty:
  * mode "replace" (OpenAI's original recipe): a response that never emitted a stop token gets score = penalty
    value (e.g. -1.0), whatever the reward model said;
  * mode "subtract" (TRL's `missing_eos_penalty`): score = score - penalty.
Raw and final scores are both returned so that both can be logged.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from alignloop.errors import ConfigError
from alignloop.rollout import Rollout


def _score_sequences(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     positive_label: int = 1) -> torch.Tensor:
    """Score at each row's last real token -> [B] float32, via the shared `alignloop.models` functions: a
    ClassifierReward's positive-class logit, or column 0 (single-output head) / `positive_label` (classifier)."""
    from alignloop.models import ClassifierReward, sequence_logits, unwrap_model
    if isinstance(model, ClassifierReward):
        return model.score_tokens(input_ids, attention_mask).float()
    from alignloop.models import RewardModel
    inner = model.model if isinstance(model, RewardModel) else model
    num_labels = int(getattr(unwrap_model(inner).config, "num_labels", 1))
    logits = sequence_logits(inner, input_ids, attention_mask)
    return logits[:, positive_label if num_labels > 1 else 0].float()


class ModelScorer:
    """A sequence-scoring model (scalar head or classifier). Dropout off (eval mode), no gradients."""

    def __init__(self, model: nn.Module, policy_tokenizer=None, reward_tokenizer=None, positive_label: int = 1,
                 batch_size: int = 64):
        self.model = model.eval()
        self.policy_tokenizer = policy_tokenizer
        self.reward_tokenizer = reward_tokenizer
        self.positive_label = positive_label
        self.batch_size = batch_size
        self.retokenize = reward_tokenizer is not None and policy_tokenizer is not None and (
            reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab())

    def _device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, rollout: Rollout, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        self.model.eval()
        if self.retokenize:
            # as the reward-model trainer built its sequences; the reward tokenizer's EOS where the policy stopped
            # (the same-vocabulary path scores the policy's own EOS there, and no EOS after a truncated response)
            from alignloop.trainers.best_of_n import reward_input_ids

            stopped = rollout.stopped.tolist()
            seqs = [reward_input_ids(self.reward_tokenizer, [p], [r], add_eos=bool(s))[0]
                    for p, r, s in zip(prompts, responses, stopped)]
            T = max(len(q) for q in seqs)
            ids = torch.zeros((len(seqs), T), dtype=torch.long)
            mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for i, q in enumerate(seqs):
                ids[i, :len(q)], mask[i, :len(q)] = torch.tensor(q), 1
        else:
            ids, mask = rollout.input_ids, rollout.attention_mask.long()
        dev = self._device()
        out = []
        for i in range(0, ids.shape[0], self.batch_size):
            out.append(_score_sequences(self.model, ids[i:i + self.batch_size].to(dev),
                                        mask[i:i + self.batch_size].to(dev), self.positive_label))
        return torch.cat(out).to(rollout.response_ids.device)


class FunctionScorer:
    """Wraps `f(prompts, responses) -> list[float]`."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]]):
        self.fn = fn

    def __call__(self, rollout: Rollout, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        values = self.fn(list(prompts), list(responses))
        scores = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
        if scores.shape[0] != len(responses):
            raise ConfigError(f"reward function returned {scores.shape[0]} scores for {len(responses)} responses")
        return scores.to(rollout.response_ids.device)


def build_scorer(reward, policy_tokenizer=None, reward_tokenizer=None, positive_label: int = 1):
    """reward: an nn.Module (scalar-head reward model or sequence classifier), an object with `.model` (e.g.
    `alignloop.models.ClassifierReward`), or a callable `f(prompts, responses) -> list[float]`."""
    if reward is None:
        return None
    if isinstance(reward, (ModelScorer, FunctionScorer)):
        return reward
    if isinstance(reward, nn.Module):  # RewardModel, ClassifierReward (its own tokenizer), HF classifier
        own_tok = getattr(reward, "tokenizer", None)
        return ModelScorer(reward, policy_tokenizer, own_tok if own_tok is not None else reward_tokenizer,
                           positive_label)
    if callable(reward):
        return FunctionScorer(reward)
    raise ConfigError(f"reward must be a model, a ClassifierReward or a function f(prompts, responses), got "
                      f"{type(reward).__name__}")


class RewardTransform:
    """Normalisation -> clipping -> no-EOS penalty (see module doc). State is saved in checkpoints.

    normalize: "none"; "running" (running mean/std over every raw score seen so far, batch included);
    "fit" (gain g = target_std/σ and bias b = target_mean − g·μ fitted once by `fit(raw_scores)` on samples from
    the starting policy; the trainer does this before the first update)."""

    def __init__(self, normalize: str = "none", clip: float | None = None, missing_eos_penalty: float | None = None,
                 missing_eos_mode: str = "replace", target_mean: float = 0.0, target_std: float = 1.0):
        if normalize not in ("none", "running", "fit"):
            raise ConfigError(f"reward_normalization must be none, running or fit, got {normalize!r}")
        if missing_eos_mode not in ("replace", "subtract"):
            raise ConfigError(f"missing_eos_penalty_mode must be replace or subtract, got {missing_eos_mode!r}")
        self.normalize, self.clip = normalize, clip
        self.penalty, self.penalty_mode = missing_eos_penalty, missing_eos_mode
        self.target_mean, self.target_std = target_mean, target_std
        self.gain, self.bias = 1.0, 0.0
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.fitted = False

    def fit(self, raw: torch.Tensor) -> None:
        raw = raw.double()
        mu, sigma = raw.mean().item(), raw.std(unbiased=False).item()
        self.gain = self.target_std / max(sigma, 1e-8)
        self.bias = self.target_mean - self.gain * mu
        self.fitted = True

    def _update_running(self, raw: torch.Tensor) -> None:
        for x in raw.double().tolist():  # Welford
            self.count += 1
            d = x - self.mean
            self.mean += d / self.count
            self.m2 += d * (x - self.mean)

    def __call__(self, raw: torch.Tensor, stopped: torch.Tensor, all_raw: torch.Tensor | None = None) -> torch.Tensor:
        """raw [B] -> final scores [B]. `all_raw`: the raw scores of every process (running statistics must be the
        same everywhere); defaults to `raw`."""
        s = raw.float()
        if self.normalize == "running":
            self._update_running(all_raw if all_raw is not None else raw)
            std = math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0
            s = (s - self.mean) / max(std, 1e-8) * self.target_std + self.target_mean
        elif self.normalize == "fit":
            s = s * self.gain + self.bias
        if self.clip is not None:
            s = s.clamp(-self.clip, self.clip)
        if self.penalty is not None:
            no_eos = ~stopped.to(s.device)
            if self.penalty_mode == "replace":
                s = torch.where(no_eos, torch.full_like(s, self.penalty), s)
            else:
                s = torch.where(no_eos, s - self.penalty, s)
        return s

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("gain", "bias", "count", "mean", "m2", "fitted")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
