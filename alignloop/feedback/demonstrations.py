"""Demonstrations (InstructGPT's step 1): the labeler writes the response a prompt deserves, or edits a sampled one.

An item of a demonstration project is a prompt, with one sampled answer (`completion_ids` = [original]) when the
labeler edits a model's answer, or none when they write from scratch. The labeler's response is `Judgement.text`,
checked and stored by the usual submit paths (`validation.validate_submission`: `text`, `min_chars` ..
`max_chars`); an edit of it is a new version, and the current version is the one that counts.

An admin reviews each demonstration: accept or reject, with a note the labeler reads on their history page
(`review_demonstration`; `DemonstrationReview` rows are append-only and the newest row of a judgement counts). A
review belongs to one judgement *version*: a labeler's later edit is pending review again.

Exports (`export_demonstration_rows`), TRL's SFT formats and, for edits, preference pairs:

* sft: `{"prompt", "completion"}`; a chat prompt (messages) gives TRL's conversational form: prompt = the
  messages, completion = [{"role": "assistant", "content": text}]; a plain prompt gives two strings.
* messages: `{"messages": prompt messages + [{"role": "assistant", "content": text}]}` (a plain prompt is one user
  message).
* preference: edits only (the text differs from the original): `{"prompt", "chosen": the edit, "rejected": the
  original}` with the labeler columns of `export_meta` (a demonstration written from scratch has no pair).

`review` picks what is exported: "not_rejected" (default: accepted or not reviewed yet), "accepted", "all".
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import Forbidden, NotFound, ValidationError
from .export_meta import judgement_meta
from .models import (
    REVIEW_DECISIONS,
    Assignment,
    Completion,
    DemonstrationReview,
    Item,
    Judgement,
    Labeler,
    Project,
    Prompt,
    utcnow,
)
from .reading import latest_versions
from .security import is_utf8_text
from .validation import MAX_COMMENT_CHARS

EXPORT_FORMATS = ("sft", "messages", "preference")
EXPORT_REVIEWS = ("not_rejected", "accepted", "all")  # what an export keeps
REVIEW_FILTERS = (*EXPORT_REVIEWS, "rejected", "pending")  # what the admin's list shows


def _demonstration_project(s: Session, project_id: int) -> Project:
    p = s.get(Project, project_id)
    if p is None:
        raise NotFound(f"no project {project_id}")
    if p.task_type != "demonstration":
        raise ValidationError({"project": f"project {p.name!r} is a {p.task_type} project, not a demonstration one"})
    return p


def review_demonstration(store, project_id: int, judgement_id: int, admin_id: int, decision: str,
                         note: str = "") -> dict:
    """Record an admin's decision ("accept" | "reject") on one demonstration (a judgement version of the project),
    with a note for the labeler. Append-only: a later review of the same judgement replaces this one. Returns the
    review as a dict. ValidationError names the field (decision, note); NotFound for a judgement of another project;
    Forbidden unless `admin_id` is an admin."""
    errors = {}
    if decision not in REVIEW_DECISIONS:
        errors["decision"] = f"{decision!r}: one of {', '.join(REVIEW_DECISIONS)}"
    if note is None:
        note = ""
    if not isinstance(note, str) or not is_utf8_text(note):
        errors["note"] = "must be text"
    elif len(note) > MAX_COMMENT_CHARS:
        errors["note"] = f"is too long (at most {MAX_COMMENT_CHARS} characters)"
    if errors:
        raise ValidationError(errors)
    with store.write() as s:
        _demonstration_project(s, project_id)
        admin = s.get(Labeler, admin_id)
        if admin is None or admin.role != "admin":
            raise Forbidden("only an admin reviews demonstrations")
        j = s.scalar(select(Judgement).join(Assignment, Assignment.id == Judgement.assignment_id)
                     .where(Judgement.id == judgement_id, Assignment.project_id == project_id))
        if j is None or j.text is None:
            raise NotFound(f"no demonstration {judgement_id} in this project")
        r = DemonstrationReview(judgement_id=j.id, admin_id=admin.id, decision=decision, note=note.strip(),
                                created_at=utcnow())
        s.add(r)
        s.flush()
        return {"id": r.id, "judgement_id": j.id, "decision": decision, "note": r.note, "admin": admin.username,
                "created_at": r.created_at}


def latest_reviews(s: Session, judgement_ids: list[int]) -> dict[int, dict]:
    """judgement id -> its newest review {"decision", "note", "admin", "created_at"}."""
    out: dict[int, dict] = {}
    for i in range(0, len(judgement_ids), 500):
        rows = s.execute(select(DemonstrationReview, Labeler.username)
                         .join(Labeler, Labeler.id == DemonstrationReview.admin_id)
                         .where(DemonstrationReview.judgement_id.in_(judgement_ids[i:i + 500]))
                         .order_by(DemonstrationReview.id)).all()
        for r, admin in rows:  # ascending ids: the newest overwrites
            out[r.judgement_id] = {"decision": r.decision, "note": r.note, "admin": admin, "created_at": r.created_at}
    return out


def reviews_of(store, judgement_ids: list[int]) -> dict[int, dict]:
    """`latest_reviews` in a read session of `store` (a labeler's history page shows them)."""
    if not judgement_ids:
        return {}
    with store.read() as s:
        return latest_reviews(s, list(judgement_ids))


def _keep(review: dict | None, which: str) -> bool:
    decision = review["decision"] if review else None
    return {"all": True, "accepted": decision == "accept", "not_rejected": decision != "reject",
            "rejected": decision == "reject", "pending": decision is None}[which]


def demonstration_records(store, project_id: int, review: str = "not_rejected") -> list[dict]:
    """The current version of every demonstration of the project (oldest first) whose newest review passes
    `review` (one of REVIEW_FILTERS): `judgement_id`, `assignment_id`, `item_id`, `version`, `messages`, `is_chat`,
    `original` (the sampled answer edited, or None), `text`, `labeler` (username), `labeler_public_id`,
    `labeler_attributes`, `comment`, `flags`, `time_spent_ms`, `created_at`, `review` (None or its newest review)."""
    if review not in REVIEW_FILTERS:
        raise ValidationError({"review": f"{review!r}: one of {', '.join(REVIEW_FILTERS)}"})
    with store.read() as s:
        _demonstration_project(s, project_id)
        latest = latest_versions()
        rows = s.execute(select(Judgement, Labeler, Item, Prompt).join(
            latest, (Judgement.assignment_id == latest.c.assignment_id) & (Judgement.version == latest.c.v))
            .join(Assignment, Assignment.id == Judgement.assignment_id)
            .join(Labeler, Labeler.id == Judgement.labeler_id)
            .join(Item, Item.id == Judgement.item_id).join(Prompt, Prompt.id == Item.prompt_id)
            .where(Assignment.project_id == project_id, Judgement.text.is_not(None)).order_by(Judgement.id)).all()
        originals = {c.id: c.text for c in s.scalars(select(Completion).where(
            Completion.id.in_({cid for _, _, item, _ in rows for cid in item.completion_ids})))}
        reviews = latest_reviews(s, [j.id for j, _, _, _ in rows])
    out = []
    for j, lab, item, pr in rows:
        rv = reviews.get(j.id)
        if not _keep(rv, review):
            continue
        out.append({"judgement_id": j.id, "assignment_id": j.assignment_id, "item_id": item.id,
                    "version": j.version, "messages": pr.messages, "is_chat": pr.is_chat,
                    "original": originals[item.completion_ids[0]] if item.completion_ids else None,
                    "text": j.text, "labeler": lab.username, "labeler_public_id": lab.public_id,
                    "labeler_attributes": dict(lab.attributes or {}), "comment": j.comment, "flags": j.flags,
                    "time_spent_ms": j.time_spent_ms, "created_at": j.created_at, "review": rv})
    return out


def _prompt(r: dict) -> Any:
    return r["messages"] if r["is_chat"] else r["messages"][-1]["content"]


def _answer(r: dict, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if r["is_chat"] else text


def export_demonstration_rows(store, project_id: int, format: str,
                              review: str = "not_rejected") -> tuple[list[dict], dict]:
    """(rows, summary) of the project's demonstrations in `format` (EXPORT_FORMATS; see the module docstring). The
    summary counts the demonstrations, the rows and what was left out and why (`left_out`: rejected / not accepted;
    `not_edited` for preference)."""
    if format not in EXPORT_FORMATS:
        raise ValidationError({"format": f"{format!r}: a demonstration project exports {', '.join(EXPORT_FORMATS)}"})
    if review not in EXPORT_REVIEWS:
        raise ValidationError({"review": f"{review!r}: one of {', '.join(EXPORT_REVIEWS)}"})
    every = demonstration_records(store, project_id, "all")
    left_out: Counter = Counter()
    rows = []
    for r in every:
        if not _keep(r["review"], review):
            left_out["rejected" if r["review"] and r["review"]["decision"] == "reject" else "not_accepted"] += 1
            continue
        if format == "sft":
            rows.append({"prompt": _prompt(r), "completion": _answer(r, r["text"])})
        elif format == "messages":
            rows.append({"messages": [*r["messages"], {"role": "assistant", "content": r["text"]}]})
        elif r["original"] is None or r["original"].strip() == r["text"].strip():
            left_out["not_edited" if r["original"] is not None else "written_from_scratch"] += 1
        else:
            rows.append({"prompt": _prompt(r), "chosen": _answer(r, r["text"]),
                         "rejected": _answer(r, r["original"]), **judgement_meta(r)})
    summary = {"demonstrations": len(every), "rows": len(rows), "format": format, "review": review,
               "left_out": dict(left_out)}
    return rows, summary


def empty_message(summary: dict) -> str:
    """Why a demonstration export came out empty, in words."""
    if summary["demonstrations"] == 0:
        return "0 rows exported: the project has no demonstrations yet"
    why = [f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(summary["left_out"].items())]
    return (f"0 rows exported from {summary['demonstrations']} demonstrations (review={summary['review']}): "
            + ("; ".join(why) or "nothing to export"))
