"""The SQLite hot path of submit-and-next: plain SQL on SQLite's own connection, one function for the store to call.

    results, fallback = submit_and_next_batch(conn, [(assignment_id, labeler_id, fields, idempotency_key), ...],
                                              caches)

What it does, in one write transaction (BEGIN IMMEDIATE ... COMMIT) and one SAVEPOINT per submission: the common
case of a labeling session, i.e. the first judgement of the labeler's open assignment, then the next non-gold item
(or the labeler's other open assignment), when no expiry check is due. That is about 12 statements per judgement
through `sqlite3` directly; SQLAlchemy's per-statement work (compile cache, parameter and result processing) cost
more than SQLite itself. Every other case (a retried key, an edit, another labeler's assignment, a skipped or expired
one, gold mixing, an expiry check due) writes nothing here and is listed in `fallback`: the store runs those through
the portable ORM path (`judgements.py`, `assignment.py`) after the COMMIT. The rules are those of the ORM path (the
same `validate_submission`, the same `CANDIDATE_LIMIT`, the same project info cache).

Rows are written in the formats the ORM writes (JSON as json.dumps text, DateTime as "YYYY-MM-DD HH:MM:SS.ffffff",
booleans 0/1; tests/feedback/test_store.py compares them), and the results are `StoredJudgement` / `AssignmentRef`
snapshots with the ORM classes' attributes (building ORM instances cost more than the SQL that stores them).

Nothing is returned before the one COMMIT has returned, so a caller that acknowledges a result acknowledges a
stored judgement; if the COMMIT fails this raises and none of the batch is stored.
"""
from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .access import AccessCache, may_label_sql
from .assignment import CANDIDATE_LIMIT, ExpiryClock, display_order
from .errors import NotFound
from .models import utcnow
from .projects import ProjectInfo, ProjectInfoCache
from .reading import ItemViewCache
from .validation import MAX_TIME_MS, validate_submission

SQL_JUDGEMENT_BY_KEY = "SELECT id FROM judgements WHERE idempotency_key = ?"
SQL_ASSIGNMENT = ("SELECT item_id, labeler_id, project_id, status, shown_order, created_at FROM assignments "
                  "WHERE id = ?")
SQL_PROJECT = "SELECT task_type, overlap_k, gold_rate, settings FROM projects WHERE id = ?"
SQL_INS_JUDGEMENT = ("INSERT INTO judgements (assignment_id, item_id, labeler_id, version, shown_order, choice, "
                     "strength, picked_position, ranking, thumbs, likert, step_labels, flags, comment, "
                     "time_spent_ms, idempotency_key, created_at, answers, text) "
                     "VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
SQL_ASSIGNMENT_DONE = "UPDATE assignments SET status = 'done', completed_at = ? WHERE id = ?"
SQL_ITEM_DONE = "UPDATE items SET n_done = n_done + 1 WHERE id = ?"
SQL_OPEN = ("SELECT a.id, a.item_id, a.is_gold, a.shown_order, a.created_at, i.prompt_id, i.completion_ids "
            "FROM assignments a JOIN items i ON i.id = a.item_id "
            "WHERE a.labeler_id = ? AND a.project_id = ? AND a.status = 'assigned' ORDER BY a.id LIMIT 1")
# Walks the index ix_items_queue in ORDER BY order and stops at the LIMIT (no sort; tested). Only ids: the index
# covers them, so the candidates cost no table lookups; the one taken is read with SQL_ITEM.
SQL_CANDIDATES = ("SELECT id FROM items WHERE project_id = ? AND is_gold = 0 "
                  "AND n_active < ? AND id NOT IN (SELECT item_id FROM assignments WHERE labeler_id = ?) "
                  f"ORDER BY n_active, n_done, id LIMIT {int(CANDIDATE_LIMIT)}")
SQL_TAKE = "UPDATE items SET n_active = n_active + 1 WHERE id = ? AND n_active < ?"
SQL_ITEM = "SELECT prompt_id, completion_ids FROM items WHERE id = ?"
SQL_INS_ASSIGNMENT = ("INSERT INTO assignments (item_id, labeler_id, project_id, status, is_gold, shown_order, "
                      "created_at) VALUES (?, ?, ?, 'assigned', 0, ?, ?)")
SQL_PROMPT = "SELECT messages, is_chat FROM prompts WHERE id = ?"
SQL_COMPLETION = "SELECT text, model FROM completions WHERE id = ?"


@dataclass(slots=True)
class StoredJudgement:
    """A judgement row as the hot path wrote it (same attributes as `Judgement`)."""
    id: int
    assignment_id: int
    item_id: int
    labeler_id: int
    version: int
    shown_order: list
    choice: str | None
    strength: str | None
    picked_position: int | None
    ranking: list | None
    thumbs: int | None
    likert: int | None
    step_labels: list | None
    flags: list
    comment: str
    time_spent_ms: int | None
    idempotency_key: str
    created_at: datetime
    answers: dict | None = None
    text: str | None = None  # a demonstration's response


@dataclass(slots=True)
class ItemRef:
    """The `Item` attributes a labeler's view needs."""
    id: int
    project_id: int
    prompt_id: int
    completion_ids: list
    is_gold: bool


@dataclass(slots=True)
class AssignmentRef:
    """An open assignment as the hot path wrote or found it (same attributes as `Assignment`)."""
    id: int
    item_id: int
    labeler_id: int
    project_id: int
    status: str
    is_gold: bool
    shown_order: list
    created_at: datetime
    item: ItemRef
    completed_at: datetime | None = None


@dataclass
class HotPathCaches:
    """The store's in-process state the hot path reads and updates."""
    info: ProjectInfoCache
    expiry: ExpiryClock
    views: ItemViewCache
    rng: random.Random
    access: AccessCache = field(default_factory=AccessCache)  # who may label (access.py, H5)


Request = tuple[int, int, Mapping[str, Any], str]  # (assignment_id, labeler_id, fields, idempotency_key)
Result = tuple[StoredJudgement, bool, AssignmentRef | None]


def submit_and_next_batch(conn: sqlite3.Connection, requests: Sequence[Request],
                          caches: HotPathCaches) -> tuple[list[Result | Exception | None], list[int]]:
    """Store what the hot path can of `requests` in one transaction (see the module docstring). Returns (results,
    fallback): per request its (judgement, created=True, next assignment or None) or the exception it raised
    (ValidationError, NotFound, a database error: that request's SAVEPOINT is rolled back, the others stand);
    `fallback` lists the indexes the hot path did not take (None in results, nothing written for them)."""
    results: list[Result | Exception | None] = [None] * len(requests)
    fallback: list[int] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for i, (assignment_id, labeler_id, fields, key) in enumerate(requests):
            conn.execute("SAVEPOINT submission")
            try:
                r = _submit_and_next(conn, assignment_id, labeler_id, fields, key, caches)
            except Exception as e:  # noqa: BLE001 - this request's error only (the others stand), for its caller
                r = e
            if r is None or isinstance(r, Exception):
                conn.execute("ROLLBACK TO submission")
            conn.execute("RELEASE submission")
            if r is None:
                fallback.append(i)
            else:
                results[i] = r
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results, fallback


def _sqlite_datetime(d: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME storage format (microseconds always written)."""
    return d.strftime("%Y-%m-%d %H:%M:%S.%f")


def _json_or_null(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


def _project_info(conn: sqlite3.Connection, project_id: int, cache: ProjectInfoCache) -> ProjectInfo:
    info = cache.get(project_id)
    if info is not None:
        return info
    read_at = time.monotonic()
    row = conn.execute(SQL_PROJECT, (project_id,)).fetchone()
    if row is None:
        raise NotFound(f"no project {project_id}")
    task_type, overlap_k, gold_rate, settings_json = row
    return cache.put(project_id, ProjectInfo.of(task_type, overlap_k, gold_rate,
                                                json.loads(settings_json) if settings_json else {}), read_at)


def _submit_and_next(conn: sqlite3.Connection, assignment_id: int, labeler_id: int, fields: Mapping[str, Any],
                     idempotency_key: str, caches: HotPathCaches) -> Result | None:
    """One submission inside the caller's transaction: the judgement, then the next assignment. None before
    writing anything when the case is not the hot path's; ValidationError (nothing written) for invalid fields."""
    if conn.execute(SQL_JUDGEMENT_BY_KEY, (idempotency_key,)).fetchone() is not None:
        return None
    row = conn.execute(SQL_ASSIGNMENT, (assignment_id,)).fetchone()
    if row is None:
        return None
    item_id, a_labeler, project_id, status, shown_order_json, created_at = row
    if a_labeler != labeler_id or status != "assigned":
        return None
    info = _project_info(conn, project_id, caches.info)
    if info.gold_rate > 0 or (info.timeout_s and caches.expiry.due(project_id)):
        return None
    shown_order = json.loads(shown_order_json)
    canon = validate_submission(info.task_type, shown_order, fields, info.flag_names, info.questions,
                                info.allow_ties, info.strength_required, info.min_chars, info.max_chars)
    now = utcnow()
    now_s = _sqlite_datetime(now)
    j = _insert_judgement(conn, assignment_id, item_id, labeler_id, shown_order, shown_order_json, canon,
                          idempotency_key, now, now_s, datetime.fromisoformat(created_at))
    if j is None:
        return None
    conn.execute(SQL_ASSIGNMENT_DONE, (now_s, assignment_id))
    conn.execute(SQL_ITEM_DONE, (item_id,))
    return j, True, _next_assignment(conn, project_id, labeler_id, info, now, now_s, caches)


def _insert_judgement(conn: sqlite3.Connection, assignment_id: int, item_id: int, labeler_id: int,
                      shown_order: list, shown_order_json: str, canon: dict, idempotency_key: str, now: datetime,
                      now_s: str, assigned_at: datetime) -> StoredJudgement | None:
    """Version 1 of the assignment's judgement; None if the row collides (e.g. a version row written by another
    process: the general path sorts it out)."""
    spent = min(int(max(0.0, (now - assigned_at).total_seconds()) * 1000), MAX_TIME_MS)  # 32-bit column
    j = StoredJudgement(0, assignment_id, item_id, labeler_id, 1, shown_order, canon.get("choice"),
                        canon.get("strength"), canon.get("picked_position"), canon.get("ranking"),
                        canon.get("thumbs"), canon.get("likert"), canon.get("step_labels"), canon["flags"],
                        canon["comment"], spent, idempotency_key, now, canon.get("answers"),
                        canon.get("text"))
    try:
        cur = conn.execute(SQL_INS_JUDGEMENT, (
            assignment_id, item_id, labeler_id, shown_order_json, j.choice, j.strength, j.picked_position,
            _json_or_null(j.ranking), j.thumbs, j.likert, _json_or_null(j.step_labels), json.dumps(j.flags),
            j.comment, spent, idempotency_key, now_s, _json_or_null(j.answers), j.text))
    except sqlite3.IntegrityError:
        return None
    j.id = cur.lastrowid
    return j


def _next_assignment(conn: sqlite3.Connection, project_id: int, labeler_id: int, info: ProjectInfo, now: datetime,
                     now_s: str, caches: HotPathCaches) -> AssignmentRef | None:
    """The labeler's other open assignment (two tabs: resumed, as `assignment.next_in` does), else the first
    candidate in queue order whose slot this takes (shown in `assignment.display_order`), else None."""
    k = info.overlap_k
    open_row = conn.execute(SQL_OPEN, (labeler_id, project_id)).fetchone()
    if open_row is not None:
        aid, item_id, is_gold, order_json, a_created, prompt_id, completion_ids_json = open_row
        item = ItemRef(item_id, project_id, prompt_id, json.loads(completion_ids_json), bool(is_gold))
        return AssignmentRef(aid, item_id, labeler_id, project_id, "assigned", bool(is_gold),
                             json.loads(order_json), datetime.fromisoformat(a_created), item)
    if not may_label_sql(conn, project_id, labeler_id, caches.access):  # not a member (any more): nothing new
        return None
    candidates = conn.execute(SQL_CANDIDATES, (project_id, k, labeler_id)).fetchall()
    for (item_id,) in candidates:
        if conn.execute(SQL_TAKE, (item_id, k)).rowcount != 1:
            continue
        prompt_id, completion_ids_json = conn.execute(SQL_ITEM, (item_id,)).fetchone()
        completion_ids = json.loads(completion_ids_json)
        order = display_order(info.task_type, len(completion_ids), caches.rng)
        aid = conn.execute(SQL_INS_ASSIGNMENT, (item_id, labeler_id, project_id, json.dumps(order), now_s)).lastrowid
        if item_id not in caches.views:
            _cache_view(conn, item_id, prompt_id, completion_ids, caches.views)
        return AssignmentRef(aid, item_id, labeler_id, project_id, "assigned", False, order, now,
                             ItemRef(item_id, project_id, prompt_id, completion_ids, False))
    return None


def _cache_view(conn: sqlite3.Connection, item_id: int, prompt_id: int, completion_ids: list,
                views: ItemViewCache) -> None:
    """Put the next item's view in the cache while the connection is at hand (the reply shows it)."""
    messages_json, is_chat = conn.execute(SQL_PROMPT, (prompt_id,)).fetchone()
    comps = [conn.execute(SQL_COMPLETION, (cid,)).fetchone() for cid in completion_ids]
    views.put(item_id, ({"messages": json.loads(messages_json), "is_chat": bool(is_chat)},
                        [{"text": text, "model": model} for text, model in comps]))
