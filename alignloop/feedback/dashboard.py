"""The numbers of a project's quality dashboard (the admin page and `alignloop feedback stats`): per-labeler
statistics and flags (each labeler's kind: person or AI), project agreement, pairwise Cohen's kappa, the AI labelers'
agreement with the people (when the project has AI judgements), a steps project's agreement per step
(`quality.step_agreement`), a several-question project's counts and agreement per question (`question_stats`), a
rank project's rank figures (`rank_stats`: mean rank per model and per position, Kendall's W corrected for ties,
pairwise order agreement, each labeler's Kendall's tau with the others), and the geometry of its server-rendered SVG
bar charts.
No web framework here: the CLI prints the same numbers without loading the app."""
from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from statistics import mean

from sqlalchemy import func, select

from . import demonstrations, quality, questions
from .models import Conversation, ConversationTurn
from .projects import default_min_labels


def dashboard_data(store, p) -> dict:
    """Everything the dashboard shows for project `p` (stats, flags, agreement, kappas, summary, charts, and
    `ai_agreement`: `quality.ai_human_agreement` when the project has AI judgements, else None; `steps`:
    `quality.step_agreement` for a steps project, else None; `question_stats`: per question, pairwise only)."""
    records = store.current_judgements(p.id)
    th = quality.thresholds_from_dict(p.settings.get("thresholds"))
    stats = quality.labeler_stats(records, p.task_type)
    flags = quality.flag_labelers(stats, th)
    agreement = quality.project_agreement(records, p.task_type)
    kappas = quality.pairwise_cohen_kappa(quality.annotations_from_records(p.task_type, records))
    has_ai = any(quality.kind_of(r) == "ai" for r in records)
    return {"stats": stats, "flags": flags, "agreement": agreement, "kappas": kappas,
            "ai_agreement": quality.ai_human_agreement(records, p.task_type) if has_ai else None,
            "steps": quality.step_agreement(records) if p.task_type == "steps" else None,
            "question_stats": question_stats(records, p.settings) if p.task_type == "pairwise" else None,
            "rank": rank_stats(records, store.prompts_and_completions(p.id)[1]) if p.task_type == "rank" else None,
            "demonstrations": demonstration_stats(store, p) if p.task_type == "demonstration" else None,
            "conversations": conversation_stats(store, p, records) if p.task_type == "conversation" else None,
            "min_labels": p.settings.get("min_labels", default_min_labels(p.overlap_k)),
            "summary": store.project_summary(p.id), "thresholds": th,
            "charts": {"agreement": bar_chart({w: d["agreement"] for w, d in stats.items()}, 0, 1,
                                              "Leave-one-out agreement", ref=th.min_agreement),
                       "left": bar_chart({w: d["left_share"] for w, d in stats.items()}, 0, 1,
                                         "Share of left picks", ref=0.5),
                       "time": bar_chart({w: d["median_seconds"] for w, d in stats.items()}, 0, None,
                                         "Median seconds per item", ref=th.min_median_seconds),
                       "gold": bar_chart({w: d["gold_accuracy"] for w, d in stats.items()}, 0, 1,
                                         "Gold accuracy", ref=th.min_gold_accuracy)}}


def demonstration_stats(store, p) -> dict:
    """A demonstration project's figures: demonstrations (current versions), edits of a sampled answer vs written
    from scratch, their review states, mean length in characters, and per labeler: count, accepted, rejected, not
    reviewed, mean length."""
    recs = demonstrations.demonstration_records(store, p.id, "all")

    def state(r: dict) -> str:
        return {"accept": "accepted", "reject": "rejected"}.get((r["review"] or {}).get("decision"), "pending")

    per: dict = defaultdict(list)
    for r in recs:
        per[r["labeler"]].append(r)
    return {"n": len(recs), "edited": sum(r["original"] is not None for r in recs),
            "reviews": dict(Counter(state(r) for r in recs)),
            "mean_chars": mean(len(r["text"]) for r in recs) if recs else None,
            "labelers": {w: {"n": len(rs), **Counter(state(r) for r in rs), "mean_chars": mean(len(r["text"])
                                                                                              for r in rs)}
                         for w, rs in sorted(per.items())}}


def conversation_stats(store, p, records: list[dict]) -> dict:
    """A conversation project's figures: conversations (open / ended), turns (chosen / failed), mean turns per
    conversation, and the mean final rating (the ended conversations' judgements: `Judgement.likert`, 1-7)."""
    with store.read() as s:
        statuses = dict(s.execute(select(Conversation.status, func.count()).where(
            Conversation.project_id == p.id).group_by(Conversation.status)).all())
        turns = dict(s.execute(select(ConversationTurn.status, func.count()).join(
            Conversation, Conversation.id == ConversationTurn.conversation_id).where(
            Conversation.project_id == p.id).group_by(ConversationTurn.status)).all())
    n = sum(statuses.values())
    ratings = [r["likert"] for r in records if r.get("likert") is not None]
    return {"n": n, "open": statuses.get("open", 0), "ended": statuses.get("ended", 0),
            "turns": sum(turns.values()), "turns_by_status": turns,
            "mean_turns": sum(turns.values()) / n if n else None,
            "mean_rating": mean(ratings) if ratings else None, "ratings": len(ratings)}


def question_stats(records: list[dict], settings: dict | None) -> dict:
    """Per question of a pairwise project: its text, the judgements that answer it, their choices (a, b, tie,
    both_bad: canonical) and the agreement over them (`quality.project_agreement`, non-gold items). The first
    question's answers are every judgement's columns; another's only several-question judgements'."""
    names = questions.names_of(settings)
    out = {}
    for q in questions.questions_of(settings):
        rs = questions.criterion_records(records, q["name"], names[0])
        out[q["name"]] = {"question": q["question"], "judgements": len(rs),
                          "choices": dict(Counter(r["choice"] for r in rs)),
                          "agreement": quality.project_agreement(rs, "pairwise")}
    return out


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def mid_ranks(values: list[float]) -> list[float]:
    """Ranks 1..n of `values` (smaller = better), tied values sharing the mean of the ranks they span (mid-ranks,
    "fractional" ranking): competition ranks [1, 1, 3] -> [1.5, 1.5, 3], [1, 2, 2] -> [1, 2.5, 2.5]."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def kendall_w(rankings: list[list[float]]) -> float | None:
    """Kendall's coefficient of concordance W of m rankings of the same n things, corrected for ties (Kendall &
    Babington Smith): each ranking is taken as mid-ranks (`mid_ranks`; the stored rankings are competition ranks,
    "1224"), R_i is thing i's rank sum and S = sum_i (R_i - mean R)^2, and

        W = 12 S / (m^2 (n^3 - n) - m sum_j T_j),   T_j = sum over ranking j's groups of tied things of (t^3 - t).

    1 = every ranking the same (ties included), 0 = no agreement. Hand-worked: [[1, 1, 3], [1, 1, 3]] -> mid-ranks
    [1.5, 1.5, 3] twice, R = (3, 3, 6), S = 1 + 1 + 4 = 6, T = 6 each, W = 72 / (4 * 24 - 2 * 12) = 1;
    [[1, 2, 3], [1, 1, 3], [2, 1, 3]] -> R = (4.5, 4.5, 9), S = 13.5, sum T = 6, W = 162 / (9 * 24 - 3 * 6) = 9/11.
    None for fewer than 2 rankings or things, or when every ranking ties everything (nothing to agree on)."""
    m, n = len(rankings), len(rankings[0]) if rankings else 0
    if m < 2 or n < 2:
        return None
    mids = [mid_ranks(r) for r in rankings]
    sums = [sum(r[i] for r in mids) for i in range(n)]
    avg = m * (n + 1) / 2  # every mid-ranking sums to n (n + 1) / 2
    ties = sum(t ** 3 - t for r in rankings for t in Counter(r).values())
    denominator = m * m * (n ** 3 - n) - m * ties
    if denominator <= 0:
        return None
    return 12 * sum((x - avg) ** 2 for x in sums) / denominator


def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's tau-a between two rankings of the same things (pairs tied in either count as neither)."""
    pairs = list(combinations(range(len(a)), 2))
    if not pairs:
        return None
    return sum(_sign(a[i] - a[j]) * _sign(b[i] - b[j]) for i, j in pairs) / len(pairs)


def rank_stats(records: list[dict], completions: dict) -> dict:
    """A rank project's figures over non-gold items: per model (the completions' `model`; "–" when unknown) and per
    canonical position (import order) the rankings, the mean rank and the share ranked first; Kendall's W per item
    with 2+ rankings (mean, items); pairwise order agreement (over every item, pair of labelers and pair of
    completions: the same order, ties included); per labeler the mean Kendall's tau of their ranking with the
    others' mean ranking of the same item."""
    by_item: dict[int, list[dict]] = defaultdict(list)
    models: dict[str, list[int]] = defaultdict(list)
    positions: dict[int, list[int]] = defaultdict(list)
    for r in records:
        if r["is_gold"] or not r.get("ranking"):
            continue
        by_item[r["item_id"]].append(r)
        for pos, (cid, rank) in enumerate(zip(r["completion_ids"], r["ranking"], strict=True)):
            c = completions.get(cid)
            models[(c.model if c is not None else None) or "–"].append(rank)
            positions[pos + 1].append(rank)
    ws, agree, pairs, taus = [], 0, 0, defaultdict(list)
    for rs in by_item.values():
        if len(rs) < 2:
            continue
        ws.append(kendall_w([r["ranking"] for r in rs]))
        for a, b in combinations(rs, 2):
            for i, j in combinations(range(len(a["ranking"])), 2):
                pairs += 1
                agree += _sign(a["ranking"][i] - a["ranking"][j]) == _sign(b["ranking"][i] - b["ranking"][j])
        for r in rs:
            others = [o["ranking"] for o in rs if o is not r]
            tau = kendall_tau(r["ranking"], [mean(col) for col in zip(*others, strict=True)])
            if tau is not None:
                taus[r["labeler"]].append(tau)

    def table(groups: dict) -> list[dict]:
        return [{"name": k, "n": len(v), "mean_rank": mean(v), "first_share": sum(x == 1 for x in v) / len(v)}
                for k, v in sorted(groups.items(), key=lambda kv: mean(kv[1]))]

    ws = [w for w in ws if w is not None]
    return {"by_model": table(models), "by_position": table(positions),
            "kendall_w": mean(ws) if ws else None, "w_items": len(ws),
            "pair_agreement": agree / pairs if pairs else None, "pairs": pairs,
            "labeler_tau": {w: mean(v) for w, v in taus.items()}}


def bar_chart(values: dict, lo: float, hi: float | None, title: str, ref: float | None = None) -> dict:
    """Geometry for a server-rendered horizontal SVG bar chart (the template draws it; labels are escaped)."""
    vals = {k: v for k, v in values.items() if v is not None}
    top = hi if hi is not None else max([*vals.values(), ref or 0, 1e-9]) * 1.1
    width, bar_h, left = 320, 18, 110
    bars = []
    for n, (k, v) in enumerate(sorted(values.items(), key=lambda kv: repr(kv[0]))):
        frac = 0.0 if v is None else max(0.0, min(1.0, (v - lo) / (top - lo)))
        bars.append({"label": str(k), "y": 24 + n * (bar_h + 6), "w": round(frac * width, 1),
                     "value": "n/a" if v is None else f"{v:.2f}"})
    ref_x = None if ref is None else left + round(max(0.0, min(1.0, (ref - lo) / (top - lo))) * width, 1)
    return {"title": title, "bars": bars, "left": left, "width": width, "bar_h": bar_h, "ref_x": ref_x,
            "height": 30 + len(bars) * (bar_h + 6)}
