"""Assignment: which item a labeler gets next (the portable ORM path, used on every database).

Rules: a labeler's open assignment in the project is handed back first (resume, from any device, same order);
else, when gold mixing is due (`gold_rate` of the labeler's assignments), a gold item (outside the k count);
else the open non-gold item with the fewest live and done labels that this labeler never had (`Item.n_active <
overlap_k`; never twice to the same labeler: unique constraint), taken with a conditional UPDATE
`n_active = n_active + 1 WHERE n_active < k` checked for one affected row, so k holds under concurrent requests.
Assignments left open longer than the project's `assignment_timeout_s` are expired first (checked at most every
`ExpiryClock.interval_s` per project). Completions are shown in an order drawn per labeler and item (a steps
item's steps in the solution's order: `display_order`).

The SQLite hot path (`sqlite_hot.py`) implements the common case of these rules in plain SQL and hands every other
case back to this module.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Integer, func, select, update
from sqlalchemy.orm import Session

from .errors import NotFound
from .models import Assignment, Item, Project, utcnow
from .projects import DEFAULT_ASSIGNMENT_TIMEOUT_S

# How many items, in queue order (fewest labels first), one request reads as candidates and tries to take, on both
# submit paths. On SQLite writers are serialised and the candidates are read in the write transaction itself, so the
# first candidate is always taken. On PostgreSQL concurrent requests read the same head of the queue and race for it:
# a conditional UPDATE that lost moves on to the next candidate, and a request reports "nothing left" only when it
# lost all of them, so the limit is how many concurrent winners a request can lose to (20: the value the PostgreSQL
# path has always used). The query walks the index `ix_items_queue` in ORDER BY order and stops at the limit; the
# SQLite hot path reads only ids, which that index covers, so the limit costs it no table reads.
CANDIDATE_LIMIT = 20
GOLD_CANDIDATES = 50  # gold items to draw the next one from at random (least-labelled first)


@dataclass
class ExpiryClock:
    """When each project's open assignments were last checked for expiry; a check is due every `interval_s`."""
    interval_s: float = 30.0
    last: dict[int, float] = field(default_factory=dict)

    def due(self, project_id: int) -> bool:
        return time.monotonic() - self.last.get(project_id, -1e18) >= self.interval_s

    def mark(self, project_id: int) -> None:
        self.last[project_id] = time.monotonic()


def open_assignment(s: Session, project_id: int, labeler_id: int) -> Assignment | None:
    """The labeler's oldest open assignment in the project (with its item loaded), if any."""
    a = s.scalar(select(Assignment).where(
        Assignment.labeler_id == labeler_id, Assignment.project_id == project_id,
        Assignment.status == "assigned").order_by(Assignment.id).limit(1))
    if a is not None:
        a.item  # noqa: B018 - load it while the session is open
    return a


def next_in(s: Session, project_id: int, labeler_id: int, rng: random.Random,
            expiry: ExpiryClock) -> Assignment | None:
    """The labeler's open assignment, else a new one by the rules above, else None (nothing left for them)."""
    open_a = open_assignment(s, project_id, labeler_id)
    if open_a is not None:
        return open_a
    p = s.get(Project, project_id)
    if p is None:
        raise NotFound(f"no project {project_id}")
    expire_stale(s, p, expiry)
    if _gold_due(s, p, labeler_id):
        a = _take_gold(s, p, labeler_id, rng)
        if a is not None:
            return a
    return _take_candidate(s, p, labeler_id, rng)


def _items_of(labeler_id: int):
    return select(Assignment.item_id).where(Assignment.labeler_id == labeler_id).scalar_subquery()


def _gold_due(s: Session, p: Project, labeler_id: int) -> bool:
    """Whether the next assignment should be gold: fewer than `gold_rate` of (the labeler's assignments + 1)."""
    if p.gold_rate <= 0:
        return False
    n_all, n_gold = s.execute(select(func.count(), func.coalesce(func.sum(func.cast(Assignment.is_gold, Integer)), 0))
                              .where(Assignment.labeler_id == labeler_id, Assignment.project_id == p.id)).one()
    return n_gold < p.gold_rate * (n_all + 1)


def _take_gold(s: Session, p: Project, labeler_id: int, rng: random.Random) -> Assignment | None:
    gold = s.scalars(select(Item).where(Item.project_id == p.id, Item.is_gold.is_(True),
                                        Item.id.not_in(_items_of(labeler_id))).order_by(Item.n_done, Item.id)
                     .limit(GOLD_CANDIDATES)).all()
    if not gold:
        return None
    item = rng.choice(gold)
    s.execute(update(Item).where(Item.id == item.id).values(n_active=Item.n_active + 1))
    return new_assignment(s, item, labeler_id, p.id, rng, p.task_type)


def _take_candidate(s: Session, p: Project, labeler_id: int, rng: random.Random) -> Assignment | None:
    candidates = s.scalars(select(Item).where(
        Item.project_id == p.id, Item.is_gold.is_(False), Item.n_active < p.overlap_k,
        Item.id.not_in(_items_of(labeler_id))).order_by(Item.n_active, Item.n_done, Item.id)
        .limit(CANDIDATE_LIMIT)).all()
    for item in candidates:
        r = s.execute(update(Item).where(Item.id == item.id, Item.n_active < p.overlap_k)
                      .values(n_active=Item.n_active + 1), execution_options={"synchronize_session": False})
        if r.rowcount == 1:
            return new_assignment(s, item, labeler_id, p.id, rng, p.task_type)
    return None


def display_order(task_type: str, n: int, rng: random.Random) -> list[int]:
    """The order a new assignment shows an item's n completions in (canonical positions, first shown first): drawn
    at random per labeler and item, so that position bias is spread and measurable; a steps item's steps are shown
    in the solution's order (0..n-1; no draw)."""
    order = list(range(n))
    if task_type != "steps":
        rng.shuffle(order)
    return order


def new_assignment(s: Session, item: Item, labeler_id: int, project_id: int, rng: random.Random,
                   task_type: str) -> Assignment:
    """Give `item` (its slot already taken) to the labeler, completions in the `display_order` of its task."""
    order = display_order(task_type, len(item.completion_ids), rng)
    a = Assignment(item_id=item.id, labeler_id=labeler_id, project_id=project_id, status="assigned",
                   is_gold=item.is_gold, shown_order=order)
    s.add(a)
    s.flush()
    a.item = item
    return a


def expire_stale(s: Session, p: Project, expiry: ExpiryClock) -> int:
    """Release assignments left open longer than the project's `assignment_timeout_s` (setting; default 2 h; 0
    = never): status "expired", slot freed for another labeler. Checked at most every `expiry.interval_s` per
    project. Returns how many were released."""
    ttl = p.settings.get("assignment_timeout_s", DEFAULT_ASSIGNMENT_TIMEOUT_S)
    if not ttl or not expiry.due(p.id):
        return 0
    expiry.mark(p.id)
    now = utcnow()
    stale = s.execute(select(Assignment.id, Assignment.item_id).where(
        Assignment.project_id == p.id, Assignment.status == "assigned",
        Assignment.created_at < now - timedelta(seconds=float(ttl)))).all()
    n = 0
    for aid, item_id in stale:
        r = s.execute(update(Assignment).where(Assignment.id == aid, Assignment.status == "assigned")
                      .values(status="expired", completed_at=now))
        if r.rowcount == 1:
            s.execute(update(Item).where(Item.id == item_id).values(n_active=Item.n_active - 1))
            n += 1
    return n


def own_assignment(s: Session, assignment_id: int, labeler_id: int | None, **options) -> Assignment:
    """The assignment; with `labeler_id`, NotFound unless it is that labeler's (others' look like missing ones)."""
    a = s.get(Assignment, assignment_id, **options)
    if a is None or (labeler_id is not None and a.labeler_id != labeler_id):
        raise NotFound("no such assignment")
    return a


def skip_in(s: Session, assignment_id: int, labeler_id: int) -> None:
    """Skip an open assignment: its slot goes back to the pool; this labeler never gets the item again."""
    a = own_assignment(s, assignment_id, labeler_id)
    if a.status != "assigned":
        return
    a.status = "skipped"
    a.completed_at = utcnow()
    s.execute(update(Item).where(Item.id == a.item_id).values(n_active=Item.n_active - 1))
