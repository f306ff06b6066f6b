"""Scoring text with a reward: the one home of "(prompt, completion) -> a number", for every caller (PPO, best-of-N,
rejection sampling, evaluation, the pipeline).

    scorer = load_scorer("runs/rm/final")                        # a reward model or classifier: folder or hub id
    scorer = load_scorer("mypkg.rewards:exact_match")            # a function f(prompts, completions) -> floats
    scorer = load_scorer(["runs/rm/final=0.7", "mypkg.rewards:exact_match=0.3"])   # a weighted sum
    scorer = build_scorer(model_or_fn_or_spec, tokenizer=...)    # from objects already in memory
    scores = scorer(prompts, completions)                        # [B] float32 tensor
    parts = scorer.parts(prompts, completions)                   # {name: [B]}: each reward of a weighted sum
    scores = scorer.score_rollout(rollout, prompts, completions) # PPO: the rollout's own tokens when possible
    scorer = load_scorer("runs/rm/final:helpful=0.7,harmless=0.3")   # a multi-head reward model, heads weighted
    scorer = load_scorer("runs/rm/final", user_tag=USER_TAG)     # per-user weights, read from each prompt's tag
    scores, parts = score_with_parts(scorer, prompts, completions)   # one pass: the total and each part

Every scorer has `.weights` ({name: weight}), `.parts(prompts, completions, eos=None)` and
`.rollout_parts(rollout, prompts, completions)` ({name: [B] float32}); calling it gives Σ weight · part.
`weights_for(scorer, prompts)` gives the weights of those rows: `.weights`, except for a per-user scorer, whose
weights are [B] tensors (one weight per row); `total` takes either.

A **multi-head reward model** (a sequence classifier whose config has `alignloop_heads`: one output per criterion,
group or labeler, see `alignloop.models.reward`) gives one part per head, all heads from one forward per batch. Its
weights: the spec's `DIR:head=w,head=w` (a head not listed weighs 0; `DIR:head` scores that head alone); by default
the population head when the model has one, else every head 1/H (their mean).

Per-user weights (`user_tag=`, a template of `alignloop.data.users`, e.g. `USER_TAG = "<user:{user}> "`): a
`UserTagScorer` reads each prompt's tag, scores the UNTAGGED prompt (the reward model never saw tags) and weighs a
multi-head model's heads per row (`HeadWeights.for_user`): a user of `user_profiles.json` (beside the model, written
by `alignloop personalize`; `alignloop.personal.UserProfiles`) gets the weights fitted to their judgements; a user
named like a head (a group head) that head; a profiled user with no judgements yet their group's head, else their
stored prior; anyone else (an untagged prompt, an unknown user: cold start) the population weights, which are the
spec's weights when given, else the profiles' `population`, else the default.

How a model sees the text (`ModelScorer`):
- A **scalar-head reward model** (a decoder `...ForSequenceClassification` with one output, as `alignloop rm` saves,
  or alignloop's `RewardModel`) scores prompt + completion tokenised **exactly as reward-model training tokenised**
  (`alignloop.data.reward_input_ids`: the two parts without special tokens, EOS appended to the completion unless
  already there, rm's "keep_end" truncation to the model's context), read where transformers reads it (the last
  real token that is not the config's pad id: with pad == EOS, the token before the EOS, as TRL's reward models are
  trained). `eos` gives the EOS rule per row: PPO passes the rollout's `stopped` flags, so a
  response cut at `max_new_tokens` gets no EOS (its `missing_eos_penalty` handles it).
- Any other **classifier** (several labels, or an encoder such as BERT or RoBERTa with no decoder `score` head)
  gives its positive-class logit (`positive_label`: index or label name) on prompt + completion as one text with its
  tokenizer's special tokens ([CLS] ... [SEP]), as such a classifier was trained; a text longer than its context
  (`alignloop.models.context_length`) keeps its end, the completion.
- With the rollout (`score_rollout`) and a scalar-head reward model sharing the policy's vocabulary, the rollout's
  own tokens are scored (no decode/re-encode): a response that stopped at EOS ends with the policy's EOS, as
  `reward_input_ids` builds from its text with `eos = stopped` (a response ended by another stop token or a stop
  string keeps that token instead). A rollout longer than the model's context takes the text path, which truncates
  like rm.
A **function** `module:function` gets the texts: `f(prompts: list[str], completions: list[str]) -> list[float]`.

A **process reward model** (a folder `alignloop prm` saved: its config carries `alignloop_prm`) or a **step
function** `fn(prompts, step_lists) -> list[list[float]]` scores each step (`ProcessScorer`): a completion is split
into steps with `alignloop.data.split_steps` (the PRM's own separator), `.step_scores(prompts, completions)` gives
each step's probability of being good, and the scorer protocol (`__call__`, `.parts`) gives their aggregate
(`aggregate_step_scores`: min, prod, last or mean), so best-of-N, rejection sampling and the RL trainers use a PRM
as an outcome reward too.

`RewardTransform` then turns raw scores into the reward an RL trainer optimises, in this order: normalisation (none /
running mean-std / gain and bias fitted on samples from the starting policy, Ziegler et al. 2019), clipping to
±`clip`, and the no-EOS penalty:
  * mode "replace" (OpenAI's original recipe): a response that never emitted a stop token gets score = penalty
    value (e.g. -1.0), whatever the reward model said;
  * mode "subtract" (TRL's `missing_eos_penalty`): score = score - penalty.
"""
from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from alignloop.data import (
    STEP_SEPARATOR,
    USER_TAG,
    DataError,
    pad_batch,
    reward_input_ids,
    split_steps,
    split_user_tag,
    tag_prompt,
)
from alignloop.errors import ConfigError, UserError
from alignloop.models import (
    ClassifierReward,
    context_length,
    has_decoder_head,
    heads_info,
    is_prm_folder,
    load_prm,
    load_sequence_classifier,
    load_tokenizer,
    prm_info,
    score_sequences,
    score_steps,
    sequence_logits,
    unwrap_model,
)
from alignloop.personal import USER_PROFILES_FILE, UserProfiles, population_weights
from alignloop.rollout import Rollout

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def total(parts: dict[str, torch.Tensor], weights: dict[str, float | torch.Tensor]) -> torch.Tensor:
    """Σ weight · part: the scalar reward of a (possibly weighted) scorer's parts. A weight is a number, or a [B]
    tensor with one weight per row (a per-user scorer's, `weights_for`)."""
    return sum((w.to(v.device) if isinstance(w := weights[k], torch.Tensor) else w) * v for k, v in parts.items())


# ------------------------------------------------------------------------------------------------ specs
def load_function(spec: str) -> Callable:
    """`module:function` -> the function (a scorer `f(prompts, completions) -> list[float]`)."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise UserError(f"reward function {spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"reward function {spec!r}: {e}") from None
    if not callable(fn):
        raise UserError(f"reward function {spec!r} is not callable")
    return fn


def is_function_spec(spec: str) -> bool:
    """`package.module:function` (and no such local path): a Python function, not a model folder or hub id."""
    mod, sep, name = spec.partition(":")
    return bool(sep) and not Path(spec).exists() and all(p.isidentifier() for p in mod.split(".") + [name])


def split_weight(item: str) -> tuple[str, float]:
    """`SPEC=WEIGHT` -> (SPEC, WEIGHT); a plain `SPEC` has weight 1."""
    spec, sep, w = item.rpartition("=")
    if sep and spec:
        try:
            weight = float(w)
        except ValueError:
            return item, 1.0
        if not math.isfinite(weight):
            raise ConfigError(f"reward {item!r}: the weight must be a finite number")
        return spec, weight
    return item, 1.0


def split_heads(item: str) -> tuple[str, dict[str, float] | None]:
    """`DIR:helpful=0.7,harmless=0.3` -> (DIR, {"helpful": 0.7, "harmless": 0.3}); `DIR:harmless` -> (DIR,
    {"harmless": 1.0}); anything without a head list (a folder that exists as written, `module:function`, a plain
    spec) -> (item, None). Which heads exist is checked once the model is loaded (`HeadWeights`)."""
    if is_function_spec(split_weight(item)[0]) or Path(item).exists():   # module:function[=W] names no heads
        return item, None
    spec, sep, listed = item.rpartition(":")
    if not sep or not spec or not listed or any(c in listed for c in "/\\"):
        return item, None
    weights: dict[str, float] = {}
    for piece in listed.split(","):
        name, eq, w = (x.strip() for x in piece.partition("="))
        if not name or name in weights:
            raise ConfigError(f"reward {item!r}: expected DIR:head=weight,head=weight with each head named once, "
                              f"got {piece.strip()!r}")
        try:
            weights[name] = float(w) if eq else 1.0
        except ValueError:
            raise ConfigError(f"reward {item!r}: the weight of head {name!r} must be a number, got {w!r}") from None
        if not math.isfinite(weights[name]):
            raise ConfigError(f"reward {item!r}: the weight of head {name!r} must be a finite number, got {w!r}")
    return spec, weights


def spec_name(spec: str) -> str:
    """A short name for metrics (`reward/<name>`): the function's name, or the model folder's (its parent for
    `.../final`)."""
    if is_function_spec(spec):
        return spec.partition(":")[2]
    p = Path(spec.rstrip("/"))
    return p.parent.name if p.name == "final" and p.parent.name else p.name


# ------------------------------------------------------------------------------------------------ scorers
class FunctionScorer:
    """A Python function `f(prompts, completions) -> list[float]` as a scorer (it sees texts only)."""

    def __init__(self, fn: RewardFn, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.weights = {self.name: 1.0}

    def parts(self, prompts: Sequence[str], completions: Sequence[str], eos=None) -> dict[str, torch.Tensor]:
        values = [float(v) for v in self.fn(list(prompts), list(completions))]
        if len(values) != len(completions):
            raise UserError(f"reward function {self.name} returned {len(values)} scores for {len(completions)} "
                            f"completions")
        return {self.name: torch.tensor(values, dtype=torch.float32)}

    def rollout_parts(self, rollout: Rollout, prompts, completions) -> dict[str, torch.Tensor]:
        return {k: v.to(rollout.response_ids.device) for k, v in self.parts(prompts, completions).items()}

    def __call__(self, prompts, completions, eos=None) -> torch.Tensor:
        return total(self.parts(prompts, completions, eos), self.weights)

    def score_rollout(self, rollout: Rollout, prompts, completions) -> torch.Tensor:
        return total(self.rollout_parts(rollout, prompts, completions), self.weights)


class ModelScorer:
    """A sequence-scoring model: a scalar-head reward model, or a classifier's `positive_label` logit (see the module
    docstring for how each sees the text). Scores in eval mode, without gradients, `batch_size` sequences per
    forward. `policy_tokenizer`: the tokenizer of the policy whose rollouts `score_rollout` gets."""

    def __init__(self, model: nn.Module, tokenizer=None, *, policy_tokenizer=None, positive_label: int | str = 1,
                 batch_size: int = 32, add_eos: bool = True, max_length: int | None = None,
                 name: str = "reward_model", head_weights: dict[str, float] | None = None,
                 user_profiles: UserProfiles | dict | str | os.PathLike | None = None):
        if isinstance(model, ClassifierReward):
            tokenizer = tokenizer if tokenizer is not None else model.tokenizer
            positive_label = model.label_index
            model = model.model
        config = unwrap_model(model).config
        info = heads_info(config)
        multi = int(getattr(config, "num_labels", 1)) > 1 and info is None
        self.label = ClassifierReward.resolve_label(config, positive_label) if multi else 0
        self.model = model
        # the reward model's own tokenizer; without one, the policy's (scoring the rollout's tokens needs neither)
        self.tokenizer = tokenizer if tokenizer is not None else policy_tokenizer
        self.policy_tokenizer = policy_tokenizer
        # a scalar-head or multi-head reward model (a decoder, one output per head) sees the text as reward-model
        # training built it; any other classifier (several labels, or an encoder) sees it as it was trained: its
        # own special tokens
        self.decoder = has_decoder_head(model)
        self.reward_model_view = self.decoder and not multi
        self.batch_size, self.add_eos, self.name = batch_size, add_eos, name
        if info is None and (head_weights or user_profiles):
            raise ConfigError(f"reward {name}: head weights or user profiles need a multi-head reward model (a config "
                              f"with alignloop_heads); this one has a single score")
        self.heads = None if info is None else HeadWeights(info, head_weights, load_profiles(user_profiles), name)
        self.weights = {name: 1.0} if self.heads is None else dict(self.heads.population)
        self.max_length = max_length or context_length(model, self.tokenizer)
        self.retokenize = not self.reward_model_view or (
            policy_tokenizer is not None and self.tokenizer is not None
            and self.tokenizer.get_vocab() != policy_tokenizer.get_vocab())

    def _named(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores [B] (one head) or [B,H] (one column per head) -> the parts {name: [B]}."""
        if self.heads is None:
            return {self.name: scores}
        return {h: scores[:, j] for j, h in enumerate(self.heads.heads)}

    def user_weights(self, users: Sequence[str | None]) -> dict[str, float | torch.Tensor]:
        """The weights of rows whose users are `users` (None: untagged): [B] per head of a multi-head model (see
        `HeadWeights`), else `.weights`."""
        return self.weights if self.heads is None else self.heads.rows(users)

    def _empty(self) -> torch.Tensor:
        return torch.zeros(0) if self.heads is None else torch.zeros(0, len(self.heads.heads))

    def _text_scores(self, prompts: Sequence[str], completions: Sequence[str], eos=None) -> torch.Tensor:
        if self.tokenizer is None:
            raise ConfigError("scoring text with a reward model needs its tokenizer (tokenizer=...)")
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        if not self.reward_model_view:  # the classifier's own view: one text, special tokens, the end when too long
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
            classifier = ClassifierReward(self.model, self.tokenizer, self.label, self.max_length or 512,
                                          self.batch_size)
            return classifier.reward(texts, keep="end") if texts else torch.zeros(0)
        return self.score_ids(reward_input_ids(self.tokenizer, prompts, completions,
                                               self.add_eos if eos is None else eos, self.max_length))

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> torch.Tensor:
        """Scores [len(seqs)] float32 of token sequences (right-padded in batches, read at the last real token)."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        out = []
        for lo in range(0, len(seqs), self.batch_size):
            ids, mask = pad_batch(seqs[lo:lo + self.batch_size], pad_id)
            out.append(self.score_tokens(ids.to(device), mask.to(device)))
        return torch.cat(out).cpu() if out else self._empty()

    @torch.no_grad()
    def score_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [B] float32 of token tensors already in this model's vocabulary (any padding side); [B,H] for a
        multi-head model (every head from the same forward)."""
        was = self.model.training
        self.model.eval()
        try:
            if self.heads is not None:
                return sequence_logits(self.model, input_ids, attention_mask).float()
            return score_sequences(self.model, input_ids, attention_mask, self.label).float()
        finally:
            self.model.train(was)

    def parts(self, prompts: Sequence[str], completions: Sequence[str], eos=None) -> dict[str, torch.Tensor]:
        return self._named(self._text_scores(prompts, completions, eos))

    def rollout_parts(self, rollout: Rollout, prompts, completions) -> dict[str, torch.Tensor]:
        too_long = self.max_length is not None and int(rollout.attention_mask.sum(1).max()) > self.max_length
        if self.retokenize or too_long:   # (the text path fits a long sequence to the context as rm truncates)
            scores = self._text_scores(prompts, completions, rollout.stopped.tolist())
        else:
            ids, mask = rollout.input_ids, rollout.attention_mask.long()
            device = next(self.model.parameters()).device
            scores = torch.cat([self.score_tokens(ids[i:i + self.batch_size].to(device),
                                                  mask[i:i + self.batch_size].to(device))
                                for i in range(0, ids.shape[0], self.batch_size)])
        return self._named(scores.to(rollout.response_ids.device))

    def __call__(self, prompts, completions, eos=None) -> torch.Tensor:
        return total(self.parts(prompts, completions, eos), self.weights)

    def score_rollout(self, rollout: Rollout, prompts, completions) -> torch.Tensor:
        return total(self.rollout_parts(rollout, prompts, completions), self.weights)


class WeightedScorer:
    """Σ weight_i · scorer_i: several rewards in one, each part kept for logging (`reward/<name>`). A scorer with
    several parts (a multi-head model) is run once per batch; its parts keep their names (made unique)."""

    def __init__(self, scorers: Sequence[tuple[object, float]]):
        if not scorers:
            raise ConfigError("a weighted reward needs at least one scorer")
        self.members: list[tuple[object, float, dict[str, str]]] = []   # (scorer, its weight, {part: unique name})
        self.weights: dict[str, float] = {}
        for scorer, weight in scorers:
            names = {}
            for name, w in scorer.weights.items():
                unique, k = name, 2
                while unique in self.weights:
                    unique, k = f"{name}_{k}", k + 1
                names[name] = unique
                self.weights[unique] = w * weight
            self.members.append((scorer, weight, names))

    def parts(self, prompts, completions, eos=None) -> dict[str, torch.Tensor]:
        return self._rename([s.parts(prompts, completions, eos) for s, _, _ in self.members])

    def rollout_parts(self, rollout: Rollout, prompts, completions) -> dict[str, torch.Tensor]:
        return self._rename([s.rollout_parts(rollout, prompts, completions) for s, _, _ in self.members])

    def user_weights(self, users: Sequence[str | None]) -> dict[str, float | torch.Tensor]:
        """Each member's weights for these rows' users (`user_weights`), times its weight in the sum."""
        out = {}
        for scorer, weight, names in self.members:
            for name, w in user_weights(scorer, users).items():
                out[names[name]] = w * weight
        return out

    def _rename(self, results: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {names[k]: v for (_, _, names), res in zip(self.members, results, strict=True) for k, v in res.items()}

    def __call__(self, prompts, completions, eos=None) -> torch.Tensor:
        return total(self.parts(prompts, completions, eos), self.weights)

    def score_rollout(self, rollout: Rollout, prompts, completions) -> torch.Tensor:
        return total(self.rollout_parts(rollout, prompts, completions), self.weights)


# ------------------------------------------------------------------------------------------------ heads and users
def check_user_template(template: str) -> None:
    """A ConfigError unless `template` is a user tag template `alignloop.data.users` can read back (`{user}` once,
    then the text that ends the name)."""
    try:
        tag_prompt("", None, template)   # checks the template before anything else
    except DataError as e:
        raise ConfigError(f"user_tag: {e}") from None


def load_profiles(source) -> UserProfiles | None:
    """`alignloop.personal.UserProfiles` from a UserProfiles, its dict, a file, or a folder holding
    `user_profiles.json`; None stays None."""
    if source is None or isinstance(source, UserProfiles):
        return source
    return UserProfiles.from_dict(source) if isinstance(source, dict) else UserProfiles.load(source)


class HeadWeights:
    """The weights over a multi-head reward model's heads (`info`: its `heads_info`): the population's (cold start)
    and each user's.

    population: the spec's `chosen` weights (heads not listed weigh 0), else the profiles' population, else
    `alignloop.personal.population_weights` (the population head alone when the model has one, else 1/H each).
    `for_user(name)`: a profiled user's weights fitted to their judgements (n > 0); a name that is a head (a group or
    labeler head): that head; a profiled user's group that is a head: that head (a group says more than a prior
    fitted to nothing); a profiled user's stored weights; else the population's (cold start)."""

    def __init__(self, info: dict, chosen: dict[str, float] | None, profiles: UserProfiles | None,
                 where: str = "reward"):
        self.heads, self.where = list(info["names"]), where
        if profiles is not None and sorted(profiles.heads) != sorted(self.heads):
            raise ConfigError(f"{where}: the user profiles are for the heads {', '.join(profiles.heads)}, not this "
                              f"model's ({', '.join(self.heads)}): fit them again with `alignloop personalize`")
        if chosen:
            self.population = self._full(chosen, "the spec")
        elif profiles is not None:
            self.population = self._full(profiles.population, "the user profiles' population")
        else:
            self.population = population_weights(info)
        self.users = {user: (self._full(p.weights, f"user {user!r}"), p.n, p.group)
                      for user, p in (profiles.users.items() if profiles is not None else ())}

    def _full(self, weights: dict[str, float], what: str) -> dict[str, float]:
        unknown = sorted(set(weights) - set(self.heads))
        if unknown:
            raise ConfigError(f"{self.where}: {what} weighs head(s) {', '.join(unknown)}, not heads of this model "
                              f"(its heads: {', '.join(self.heads)})")
        return {h: float(weights.get(h, 0.0)) for h in self.heads}

    def _one(self, head: str) -> dict[str, float]:
        return self._full({head: 1.0}, f"head {head!r}")

    def for_user(self, user: str | None) -> dict[str, float]:
        weights, n, group = self.users.get(user, (None, 0, None)) if user is not None else (None, 0, None)
        if weights is not None and n > 0:
            return weights
        if user in self.heads:
            return self._one(user)
        if group in self.heads:
            return self._one(group)
        return weights if weights is not None else self.population

    def rows(self, users: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """{head: [B] float32}: each row's weight of each head."""
        per_row = [self.for_user(u) for u in users]
        return {h: torch.tensor([w[h] for w in per_row], dtype=torch.float32) for h in self.heads}


def user_weights(scorer, users: Sequence[str | None]) -> dict[str, float | torch.Tensor]:
    """A scorer's weights for rows of these users: its `user_weights(users)` when it has per-user weights (a
    multi-head model, a weighted sum holding one), else its `.weights`."""
    fn = getattr(scorer, "user_weights", None)
    return fn(users) if fn is not None else scorer.weights


def weights_for(scorer, prompts: Sequence[str]) -> dict[str, float | torch.Tensor]:
    """The weights of rows with these prompts: a `UserTagScorer`'s per-row weights from the prompts' user tags,
    any other scorer's `.weights`."""
    fn = getattr(scorer, "weights_for", None)
    return fn(prompts) if fn is not None else scorer.weights


def score_with_parts(scorer, prompts: Sequence[str], completions: Sequence[str],
                     eos=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(scores [B], parts {name: [B]}) from one pass of the scorer: what best-of-N, rejection sampling and
    evaluation log per part (head) without scoring twice."""
    parts = scorer.parts(prompts, completions, eos)
    return total(parts, weights_for(scorer, prompts)).float(), parts


class UserTagScorer:
    """A scorer for prompts tagged with their user (`alignloop.data.users`, `template`, e.g. "<user:{user}> "): the
    wrapped scorer sees the untagged prompts (a reward model never saw tags) and weighs its parts per row by each
    row's user (`user_weights`: a multi-head model's `HeadWeights`; other scorers' weights are the same for
    everyone). `.weights` are the population's. With a rollout the text is scored (its tokens hold the tag)."""

    def __init__(self, scorer, template: str = USER_TAG):
        check_user_template(template)
        self.scorer, self.template = scorer, template
        self.weights = scorer.weights
        self.name = getattr(scorer, "name", type(scorer).__name__)
        self.model = getattr(scorer, "model", None)   # what PPO's value_model="reward" and the speed-ups look for

    def split(self, prompts: Sequence[str]) -> tuple[list[str | None], list[str]]:
        """(each prompt's user or None, the prompts without their tags)."""
        pairs = [split_user_tag(p, self.template) for p in prompts]
        return [u for u, _ in pairs], [p for _, p in pairs]

    def weights_for(self, prompts: Sequence[str]) -> dict[str, float | torch.Tensor]:
        return user_weights(self.scorer, self.split(prompts)[0])

    def parts(self, prompts, completions, eos=None) -> dict[str, torch.Tensor]:
        return self.scorer.parts(self.split(prompts)[1], completions, eos)

    def rollout_parts(self, rollout: Rollout, prompts, completions) -> dict[str, torch.Tensor]:
        parts = self.parts(prompts, completions, rollout.stopped.tolist())
        return {k: v.to(rollout.response_ids.device) for k, v in parts.items()}

    def __call__(self, prompts, completions, eos=None) -> torch.Tensor:
        return total(self.parts(prompts, completions, eos), self.weights_for(prompts))

    def score_rollout(self, rollout: Rollout, prompts, completions) -> torch.Tensor:
        return total(self.rollout_parts(rollout, prompts, completions), self.weights_for(prompts))


STEP_AGGREGATIONS = ("min", "prod", "last", "mean")
STEP_AGGREGATION_HELP = ("A process reward model's solution score from its step scores: min (the weakest step; "
                         "Math-Shepherd's), prod (all steps right; Lightman et al.), last, mean. Default: the model's "
                         "own (min for a PRM, last for an ORM trained with `alignloop prm --outcome`). Ignored for "
                         "other rewards.")


def check_step_aggregation(how: str | None) -> None:
    """ConfigError unless `how` is None (the model's own) or one of STEP_AGGREGATIONS: the one check of configs
    (before loading anything), the scorer and `aggregate_step_scores`."""
    if how is not None and how not in STEP_AGGREGATIONS:
        raise ConfigError(f"step aggregation (step_aggregation) must be one of {', '.join(STEP_AGGREGATIONS)}, got "
                          f"{how!r}")


def aggregate_step_scores(scores: Sequence[Sequence[float]], how: str = "min") -> list[float]:
    """One score per solution from its steps' scores (probabilities that each step is good): "min" (the weakest
    step, Math-Shepherd), "prod" (the probability that every step is good, Lightman et al. 2023), "last" (the final
    step's: the outcome view's score) or "mean". A solution with no step scores 0.0 whatever `how`: nothing in it is
    shown correct, so an empty answer never wins a best-of-N nor earns an RL reward.
    [[0.9, 0.5, 0.8], [], [0.6]] -> min [0.5, 0.0, 0.6]; prod [0.36, 0.0, 0.6]; last [0.8, 0.0, 0.6];
    mean [0.7333, 0.0, 0.6]."""
    check_step_aggregation(how)
    if how is None:
        raise ConfigError("aggregate_step_scores needs an aggregation: one of " + ", ".join(STEP_AGGREGATIONS))
    out = []
    for row in scores:
        row = [float(v) for v in row]
        if not row:
            out.append(0.0)
        elif how == "min":
            out.append(min(row))
        elif how == "prod":
            out.append(math.prod(row))
        elif how == "last":
            out.append(row[-1])
        else:
            out.append(sum(row) / len(row))
    return out


class ProcessScorer:
    """Scores each step of a solution: a process reward model (a token classifier `alignloop prm` trained, with its
    tokenizer) or a step function `fn(prompts, step_lists) -> list[list[float]]` (a rule-based step verifier; a
    `module:function` spec is loaded). Completions are split into steps with `split_steps` (the PRM's separator).

    `.step_scores(prompts, completions) -> list[list[float]]`: each step's probability of being good (a PRM scores
    the steps that fit its context, whole steps from the start: a longer solution gets fewer scores than steps).
    The scorer protocol (`__call__`, `.parts`, `.score_rollout`) gives `aggregate_step_scores(..., aggregate)`, with
    steps the PRM could not see counted as 0.0; `eos` is ignored (a PRM reads steps, not the end of the text).
    `aggregate` None: the model's own (`alignloop prm --outcome` saves "last": an ORM scores the final step end),
    else "min"."""

    def __init__(self, model_or_fn, tokenizer=None, *, aggregate: str | None = None, separator: str | None = None,
                 batch_size: int = 32, max_length: int | None = None, name: str | None = None):
        if isinstance(model_or_fn, str):
            name = name or spec_name(model_or_fn)
            model_or_fn = load_function(model_or_fn)
        self.model = model_or_fn if isinstance(model_or_fn, nn.Module) else None
        self.fn = None if self.model is not None else model_or_fn
        if self.fn is not None and not callable(self.fn):
            raise ConfigError(f"a process scorer needs a PRM or a step function, got {type(model_or_fn).__name__}")
        if self.model is not None and tokenizer is None:
            raise ConfigError("scoring steps with a process reward model needs its tokenizer (tokenizer=...)")
        info = (prm_info(self.model) if self.model is not None else None) or {}
        self.separator = separator or info.get("separator", STEP_SEPARATOR)
        # an outcome-trained model (the ORM view) is read at its final step end; others by their weakest step
        self.aggregate = aggregate or info.get("aggregate", "min")
        check_step_aggregation(self.aggregate)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.max_length = max_length or (context_length(self.model, tokenizer) if self.model is not None else None)
        self.name = name or ("prm" if self.model is not None else getattr(self.fn, "__name__", "step_function"))
        self.weights = {self.name: 1.0}

    def score_steps(self, prompts: Sequence[str], step_lists: Sequence[Sequence[str]]) -> list[list[float | None]]:
        """Each step's score (None for a step past the PRM's context)."""
        if len(prompts) != len(step_lists):
            raise ValueError(f"got {len(prompts)} prompts for {len(step_lists)} solutions")
        if self.model is not None:
            return score_steps(self.model, self.tokenizer, prompts, step_lists, separator=self.separator,
                               max_length=self.max_length, batch_size=self.batch_size)
        got = self.fn(list(prompts), [list(s) for s in step_lists])
        if not isinstance(got, (list, tuple)) or len(got) != len(step_lists) or any(
                not isinstance(row, (list, tuple, torch.Tensor)) or len(row) != len(steps)
                for row, steps in zip(got, step_lists, strict=False)):
            raise UserError(f"step function {self.name}: expected one list of scores per solution, one score per "
                            f"step ({[len(s) for s in step_lists][:8]} steps), got {str(got)[:120]}")
        return [[float(v) for v in row] for row in got]

    def step_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[float]]:
        steps = [split_steps(c, self.separator) for c in completions]
        return [[v for v in row if v is not None] for row in self.score_steps(prompts, steps)]

    def parts(self, prompts: Sequence[str], completions: Sequence[str], eos=None) -> dict[str, torch.Tensor]:
        steps = [split_steps(c, self.separator) for c in completions]
        scores = [[0.0 if v is None else v for v in row] for row in self.score_steps(prompts, steps)]
        return {self.name: torch.tensor(aggregate_step_scores(scores, self.aggregate), dtype=torch.float32)}

    def rollout_parts(self, rollout: Rollout, prompts, completions) -> dict[str, torch.Tensor]:
        return {k: v.to(rollout.response_ids.device) for k, v in self.parts(prompts, completions).items()}

    def __call__(self, prompts, completions, eos=None) -> torch.Tensor:
        return total(self.parts(prompts, completions, eos), self.weights)

    def score_rollout(self, rollout: Rollout, prompts, completions) -> torch.Tensor:
        return total(self.rollout_parts(rollout, prompts, completions), self.weights)


Scorer = FunctionScorer | ModelScorer | WeightedScorer | ProcessScorer | UserTagScorer
SCORERS = (FunctionScorer, ModelScorer, WeightedScorer, ProcessScorer, UserTagScorer)


# ------------------------------------------------------------------------------------------------ transform
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


# ------------------------------------------------------------------------------------------------ loading
def load_reward_model(name_or_path: str | os.PathLike, dtype=None) -> tuple[nn.Module, object]:
    """(sequence classifier in eval mode, its tokenizer) from a folder or hub id. A checkpoint without a trained
    classification head (e.g. a plain causal LM) is refused: its scores would come from a random head."""
    model, info = load_sequence_classifier(name_or_path, dtype=dtype, output_loading_info=True)
    missing = sorted(k for k in (info or {}).get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier"))
    if missing:
        raise UserError(f"{name_or_path} is not a reward model or classifier: its classification head "
                        f"({', '.join(missing)}) is not in the checkpoint (train one with `alignloop rm`)")
    return model.eval(), load_tokenizer(str(name_or_path), padding_side="right")


def load_scorer(specs: str | Sequence[str], *, dtype=None, positive_label: int | str = 1, batch_size: int = 32,
                add_eos: bool = True, policy_tokenizer=None, device=None, step_aggregation: str | None = None,
                user_tag: str | None = None, user_profiles=None) -> Scorer:
    """A scorer from one spec or several `SPEC=WEIGHT` (see the module docstring). SPEC: a reward-model /
    classifier folder or hub id, a multi-head reward model's `DIR` or `DIR:head=w,head=w`, a process reward model
    folder (a `ProcessScorer` aggregating its step scores with `step_aggregation`; None: the model's own, see
    `ProcessScorer`), or `module:function`. `user_tag`: a `UserTagScorer` for user-tagged prompts, its multi-head
    models weighted per user by `user_profiles` (`load_profiles`; default: `user_profiles.json` in the model's
    folder when there is one)."""
    items = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    if not items:
        raise ConfigError("no reward given: a reward-model folder or hub id, or module:function")
    built = []
    for item in items:
        spec, heads = split_heads(str(item))
        spec, weight = split_weight(spec) if heads is None else (spec, 1.0)
        if is_function_spec(spec):
            scorer = FunctionScorer(load_function(spec), spec_name(spec))
        elif is_prm_folder(spec):
            model, tok = load_prm(spec, dtype, device)
            scorer = ProcessScorer(model, tok, aggregate=step_aggregation, batch_size=batch_size,
                                   name=spec_name(spec))
        else:
            model, tok = load_reward_model(spec, dtype)
            if device is not None:
                model.to(device)
            beside = Path(spec, USER_PROFILES_FILE)
            profiles = None if heads_info(model.config) is None else (
                user_profiles if user_profiles is not None else beside if beside.is_file() else None)
            scorer = ModelScorer(model, tok, policy_tokenizer=policy_tokenizer, positive_label=positive_label,
                                 batch_size=batch_size, add_eos=add_eos, name=spec_name(spec), head_weights=heads,
                                 user_profiles=profiles)
        if heads is not None and getattr(scorer, "heads", None) is None:
            raise ConfigError(f"reward {item!r}: head weights need a multi-head reward model, {spec} is not one")
        built.append((scorer, weight))
    scorer = built[0][0] if len(built) == 1 and built[0][1] == 1.0 else WeightedScorer(built)
    return UserTagScorer(scorer, user_tag) if user_tag else scorer


def build_scorer(reward, tokenizer=None, *, policy_tokenizer=None, positive_label: int | str = 1,
                 batch_size: int = 32, add_eos: bool = True, dtype=None, device=None,
                 step_aggregation: str | None = None, user_tag: str | None = None,
                 user_profiles=None) -> Scorer | None:
    """A scorer from whatever the user handed over: a scorer (as is), a spec string or list (`load_scorer`), a model
    (`RewardModel`, `ClassifierReward`, any transformers sequence classifier, a multi-head or process reward model;
    with its `tokenizer`) or a function `f(prompts, completions) -> floats`. None stays None. `user_tag`: wrapped in
    a `UserTagScorer` (a scorer that is one already stays as it is); `user_profiles` for a multi-head model object
    (a spec's come from its folder)."""
    if reward is None or isinstance(reward, UserTagScorer):
        return reward
    if isinstance(reward, SCORERS):
        return UserTagScorer(reward, user_tag) if user_tag else reward
    if isinstance(reward, (str, os.PathLike)) or (isinstance(reward, (list, tuple)) and reward
                                                  and all(isinstance(r, (str, os.PathLike)) for r in reward)):
        return load_scorer(reward, dtype=dtype, positive_label=positive_label, batch_size=batch_size,
                           add_eos=add_eos, policy_tokenizer=policy_tokenizer, device=device,
                           step_aggregation=step_aggregation, user_tag=user_tag, user_profiles=user_profiles)
    if isinstance(reward, nn.Module):
        if device is not None:
            reward.to(device)
        if prm_info(reward) is not None:
            scorer = ProcessScorer(reward, tokenizer, aggregate=step_aggregation, batch_size=batch_size)
        else:
            scorer = ModelScorer(reward, tokenizer, policy_tokenizer=policy_tokenizer, positive_label=positive_label,
                                 batch_size=batch_size, add_eos=add_eos, user_profiles=user_profiles)
    elif callable(reward):
        scorer = FunctionScorer(reward)
    else:
        raise ConfigError(f"reward must be a model, a ClassifierReward, a function f(prompts, completions), a "
                          f"folder / hub id or module:function, got {type(reward).__name__}")
    return UserTagScorer(scorer, user_tag) if user_tag else scorer
