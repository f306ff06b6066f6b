"""Storing a judgement: the portable ORM path (every database, and every case the SQLite hot path hands back).

Judgements are append-only: the first judgement of an assignment is version 1 and closes it (status "done",
`Item.n_done + 1`); an edit inserts version + 1. `idempotency_key` is unique, so a retried submission finds the
stored judgement and stores nothing (created=False). A submission for an assignment that expired (left open past
the project's timeout) takes the slot back if one is free, and is refused with a message otherwise. One that undo
reopened ("reopened", `assignment.undo_in`) takes an edit (version + 1) and is done again.

AI labelers (labelers of kind "ai", `Store.add_ai_labeler`) store their judgements in bulk (`record_ai_in`): one
assignment per (item, AI labeler), made with status "done" and *outside* the item's slots (`Item.n_active` and
`Item.n_done` are left alone, so an AI label never takes a person's place among the k, never completes an item and
is never in a person's queue); judging an item again appends a new version, like a person's edit.
"""
from __future__ import annotations

import numbers
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, noload

from .access import AccessCache, may_label
from .assignment import own_assignment
from .errors import Forbidden, NotFound, ValidationError
from .models import Assignment, Item, Judgement, Labeler, Project, utcnow
from .projects import ProjectInfo, ProjectInfoCache, find_project, project_info
from .validation import MAX_TIME_MS, check_ai_labeler, validate_ai_judgement, validate_submission

AI_PASSWORD_HASH = "!ai-labeler: never signs in"  # not an argon2 hash: no password verifies against it
IN_BATCH = 500  # ids per `IN (...)` query (SQLite's bound-parameter limit is far above)
MAX_ERRORS_SHOWN = 20  # errors of a refused batch of AI judgements listed in the message


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
    if a.status in ("done", "reopened") and not may_label(s, a.project_id, labeler_id, AccessCache()):
        # an edit by a labeler who may no longer label the project (removed from a members-only one): 404 like a
        # missing assignment; finishing the item they had open is still taken. (Edits are rare: no cache needed.)
        raise NotFound(f"no assignment {assignment_id}")
    rules = project_info(s, a.project_id, info)
    canon = validate_submission(rules.task_type, a.shown_order, fields, rules.flag_names, rules.questions,
                                rules.allow_ties, rules.strength_required, rules.min_chars, rules.max_chars)
    last = 0 if a.status == "assigned" else (  # first judgement of an open assignment: version 1
        s.scalar(select(func.max(Judgement.version)).where(Judgement.assignment_id == a.id)) or 0)
    now = utcnow()
    start = a.created_at if last == 0 or started_at is None else started_at
    # capped: the column is a 32-bit integer on PostgreSQL (an item left open for weeks must still be stored)
    spent = min(int(max(0.0, (now - start).total_seconds()) * 1000), MAX_TIME_MS)
    j = Judgement(assignment_id=a.id, item_id=a.item_id, labeler_id=labeler_id, version=last + 1,
                  shown_order=a.shown_order, idempotency_key=idempotency_key, time_spent_ms=spent,
                  created_at=now, **canon)
    s.add(j)
    if a.status == "assigned":
        a.status = "done"
        a.completed_at = now
        s.execute(update(Item).where(Item.id == a.item_id).values(n_done=Item.n_done + 1))
    elif a.status == "reopened":  # undo reopened it (assignment.undo_in): this edit closes it again
        a.status = "done"
    s.flush()
    return j, True, a.project_id


# -- AI labelers --------------------------------------------------------------------------------------------------
def get_or_add_ai_labeler(s: Session, name: str, model: str) -> Labeler:
    """The AI labeler `name` judging with `model`, created if new. A person of that name, or an AI labeler of that
    name with another model (its agreement figures would mix two models), is a ValidationError."""
    check_ai_labeler(name, model)
    lab = s.scalar(select(Labeler).where(Labeler.username == name))
    if lab is None:
        lab = Labeler(username=name, password_hash=AI_PASSWORD_HASH, role="labeler", kind="ai", model=model)
        s.add(lab)
        s.flush()
        return lab
    if lab.kind != "ai":
        raise ValidationError({"name": f"{name!r} is a {lab.kind} labeler (who signs in); give the AI labeler "
                                       "another name"})
    if lab.model != model:
        raise ValidationError({"model": f"AI labeler {name!r} judges with {lab.model!r}, not {model!r}; give a "
                                        "labeler of another model another name"})
    return lab


def item_id_of(judgement: Mapping[str, Any]) -> int | None:
    """A judgement's `item_id` as an int (numpy's integers too), None when it is not an integer."""
    v = judgement.get("item_id")
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v < 2**63  # (2**63: no such row)
    return int(v) if ok else None


def _chunks(values: Sequence, n: int = IN_BATCH) -> Iterator[Sequence]:
    for i in range(0, len(values), n):
        yield values[i:i + n]


def _items_by_id(s: Session, project_id: int, ids: Iterable[int]) -> dict[int, tuple[list, bool]]:
    """item id -> (completion_ids, is_gold), for the ids that are items of the project."""
    out = {}
    for chunk in _chunks(sorted(set(ids))):
        out.update({i: (cids, gold) for i, cids, gold in s.execute(
            select(Item.id, Item.completion_ids, Item.is_gold).where(Item.project_id == project_id,
                                                                     Item.id.in_(chunk)))})
    return out


def _checked_ai_judgements(p: Project, items: dict[int, tuple[list, bool]],
                           judgements: Sequence[Any]) -> list[tuple[int, dict]]:
    """(item id, Judgement fields) per judgement; every mistake of the batch raised together (naming the item)."""
    flag_names = ProjectInfo.of(p.task_type, p.overlap_k, p.gold_rate, p.settings).flag_names
    out, errors = [], {}
    for n, j in enumerate(judgements):
        if not isinstance(j, Mapping):
            errors[f"judgements[{n}]"] = f"a dict, not {type(j).__name__}"
            continue
        item_id = item_id_of(j)
        if item_id not in items:
            errors[f"judgements[{n}].item_id"] = f"no item {j.get('item_id')!r} in project {p.name!r}"
            continue
        try:
            out.append((item_id, validate_ai_judgement(p.task_type, len(items[item_id][0]), j, flag_names)))
        except ValidationError as e:
            errors.update({f"item {item_id} (judgements[{n}]).{k}": v for k, v in e.errors.items()})
    if errors:
        shown = dict(list(errors.items())[:MAX_ERRORS_SHOWN])
        if len(errors) > MAX_ERRORS_SHOWN:
            shown["..."] = f"and {len(errors) - MAX_ERRORS_SHOWN} more"
        raise ValidationError(shown)
    return out


def _ai_assignments(s: Session, p: Project, labeler_id: int, checked: list[tuple[int, dict]],
                    items: dict[int, tuple[list, bool]], now: datetime) -> dict[int, int]:
    """item id -> the AI labeler's assignment id, made (status done, no slot taken) where it had none."""
    def existing(ids) -> dict[int, int]:
        found = {}
        for chunk in _chunks(sorted(ids)):
            found.update(dict(s.execute(select(Assignment.item_id, Assignment.id).where(
                Assignment.labeler_id == labeler_id, Assignment.item_id.in_(chunk))).all()))
        return found

    by_item = existing({i for i, _ in checked})
    new: dict[int, dict] = {}
    for item_id, fields in checked:  # the first judgement of an item gives its assignment's shown order
        if item_id not in by_item and item_id not in new:
            new[item_id] = {"item_id": item_id, "labeler_id": labeler_id, "project_id": p.id, "status": "done",
                            "is_gold": items[item_id][1], "shown_order": fields["shown_order"], "created_at": now,
                            "completed_at": now}
    if new:
        s.execute(insert(Assignment), list(new.values()))
        by_item.update(existing(new))
    return by_item


def _latest_version(s: Session, assignment_ids: Iterable[int]) -> dict[int, int]:
    out = {}
    for chunk in _chunks(sorted(assignment_ids)):
        out.update(dict(s.execute(select(Judgement.assignment_id, func.max(Judgement.version))
                                  .where(Judgement.assignment_id.in_(chunk)).group_by(Judgement.assignment_id)).all()))
    return out


def record_ai_in(s: Session, project: str | int, labeler_id: int, judgements: Iterable[Mapping[str, Any]]) -> int:
    """Store an AI labeler's judgements (canonical terms, `validation.validate_ai_judgement`) in the caller's write
    transaction, in bulk; nothing is written unless all of them are valid. Returns the rows written."""
    lab = s.get(Labeler, labeler_id)
    if lab is None:
        raise NotFound(f"no labeler {labeler_id!r}")
    if lab.kind != "ai":
        raise ValidationError({"labeler_id": f"{labeler_id} is {lab.username!r}, a {lab.kind} labeler; AI judgements "
                                             "need an AI labeler (Store.add_ai_labeler)"})
    p = find_project(s, project)
    judgements = list(judgements)
    items = _items_by_id(s, p.id, {item_id_of(j) for j in judgements if isinstance(j, Mapping)} - {None})
    checked = _checked_ai_judgements(p, items, judgements)
    if not checked:
        return 0
    now = utcnow()
    assignment_of = _ai_assignments(s, p, labeler_id, checked, items, now)
    version = _latest_version(s, assignment_of.values())
    rows = []
    for item_id, fields in checked:
        aid = assignment_of[item_id]
        version[aid] = version.get(aid, 0) + 1
        row = {"assignment_id": aid, "item_id": item_id, "labeler_id": labeler_id, "version": version[aid],
               "idempotency_key": f"ai:{labeler_id}:{uuid.uuid4().hex}", "created_at": now, **fields}
        for col in ("ranking", "step_labels"):
            if row.get(col) is None:
                row.pop(col, None)  # SQL NULL as the other paths store it (a JSON None would be 'null')
        rows.append(row)
    s.execute(insert(Judgement), rows)
    return len(rows)
