"""Simulated labelers: noisy Bradley-Terry judges of a hidden gold scorer, and a careless one.

A careful labeler shown completions L (left) and R (right) picks L with probability σ((g(L) − g(R)) / τ), g the gold
score and τ its noise temperature; the strength of the preference grows with |g(L) − g(R)|. The careless labeler
ignores the text and picks the left one with probability `left_bias` (position bias). In a thumbs project a careful
labeler gives a thumbs up with probability σ((g − threshold) / τ) (threshold: the project's bar, by default the median
gold score of its completions); the careless one says up with probability `left_bias` whatever the text. They label
through the same store API the web app uses (`Store.next_assignment` / `Store.submit`), so overlap, shuffling of the
shown order and the labeler-quality statistics are exactly those of human labeling.
"""
from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class SimulatedLabeler:
    name: str
    temperature: float = 1.0     # Bradley-Terry noise τ (careful labelers)
    careless: bool = False
    left_bias: float = 0.85      # careless: probability of picking the left completion


def default_labelers(n_careful: int = 4, seed: int = 0) -> list[SimulatedLabeler]:
    temps = [0.6, 0.8, 1.0, 1.2, 0.9, 0.7]
    out = [SimulatedLabeler(f"judge{i + 1}", temperature=temps[i % len(temps)]) for i in range(n_careful)]
    out.append(SimulatedLabeler("careless", careless=True, left_bias=0.85))
    return out


def _strength(gap: float) -> str:
    gap = abs(gap)
    return ("significantly_better" if gap >= 3 else "better" if gap >= 1.5 else "slightly_better" if gap >= 0.5
            else "negligibly_better")


def judge(lab: SimulatedLabeler, gold_left: float, gold_right: float, rng: random.Random) -> dict:
    """The form fields a labeler submits for one pair shown as (left, right)."""
    if lab.careless:
        choice = "left" if rng.random() < lab.left_bias else "right"
        return {"choice": choice, "strength": rng.choice(["better", "slightly_better"])}
    d = (gold_left - gold_right) / lab.temperature
    p_left = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, d))))
    return {"choice": "left" if rng.random() < p_left else "right", "strength": _strength(gold_left - gold_right)}


def judge_thumbs(lab: SimulatedLabeler, gold: float, threshold: float, rng: random.Random) -> dict:
    """The form fields a labeler submits for one completion of a thumbs project."""
    if lab.careless:
        return {"thumbs": "up" if rng.random() < lab.left_bias else "down"}
    d = (gold - threshold) / lab.temperature
    p_up = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, d))))
    return {"thumbs": "up" if rng.random() < p_up else "down"}


def simulate_labeling(store, project: str, labelers: list[SimulatedLabeler], gold: Callable, seed: int = 0,
                      password: str = "simulated-labeler-password", threshold: float = 0.0) -> dict:
    """Every labeler takes assignments in turn until none is left for anyone. Returns counts per labeler.
    `gold`: f(prompts, responses) -> list[float] (the hidden scorer; only the simulated labelers call it).
    `threshold`: a thumbs project's bar (`judge_thumbs`); pairwise projects ignore it."""
    rng = random.Random(seed)
    p = store.get_project(project)
    existing = {lab.username: lab for lab in store.list_labelers()}
    ids = {}
    for lab in labelers:
        ids[lab.name] = (existing[lab.name] if lab.name in existing else store.add_labeler(lab.name, password)).id
    counts = {lab.name: 0 for lab in labelers}
    cache: dict[tuple[str, str], float] = {}
    active = list(labelers)
    while active:
        still = []
        for lab in active:
            a = store.next_assignment(p.id, ids[lab.name])
            if a is None:
                continue
            item = a.item
            view = store.item_view(item, a.shown_order)
            prompt = view["messages"][-1]["content"]
            texts = [c["text"] for c in view["completions"]]
            g = []
            for t in texts:
                if (prompt, t) not in cache:
                    cache[(prompt, t)] = float(gold([prompt], [t])[0])
                g.append(cache[(prompt, t)])
            fields = judge_thumbs(lab, g[0], threshold, rng) if p.task_type == "thumbs" else judge(lab, g[0], g[1], rng)
            store.submit(a.id, ids[lab.name], fields, idempotency_key=uuid.uuid4().hex)
            counts[lab.name] += 1
            still.append(lab)
        active = still
    return counts


def gold_agreement(records: list[dict], store, project_id: int, gold: Callable,
                   threshold: float | None = None) -> dict[str, float]:
    """Per labeler: the share of their decisive pairwise judgements that agree with the gold scorer's preference
    (pairs where the gold scores differ); for thumbs (`threshold` given), the share of thumbs that agree with gold >=
    threshold. Only the demo and the pipeline's simulation can compute this: they know the hidden scorer."""
    prompts, comps = store.prompts_and_completions(project_id)
    agree: dict[str, list[int]] = {}
    for r in records:
        if threshold is not None:
            if r.get("thumbs") in (1, -1) and not r.get("is_gold"):
                g = gold([prompts[r["prompt_id"]].messages[-1]["content"]], [comps[r["completion_ids"][0]].text])[0]
                agree.setdefault(r["labeler"], []).append(int((r["thumbs"] == 1) == (g >= threshold)))
            continue
        if r.get("choice") not in ("a", "b") or r.get("is_gold"):
            continue
        pr = prompts[r["prompt_id"]].messages[-1]["content"]
        a, b = (comps[c].text for c in r["completion_ids"])
        ga, gb = gold([pr, pr], [a, b])
        if ga == gb:
            continue
        agree.setdefault(r["labeler"], []).append(int((r["choice"] == "a") == (ga > gb)))
    return {w: sum(v) / len(v) for w, v in agree.items() if v}


def ai_agreement_by_order(records: list[dict], store, project_id: int, gold: Callable | None) -> dict[str, dict]:
    """Per AI labeler, from its first judging order alone (as one pass of a position-biased judge would label) and
    from both orders averaged (its stored choice): the share of pairs where its choice agrees with the gold scorer
    (pairs whose gold scores differ; `gold` None: not computed) and with the people's majority (items where the
    people's a/b votes have a strict majority). A tie counts as disagreement; how many there were is kept."""
    prompts, comps = store.prompts_and_completions(project_id)
    votes: dict[int, list[str]] = {}
    for r in records:
        if r.get("labeler_kind", "human") == "human" and r.get("choice") in ("a", "b"):
            votes.setdefault(r["item_id"], []).append(r["choice"])
    majority = {i: "a" if v.count("a") > v.count("b") else "b" for i, v in votes.items()
                if v.count("a") != v.count("b")}
    found: dict[str, dict[str, list[int]]] = {}
    for r in records:
        d = r.get("details") or {}
        if r.get("labeler_kind") != "ai" or len(r["completion_ids"]) != 2 or not d.get("p_orders"):
            continue
        p1 = d["p_orders"][0]
        views = {"single_order": "a" if p1 > 0.5 else "b" if p1 < 0.5 else "tie", "both_orders": r["choice"]}
        acc = found.setdefault(r["labeler"], {})
        for against, truth in (("gold", _gold_choice(r, prompts, comps, gold)), ("people", majority.get(r["item_id"]))):
            if truth is None:
                continue
            for view, choice in views.items():
                acc.setdefault(f"{against}/{view}", []).append(int(choice == truth))
                acc.setdefault(f"{against}/ties_{view.split('_')[0]}", []).append(int(choice == "tie"))
    return {w: {**{k: sum(v) / len(v) for k, v in acc.items() if "ties" not in k},
                **{k: sum(v) for k, v in acc.items() if "ties" in k},
                **{f"{a}/pairs": len(acc[f"{a}/both_orders"]) for a in ("gold", "people") if f"{a}/both_orders" in acc}}
            for w, acc in found.items() if acc}


def _gold_choice(r: dict, prompts: dict, comps: dict, gold: Callable | None) -> str | None:
    """"a" / "b": the completion the gold scorer prefers; None when it ties or there is no gold scorer."""
    if gold is None:
        return None
    pr = prompts[r["prompt_id"]].messages[-1]["content"]
    ga, gb = gold([pr, pr], [comps[c].text for c in r["completion_ids"]])
    return None if ga == gb else "a" if ga > gb else "b"
