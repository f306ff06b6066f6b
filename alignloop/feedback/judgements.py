"""Storing a judgement: the portable ORM path (every database, and every case the SQLite hot path hands back).

Judgements are append-only: the first judgement of an assignment is version 1 and closes it (status "done",
`Item.n_done + 1`); an edit inserts version + 1. `idempotency_key` is unique, so a retried submission finds the
stored judgement and stores nothing (created=False). A submission for an assignment that expired (left open past
the project's timeout) takes the slot back if one is free, and is refused with a message otherwise.
"""
from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, noload

from .assignment import own_assignment
from .errors import Forbidden, ValidationError
from .models import Assignment, Item, Judgement, Project, utcnow
from .projects import ProjectInfoCache, project_info
from .validation import validate_submission


def judgement_by_key(s: Session, idempotency_key: str, labeler_id: int) -> Judgement | None:
    """The judgement stored under this key, if any; Forbidden if it is another labeler's."""
    j = s.scalar(select(Judgement).where(Judgement.idempotency_key == idempotency_key))
    if j is not None and j.labeler_id != labeler_id:
        raise Forbidden("idempotency key belongs to another labeler")
    return j


def _reopen_expired(s: Session, a: Assignment) -> None:
    """Take an expired assignment's slot back (if nobody else has it) so its late judgement can be stored."""
    p = s.get(Project, a.project_id)
    cond = [Item.id == a.item_id] + ([] if a.is_gold else [Item.n_active < p.overlap_k])
    if s.execute(update(Item).where(*cond).values(n_active=Item.n_active + 1)).rowcount != 1:
        raise ValidationError({"assignment": "this item was given to another labeler after you left it "
                                             "open too long; your judgement was not stored"})
    a.status = "assigned"


def _judgeable(s: Session, assignment_id: int, labeler_id: int) -> Assignment:
    """The labeler's assignment, open (an expired one reopened); NotFound / ValidationError otherwise."""
    a = own_assignment(s, assignment_id, labeler_id, options=[noload(Assignment.item)])
    if a.status == "skipped":
        raise ValidationError({"assignment": "this item was skipped; it can no longer be judged"})
    if a.status == "expired":
        _reopen_expired(s, a)
    return a


def submit_in(s: Session, assignment_id: int, labeler_id: int, fields: Mapping[str, Any], idempotency_key: str,
              started_at: datetime | None, info: ProjectInfoCache) -> tuple[Judgement, bool, int]:
    """Store a judgement in the caller's write transaction. Returns (judgement, created, project id).
    `started_at` (when the labeler saw the item) times an edit; a first judgement is timed from the assignment."""
    j = judgement_by_key(s, idempotency_key, labeler_id)
    if j is not None:
        return j, False, s.get(Assignment, j.assignment_id, options=[noload(Assignment.item)]).project_id
    a = _judgeable(s, assignment_id, labeler_id)
    rules = project_info(s, a.project_id, info)
    canon = validate_submission(rules.task_type, a.shown_order, fields, rules.flag_names)
    last = 0 if a.status == "assigned" else (  # first judgement of an open assignment: version 1
        s.scalar(select(func.max(Judgement.version)).where(Judgement.assignment_id == a.id)) or 0)
    now = utcnow()
    start = a.created_at if last == 0 or started_at is None else started_at
    spent = int(max(0.0, (now - start).total_seconds()) * 1000)
    j = Judgement(assignment_id=a.id, item_id=a.item_id, labeler_id=labeler_id, version=last + 1,
                  shown_order=a.shown_order, idempotency_key=idempotency_key, time_spent_ms=spent,
                  created_at=now, **canon)
    s.add(j)
    if a.status == "assigned":
        a.status = "done"
        a.completed_at = now
        s.execute(update(Item).where(Item.id == a.item_id).values(n_done=Item.n_done + 1))
    s.flush()
    return j, True, a.project_id
