"""Labeler-quality statistics and consensus, as pure functions over plain Python data.

The common input is **annotations**: a mapping `item -> {labeler: label}` (labels hashable: a string, an int, a
tuple). Nothing here touches the database, so simulated labelers (the end-to-end demo) can use it directly.

    ann = {1: {"ann": "a", "bob": "a"}, 2: {"ann": "b", "bob": "a", "cy": "b"}}
    leave_one_out_agreement(ann)         # {"ann": 1.0, "bob": 0.5, "cy": 1.0}
    pairwise_cohen_kappa(ann)            # {("ann", "bob"): ..., ...}   (sklearn.metrics.cohen_kappa_score)
    fleiss_kappa(ann)                    # Fleiss (1971), generalised to a varying number of ratings per item
    krippendorff_alpha(ann, "nominal")   # the `krippendorff` package
    dawid_skene(ann)                     # EM (Dawid & Skene 1979): consensus, posteriors, confusion matrices
    position_bias([0, 0, 1, 0])          # share of left picks and a two-sided binomial test against 1/2

`labeler_stats(records, task_type)` computes every per-labeler figure from judgement records (dicts as returned by
`Store.current_judgements`), and `flag_labelers(stats, Thresholds())` says who is flagged and why.

Steps (process supervision: a label +1 / 0 / -1 per step of a solution): the unit of agreement is the **step**, not
the solution. `annotations_from_records("steps", ...)` gives one unit per (item id, step index), so leave-one-out
agreement, Cohen's / Fleiss' kappa, Krippendorff's alpha (nominal and ordinal: -1 < 0 < +1), gold accuracy,
Dawid-Skene and the flags all work per step; `step_agreement(records)` adds pooled percent agreement, agreement on
the first error, and both per step position (step 1, step 2, ...). AI labelers
(records of `labeler_kind` "ai") are labelers like anyone there, except that the people-only check (minimum median
seconds per item) does not flag them; `ai_human_agreement(records, task_type)` compares each AI labeler with the
people (agreement with their majority, Cohen's kappa, agreement with each person, position bias before and after
the order debiasing) next to the people's agreement among themselves.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from statistics import median
from typing import Any

import krippendorff
import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

Annotations = Mapping[Hashable, Mapping[Hashable, Hashable]]


# ----------------------------------------------------------------------------------------------------------------
# Consensus
# ----------------------------------------------------------------------------------------------------------------

def majority_vote(annotations: Annotations, min_labels: int = 1) -> dict[Hashable, Hashable | None]:
    """The most common label per item; None when the top labels tie or fewer than `min_labels` labels exist."""
    out: dict[Hashable, Hashable | None] = {}
    for item, labs in annotations.items():
        if len(labs) < min_labels:
            out[item] = None
            continue
        counts = Counter(labs.values()).most_common()
        out[item] = counts[0][0] if len(counts) == 1 or counts[0][1] > counts[1][1] else None
    return out


@dataclass
class DawidSkeneResult:
    consensus: dict[Hashable, Hashable]          # item -> most probable true label
    posteriors: dict[Hashable, dict[Hashable, float]]  # item -> {label: P(true label)}
    confusion: dict[Hashable, dict[Hashable, dict[Hashable, float]]]  # labeler -> true -> {given: prob}
    priors: dict[Hashable, float]
    iterations: int
    converged: bool


def dawid_skene(annotations: Annotations, max_iter: int = 100, tol: float = 1e-6, smoothing: float = 0.01,
                labels: Sequence[Hashable] | None = None) -> DawidSkeneResult:
    """Dawid & Skene (1979) EM: each labeler has a confusion matrix P(given label | true label); the true label
    of an item is latent. Initialised from (soft) majority votes; `smoothing` is a Dirichlet pseudo-count."""
    items = [i for i in annotations if annotations[i]]
    cats = list(labels) if labels is not None else sorted({lab for i in items for lab in annotations[i].values()},
                                                          key=repr)
    workers = sorted({w for i in items for w in annotations[i]}, key=repr)
    ci = {c: n for n, c in enumerate(cats)}
    wi = {w: n for n, w in enumerate(workers)}
    n_i, n_w, n_c = len(items), len(workers), len(cats)
    if n_i == 0:
        return DawidSkeneResult({}, {}, {}, {}, 0, True)
    counts = np.zeros((n_i, n_w, n_c))
    for r, i in enumerate(items):
        for w, lab in annotations[i].items():
            counts[r, wi[w], ci[lab]] += 1
    T = counts.sum(axis=1)
    T = T / T.sum(axis=1, keepdims=True)
    converged, n_iter = False, 0
    while n_iter < max_iter:
        n_iter += 1
        # M-step
        priors = (T.sum(axis=0) + smoothing) / (n_i + smoothing * n_c)
        conf = np.einsum("ik,iwl->wkl", T, counts) + smoothing
        conf = conf / conf.sum(axis=2, keepdims=True)
        # E-step (log space)
        logT = np.log(priors)[None, :] + np.einsum("iwl,wkl->ik", counts, np.log(conf))
        logT -= logT.max(axis=1, keepdims=True)
        newT = np.exp(logT)
        newT /= newT.sum(axis=1, keepdims=True)
        delta = np.abs(newT - T).max()
        T = newT
        if delta < tol:
            converged = True
            break
    consensus = {i: cats[int(np.argmax(T[r]))] for r, i in enumerate(items)}
    posteriors = {i: {c: float(T[r, ci[c]]) for c in cats} for r, i in enumerate(items)}
    confusion = {w: {k: {lab: float(conf[wi[w], ci[k], ci[lab]]) for lab in cats} for k in cats} for w in workers}
    return DawidSkeneResult(consensus, posteriors, confusion, {c: float(priors[ci[c]]) for c in cats}, n_iter,
                            converged)


# ----------------------------------------------------------------------------------------------------------------
# Agreement
# ----------------------------------------------------------------------------------------------------------------

def leave_one_out_agreement(annotations: Annotations) -> dict[Hashable, float | None]:
    """Per labeler: mean over their items (with at least one other label) of agreement with the majority of the
    *other* labelers. When the others' top labels tie among m labels, agreeing with one of them scores 1/m.
    None for a labeler with no such item."""
    scores: dict[Hashable, list[float]] = defaultdict(list)
    for labs in annotations.values():
        for w, lab in labs.items():
            others = Counter(v for u, v in labs.items() if u != w)
            if not others:
                continue
            top = max(others.values())
            modal = [v for v, c in others.items() if c == top]
            scores[w].append(1.0 / len(modal) if lab in modal else 0.0)
    workers = {w for labs in annotations.values() for w in labs}
    return {w: (float(np.mean(scores[w])) if scores[w] else None) for w in workers}


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two aligned label sequences (sklearn). nan when undefined (one shared constant label)."""
    if len(a) != len(b) or not a:
        raise ValueError("cohen_kappa needs two non-empty sequences of equal length")
    if len(set(a) | set(b)) < 2:
        return float("nan")
    la, lb = [repr(x) for x in a], [repr(x) for x in b]
    return float(cohen_kappa_score(la, lb))


def pairwise_cohen_kappa(annotations: Annotations, min_overlap: int = 2) -> dict[tuple, float]:
    """Cohen's kappa for every pair of labelers sharing at least `min_overlap` items."""
    by_worker: dict[Hashable, dict] = defaultdict(dict)
    for item, labs in annotations.items():
        for w, lab in labs.items():
            by_worker[w][item] = lab
    out = {}
    for w1, w2 in combinations(sorted(by_worker, key=repr), 2):
        shared = sorted(set(by_worker[w1]) & set(by_worker[w2]), key=repr)
        if len(shared) >= min_overlap:
            out[(w1, w2)] = cohen_kappa([by_worker[w1][i] for i in shared], [by_worker[w2][i] for i in shared])
    return out


def mean_pairwise_kappa(annotations: Annotations, min_overlap: int = 2) -> float:
    vals = [v for v in pairwise_cohen_kappa(annotations, min_overlap).values() if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def fleiss_kappa(annotations: Annotations, categories: Sequence[Hashable] | None = None) -> float:
    """Fleiss' kappa over items with at least two labels. With a varying number of labels per item n_i, uses
    P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)) and p_j = sum_i n_ij / sum_i n_i (equal n_i gives Fleiss 1971)."""
    rows = [Counter(labs.values()) for labs in annotations.values() if len(labs) >= 2]
    if not rows:
        return float("nan")
    cats = list(categories) if categories is not None else sorted({c for r in rows for c in r}, key=repr)
    table = np.array([[r.get(c, 0) for c in cats] for r in rows], dtype=float)
    return fleiss_kappa_table(table)


def fleiss_kappa_table(table: np.ndarray) -> float:
    """Fleiss' kappa from an items x categories count table."""
    table = np.asarray(table, dtype=float)
    n_i = table.sum(axis=1)
    P_i = ((table ** 2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    P_bar = P_i.mean()
    p_j = table.sum(axis=0) / n_i.sum()
    P_e = (p_j ** 2).sum()
    if math.isclose(P_e, 1.0):
        return float("nan")
    return float((P_bar - P_e) / (1 - P_e))


def krippendorff_alpha(annotations: Annotations, level: str = "nominal") -> float:
    """Krippendorff's alpha (the `krippendorff` package). level: nominal | ordinal | interval | ratio. For a
    non-nominal level, labels must be numbers; for nominal, any hashable labels (mapped to codes)."""
    items = [i for i in annotations if len(annotations[i]) >= 1]
    workers = sorted({w for i in items for w in annotations[i]}, key=repr)
    if len(workers) < 2 or not items:
        return float("nan")
    values = sorted({lab for i in items for lab in annotations[i].values()}, key=repr)
    if len(values) < 2:
        return float("nan")
    if level == "nominal":
        code = {v: n for n, v in enumerate(values)}
    else:
        code = {v: float(v) for v in values}
    data = np.full((len(workers), len(items)), np.nan)
    wi = {w: n for n, w in enumerate(workers)}
    for c, i in enumerate(items):
        for w, lab in annotations[i].items():
            data[wi[w], c] = code[lab]
    try:
        return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    except ValueError:
        return float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Per-labeler behaviour
# ----------------------------------------------------------------------------------------------------------------

def position_bias(picks: Iterable[int]) -> dict[str, float | int | None]:
    """picks: screen positions picked on decisive pairwise judgements (0 = left, 1 = right). Returns n, the share
    of left picks and the two-sided exact binomial p-value against 1/2 (scipy.stats.binomtest)."""
    picks = [int(p) for p in picks if p is not None]
    n = len(picks)
    if n == 0:
        return {"n": 0, "left_share": None, "p_value": None}
    left = sum(1 for p in picks if p == 0)
    return {"n": n, "left_share": left / n, "p_value": float(binomtest(left, n, 0.5).pvalue)}


def gold_accuracy(annotations: Annotations, gold: Mapping[Hashable, Hashable],
                  is_correct: Callable[[Hashable, Hashable], bool] | None = None) -> dict[Hashable, dict]:
    """Per labeler on the gold items they labeled: {"n", "correct", "accuracy"}."""
    eq = is_correct or (lambda given, truth: given == truth)
    out: dict[Hashable, dict] = {}
    for item, truth in gold.items():
        for w, lab in annotations.get(item, {}).items():
            d = out.setdefault(w, {"n": 0, "correct": 0, "accuracy": None})
            d["n"] += 1
            d["correct"] += bool(eq(lab, truth))
    for d in out.values():
        d["accuracy"] = d["correct"] / d["n"] if d["n"] else None
    return out


def tie_rate(choices: Iterable[Hashable], tie_labels: Sequence[Hashable] = ("tie",)) -> float | None:
    choices = list(choices)
    return sum(1 for c in choices if c in tie_labels) / len(choices) if choices else None


def median_seconds(times_ms: Iterable[int | None]) -> float | None:
    ts = [t for t in times_ms if t is not None]
    return median(ts) / 1000.0 if ts else None


# ----------------------------------------------------------------------------------------------------------------
# From judgement records (dicts) to labels and a report
# ----------------------------------------------------------------------------------------------------------------

def label_of(task_type: str, record: Mapping[str, Any]) -> Hashable | None:
    """The categorical label used for agreement. pairwise: the choice a|b|tie|both_bad (strength ignored);
    rank: the tuple of canonical positions ranked first (ties give several); thumbs: +1/-1; likert: 1..7; steps:
    the tuple of step labels (+1/0/-1 each; `annotations_from_records` splits it into one unit per step);
    demonstration, conversation: None (no categorical label: `dashboard.demonstration_stats` / `conversation_stats`
    count them instead)."""
    if task_type == "pairwise":
        return record.get("choice")
    if task_type == "rank":
        r = record.get("ranking")
        return tuple(i for i, v in enumerate(r) if v == 1) if r else None
    if task_type == "thumbs":
        return record.get("thumbs")
    if task_type == "likert":
        return record.get("likert")
    if task_type == "steps":
        r = record.get("step_labels")
        return tuple(r) if r else None
    if task_type in ("demonstration", "conversation"):  # free text, a conversation of one's own: nothing to agree on
        return None
    raise ValueError(f"unknown task type {task_type!r}")


def gold_label(task_type: str, gold_answer: Mapping[str, Any] | None) -> Hashable | None:
    if not gold_answer:
        return None
    return label_of(task_type, gold_answer)


def gold_is_correct(task_type: str, likert_tolerance: int = 1) -> Callable[[Hashable, Hashable], bool]:
    if task_type == "likert":
        return lambda given, truth: abs(int(given) - int(truth)) <= likert_tolerance
    return lambda given, truth: given == truth


def kind_of(record: Mapping[str, Any]) -> str:
    """The labeler kind of a judgement record: "human" (also when the record does not say) or "ai"."""
    return record.get("labeler_kind") or "human"


def annotations_from_records(task_type: str, records: Iterable[Mapping[str, Any]], gold: bool | None = False,
                             labelers: Iterable[Hashable] | None = None) -> dict[Hashable, dict[Hashable, Hashable]]:
    """item_id -> {labeler: label}. gold=False: non-gold items only; True: gold only; None: all. Steps: one unit
    per step, (item_id, step index) -> {labeler: +1 | 0 | -1}."""
    keep = set(labelers) if labelers is not None else None
    out: dict[Hashable, dict] = defaultdict(dict)
    for r in records:
        if gold is not None and bool(r.get("is_gold")) != gold:
            continue
        if keep is not None and r["labeler"] not in keep:
            continue
        lab = label_of(task_type, r)
        if lab is None:
            continue
        if task_type == "steps":
            for i, v in enumerate(lab):
                out[(r["item_id"], i)][r["labeler"]] = v
        else:
            out[r["item_id"]][r["labeler"]] = lab
    return dict(out)


def gold_truth(task_type: str, records: Iterable[Mapping[str, Any]]) -> dict[Hashable, Hashable]:
    """The known answers of the gold items among `records`, keyed like `annotations_from_records` (steps: per
    (item_id, step index))."""
    truth: dict[Hashable, Hashable] = {}
    for r in records:
        if not r.get("is_gold"):
            continue
        g = gold_label(task_type, r.get("gold_answer"))
        if g is None:
            continue
        if task_type == "steps":
            truth.update({(r["item_id"], i): v for i, v in enumerate(g)})
        else:
            truth[r["item_id"]] = g
    return truth


@dataclass
class Thresholds:
    """A labeler is flagged when a figure crosses a threshold (only once they have `min_items` judgements)."""
    min_items: int = 10
    min_agreement: float = 0.5          # leave-one-out agreement with the others' majority
    min_gold_accuracy: float = 0.7
    min_gold_items: int = 3
    max_position_p: float = 0.01        # binomial test p-value of left picks vs 1/2 ...
    min_position_deviation: float = 0.15  # ... and |left share - 0.5| at least this
    max_tie_rate: float = 0.5
    min_median_seconds: float = 2.0     # faster than this per item is not reading


def labeler_stats(records: Sequence[Mapping[str, Any]], task_type: str,
                  likert_tolerance: int = 1) -> dict[Hashable, dict]:
    """Per labeler: kind ("human" | "ai") and model (AI), n, agreement (leave-one-out, non-gold items), gold
    n/accuracy, left share + p-value (pairwise), tie rate (pairwise: tie or both_bad share), median seconds per
    item. AI labelers are labelers like anyone here (their labels count in everyone's leave-one-out majority).
    Steps: agreement and gold accuracy are over steps (gold_n still counts gold solutions), tie rate is the share
    of steps rated neutral, and `steps_n` counts the steps labeled."""
    ann = annotations_from_records(task_type, records, gold=False)
    loo = leave_one_out_agreement(ann)
    gold_ann = annotations_from_records(task_type, records, gold=True)
    truth = gold_truth(task_type, records)
    gacc = gold_accuracy(gold_ann, truth, gold_is_correct(task_type, likert_tolerance))
    by: dict[Hashable, list] = defaultdict(list)
    for r in records:
        by[r["labeler"]].append(r)
    out = {}
    for w, rs in sorted(by.items(), key=lambda kv: repr(kv[0])):
        d: dict[str, Any] = {"kind": kind_of(rs[0]), "model": rs[0].get("labeler_model"),
                             "n": len(rs), "agreement": loo.get(w),
                             "gold_n": gacc.get(w, {}).get("n", 0), "gold_accuracy": gacc.get(w, {}).get("accuracy"),
                             "median_seconds": median_seconds(r.get("time_spent_ms") for r in rs)}
        if task_type == "pairwise":
            pb = position_bias(r.get("picked_position") for r in rs if r.get("picked_position") is not None)
            d.update(left_share=pb["left_share"], position_p=pb["p_value"],
                     tie_rate=tie_rate((r.get("choice") for r in rs), ("tie",)),
                     both_bad_rate=tie_rate((r.get("choice") for r in rs), ("both_bad",)))
        else:
            d.update(left_share=None, position_p=None, tie_rate=None, both_bad_rate=None)
        if task_type == "rank":
            d["tie_rate"] = tie_rate((len(set(r["ranking"])) < len(r["ranking"]) for r in rs if r.get("ranking")),
                                     (True,))
        if task_type == "steps":
            labels = [v for r in rs for v in (r.get("step_labels") or [])]
            d["tie_rate"] = tie_rate(labels, (0,))
            d["steps_n"] = len(labels)
            d["gold_n"] = len({r["item_id"] for r in rs if (r["item_id"], 0) in truth})
        out[w] = d
    return out


def flag_labelers(stats: Mapping[Hashable, Mapping[str, Any]],
                  th: Thresholds | None = None) -> dict[Hashable, list[str]]:
    """labeler -> reasons (empty list: not flagged). The people-only check (median seconds per item: reading
    takes time) does not apply to AI labelers (`kind` "ai")."""
    th = th or Thresholds()
    out = {}
    for w, d in stats.items():
        reasons: list[str] = []
        if d["n"] >= th.min_items:
            if d.get("agreement") is not None and d["agreement"] < th.min_agreement:
                reasons.append(f"agreement {d['agreement']:.2f} < {th.min_agreement}")
            if d.get("tie_rate") is not None and d["tie_rate"] > th.max_tie_rate:
                reasons.append(f"tie rate {d['tie_rate']:.2f} > {th.max_tie_rate}")
            if (d.get("position_p") is not None and d["position_p"] < th.max_position_p
                    and abs(d["left_share"] - 0.5) >= th.min_position_deviation):
                reasons.append(f"position bias: left {d['left_share']:.0%} (p={d['position_p']:.2g})")
            if d.get("kind", "human") == "human" and d.get("median_seconds") is not None \
                    and d["median_seconds"] < th.min_median_seconds:
                reasons.append(f"median {d['median_seconds']:.1f}s per item < {th.min_median_seconds}s")
        if d.get("gold_n", 0) >= th.min_gold_items and d.get("gold_accuracy") is not None \
                and d["gold_accuracy"] < th.min_gold_accuracy:
            reasons.append(f"gold accuracy {d['gold_accuracy']:.2f} < {th.min_gold_accuracy}")
        out[w] = reasons
    return out


def project_agreement(records: Sequence[Mapping[str, Any]], task_type: str) -> dict[str, float]:
    """Project-level: Fleiss' kappa, Krippendorff's alpha (nominal; plus ordinal for Likert) and the mean
    pairwise Cohen's kappa, over non-gold items."""
    ann = annotations_from_records(task_type, records, gold=False)
    out = {"fleiss_kappa": fleiss_kappa(ann), "krippendorff_alpha": krippendorff_alpha(ann, "nominal"),
           "mean_cohen_kappa": mean_pairwise_kappa(ann)}
    if task_type in ("likert", "steps"):
        out["krippendorff_alpha_ordinal"] = krippendorff_alpha(ann, "ordinal")
    return out


def first_error(step_labels: Sequence[int]) -> int | None:
    """The index of the first step labeled bad (-1), None when no step is."""
    return next((i for i, v in enumerate(step_labels) if v == -1), None)


def percent_agreement(ann: Annotations) -> dict[str, float | int | None]:
    """Pooled pairwise percent agreement: over every unit and every pair of labelers who both labeled it, the
    share of pairs giving the same label. {"agreement", "pairs", "units"} (units: with at least one pair)."""
    d = human_pairwise_agreement(ann)
    return {"agreement": d["agreement"], "pairs": d["pairs"], "units": d["items"]}


def step_agreement(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Agreement of a steps project, over non-gold items (records as `Store.current_judgements` gives):

    * `percent_agreement`, `pairs`, `units`: pooled pairwise agreement over steps (`percent_agreement`);
    * `first_error_agreement`, `first_error_pairs`: over solutions, the share of labeler pairs that put the first
      error (the first step labeled -1; or none) at the same step;
    * `by_position`: per step position (1-based `step`): `units` (steps at that position with >= 2 labels),
      `percent_agreement`, `fleiss_kappa` (nan when undefined, e.g. one label used throughout).

    Project-wide kappas and alphas over steps are in `project_agreement(records, "steps")`."""
    ann = annotations_from_records("steps", records, gold=False)
    pooled = percent_agreement(ann)
    by_pos: dict[int, dict] = defaultdict(dict)
    for (item, i), labs in ann.items():
        by_pos[i][item] = labs
    positions = []
    for i in sorted(by_pos):
        pa = percent_agreement(by_pos[i])
        positions.append({"step": i + 1, "units": pa["units"], "percent_agreement": pa["agreement"],
                          "fleiss_kappa": fleiss_kappa(by_pos[i])})
    firsts: dict[Hashable, list] = defaultdict(list)
    for r in records:
        if not r.get("is_gold") and r.get("step_labels"):
            firsts[r["item_id"]].append(first_error(r["step_labels"]))
    pairs = same = 0
    for fs in firsts.values():
        for x, y in combinations(fs, 2):
            pairs += 1
            same += x == y
    return {"percent_agreement": pooled["agreement"], "pairs": pooled["pairs"], "units": pooled["units"],
            "first_error_agreement": _share(same, pairs), "first_error_pairs": pairs, "by_position": positions}


def thresholds_from_dict(d: Mapping[str, Any] | None) -> Thresholds:
    base = asdict(Thresholds())
    for k, v in (d or {}).items():
        if k in base:
            base[k] = type(base[k])(v)
    return Thresholds(**base)


# ----------------------------------------------------------------------------------------------------------------
# AI labelers against people
# ----------------------------------------------------------------------------------------------------------------

def _share(hits: int, n: int) -> float | None:
    return hits / n if n else None


def human_pairwise_agreement(ann: Annotations) -> dict[str, float | int | None]:
    """The people's agreement among themselves (the baseline an AI labeler is compared with): over every item and
    every pair of people who both labeled it, the share of pairs giving the same label (pooled). Returns
    {"agreement", "pairs", "items"} (items: with at least one pair)."""
    pairs = same = items = 0
    for labs in ann.values():
        vals = list(labs.values())
        if len(vals) < 2:
            continue
        items += 1
        for x, y in combinations(vals, 2):
            pairs += 1
            same += x == y
    return {"agreement": _share(same, pairs), "pairs": pairs, "items": items}


def _position_before_after(rs: Sequence[Mapping[str, Any]]) -> dict[str, float | int | None]:
    """Share of first-shown-position picks: `before` over the single-order raw picks in `details["raw_picks"]`,
    `after` over the final judgements' `picked_position`."""
    raw = [p for r in rs for p in ((r.get("details") or {}).get("raw_picks") or []) if p is not None]
    final = [r["picked_position"] for r in rs if r.get("picked_position") is not None]
    return {"before": _share(sum(1 for p in raw if p == 0), len(raw)), "n_before": len(raw),
            "after": _share(sum(1 for p in final if p == 0), len(final)), "n_after": len(final)}


def _against_people(ai: Mapping[Hashable, Hashable], people: Annotations) -> dict[str, Any]:
    """One AI labeler's labels (item -> label) against the people's labels of the same items."""
    shared = [i for i in ai if people.get(i)]
    majority = majority_vote({i: people[i] for i in shared})
    decided = [i for i in shared if majority[i] is not None]
    a, m = [ai[i] for i in decided], [majority[i] for i in decided]
    kappa = cohen_kappa(a, m) if decided else float("nan")
    per_human: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])  # person -> [same, items]
    for i in shared:
        for w, lab in people[i].items():
            per_human[w][0] += lab == ai[i]
            per_human[w][1] += 1
    same, n = sum(v[0] for v in per_human.values()), sum(v[1] for v in per_human.values())
    return {"n": len(shared), "n_majority": len(decided),
            "majority_agreement": _share(sum(x == y for x, y in zip(a, m, strict=True)), len(decided)),
            "majority_kappa": None if math.isnan(kappa) else kappa,
            "human_agreement": _share(same, n), "human_comparisons": n,
            "per_human": {w: {"n": v[1], "agreement": v[0] / v[1]}
                          for w, v in sorted(per_human.items(), key=lambda kv: repr(kv[0]))}}


def ai_human_agreement(records: Sequence[Mapping[str, Any]], task_type: str) -> dict[str, Any]:
    """How each AI labeler agrees with the people, on non-gold items (records as `Store.current_judgements` gives).

    Returns `{"humans": {"agreement", "pairs", "items"}, "ai": {name: {...}}}`. `humans` is the baseline: the
    people's pooled pairwise agreement (`human_pairwise_agreement`). Per AI labeler: `model`; `n` items judged by
    it and at least one person; `n_majority` of them with a people's majority label (`majority_vote` over the
    people only; a tie at the top: the item is skipped); `majority_agreement` (share of those where the AI gave
    the majority label) and `majority_kappa` (Cohen's kappa of the AI against the majority; None when undefined);
    `human_agreement`: agreement with each individual person, pooled over every (item, person) pair
    (`human_comparisons` of them; comparable with the baseline), and `per_human` {person: {"n", "agreement"}};
    `position` (pairwise; else None): `before`, the share of the AI's single-order raw picks at the first shown
    position (`details["raw_picks"]`, a list of 0/1 per order judged; judgements without it are skipped) and
    `after`, the share of its final judgements with `picked_position` 0 (over every judgement of the AI, gold
    included, like `labeler_stats`' left share), with `n_before` / `n_after`. A labeler's agreement is None when
    there is nothing to compare.
    """
    people = annotations_from_records(task_type, [r for r in records if kind_of(r) == "human"], gold=False)
    ai_records: dict[Hashable, list] = defaultdict(list)
    for r in records:
        if kind_of(r) == "ai":
            ai_records[r["labeler"]].append(r)
    out: dict[str, Any] = {"humans": human_pairwise_agreement(people), "ai": {}}
    for name, rs in sorted(ai_records.items(), key=lambda kv: repr(kv[0])):
        labels = annotations_from_records(task_type, rs, gold=False)
        d = {"model": rs[0].get("labeler_model"),
             **_against_people({i: labs[name] for i, labs in labels.items()}, people),
             "position": _position_before_after(rs) if task_type == "pairwise" else None}
        out["ai"][name] = d
    return out
