"""Assignment: which item a labeler gets next (the portable ORM path, used on every database).

Rules: a labeler's open assignment in the project is handed back first (resume, from any device, same order);
else, when the labeler's turn is a gold one (`is_gold_turn`: the i-th assignment is gold with probability
`gold_rate`, a seeded draw: random placement, reproducible), a gold item (outside the k count, at random among the
least-labelled they never had);
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

import hashlib
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from alignloop.errors import UserError

from .errors import NotFound
from .models import Assignment, Item, Judgement, Project, utcnow
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
    return _oldest_with_status(s, project_id, labeler_id, "assigned")


def _oldest_with_status(s: Session, project_id: int, labeler_id: int, status: str) -> Assignment | None:
    a = s.scalar(select(Assignment).where(
        Assignment.labeler_id == labeler_id, Assignment.project_id == project_id,
        Assignment.status == status).order_by(Assignment.id).limit(1))
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


def gold_seed(p: Project) -> str:
    """The project's seed for gold placement: `settings.gold_seed` (drawn at random when the project is created);
    a project made before that setting existed: its id and creation time."""
    seed = (p.settings or {}).get("gold_seed")
    return str(seed) if seed is not None else f"{p.id}:{p.created_at.isoformat()}"


def is_gold_turn(seed: str, labeler_id: int, i: int, gold_rate: float) -> bool:
    """Whether a labeler's i-th assignment in a project (0-based, counting every assignment they were given) is a
    gold one: a draw with probability `gold_rate` from a hash of (the project's seed, the labeler, i). Random
    placement (no fixed schedule to learn), the same draw on every run and on every database (reproducible)."""
    h = hashlib.sha256(f"{seed}:{labeler_id}:{i}".encode()).digest()
    return int.from_bytes(h[:8], "big") < gold_rate * 2**64


def _gold_due(s: Session, p: Project, labeler_id: int) -> bool:
    """Whether the labeler's next assignment should be gold (`is_gold_turn` for their next i)."""
    if p.gold_rate <= 0:
        return False
    i = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.labeler_id == labeler_id,
                                                                    Assignment.project_id == p.id))
    return is_gold_turn(gold_seed(p), labeler_id, i, p.gold_rate)


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
    cutoff = now - timedelta(seconds=float(ttl))
    stale = s.execute(select(Assignment.id, Assignment.item_id).where(
        Assignment.project_id == p.id, Assignment.status == "assigned", Assignment.created_at < cutoff)).all()
    n = 0
    for aid, item_id in stale:
        # the time again in the UPDATE: on PostgreSQL (READ COMMITTED) a keep-alive committed since the SELECT (a
        # conversation's message: `conversations._touch_assignment`) restarted it, and the UPDATE re-checks only its
        # own WHERE on the row it waited for; the keep-alive wins
        r = s.execute(update(Assignment).where(Assignment.id == aid, Assignment.status == "assigned",
                                               Assignment.created_at < cutoff)
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
    """Skip an open assignment: its slot goes back to the pool; this labeler never gets the item again. Skipping a
    judgement reopened by undo leaves it as it was (done, its judgement current)."""
    a = own_assignment(s, assignment_id, labeler_id)
    if a.status == "reopened":
        a.status = "done"
        return
    if a.status != "assigned":
        return
    a.status = "skipped"
    a.completed_at = utcnow()
    s.execute(update(Item).where(Item.id == a.item_id).values(n_active=Item.n_active - 1))


# -- undo -----------------------------------------------------------------------------------------------------------
class UndoRefused(UserError):
    """Nothing to undo, or the skipped item's slot went to another labeler (the web app answers 409)."""


def reopened_assignment(s: Session, project_id: int, labeler_id: int) -> Assignment | None:
    """The labeler's judged assignment that undo reopened for editing in this project, if any (item loaded)."""
    return _oldest_with_status(s, project_id, labeler_id, "reopened")


class UndoneAlready(UndoRefused):
    """The undo names an action that is not the labeler's last one any more (a double click, a held key, a retry):
    nothing changes."""


def last_action(s: Session, project_id: int, labeler_id: int) -> tuple[str, int] | None:
    """The labeler's last action in the project: ("skip", assignment id) or ("judgement", assignment id), the newer
    of their newest skip and their newest judgement (a first one or an edit); None when there is none."""
    last_j = s.execute(select(Judgement.assignment_id, Judgement.created_at).join(
        Assignment, Assignment.id == Judgement.assignment_id).where(
        Judgement.labeler_id == labeler_id, Assignment.project_id == project_id)
        .order_by(Judgement.id.desc()).limit(1)).first()
    skipped = s.execute(select(Assignment.id, Assignment.completed_at).where(
        Assignment.labeler_id == labeler_id, Assignment.project_id == project_id, Assignment.status == "skipped")
        .order_by(Assignment.completed_at.desc(), Assignment.id.desc()).limit(1)).first()
    if skipped is not None and (last_j is None or skipped.completed_at > last_j.created_at):
        return "skip", skipped.id
    return None if last_j is None else ("judgement", last_j.assignment_id)


def undo_in(s: Session, project_id: int, labeler_id: int, expected: int | None = None) -> tuple[str, Assignment]:
    """Undo the labeler's last action in the project: ("judgement", its assignment) or ("skip", the assignment).

    A judgement: its assignment is reopened for editing (status "reopened": the label page shows it prefilled; the
    next submission is version + 1 and closes it again; nothing is deleted and the item's counts do not change, the
    judgement stays current until then). A skip: the assignment is open again ("assigned", its time restarted) if
    the item still has a free slot (n_active < k; a gold item is outside the k), else UndoRefused. Undoing again
    finds the same reopened judgement (one level of undo). `expected`: the assignment the client saw as the last
    action (the page's `undo_of`, the API's `assignment_id`); another one now means that action was undone already
    (a double click, a retry): UndoneAlready, nothing changes."""
    if s.get(Project, project_id).task_type == "conversation":
        # a conversation's rating closes a conversation that cannot be reopened (its turns are the data): no undo
        raise UndoRefused("a conversation cannot be undone: it ended with your rating; start a new one")
    last = last_action(s, project_id, labeler_id)
    if last is None:
        raise UndoRefused("nothing to undo: you have not judged or skipped anything in this project")
    kind, aid = last
    if expected is not None and aid != expected:
        raise UndoneAlready("already undone: that is not your last action any more (nothing changed)")
    a = s.get(Assignment, aid)
    if kind == "skip":
        return "skip", _unskip(s, a)
    if a.status == "done":
        a.status = "reopened"
    a.item  # noqa: B018 - load it while the session is open
    return "judgement", a


def _unskip(s: Session, a: Assignment) -> Assignment:
    # the status first, conditionally: of two concurrent undos of one skip (PostgreSQL runs writers side by side)
    # only one may take a slot, else n_active would count one assignment twice and the item miss a label for good
    now = utcnow()
    if s.execute(update(Assignment).where(Assignment.id == a.id, Assignment.status == "skipped")
                 .values(status="assigned", completed_at=None, created_at=now)).rowcount != 1:
        raise UndoneAlready("already undone: that skip is open again (nothing changed)")
    p = s.get(Project, a.project_id)
    cond = [Item.id == a.item_id] + ([] if a.is_gold else [Item.n_active < p.overlap_k])
    if s.execute(update(Item).where(*cond).values(n_active=Item.n_active + 1)).rowcount != 1:
        # raised inside the write transaction: it rolls back, the status change with it
        raise UndoRefused("this item went to other labelers after you skipped it (all its places are taken), so "
                          "the skip cannot be undone")
    s.refresh(a)
    a.item  # noqa: B018 - load it while the session is open
    return a
