"""Review and adjudication: an admin looks at one item's labels and decides (append-only `adjudications` rows; the
newest per item counts):

* **accept** — the labelers' consensus stands; the item is exported even with fewer than `min_labels` labels;
* **override** — the admin's answer (a judgement's fields in canonical terms: `{"choice": "a", "strength":
  "better"}`, `{"ranking": [1, 3, 2]}`, `{"thumbs": 1}`, `{"likert": 5}`, `{"step_labels": [1, -1]}`) replaces the
  votes in every export of all labelers (a pairwise margin from the override's strength); a several-question
  project's override answers its first question (the other questions' exports keep the votes); an export of people
  or AI labelers only (`labelers` human | ai) keeps their own votes (it is the admin's answer, neither kind's);
* **exclude** — the item leaves every export.

`review_queue` lists the items worth a look (labels that disagree, flags, comments); `item_review` is everything
the review page shows of one item. Functions take an open session; `Store` opens it.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alignloop.errors import UserError

from .errors import NotFound, ValidationError
from .models import (
    ADJUDICATION_DECISIONS,
    Adjudication,
    Assignment,
    Completion,
    Item,
    Judgement,
    Labeler,
    Project,
    Prompt,
)
from .reading import latest_versions
from .validation import validate_submission

MAX_NOTE_CHARS = 2000
ANSWER_FIELDS = {"pairwise": ("choice", "strength"), "rank": ("ranking",), "thumbs": ("thumbs",),
                 "likert": ("likert",), "steps": ("step_labels",)}


def check_answer(task_type: str, n_completions: int, fields: Mapping[str, Any]) -> dict:
    """An override's answer from the review form's fields (the labeling form's names, in canonical order: `choice`
    left = A, right = B; `rank_<i>`, `thumbs`, `likert`, `step_<i>`), checked by the labelers' own validation and
    returned in canonical terms. ValidationError (per field) when something is missing or wrong."""
    canon = validate_submission(task_type, list(range(n_completions)), fields)
    return {k: canon[k] for k in ANSWER_FIELDS[task_type] if canon.get(k) is not None}


def adjudicate(s: Session, project_id: int, item_id: int, admin_id: int, decision: str,
               fields: Mapping[str, Any] | None = None, note: str = "") -> Adjudication:
    """Record an admin's decision on an item of the project (`fields`: the override's form fields)."""
    item = s.get(Item, item_id)
    if item is None or item.project_id != project_id:
        raise NotFound(f"no item {item_id} in this project")
    if decision not in ADJUDICATION_DECISIONS:
        raise ValidationError({"decision": f"choose one of {', '.join(ADJUDICATION_DECISIONS)}"})
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
        raise ValidationError({"note": f"a text of at most {MAX_NOTE_CHARS} characters"})
    answer = None
    if decision == "override":
        task_type = s.scalar(select(Project.task_type).where(Project.id == project_id))
        answer = check_answer(task_type, len(item.completion_ids), fields or {})
    row = Adjudication(item_id=item_id, admin_id=admin_id, decision=decision, answer=answer, note=note.strip())
    s.add(row)
    s.flush()
    return row


def latest_adjudications(s: Session, project_id: int) -> dict[int, dict]:
    """item id -> the newest adjudication of each adjudicated item of the project: `decision`, `answer`, `note`,
    `created_at`, the admin (`admin`: username, `admin_public_id`, `admin_attributes`) and the item (`item_id`,
    `prompt_id`, `completion_ids`, `is_gold`) — what export needs to write an overridden item's row."""
    newest = (select(func.max(Adjudication.id).label("id")).join(Item, Item.id == Adjudication.item_id)
              .where(Item.project_id == project_id).group_by(Adjudication.item_id).subquery())
    rows = s.execute(select(Adjudication, Labeler, Item).join(newest, newest.c.id == Adjudication.id)
                     .join(Labeler, Labeler.id == Adjudication.admin_id)
                     .join(Item, Item.id == Adjudication.item_id)).all()
    return {item.id: {"decision": a.decision, "answer": a.answer, "note": a.note, "created_at": a.created_at,
                      "admin": lab.username, "admin_public_id": lab.public_id,
                      "admin_attributes": dict(lab.attributes or {}), "item_id": item.id,
                      "prompt_id": item.prompt_id, "completion_ids": item.completion_ids, "is_gold": item.is_gold}
            for a, lab, item in rows}


def _label(task_type: str, r: Mapping[str, Any]):
    """What two labels must share to agree (pairwise: the choice; the rest: the whole answer)."""
    return {"pairwise": r.get("choice"), "rank": tuple(r.get("ranking") or ()), "thumbs": r.get("thumbs"),
            "likert": r.get("likert"), "steps": tuple(r.get("step_labels") or ())}.get(task_type)
    # a demonstration: free text; a conversation: each labeler's rating is of their own conversation (different
    # turns from the same opening), so two ratings are no disagreement. Both have their own admin pages.


def review_queue(records: list[dict], task_type: str, adjudications: Mapping[int, dict],
                 show: str = "attention") -> list[dict]:
    """Items with current judgements (`Store.current_judgements`' records), most labels first: per item its id,
    `labels`, `disagree` (not all labels the same), `flags` (the union of the labels' flags), `comments`
    (non-empty comments), `decision` (the newest adjudication's, else None). `show`: "attention" (disagreement,
    flags or comments, not yet adjudicated), "adjudicated", or "all"."""
    by_item: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_item[r["item_id"]].append(r)
    out = []
    for item_id, rs in by_item.items():
        row = {"item_id": item_id, "is_gold": rs[0]["is_gold"], "labels": len(rs),
               "disagree": len({_label(task_type, r) for r in rs}) > 1,
               "flags": sorted({f for r in rs for f in (r.get("flags") or [])}),
               "comments": sum(1 for r in rs if r.get("comment")),
               "decision": (adjudications.get(item_id) or {}).get("decision")}
        needs = row["disagree"] or row["flags"] or row["comments"]
        if show == "all" or (show == "adjudicated" and row["decision"]) or (
                show == "attention" and needs and not row["decision"]):
            out.append(row)
    return sorted(out, key=lambda r: (-r["disagree"], -r["labels"], r["item_id"]))


def item_review(s: Session, project_id: int, item_id: int) -> dict:
    """What the review page shows: the item (`is_gold`, `gold_answer`), the prompt's messages, the completions in
    canonical order with their model and params (admins see them), every judgement of the item (current versions:
    labeler username and export id, kind, answer fields, comment, flags, time, version) and the adjudications
    (newest first)."""
    item = s.get(Item, item_id)
    if item is None or item.project_id != project_id:
        raise NotFound(f"no item {item_id} in this project")
    prompt = s.get(Prompt, item.prompt_id)
    comps = {c.id: c for c in s.scalars(select(Completion).where(Completion.id.in_(item.completion_ids)))}
    latest = latest_versions()  # the current version of each judgement, as export reads them
    judged = s.execute(select(Judgement, Labeler, Assignment).join(
        latest, (Judgement.assignment_id == latest.c.assignment_id) & (Judgement.version == latest.c.v))
        .join(Labeler, Labeler.id == Judgement.labeler_id).join(Assignment, Assignment.id == Judgement.assignment_id)
        .where(Judgement.item_id == item_id).order_by(Judgement.created_at)).all()
    adjs = s.execute(select(Adjudication, Labeler).join(Labeler, Labeler.id == Adjudication.admin_id)
                     .where(Adjudication.item_id == item_id).order_by(Adjudication.id.desc())).all()
    return {"item": item, "messages": prompt.messages, "is_chat": prompt.is_chat,
            "completions": [{"id": cid, "text": comps[cid].text, "model": comps[cid].model,
                             "params": comps[cid].params} for cid in item.completion_ids],
            "judgements": [{"labeler": lab.username, "public_id": lab.public_id, "kind": lab.kind,
                            "choice": j.choice, "strength": j.strength, "ranking": j.ranking, "thumbs": j.thumbs,
                            "likert": j.likert, "step_labels": j.step_labels, "answers": j.answers,
                            "flags": j.flags or [], "comment": j.comment or "", "time_spent_ms": j.time_spent_ms,
                            "version": j.version, "created_at": j.created_at, "shown_order": a.shown_order}
                           for j, lab, a in judged],
            "adjudications": [{"decision": a.decision, "answer": a.answer, "note": a.note, "admin": lab.username,
                               "created_at": a.created_at} for a, lab in adjs]}


def neighbours(queue: list[dict], item_id: int) -> tuple[int | None, int | None]:
    """The previous and next item ids around `item_id` in a review queue (None at the ends or when absent)."""
    ids = [r["item_id"] for r in queue]
    if item_id not in ids:
        return None, (ids[0] if ids else None)
    i = ids.index(item_id)
    return (ids[i - 1] if i > 0 else None), (ids[i + 1] if i + 1 < len(ids) else None)


def check_show(show: str) -> str:
    if show not in ("attention", "adjudicated", "all"):
        raise UserError(f"show {show!r}: choose attention, adjudicated or all")
    return show
