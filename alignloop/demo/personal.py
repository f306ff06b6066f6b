"""`alignloop demo --personal`: whose preferences? Two simulated labeler populations with opposing hidden tastes on
the toy movie-review domain, a single reward model against a personalized one, few-shot weights for new users, and
a generic policy against a user-conditioned one. Offline, on CPU.

The two groups (`GROUPS`), each judging by its own hidden gold scorer (`GOLD`):
  warm     wants warm, enthusiastic reviews: `alignloop.demo.domain.gold_score` (the default demo's gold)
  critic   wants balanced, specific critiques: `critic_score` (aspects named, praise and criticism both, no gushing)
On the SFT model's reviews the two golds order a pair the same way only about a quarter of the time, so a reward
model fitted to the mixed population (warm the majority) learns the majority's taste and ranks the critics' pairs
no better than a coin, or worse (Siththaranjan et al. 2023: a single Bradley-Terry model aggregates hidden context).
Each labeler is a noisy Bradley-Terry judge of its group's gold (`alignloop.pipeline.labelers.judge`), and each
preference row says who judged it: `labeler` and `labeler_attributes: {"group": ...}` (the data vocabulary).

Stages (each resumable through `alignloop.pipeline.RunFolder`; the folder names are the stage names):
  data, base, sft   the default demo's: corpus, demonstrations and prompts; the small GPT-2 pretrained from scratch;
                    SFT on the demonstrations (`alignloop.demo.demo`), two thirds of their prompts tagged with a
                    random group (`stage_tagged_sft`: a tag the SFT model has read, telling it nothing yet)
  samples   `completions_per_prompt` reviews per labeling prompt from the SFT model, with both golds
  labels    prompts split into training and held-out ones; each prompt's pairs judged by `labelers_per_prompt`
            labelers of the population (3 warm, 2 critics); new users (`new_users` per group, never in training)
            judge every held-out pair
  rm_single        one reward model on every training row, whoever judged it
  rm_personal      the same trainer with one head per group and a population head (`heads_by="group"`)
  rm_eval          each model's held-out pairwise accuracy per group, against the group's labels and its gold
  fewshot          each new user's weights over the heads fitted from k of their judgements
                   (`alignloop.personal.fit_user_weights`, the population weights as the prior), k = 0, 1, 2, ...;
                   accuracy on their other judgements against the population model's
  policy_generic   RLOO of the SFT model against the single reward model
  policy_personal  the same trainer on prompts tagged with a group (`<user:warm> Review of ...`), against the
                   personalized model weighted per prompt by the tag's head (`OnlineRLArgs.user_tag`)
  eval      each group's mean gold score of the SFT model, the generic policy and the personalized policy given that
            group's tag, on held-out prompts
  report    report.md / report.html and results.json (`alignloop.demo.personal_report`)
"""
from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignloop.data import USER_TAG, read_rows, tag_prompt, write_rows
from alignloop.demo import domain
from alignloop.demo.demo import DemoSize, critic_free_section, demo_config, stage_base, stage_data
from alignloop.demo.personal_report import write_personal_report
from alignloop.errors import UserError
from alignloop.evaluation import load_policy, mean, sample_policy, win_rate
from alignloop.models import heads_info
from alignloop.personal import UserProfiles, fit_user_weights, population_weights
from alignloop.pipeline import RunFolder
from alignloop.pipeline.labelers import SimulatedLabeler, judge
from alignloop.pipeline.stages import numbers, stage_sft
from alignloop.scoring import load_scorer
from alignloop.trainers.grpo import GRPOTrainer, RLOOConfig
from alignloop.trainers.rm import RewardConfig, RewardTrainer
from alignloop.training.loop import set_threads

TASK = "personal"
GROUPS = ("warm", "critic")
SAMPLES, LABELS, RM_SINGLE, RM_PERSONAL, RM_EVAL = "samples", "labels", "rm_single", "rm_personal", "rm_eval"
FEWSHOT, POLICY_GENERIC, POLICY_PERSONAL, EVAL, REPORT = ("fewshot", "policy_generic", "policy_personal", "eval",
                                                          "report")
POPULATION = "population"


# ------------------------------------------------------------------------------------------------ the two tastes
_WORD = re.compile(r"[a-z]+|\.")
ASPECT_SET = frozenset(domain.ASPECTS)
INTENSIFIER_SET = frozenset(domain.INTENS)


def warm_score(text: str) -> float:
    """The warm group's gold: the default demo's (`domain.gold_score`): praise up, criticism down, a warm closing
    line up, too short or rambling down."""
    return domain.gold_score(text)


def critic_score(text: str) -> float:
    """The critic group's gold: a balanced, specific critique. Roughly in [-8, 8].

    + 1 per distinct aspect named (acting, plot, music, ...), at most 4 (specific);
    + 2 when one sentence praises and another criticises (balanced);
    + 0.5 per distinct criticism word, at most 3;
    - 1 per praise word beyond the first (gushing), - 1.5 per warm closing line ("highly recommended ."),
    - 0.5 per intensifier (very, really, quite, so, rather);
    - 2 if the review has fewer than 2 sentences, - 0.25 per word beyond 40 (the warm gold's penalties)."""
    words = _WORD.findall(text.lower())
    low = " ".join(words)
    sentences = [s.split() for s in low.split(".") if s.strip()]
    praises = sum(any(w in domain.POSITIVE_SET for w in s) for s in sentences)
    criticises = sum(any(w in domain.NEGATIVE_SET for w in s) for s in sentences)
    s = 1.0 * min(len(set(words) & ASPECT_SET), 4)
    s += 2.0 if praises and criticises else 0.0
    s += 0.5 * min(len(set(words) & domain.NEGATIVE_SET), 3)
    s -= 1.0 * max(0, sum(w in domain.POSITIVE_SET for w in words) - 1)
    s -= 1.5 * sum(1 for p in domain.POSITIVE_PHRASES if p in low)
    s -= 0.5 * sum(w in INTENSIFIER_SET for w in words)
    n_sent = words.count(".")
    if n_sent < 2:
        s -= 2.0
    s -= 0.25 * max(0, len(words) - n_sent - 40)
    return float(s)


GOLD: dict[str, Callable[[str], float]] = {"warm": warm_score, "critic": critic_score}


def gold_scores(group: str, responses) -> list[float]:
    """Group `group`'s gold score of each response."""
    return [GOLD[group](r) for r in responses]


def gold_agreement_rate(texts: list[str], seed: int = 0) -> float:
    """The share of pairs of `texts` (random, disjoint) that the two golds order the same way, among pairs both
    order (no tie): how opposed the tastes are on these texts (0.5: unrelated, 0: exactly opposed)."""
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    same = both = 0
    for a, b in zip(texts[::2], texts[1::2], strict=False):
        dw, dc = warm_score(a) - warm_score(b), critic_score(a) - critic_score(b)
        if dw and dc:
            both += 1
            same += (dw > 0) == (dc > 0)
    return same / both if both else float("nan")


# ------------------------------------------------------------------------------------------------ populations
@dataclass
class GroupLabeler(SimulatedLabeler):
    """A simulated labeler of a group: a noisy Bradley-Terry judge (`temperature` τ) of its group's gold."""
    group: str = "warm"


TEMPERATURES = (0.7, 1.0, 1.3, 0.85, 1.15)


def population(n_warm: int = 3, n_critic: int = 2) -> list[GroupLabeler]:
    """The labelers whose judgements train the reward models: warm-1..n, critic-1..m (noise τ from TEMPERATURES)."""
    out = []
    for group, n in (("warm", n_warm), ("critic", n_critic)):
        out += [GroupLabeler(f"{group}-{i + 1}", temperature=TEMPERATURES[i % len(TEMPERATURES)], group=group)
                for i in range(n)]
    return out


def new_users(n_per_group: int, seed: int = 0) -> list[GroupLabeler]:
    """Users of each group never seen in training (new-warm-1, ..., new-critic-1, ...), τ drawn in [0.7, 1.3]."""
    rng = random.Random(seed)
    return [GroupLabeler(f"new-{g}-{i + 1}", temperature=round(rng.uniform(0.7, 1.3), 2), group=g)
            for g in GROUPS for i in range(n_per_group)]


def judge_pair(lab: GroupLabeler, prompt: str, a: str, b: str, rng: random.Random) -> dict:
    """A preference row of `lab` on completions a and b (shown in a random order), with who judged it."""
    left, right = (a, b) if rng.random() < 0.5 else (b, a)
    gold = GOLD[lab.group]
    choice = judge(lab, gold(left), gold(right), rng)["choice"]
    chosen, rejected = (left, right) if choice == "left" else (right, left)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "labeler": lab.name,
            "labeler_attributes": {"group": lab.group}}


def prompt_pairs(row: dict) -> list[tuple[str, str]]:
    """Every pair of a prompt's distinct completions."""
    return list(itertools.combinations(row["completions"], 2))


# ------------------------------------------------------------------------------------------------ sizes
@dataclass
class PersonalSize:
    """Sizes of every stage (the default is the full demo; `quick()` the reduced one the tests run). The base and
    SFT models are the default demo's (`DemoSize` fields of the same names)."""
    corpus: int = 4000
    demos: int = 1000
    n_embd: int = 128
    pretrain_steps: int = 500
    sft_steps: int = 150
    label_prompts: int = 256              # every training prompt of the demo (domain.prompt_split)
    completions_per_prompt: int = 4       # 6 pairs per prompt
    labelers_per_prompt: int = 2          # drawn from the population (3 warm, 2 critics): 60% warm judgements
    heldout_prompts: int = 60             # of label_prompts: no reward model trains on them; the new users judge them
    n_warm: int = 3
    n_critic: int = 2
    rm_epochs: int = 4
    rm_learning_rate: float = 5e-4
    new_users: int = 8                    # per group
    fewshot_ks: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16, 32])
    fewshot_draws: int = 8                # random draws of a user's k judgements (averaged)
    fewshot_l2: float = 3.0               # the pull toward the population weights (1 and 0.3: a worse k = 1, 2)
    # each policy: rl_updates x rl_prompts x rl_generations completions. The default demo's RLOO (80 updates, learning
    # rate 1e-4, KL 0.15) left the tag-conditioned policy hardly telling the groups apart (160 updates too; 300 at
    # 1e-4: critic-tag critic gold 4.2 vs warm-tag 3.7); 300 at 3e-4, KL 0.05: 5.7 vs 1.0, measured
    rl_updates: int = 300
    rl_prompts: int = 8
    rl_generations: int = 4
    rl_learning_rate: float = 3e-4
    rl_kl_coef: float = 0.05
    eval_prompts: int = 64
    eval_samples: int = 4                 # per prompt and policy
    max_new_tokens: int = 40

    @classmethod
    def quick(cls) -> PersonalSize:
        return cls(corpus=2000, demos=600, n_embd=96, pretrain_steps=250, sft_steps=100, label_prompts=120,
                   heldout_prompts=40, rm_epochs=3, new_users=4, fewshot_ks=[0, 1, 4, 16], fewshot_draws=4,
                   rl_updates=60, eval_prompts=32, eval_samples=2)

    def demo_size(self) -> DemoSize:
        """The default demo's sizes with this run's base and SFT sizes (the stages reused from it read these)."""
        return DemoSize(corpus=self.corpus, demos=self.demos, n_embd=self.n_embd, pretrain_steps=self.pretrain_steps,
                        sft_steps=self.sft_steps, eval_prompts=self.eval_prompts, rl_updates=self.rl_updates,
                        rl_prompts=self.rl_prompts, rl_generations=self.rl_generations,
                        max_new_tokens=self.max_new_tokens)


# ------------------------------------------------------------------------------------------------ stages
def stage_tagged_sft(folder: Path, run: RunFolder, size: DemoSize, seed: int) -> dict:
    """The default demo's SFT stage on its demonstrations, a third of their prompts tagged `<user:warm> `, a third
    `<user:critic> `, drawn independently of the review: the SFT model reads a tag and writes the same reviews with or
    without one (untagged it wrote short, broken reviews after a tag, measured: 10-15 tokens instead of 23), so RL
    starts from a policy for which the tag says nothing yet."""
    rng = random.Random(seed + 3)
    rows = [{**r, "prompt": tag_prompt(r["prompt"], rng.choice((None, *GROUPS)))}
            for r in read_rows(run.data_dir / "demos.jsonl")]
    write_rows(rows, folder / "demos_tagged.jsonl")
    cfg = demo_config(run.root, size, seed)
    cfg.sft["train_rows"] = rows
    return stage_sft(folder, cfg)


def stage_samples(folder: Path, run: RunFolder, size: PersonalSize, seed: int) -> dict:
    """`completions_per_prompt` SFT reviews per labeling prompt (distinct ones kept), with both golds."""
    prompts = [r["prompt"] for r in read_rows(run.data_dir / "prompts.jsonl")]
    random.Random(seed).shuffle(prompts)
    prompts = prompts[:size.label_prompts]
    model, tok = load_policy(str(run.sft_model))
    k = size.completions_per_prompt
    s = sample_policy(model, tok, prompts, k, size.max_new_tokens, seed=seed + 7)
    rows = []
    for i, p in enumerate(prompts):
        texts = list(dict.fromkeys(s.responses[i * k:(i + 1) * k]))
        rows.append({"prompt": p, "completions": texts, "gold": {g: gold_scores(g, texts) for g in GROUPS}})
    write_rows(rows, folder / "samples.jsonl")
    texts = [t for r in rows for t in r["completions"]]
    return {"prompts": len(rows), "completions": len(texts),
            "gold_agreement": gold_agreement_rate(texts, seed),
            **{f"sft_gold/{g}": mean(gold_scores(g, texts)) for g in GROUPS}}


def stage_labels(folder: Path, run: RunFolder, size: PersonalSize, seed: int) -> dict:
    """Training and held-out preference rows of the population, and the new users' judgements of the held-out
    pairs (`labeler`, `labeler_attributes` on every row)."""
    rows = [dict(r) for r in read_rows(run.path(SAMPLES) / "samples.jsonl")]
    rng = random.Random(seed + 11)
    labelers = population(size.n_warm, size.n_critic)
    held = set(range(len(rows) - size.heldout_prompts, len(rows)))
    train, heldout, users = [], [], []
    for i, row in enumerate(rows):
        judges = rng.sample(labelers, size.labelers_per_prompt)
        for lab in judges:
            for a, b in prompt_pairs(row):
                (heldout if i in held else train).append(judge_pair(lab, row["prompt"], a, b, rng))
    for lab in new_users(size.new_users, seed):
        for i in sorted(held):
            users += [judge_pair(lab, rows[i]["prompt"], a, b, rng) for a, b in prompt_pairs(rows[i])]
    write_rows(train, folder / "train.jsonl")
    write_rows(heldout, folder / "heldout.jsonl")
    write_rows(users, folder / "new_users.jsonl")
    by_group = {g: sum(r["labeler_attributes"]["group"] == g for r in train) for g in GROUPS}
    return {"train_rows": len(train), "heldout_rows": len(heldout), "new_user_rows": len(users),
            "train_prompts": len(rows) - len(held), "heldout_prompts": len(held),
            "labelers": {lab.name: lab.temperature for lab in labelers},
            **{f"train_rows/{g}": n for g, n in by_group.items()}}


def rm_config(folder: Path, size: PersonalSize, seed: int, personal: bool) -> RewardConfig:
    """The default demo's reward-model settings; `personal`: one head per group and a population head."""
    heads = {"heads_by": "group", "population_head": True} if personal else {}
    return RewardConfig(output_dir=str(folder), num_epochs=size.rm_epochs, learning_rate=size.rm_learning_rate,
                        per_device_batch_size=16, max_length=96, warmup_steps=5, use_margin=False, seed=seed,
                        progress=False, tensorboard=False, logging_steps=10, eval_fraction=0.0, **heads)


def stage_rm(folder: Path, run: RunFolder, size: PersonalSize, seed: int, personal: bool) -> dict:
    """A reward model from the SFT model on every training row: one score (`personal` False) or per-group heads plus
    a population head."""
    rows = [dict(r) for r in read_rows(run.path(LABELS) / "train.jsonl")]
    res = RewardTrainer(model=str(run.sft_model), args=rm_config(folder, size, seed, personal),
                        train_dataset=rows).train()
    return {"model": res.output_dir, "steps": res.steps, "rows": len(rows), **numbers(res.metrics)}


def pairwise_accuracy(diffs) -> float:
    """The share of pairs whose score difference (chosen − rejected) is positive; a tie counts ½."""
    diffs = [float(d) for d in diffs]
    return win_rate(diffs, [0.0] * len(diffs)) if diffs else float("nan")   # chosen "wins" against rejected


def score_texts(spec: str, keys: list[tuple[str, str]]) -> dict[str, list[float]]:
    """{part: scores} of (prompt, completion) `keys` by a reward model: one part for a one-score model, one per
    head of a multi-head one."""
    scorer = load_scorer(spec, batch_size=64)
    parts = scorer.parts([p for p, _ in keys], [c for _, c in keys])
    return {name: v.tolist() for name, v in parts.items()}


class TextScores:
    """Scores of (prompt, completion) by every model and head, and the golds; `diff(model, row)` = chosen −
    rejected."""

    def __init__(self, keys: list[tuple[str, str]], scores: dict[str, list[float]]):
        self.index = {k: i for i, k in enumerate(keys)}
        self.scores = scores

    def write(self, path: Path) -> None:
        write_rows([{"prompt": p, "completion": c, **{n: v[i] for n, v in self.scores.items()}}
                    for (p, c), i in self.index.items()], path)

    @classmethod
    def read(cls, path: Path) -> TextScores:
        rows = [dict(r) for r in read_rows(path)]
        names = [k for k in rows[0] if k not in ("prompt", "completion")] if rows else []
        return cls([(r["prompt"], r["completion"]) for r in rows], {n: [r[n] for r in rows] for n in names})

    def value(self, name: str, prompt: str, completion: str) -> float:
        return self.scores[name][self.index[(prompt, completion)]]

    def diff(self, name: str, row: dict) -> float:
        return self.value(name, row["prompt"], row["chosen"]) - self.value(name, row["prompt"], row["rejected"])


def heldout_scores(run: RunFolder) -> TextScores:
    """Every held-out (prompt, completion) scored by the single model ("single"), each head of the personalized one
    ("personal/<head>") and each group's gold ("gold/<group>")."""
    rows = [dict(r) for r in read_rows(run.path(LABELS) / "heldout.jsonl")]
    keys = sorted({(r["prompt"], c) for r in rows for c in (r["chosen"], r["rejected"])})
    scores = {"single": next(iter(score_texts(str(run.path(RM_SINGLE) / "final"), keys).values()))}
    scores.update({f"personal/{h}": v for h, v in score_texts(str(run.path(RM_PERSONAL) / "final"), keys).items()})
    scores.update({f"gold/{g}": gold_scores(g, [c for _, c in keys]) for g in GROUPS})
    return TextScores(keys, scores)


def stage_rm_eval(folder: Path, run: RunFolder) -> dict:
    """Held-out pairwise accuracy per group of the single model, the personalized model's group head (and its
    population head): against the group's labelers' held-out rows, and against the group's gold on every held-out
    pair the gold orders."""
    rows = [dict(r) for r in read_rows(run.path(LABELS) / "heldout.jsonl")]
    ts = heldout_scores(run)
    ts.write(folder / "scores.jsonl")
    pairs = list({(r["prompt"], *sorted((r["chosen"], r["rejected"]))) for r in rows})
    out = {}
    for g in GROUPS:
        own = [r for r in rows if r["labeler_attributes"]["group"] == g]
        # every held-out pair the group's gold orders, as (prompt, gold's chosen, gold's rejected)
        gold_rows = []
        for p, a, b in pairs:
            d = ts.value(f"gold/{g}", p, a) - ts.value(f"gold/{g}", p, b)
            if d:
                gold_rows.append({"prompt": p, "chosen": a if d > 0 else b, "rejected": b if d > 0 else a})
        for model in ("single", f"personal/{g}", f"personal/{POPULATION}"):
            name = "personalized (group head)" if model == f"personal/{g}" else \
                "personalized (population head)" if model.endswith(POPULATION) else "single"
            out.setdefault(name, {})[g] = {
                "labels": pairwise_accuracy([ts.diff(model, r) for r in own]),
                "gold": pairwise_accuracy([ts.diff(model, r) for r in gold_rows])}
        out.setdefault("labelers (agreement with own gold)", {})[g] = {
            "labels": None, "gold": pairwise_accuracy([ts.diff(f"gold/{g}", r) for r in own])}
        out.setdefault("pairs", {})[g] = {"labels": len(own), "gold": len(gold_rows)}
    return {"accuracy": out}


def fewshot_curve(user_rows: list[dict], ts: TextScores, heads: list[str], prior: torch.Tensor, size: PersonalSize,
                  rng: random.Random) -> tuple[dict, torch.Tensor]:
    """For one new user: held-out accuracy (on their test judgements, against their labels and their group's gold)
    of weights fitted on k of their other judgements, k in `fewshot_ks`, averaged over `fewshot_draws` draws (and
    the single model's on the same test judgements); and their weights fitted on the largest k.
    The user's judgements are split by prompt: fitting prompts and test prompts."""
    prompts = sorted({r["prompt"] for r in user_rows})
    rng.shuffle(prompts)
    test_prompts = set(prompts[:len(prompts) // 2])
    fit = [r for r in user_rows if r["prompt"] not in test_prompts]
    test = [r for r in user_rows if r["prompt"] in test_prompts]
    group = user_rows[0]["labeler_attributes"]["group"]

    def diffs(rows):
        return torch.tensor([[ts.diff(f"personal/{h}", r) for h in heads] for r in rows], dtype=torch.float32)

    test_diffs, fit_diffs = diffs(test), diffs(fit)
    gold_sign = torch.tensor([ts.diff(f"gold/{group}", r) for r in test])
    decisive = gold_sign != 0
    out, w = {}, prior
    for k in size.fewshot_ks:
        labels, gold = [], []
        for _ in range(size.fewshot_draws if k else 1):
            idx = rng.sample(range(len(fit)), min(k, len(fit)))
            w = fit_user_weights(fit_diffs[idx], prior, size.fewshot_l2).float()
            margin = test_diffs @ w
            labels.append(pairwise_accuracy(margin.tolist()))
            gold.append(pairwise_accuracy((margin * gold_sign.sign())[decisive].tolist()))
        out[k] = {"labels": mean(labels), "gold": mean(gold)}
    single = [ts.diff("single", r) for r in test]
    out["single"] = {"labels": pairwise_accuracy(single),
                     "gold": pairwise_accuracy((torch.tensor(single) * gold_sign.sign())[decisive].tolist())}
    return out, w


def stage_fewshot(folder: Path, run: RunFolder, size: PersonalSize, seed: int) -> dict:
    """Each new user's few-shot curve; per group, the mean over its users, and the fewest judgements after which
    the few-shot model beats the population model (k = 0) for that k and every larger one. The users' weights
    fitted on the largest k (its last draw) go to `user_profiles.json` (`alignloop.personal.UserProfiles`, the
    format `alignloop personalize` writes beside a model)."""
    rows = [dict(r) for r in read_rows(run.path(LABELS) / "new_users.jsonl")]
    ts = TextScores.read(run.path(RM_EVAL) / "scores.jsonl")
    info = heads_info(run.path(RM_PERSONAL) / "final")
    heads, population = info["names"], population_weights(info)
    prior = torch.tensor([population[h] for h in heads])
    profiles = UserProfiles(heads, population)
    rng = random.Random(seed + 21)
    per_user = {}
    for user in dict.fromkeys(r["labeler"] for r in rows):
        mine = [r for r in rows if r["labeler"] == user]
        per_user[user], w = fewshot_curve(mine, ts, heads, prior, size, rng)
        profiles.set_user(user, dict(zip(heads, w.tolist(), strict=True)), max(size.fewshot_ks),
                          mine[0]["labeler_attributes"]["group"])
    profiles.save(folder / "user_profiles.json")
    groups = {}
    for g in GROUPS:
        curves = [c for u, c in per_user.items() if u.startswith(f"new-{g}-")]
        keys = [*size.fewshot_ks, "single"]
        groups[g] = {str(k): {m: mean([c[k][m] for c in curves]) for m in ("labels", "gold")} for k in keys}
        groups[g]["needed"] = {m: judgements_needed(groups[g], size.fewshot_ks, m) for m in ("labels", "gold")}
    write_rows([{"user": u, **{str(k): v for k, v in c.items()}} for u, c in per_user.items()],
               folder / "per_user.jsonl")
    return {"heads": heads, "groups": groups, "users": len(per_user), "l2": size.fewshot_l2,
            "draws": size.fewshot_draws}


def judgements_needed(curve: dict, ks: list[int], metric: str) -> int | None:
    """The smallest k > 0 from which the few-shot accuracy stays above the population model's (k = 0); None when
    it never does by the largest k."""
    base = curve["0"][metric]
    needed = None
    for k in sorted(k for k in ks if k > 0):
        if curve[str(k)][metric] > base:
            needed = k if needed is None else needed
        else:
            needed = None
    return needed


def rl_args(folder: Path, size: PersonalSize, seed: int, user_tag: str | None) -> RLOOConfig:
    """The default demo's RLOO settings (`demo.critic_free_section`) with this demo's learning rate and KL
    coefficient; `user_tag`: prompts tagged with their user."""
    section = {**critic_free_section(size.demo_size(), "rloo"), "seed": seed, "sample_every": 0,
               "learning_rate": size.rl_learning_rate, "kl_coef": size.rl_kl_coef}
    return RLOOConfig(output_dir=str(folder), user_tag=user_tag, **section)


def stage_policy(folder: Path, run: RunFolder, size: PersonalSize, seed: int, personal: bool) -> dict:
    """RLOO of the SFT model: against the single reward model on plain prompts, or (`personal`) against the
    personalized model on prompts tagged with a group, each prompt once per group, weighted by the tag's head."""
    prompts = [r["prompt"] for r in read_rows(run.data_dir / "prompts.jsonl")]
    if personal:
        data = [{"prompt": p, "user": g} for p in prompts for g in GROUPS]
        random.Random(seed + 31).shuffle(data)
        reward, tag = str(run.path(RM_PERSONAL) / "final"), USER_TAG
    else:
        data, reward, tag = prompts, str(run.path(RM_SINGLE) / "final"), None
    res = GRPOTrainer(model=str(run.sft_model), reward=reward, args=rl_args(folder, size, seed, tag),
                      train_dataset=data).train()
    return {"model": str(folder / "final"), "updates": res.steps, "stop_reason": res.stop_reason,
            **numbers(res.metrics)}


POLICIES = (("SFT", None, False), ("generic policy", POLICY_GENERIC, False),
            ("personalized policy", POLICY_PERSONAL, True))


def stage_eval(folder: Path, run: RunFolder, size: PersonalSize, seed: int) -> dict:
    """Each policy's samples on the held-out prompts (the personalized one given each group's tag) and their mean
    gold score of each group: {policy: {"tag", "gold/<group>", "length"}}."""
    prompts = [r["prompt"] for r in read_rows(run.data_dir / "eval_prompts.jsonl")][:size.eval_prompts]
    out = {}
    for name, stage, personal in POLICIES:
        model, tok = load_policy(str(run.sft_model if stage is None else run.path(stage) / "final"))
        for user in GROUPS if personal else (None,):
            tagged = [tag_prompt(p, user) for p in prompts]
            s = sample_policy(model, tok, tagged, size.eval_samples, size.max_new_tokens, seed=seed + 41)
            key = f"{name} <user:{user}>" if user else name
            golds = {g: gold_scores(g, s.responses) for g in GROUPS}
            write_rows([{"prompt": p, "response": r, **{f"gold/{g}": golds[g][i] for g in GROUPS}}
                        for i, (p, r) in enumerate(zip(s.prompts, s.responses, strict=True))],
                       folder / f"samples_{key.replace(' ', '_').replace('<', '').replace('>', '')}.jsonl")
            out[key] = {"tag": user, **{f"gold/{g}": mean(golds[g]) for g in GROUPS},
                        "length": mean(s.lengths), "example": s.responses[0]}
    return {"policies": out, "prompts": len(prompts), "samples_per_prompt": size.eval_samples}


def stage_report(run: RunFolder, size: PersonalSize) -> dict:
    """The report from the finished stages (`alignloop.demo.personal_report`)."""
    info = {s: run.info(s) or {} for s in (SAMPLES, LABELS, RM_SINGLE, RM_PERSONAL, RM_EVAL, FEWSHOT,
                                           POLICY_GENERIC, POLICY_PERSONAL, EVAL)}
    quick = size.label_prompts < PersonalSize().label_prompts
    return write_personal_report(run, info, asdict(size), f"alignloop demo --personal{' --quick' if quick else ''}")


# ------------------------------------------------------------------------------------------------ entry point
def run_personal_demo(output_dir: str | Path = "runs/demo-personal", size: PersonalSize | None = None, seed: int = 0,
                      resume: bool = False, echo: Callable[[str], None] = print, threads: int | None = None) -> dict:
    """Run (or resume) the personalization demo; returns {"run", "report", "html", "results"}."""
    set_threads(threads)
    out = Path(output_dir)
    run = RunFolder(out, echo)
    if run.demo_state.exists():
        state = json.loads(run.demo_state.read_text())
        if state.get("task", "reviews") != TASK:
            raise UserError(f"{out} holds a run of another demo ({state.get('task', 'reviews')}); use another "
                            f"--output-dir")
        if resume:
            size, seed = PersonalSize(**state["size"]), state["seed"]
    size = size or PersonalSize()
    run.demo_state.write_text(json.dumps({"task": TASK, "size": asdict(size), "seed": seed}, indent=1))
    demo_size = size.demo_size()
    run.stage(run.DATA, lambda f: stage_data(f, demo_size, seed))
    run.stage(run.BASE, lambda f: stage_base(f, run.data_dir, demo_size, seed))
    run.stage(run.SFT, lambda f: stage_tagged_sft(f, run, demo_size, seed))
    run.stage(SAMPLES, lambda f: stage_samples(f, run, size, seed))
    run.stage(LABELS, lambda f: stage_labels(f, run, size, seed))
    run.stage(RM_SINGLE, lambda f: stage_rm(f, run, size, seed, personal=False))
    run.stage(RM_PERSONAL, lambda f: stage_rm(f, run, size, seed, personal=True))
    run.stage(RM_EVAL, lambda f: stage_rm_eval(f, run))
    run.stage(FEWSHOT, lambda f: stage_fewshot(f, run, size, seed))
    run.stage(POLICY_GENERIC, lambda f: stage_policy(f, run, size, seed, personal=False))
    run.stage(POLICY_PERSONAL, lambda f: stage_policy(f, run, size, seed, personal=True))
    run.stage(EVAL, lambda f: stage_eval(f, run, size, seed))
    rep = run.stage(REPORT, lambda f: stage_report(run, size))
    results = json.loads((run.root / "results.json").read_text())
    return {"run": str(out), "report": rep["report"], "html": rep["html"], "plot": rep["plot"], "results": results}
