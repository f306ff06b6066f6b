"""Turn judgements into the datasets the trainers read (TRL formats).

* preference: `{"prompt", "chosen", "rejected", "margin"}` from pairwise judgements (margin from strength, Llama 2's
  small-margin table: significantly_better 1.0, better 2/3, slightly_better 1/3, negligibly_better 0.0) or from
  rankings (every pair with different ranks; margin 0.0).
* ranking: `{"prompt", "completions", "ranking"}` (rank 1 = best, ties share a rank).
* unpaired: `{"prompt", "completion", "label"}` (bool): thumbs; Likert >= `likert_threshold`; pairwise chosen True /
  rejected False; rank first True / last False.

A plain-string prompt is written as a string and completions as strings; a multi-turn (messages) prompt is written in
TRL's conversational form: `prompt` a list of messages, each completion `[{"role": "assistant", "content": ...}]`.

Options (`ExportOptions`): `mode` consensus (one record per item, from the labels of unflagged labelers) or all (one
record per current judgement); `consensus` majority | dawid_skene; `ties` drop | both (a tie becomes both orders with
margin 0, which is a 1/2 target for Bradley-Terry in expectation; a rank project's ranking rows keep partial ties as
equal ranks whatever this option, and drop rankings where everything is tied; a pairwise tie in ranking format is
`[1, 1]` with ties=both); `both_bad` drop | tie (treat as a tie); `exclude_flagged` (labelers flagged by the quality
thresholds); `include_gold` (gold items are for quality control and left out by default).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median
from typing import Any

from alignloop.errors import UserError

from . import quality
from .models import STRENGTH_MARGIN

FORMATS = ("preference", "ranking", "unpaired")


@dataclass
class ExportOptions:
    format: str = "preference"
    mode: str = "consensus"            # consensus | all
    consensus: str = "majority"        # majority | dawid_skene
    ties: str = "drop"                 # drop | both
    both_bad: str = "drop"             # drop | tie
    exclude_flagged: bool = True
    include_gold: bool = False
    likert_threshold: int = 5
    thresholds: quality.Thresholds = field(default_factory=quality.Thresholds)

    def check(self) -> None:
        for name, allowed in (("format", FORMATS), ("mode", ("consensus", "all")),
                              ("consensus", ("majority", "dawid_skene")), ("ties", ("drop", "both")),
                              ("both_bad", ("drop", "tie"))):
            if getattr(self, name) not in allowed:
                raise UserError(f"export {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not 1 <= self.likert_threshold <= 7:
            raise UserError("likert threshold must be 1..7")


def export_records(store, project: str | int, opts: ExportOptions) -> tuple[list[dict], dict]:
    """Build the rows for one project. Returns (rows, summary)."""
    opts.check()
    p = store.get_project(project)
    if p.task_type in ("thumbs", "likert") and opts.format != "unpaired":
        raise UserError(f"a {p.task_type} project exports only the unpaired format (got {opts.format!r})")
    records = store.current_judgements(p.id)
    prompts, comps = store.prompts_and_completions(p.id)
    stats = quality.labeler_stats(records, p.task_type)
    flagged = {w for w, r in quality.flag_labelers(stats, opts.thresholds).items() if r}
    kept = [r for r in records if (opts.include_gold or not r["is_gold"])
            and not (opts.exclude_flagged and r["labeler"] in flagged)]
    summary: dict[str, Any] = {"judgements": len(records), "used": len(kept), "flagged_labelers": sorted(flagged),
                               "dropped": Counter()}

    def prompt_of(pid: int):
        pr = prompts[pid]
        return pr.messages if pr.is_chat else pr.messages[-1]["content"]

    def text_of(pid: int, cid: int):
        t = comps[cid].text
        return [{"role": "assistant", "content": t}] if prompts[pid].is_chat else t

    # per item: the labels to turn into rows (a list of "votes"; consensus collapses them to one)
    by_item: dict[int, list[dict]] = defaultdict(list)
    for r in kept:
        by_item[r["item_id"]].append(r)
    votes: list[tuple[dict, dict]] = []  # (item record, vote)
    if opts.mode == "all":
        votes = [(r, r) for r in kept]
    else:
        votes = _consensus_votes(p.task_type, by_item, opts, summary)

    rows: list[dict] = []
    fmt, tt = opts.format, p.task_type
    for item, v in votes:
        pid, cids = item["prompt_id"], item["completion_ids"]
        prompt = prompt_of(pid)
        if tt == "pairwise":
            choice = v["choice"]
            if choice == "both_bad":
                if opts.both_bad == "drop":
                    summary["dropped"]["both_bad"] += 1
                    continue
                choice = "tie"
            if choice == "tie":
                if opts.ties == "drop" and fmt != "unpaired":
                    summary["dropped"]["tie"] += 1
                    continue
                if fmt == "preference":
                    a, b = text_of(pid, cids[0]), text_of(pid, cids[1])
                    rows += [{"prompt": prompt, "chosen": a, "rejected": b, "margin": 0.0},
                             {"prompt": prompt, "chosen": b, "rejected": a, "margin": 0.0}]
                elif fmt == "ranking":
                    rows.append({"prompt": prompt, "completions": [text_of(pid, c) for c in cids], "ranking": [1, 1]})
                else:
                    summary["dropped"]["tie"] += 1
                continue
            win, lose = (cids[0], cids[1]) if choice == "a" else (cids[1], cids[0])
            if fmt == "preference":
                rows.append({"prompt": prompt, "chosen": text_of(pid, win), "rejected": text_of(pid, lose),
                             "margin": float(v.get("margin", STRENGTH_MARGIN.get(v.get("strength"), 0.0)))})
            elif fmt == "ranking":
                rows.append({"prompt": prompt, "completions": [text_of(pid, c) for c in cids],
                             "ranking": [1, 2] if choice == "a" else [2, 1]})
            else:
                rows += [{"prompt": prompt, "completion": text_of(pid, win), "label": True},
                         {"prompt": prompt, "completion": text_of(pid, lose), "label": False}]
        elif tt == "rank":
            ranking = v["ranking"]
            if fmt == "ranking":
                if len(set(ranking)) == 1:  # everything tied: no information
                    summary["dropped"]["tie"] += 1
                    continue
                rows.append({"prompt": prompt, "completions": [text_of(pid, c) for c in cids], "ranking": ranking})
            elif fmt == "preference":
                for i in range(len(cids)):
                    for j in range(len(cids)):
                        if ranking[i] < ranking[j]:
                            rows.append({"prompt": prompt, "chosen": text_of(pid, cids[i]),
                                         "rejected": text_of(pid, cids[j]), "margin": 0.0})
                        elif ranking[i] == ranking[j] and i < j:
                            if opts.ties == "both":
                                a, b = text_of(pid, cids[i]), text_of(pid, cids[j])
                                rows += [{"prompt": prompt, "chosen": a, "rejected": b, "margin": 0.0},
                                         {"prompt": prompt, "chosen": b, "rejected": a, "margin": 0.0}]
                            else:
                                summary["dropped"]["tie"] += 1
            else:
                best, worst = min(ranking), max(ranking)
                if best == worst:
                    summary["dropped"]["tie"] += 1
                    continue
                for c, rk in zip(cids, ranking):
                    if rk in (best, worst):
                        rows.append({"prompt": prompt, "completion": text_of(pid, c), "label": rk == best})
        elif tt in ("thumbs", "likert"):
            label = v["thumbs"] == 1 if tt == "thumbs" else v["likert"] >= opts.likert_threshold
            rows.append({"prompt": prompt, "completion": text_of(pid, cids[0]), "label": bool(label)})
    summary["rows"] = len(rows)
    summary["dropped"] = dict(summary["dropped"])
    return rows, summary


def _consensus_votes(task_type: str, by_item: dict[int, list[dict]], opts: ExportOptions,
                     summary: dict) -> list[tuple[dict, dict]]:
    out = []
    if task_type == "rank":
        for item_id, rs in sorted(by_item.items()):
            k = len(rs[0]["ranking"])
            means = [mean(r["ranking"][i] for r in rs) for i in range(k)]
            out.append((rs[0], {"ranking": [1 + sum(1 for m in means if m < x) for x in means]}))
        return out
    if task_type == "likert":
        for item_id, rs in sorted(by_item.items()):
            out.append((rs[0], {"likert": median(r["likert"] for r in rs)}))
        return out
    ann = {i: {r["labeler"]: quality.label_of(task_type, r) for r in rs} for i, rs in by_item.items()}
    if opts.consensus == "dawid_skene":
        cons = quality.dawid_skene(ann).consensus
    else:
        cons = quality.majority_vote(ann)
    for item_id, rs in sorted(by_item.items()):
        c = cons.get(item_id)
        if c is None:
            summary["dropped"]["no_consensus"] += 1
            continue
        if task_type == "pairwise":
            agreeing = [STRENGTH_MARGIN.get(r["strength"], 0.0) for r in rs if r["choice"] == c]
            out.append((rs[0], {"choice": c, "margin": mean(agreeing) if agreeing else 0.0}))
        else:
            out.append((rs[0], {"thumbs": c}))
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
