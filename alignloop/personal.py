"""Few-shot personalization: a new user's weights over a multi-head reward model's heads, from a handful of their
judgements (`alignloop personalize`).

A multi-head reward model (`alignloop.models.reward`: one head per criterion, labeler group or labeler, often a
population head) scores a completion with H numbers. A user's reward is modelled as a weighted sum w · s(x, y) of
those head scores (P-RLHF's per-user linear weights over shared features, Li et al. 2024), so their judgement
"chosen ≻ rejected" has the Bradley-Terry probability σ(w · d) with d = s(chosen) − s(rejected), the heads' score
differences. `fit_user_weights` fits w to a user's judgements by logistic regression without intercept (a reward is
shift-free), pulled toward a prior w0 (the population's weights) by an L2 term:

    minimise  L(w) = Σ_i −log σ(w · d_i) + (l2 / 2) · ‖w − w0‖²

strictly convex for l2 > 0, solved by Newton's method (exact gradient and Hessian Σ σ(1−σ) d dᵀ + l2·I, a
backtracking line search; float64, deterministic). With no judgements the answer is the prior; the more a user
judges, the further the data move w. Cold start is thus the population model itself.

Worked cases (`tests/personal/test_personal.py` checks them):
  - 0 judgements: w = w0 exactly.
  - n judgements with d = (1, 0) (head 0 prefers the chosen one, head 1 cannot tell them apart): head 1's weight
    stays w0[1] (no judgement says anything about it: ∂L/∂w1 = l2 (w1 − w0[1])), head 0's grows to the root of
    n·σ(−w0') = l2 (w0' − w0[0]); e.g. w0 = (0, 0), l2 = 1, n = 4: w0' ≈ 1.0426 (4σ(−1.0426) = 1.0426).
  - two contradictory judgements d and −d with w0 · d = 0: they cancel, w = w0.
  - judgements that one head explains perfectly (its difference always favours the chosen one) while another's
    is noise: w moves toward that head (its weight grows; the noise head's stays near its prior).

Profiles (`UserProfiles`, the JSON `user_profiles.json` saved beside the model, which `alignloop.scoring` reads):
    {"heads": [...], "population": {head: w}, "users": {user: {"weights": {head: w}, "n": k, "group": g | null}}}

API:
    fit_user_weights(head_diffs [n, H], prior [H], l2=1.0) -> w [H] (float64 tensor)
    population_weights(heads) -> {head: w}: the population head alone when there is one, else 1/H each
    head_diffs(model, tokenizer, groups, batch_size=16, max_length=None, add_eos=True) -> [n, H]: each pair's
        chosen − rejected head scores, tokenised as reward-model training did
    UserProfiles(heads, population, users); .load(path_or_folder); .save(path_or_folder) -> Path;
        .set_user(name, weights, n, group)
    personalize(reward_model, train_file, user=None, l2=1.0, output=None, ...) -> (user, UserProfile, Path)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alignloop.data import (
    PreferenceGroup,
    RankingCollator,
    check_user,
    load_preferences,
    meta_key,
    tokenize_rankings,
)
from alignloop.errors import UserError
from alignloop.models import RewardModel, heads_info, load_tokenizer

USER_PROFILES_FILE = "user_profiles.json"


# ---------------------------------------------------------------- the fit

def fit_user_weights(head_diffs: Any, prior: Any, l2: float = 1.0, *, max_iter: int = 100,
                     tol: float = 1e-10) -> torch.Tensor:
    """A user's weights over H heads [H] (float64) from their judgements' head score differences `head_diffs`
    [n, H] (chosen − rejected, one row per judgement; n may be 0): logistic regression without intercept with an
    L2 pull of strength `l2` (> 0) toward `prior` [H] (see the module docstring). Newton's method until the gradient's
    largest entry is below `tol`."""
    d = torch.as_tensor(head_diffs, dtype=torch.float64).detach().cpu()
    w0 = torch.as_tensor(prior, dtype=torch.float64).detach().cpu()
    if w0.dim() != 1 or d.dim() != 2 or d.shape[1] != w0.shape[0]:
        raise ValueError(f"head_diffs must be [n, H] and prior [H]; got {tuple(d.shape)} and {tuple(w0.shape)}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (without the pull toward the prior, separable judgements have no "
                         f"finite fit), got {l2}")
    if not (torch.isfinite(d).all() and torch.isfinite(w0).all()):
        raise ValueError("head_diffs and prior must be finite")

    def objective(w: torch.Tensor) -> torch.Tensor:
        return F.softplus(-(d @ w)).sum() + 0.5 * l2 * (w - w0).pow(2).sum()   # softplus(−z) = −log σ(z)

    w = w0.clone()
    eye = torch.eye(w0.shape[0], dtype=torch.float64)
    for _ in range(max_iter):
        wrong = torch.sigmoid(-(d @ w))                       # [n] P(the judgement goes the other way)
        grad = -(d * wrong[:, None]).sum(0) + l2 * (w - w0)
        if grad.abs().max() < tol:
            break
        hessian = (d.T * (wrong * (1 - wrong))) @ d + l2 * eye
        step = torch.linalg.solve(hessian, grad)
        # Newton's full step can overshoot far from the optimum; halve it until L decreases enough (Armijo)
        t, now, slope = 1.0, objective(w), float(grad @ step)
        while objective(w - t * step) > now - 1e-4 * t * slope and t > 1e-12:
            t /= 2
        w = w - t * step
    return w


def population_weights(heads: dict[str, Any]) -> dict[str, float]:
    """The weights of someone nobody knows (a `heads_info` dict): the population head alone when the model has one,
    else every head equally (the mixture of the groups or criteria)."""
    names = heads["names"]
    if heads.get("population"):
        return {h: float(h == heads["population"]) for h in names}
    return {h: 1.0 / len(names) for h in names}


# ---------------------------------------------------------------- scoring a user's pairs

@torch.no_grad()
def head_diffs(model: RewardModel, tokenizer, groups: list[PreferenceGroup], batch_size: int = 16,
               max_length: int | None = None, add_eos: bool = True) -> torch.Tensor:
    """Each strict pair's head score differences [n, H] (chosen − rejected; float32, in the groups' pair order),
    every completion tokenised and scored once as reward-model training did (`tokenize_rankings`, right padding)."""
    examples, _ = tokenize_rankings(groups, tokenizer, max_length=max_length, add_eos=add_eos)
    collate = RankingCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size])
            scores = model.head_scores(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu()
            diffs = scores[batch["chosen_index"]] - scores[batch["rejected_index"]]          # [P, H]
            out.append(diffs[~batch["tie"]])
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.num_heads)


# ---------------------------------------------------------------- profiles

@dataclass
class UserProfile:
    """One user's fitted weights {head: w}, from `n` judgements; `group`: their labeler group when the data said."""
    weights: dict[str, float]
    n: int = 0
    group: str | None = None


@dataclass
class UserProfiles:
    """The heads of a model, the population's weights and each profiled user's: `user_profiles.json`."""
    heads: list[str]
    population: dict[str, float]
    users: dict[str, UserProfile] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": list(self.heads), "population": dict(self.population),
                "users": {u: {"weights": dict(p.weights), "n": p.n, "group": p.group} for u, p in self.users.items()}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "user profiles") -> UserProfiles:
        """Check and read the JSON shape (a UserError naming the field that is wrong)."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected an object {{heads, population, users}}, got {type(data).__name__}")
        heads = data.get("heads")
        if not isinstance(heads, list) or not heads or not all(isinstance(h, str) for h in heads):
            raise UserError(f"{where}: 'heads': expected a non-empty list of head names, got {heads!r}")
        population = _weights(data.get("population"), heads, f"{where}: 'population'")
        users = data.get("users", {})
        if not isinstance(users, dict):
            raise UserError(f"{where}: 'users': expected an object of user -> profile, got {type(users).__name__}")
        profiles = {}
        for name, entry in users.items():
            what = f"{where}: user {name!r}"
            if not isinstance(entry, dict):
                raise UserError(f"{what}: expected {{weights, n, group}}, got {type(entry).__name__}")
            n, group = entry.get("n", 0), entry.get("group")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise UserError(f"{what}: 'n': expected a count >= 0, got {n!r}")
            if group is not None and not isinstance(group, str):
                raise UserError(f"{what}: 'group': expected a string or null, got {group!r}")
            profiles[name] = UserProfile(_weights(entry.get("weights"), heads, f"{what}: 'weights'"), n, group)
        return cls(list(heads), population, profiles)

    @classmethod
    def load(cls, path: str | os.PathLike) -> UserProfiles:
        """From a file, or a folder holding `user_profiles.json` (a model folder)."""
        path = Path(path)
        path = path / USER_PROFILES_FILE if path.is_dir() else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: no such user profiles file (write one with `alignloop personalize`)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not readable JSON ({e})") from None
        return cls.from_dict(data, str(path))

    def save(self, path: str | os.PathLike) -> Path:
        """To a file, or into a folder as `user_profiles.json`; written aside and renamed into place."""
        path = Path(path)
        path = path / USER_PROFILES_FILE if path.is_dir() else path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def set_user(self, name: str, weights: dict[str, float], n: int, group: str | None = None) -> UserProfile:
        profile = UserProfile(_weights(weights, self.heads, f"user {name!r}"), n, group)
        self.users[check_user(name)] = profile
        return profile


def _weights(value: Any, heads: list[str], what: str) -> dict[str, float]:
    """{head: weight} over exactly `heads`, numbers (heads left out weigh 0)."""
    if not isinstance(value, dict):
        raise UserError(f"{what}: expected an object of head -> weight, got {type(value).__name__}")
    unknown = sorted(set(value) - set(heads))
    if unknown:
        raise UserError(f"{what}: {', '.join(map(repr, unknown))} not among the heads {heads}")
    bad = [h for h, w in value.items() if isinstance(w, bool) or not isinstance(w, (int, float))]
    if bad:
        raise UserError(f"{what}: the weight of {bad[0]!r} is not a number ({value[bad[0]]!r})")
    return {h: float(value.get(h, 0.0)) for h in heads}


# ---------------------------------------------------------------- one user, end to end

def _users_pairs(groups: list[PreferenceGroup], user: str | None, source) -> tuple[str, list[PreferenceGroup]]:
    """The user's name and their groups: `user` given -> the rows whose `labeler` is theirs (all rows when the data
    has no labeler column); not given -> the one labeler of the rows."""
    labelers = {g.meta.get("labeler") for g in groups}
    if user is None:
        named = labelers - {None}
        if len(named) != 1 or None in labelers:
            raise UserError(f"{source}: name the user (--user): the rows' labelers are "
                            f"{sorted(named) or 'not given'}" + (" (and some rows have none)" if None in labelers
                                                                  and named else ""))
        return check_user(named.pop()), groups
    check_user(user)
    if labelers == {None}:
        return user, groups
    mine = [g for g in groups if g.meta.get("labeler") == user]
    if not mine:
        raise UserError(f"{source}: no row has labeler {user!r} (labelers: {sorted(labelers - {None})})")
    return user, mine


def personalize(reward_model: str | os.PathLike, train_file: Any, user: str | None = None, l2: float = 1.0,
                output: str | os.PathLike | None = None, score_batch_size: int = 16, max_length: int | None = None,
                add_eos: bool = True, dtype: str | None = None) -> tuple[str, UserProfile, Path]:
    """Fit one user's weights over a multi-head reward model's heads from their preferences and add them to the
    profiles file (`output`, default `user_profiles.json` in the model folder; kept users stay). The prior: the
    user's group head when their rows name a group (`labeler_attributes.group`) that is a head, else the profiles'
    population weights (`population_weights` for a new file). Returns (user, profile, path of the profiles file)."""
    heads = heads_info(reward_model)
    if heads is None:
        raise UserError(f"{reward_model}: a one-head reward model has nothing to weigh; personalize a multi-head "
                        f"model (alignloop rm --heads-by criterion|group|labeler [--population-head])")
    groups, _ = load_preferences(train_file)
    user, groups = _users_pairs(groups, user, train_file)
    path = Path(output) if output is not None else Path(reward_model) / USER_PROFILES_FILE
    profiles = (UserProfiles.load(path) if path.is_file()
                else UserProfiles(heads["names"], population_weights(heads)))
    if profiles.heads != heads["names"]:
        raise UserError(f"{path}: its heads {profiles.heads} are not the model's {heads['names']}")
    found = {meta_key(g.meta, "group") for g in groups} - {None}
    group = found.pop() if len(found) == 1 else None
    prior = ({h: float(h == group) for h in heads["names"]} if group in heads["names"] and heads["by"] == "group"
             else profiles.population)
    model = RewardModel.from_pretrained(reward_model, dtype=dtype)
    tokenizer = load_tokenizer(reward_model, padding_side="right")
    diffs = head_diffs(model, tokenizer, groups, batch_size=score_batch_size, max_length=max_length, add_eos=add_eos)
    w = fit_user_weights(diffs, [prior[h] for h in heads["names"]], l2)
    profile = profiles.set_user(user, dict(zip(heads["names"], w.tolist(), strict=True)), len(diffs), group)
    return user, profile, profiles.save(path)
