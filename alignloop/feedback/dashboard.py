"""The numbers of a project's quality dashboard (the admin page and `alignloop feedback stats`): per-labeler
statistics and flags (each labeler's kind: person or AI), project agreement, pairwise Cohen's kappa, the AI labelers'
agreement with the people (when the project has AI judgements), a steps project's agreement per step
(`quality.step_agreement`), a several-question project's counts and agreement per question (`question_stats`), and
the geometry of its server-rendered SVG bar charts. No web framework here: the CLI
prints the same numbers without loading the app."""
from __future__ import annotations

from collections import Counter

from . import quality, questions


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
            "summary": store.project_summary(p.id), "thresholds": th,
            "charts": {"agreement": bar_chart({w: d["agreement"] for w, d in stats.items()}, 0, 1,
                                              "Leave-one-out agreement", ref=th.min_agreement),
                       "left": bar_chart({w: d["left_share"] for w, d in stats.items()}, 0, 1,
                                         "Share of left picks", ref=0.5),
                       "time": bar_chart({w: d["median_seconds"] for w, d in stats.items()}, 0, None,
                                         "Median seconds per item", ref=th.min_median_seconds),
                       "gold": bar_chart({w: d["gold_accuracy"] for w, d in stats.items()}, 0, 1,
                                         "Gold accuracy", ref=th.min_gold_accuracy)}}


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
