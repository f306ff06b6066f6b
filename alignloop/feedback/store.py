"""The feedback store: projects, labelers, importing completions, assignment and judgements.

    store = Store("feedback.db")                          # creates / migrates the database
    p = store.create_project("hh", "pairwise", overlap_k=3, gold_rate=0.1, guidelines_md="# Be careful")
    store.import_records(p.name, [{"prompt": "Hi", "completions": ["Hello", "Go away"]}])
    lab = store.add_labeler("ann", "a long password")
    a = store.next_assignment(p.id, lab.id)               # None when nothing is left for this labeler
    store.submit(a.id, lab.id, {"choice": "left", "strength": "better"}, idempotency_key="...")
    judge = store.add_ai_labeler("judge-1", "Qwen/Qwen2.5-7B-Instruct")  # an AI labeler: never signs in
    store.record_ai_judgements(p.name, judge.id, [{"item_id": 1, "shown_order": [1, 0], "choice": "a",
                                                   "strength": None, "picked_position": 1, "details": {...}}])

`Store` owns the engine, the sessions, the write lock and the in-process caches, and opens one transaction per
call; the work itself lives in modules that read top to bottom:

    projects.py     projects and labelers, ProjectInfo and its cache
    importing.py    JSONL rows -> prompts, completions, items
    assignment.py   the next item for a labeler (rules: k distinct labelers, fewest labels first, gold mixing,
                    expiry), skipping
    judgements.py   storing a judgement (append-only versions, idempotency keys), the portable ORM path; AI
                    labelers and their judgements, in bulk and outside the items' slots
    sqlite_hot.py   submit-and-next in plain SQL on SQLite (the labeling hot path), behind one function
    reading.py      item views, histories, progress, summaries, the judgements for quality and export
    validation.py   checking a submission (both submit paths)

Two submit paths: on SQLite, `submit_and_next` / `submit_and_next_batch` go through `sqlite_hot` on one pooled
connection kept for it (`_hot_connection`), and whatever it hands back goes through the ORM path; on every other
database (PostgreSQL) the ORM path takes everything. Concurrency: the slot is taken with a conditional `UPDATE ...
WHERE n_active < k` checked for one affected row, so k holds under concurrent requests on SQLite and PostgreSQL alike.
"""
from __future__ import annotations

import math
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from alignloop.errors import UserError

from . import access, reading, review, sessions, sqlite_hot
from . import db as dbmod
from .assignment import (
    ExpiryClock,
    last_action,
    next_in,
    open_assignment,
    own_assignment,
    reopened_assignment,
    skip_in,
    undo_in,
)
from .importing import IMPORT_BATCH_ROWS, ImportResult, Pacer, batches, plan_import, read_jsonl, write_batch
from .judgements import get_or_add_ai_labeler, judgement_by_key, record_ai_in, submit_in
from .models import Assignment, Completion, Item, Judgement, Labeler, Project, Prompt, WebSession
from .projects import (
    ProjectInfoCache,
    check_attributes,
    check_password,
    check_settings,
    find_labeler,
    find_project,
    new_labeler,
    new_project,
    project_info,
)
from .security import check_new_password, hash_password
from .validation import check_idempotency_key, valid_idempotency_key

IMPORT_SERVER_DUTY = 0.3  # share of the time an import in the web server's process works (the rest: the loop's)
IMPORT_PAUSE_S = 0.002  # between two import batches: a thread lock is not fair, the import would take it right back
_RETRIES = 5  # attempts when a concurrent request of the same labeler wins a unique constraint first
_TRANSIENT_SQLSTATES = ("40P01", "40001")  # PostgreSQL: deadlock detected, serialization failure


def _transient(e: OperationalError) -> bool:
    """A deadlock or serialization failure: the database rolled the whole transaction back, so running it again is
    safe (two labelers submitting and taking items in crossed order can deadlock on PostgreSQL's row locks)."""
    code = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
    return code in _TRANSIENT_SQLSTATES


def _retrying(fn):
    """fn(), run again (after a short random wait) when the database aborted it as a deadlock victim."""
    for attempt in range(_RETRIES):
        try:
            return fn()
        except OperationalError as e:
            if not _transient(e) or attempt == _RETRIES - 1:
                raise
            time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
    raise AssertionError("unreachable")


def _last_user_turn(messages: list[dict]) -> str:
    """What a prompt asks: its last user message (a plain prompt is one), else its last message."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1]["content"] if messages else "")


class Store:
    def __init__(self, db: str, create: bool = True, synchronous: str = "NORMAL", seed: int | None = None,
                 lock_timeout_s: float = dbmod.DEFAULT_LOCK_TIMEOUT_S):
        self.url = dbmod.normalise_url(db)
        # SQLite: a writer waits at most lock_timeout_s for the write lock (then DatabaseBusy: the web app's 503)
        self.lock_timeout_s = lock_timeout_s
        self.engine = dbmod.open_engine(self.url, busy_timeout_ms=int(lock_timeout_s * 1000), synchronous=synchronous)
        if create:
            dbmod.upgrade(self.engine)
        elif not dbmod.is_initialised(self.engine):
            raise UserError(f"{db}: not a feedback database (run `alignloop feedback create` first)")
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(dbmod.write_engine(self.engine), expire_on_commit=False)
        self.sqlite = self.engine.dialect.name == "sqlite"
        # which submit path takes submit-and-next: the SQLite hot path (sqlite_hot.py) on SQLite, else the ORM path
        self.hot_path = self.sqlite
        # display order and gold mixing: unpredictable for people; `seed` makes simulations (the demo) reproducible
        self._rng = random.SystemRandom() if seed is None else random.Random(seed)
        self._info = ProjectInfoCache()
        self._expiry = ExpiryClock()
        self._views = reading.ItemViewCache()
        self._access = access.AccessCache()  # who may label which project (access.py)
        self._hot_caches = sqlite_hot.HotPathCaches(self._info, self._expiry, self._views, self._rng, self._access)
        # SQLite has one writer at a time: queue writers of this process on a lock (a cheap hand-off) rather than
        # on SQLite's busy handler (which sleeps in steps of up to 100 ms); other processes still wait on
        # busy_timeout. PostgreSQL writers run concurrently.
        self._write_lock = dbmod.WriteLock(lock_timeout_s) if self.sqlite else nullcontext()
        self._hot = None  # SQLite: the pooled connection kept for the hot path, used only under _write_lock
        self._checkpointer: threading.Thread | None = None
        self._checkpointer_stop = threading.Event()
        self.checkpoints = 0  # completed background checkpoints (for tests and diagnostics)
        self._revoked: dict[int, float] = {}  # labeler id -> when its sessions were last all ended (sessions.py)

    @property
    def expiry_check_interval_s(self) -> float:
        """Seconds between two checks of a project's open assignments for expiry."""
        return self._expiry.interval_s

    @expiry_check_interval_s.setter
    def expiry_check_interval_s(self, value: float) -> None:
        self._expiry.interval_s = value

    def dispose(self) -> None:
        self.stop_checkpointer()
        with self._write_lock:
            if self._hot is not None:
                self._hot.close()  # back to the pool
                self._hot = None
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as s:
            yield s

    @contextmanager
    def write(self, after_commit=None) -> Iterator[Session]:
        """A write transaction under the store's write lock. `after_commit` runs after the COMMIT and before the
        lock goes to the next writer of this process (clearing a cache there: no writer reads it stale between)."""
        with self._write_lock:
            with self._write() as s, s.begin():
                yield s
            if after_commit is not None:
                after_commit()

    # -- SQLite: the hot path's connection and WAL checkpoints off the request path --------------------------------
    def _hot_connection(self) -> sqlite3.Connection:
        """The hot path's DBAPI connection (call with _write_lock held). Opened through the engine, so it has the
        pragmas of every connection (WAL, busy_timeout, synchronous, foreign keys) and autocommit mode (we BEGIN)."""
        if self._hot is None:
            self._hot = self.engine.raw_connection()
            dbmod.set_busy_timeout(self._hot, int(self.lock_timeout_s * 1000))  # a pooled one may have had 0
            if self._checkpointer is not None:
                self._hot.driver_connection.execute("PRAGMA wal_autocheckpoint=0")
        return self._hot.driver_connection

    def start_checkpointer(self, interval_s: float = 0.2) -> bool:
        """SQLite: copy the WAL back into the database file from a background thread, every `interval_s`, and turn
        SQLite's automatic checkpoint off on the submit hot path's connection. A checkpoint is where SQLite fsyncs
        in WAL + synchronous=NORMAL mode; done by the committing request (the default) it stalled the event loop
        for up to ~1 s whenever the disk was busy. PASSIVE checkpoints never block writers or readers. Returns
        False (nothing started) on other databases. The web app starts it for the server's lifetime."""
        if not self.sqlite or self._checkpointer is not None:
            return False
        self._checkpointer_stop.clear()
        conn = self.engine.raw_connection()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(conn, interval_s),
                                              name="sqlite-checkpointer", daemon=True)
        self._checkpointer.start()
        with self._write_lock:
            if self._hot is not None:
                self._hot.driver_connection.execute("PRAGMA wal_autocheckpoint=0")
        return True

    def _checkpoint_loop(self, conn, interval_s: float) -> None:
        try:
            while not self._checkpointer_stop.wait(interval_s):
                try:
                    conn.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error:
                    continue  # e.g. SQLITE_BUSY while another checkpoint runs: try again next round
        finally:
            conn.close()

    def stop_checkpointer(self) -> None:
        """Stop the background checkpoints; SQLite's automatic ones apply again on every connection."""
        t = self._checkpointer
        if t is None:
            return
        self._checkpointer_stop.set()
        t.join()
        self._checkpointer = None
        with self._write_lock:
            if self._hot is not None:
                self._hot.driver_connection.execute("PRAGMA wal_autocheckpoint=1000")  # SQLite's default

    # -- projects and labelers ------------------------------------------------------------------------------------
    def create_project(self, name: str, task_type: str, guidelines_md: str = "", overlap_k: int = 3,
                       gold_rate: float = 0.0, settings: dict | None = None) -> Project:
        p = new_project(name, task_type, guidelines_md, overlap_k, gold_rate, settings)
        try:
            with self.write() as s:
                s.add(p)
                s.flush()
        except IntegrityError:
            raise UserError(f"a project named {name!r} already exists") from None
        return p

    def get_project(self, name_or_id: str | int) -> Project:
        """By name (a str: never parsed, "2024" is a name) or by id (an int); NotFound otherwise."""
        with self.read() as s:
            return find_project(s, name_or_id)

    def list_projects(self) -> list[Project]:
        with self.read() as s:
            return list(s.scalars(select(Project).order_by(Project.id)))

    def project_rules(self, project_id: int) -> tuple[str, list[str]]:
        """(task type, flag names) of a project, from the project info cache."""
        info = self._project_info(project_id)
        return info.task_type, info.flag_names

    def question_names(self, project_id: int) -> tuple[str, ...]:
        """The names of the questions the project asks of each item (one: its default question), from the cache."""
        return self._project_info(project_id).questions

    def _project_info(self, project_id: int):
        info = self._info.get(project_id)
        if info is None:
            with self.read() as s:
                info = project_info(s, project_id, self._info)
        return info

    def add_labeler(self, username: str, password: str, role: str = "labeler",
                    attributes: Mapping[str, str] | None = None) -> Labeler:
        """A person who signs in (`role` labeler | admin), with optional `attributes` (group, locale, ...: str ->
        str, exported with their judgements)."""
        lab = new_labeler(username, password, role, attributes)
        try:
            with self.write() as s:
                s.add(lab)
                s.flush()
        except IntegrityError:
            raise UserError(f"a labeler named {username!r} already exists") from None
        return lab

    def add_ai_labeler(self, name: str, model: str) -> Labeler:
        """The AI labeler `name` (kind "ai") that judges with `model`, created if new (get-or-create). It has no
        usable password and `authenticate` refuses it. ValidationError if `name` is a person's, or an AI labeler's
        with another model."""
        for _attempt in range(_RETRIES):
            try:
                with self.write() as s:
                    return get_or_add_ai_labeler(s, name, model)
            except IntegrityError:  # created concurrently under the same name: read it back
                continue
        raise RuntimeError(f"could not add the AI labeler {name!r} after {_RETRIES} attempts")

    def authenticate(self, username: str, password: str) -> Labeler | None:
        """The active person with this username and password, else None (an AI labeler never signs in)."""
        with self.read() as s:
            lab = s.scalar(select(Labeler).where(Labeler.username == username))
        if lab is not None and lab.kind != "human":
            lab = None  # still one password check: refused as slowly as a wrong password
        return check_password(lab, password)

    def set_labeler_attributes(self, username_or_id: str | int, attributes: Mapping[str, str],
                               replace: bool = True, remove: Iterable[str] = ()) -> Labeler:
        """Set a labeler's attributes: `replace` them all with `attributes`, or (replace=False) update the given
        ones and drop the names in `remove`. Returns the labeler. UserError naming the attribute when one is
        invalid; NotFound for an unknown labeler."""
        with self.write() as s:
            lab = find_labeler(s, username_or_id)
            new = dict(attributes) if replace else {**(lab.attributes or {}), **attributes}
            for name in remove:
                if name not in new:
                    raise UserError(f"labeler {lab.username!r} has no attribute {name!r} to remove")
                del new[name]
            lab.attributes = check_attributes(new)
            return lab

    def get_labeler(self, labeler_id: int) -> Labeler | None:
        with self.read() as s:
            return s.get(Labeler, labeler_id)

    def list_labelers(self) -> list[Labeler]:
        with self.read() as s:
            return list(s.scalars(select(Labeler).order_by(Labeler.id)))

    # -- passwords, activation and sign-in sessions (sessions.py; the web app's SessionManager calls these) ---------
    def set_password(self, username_or_id: str | int, password: str) -> Labeler:
        """Change a person's password (the rules of `security.password_problem`: UserError naming the rule) and end
        all their sessions. NotFound for an unknown labeler; UserError for an AI labeler (it never signs in)."""
        with self.read() as s:
            lab = find_labeler(s, username_or_id)
        if lab.kind != "human":
            raise UserError(f"{lab.username!r} is an AI labeler: it has no password")
        new_hash = hash_password(check_new_password(password, lab.username))  # ~0.2 s: not under the write lock
        with self.write() as s:
            lab = s.get(Labeler, lab.id)
            lab.password_hash = new_hash
            sessions.end_all(s, lab.id)
        self._sessions_revoked(lab.id)
        return lab

    def set_active(self, username_or_id: str | int, active: bool) -> Labeler:
        """(De)activate a labeler. An inactive one cannot sign in, and deactivation ends all their sessions (their
        judgements stay). NotFound for an unknown labeler."""
        with self.write() as s:
            lab = find_labeler(s, username_or_id)
            lab.active = bool(active)
            if not active:
                sessions.end_all(s, lab.id)
        if not active:
            self._sessions_revoked(lab.id)
        return lab

    def revoke_sessions(self, labeler_id: int) -> int:
        """End all of a labeler's sessions (every device signed out); returns how many there were."""
        with self.write() as s:
            n = sessions.end_all(s, labeler_id)
        self._sessions_revoked(labeler_id)
        return n

    def sessions_revoked_at(self, labeler_id: int) -> float:
        """When (time.monotonic()) this process last ended all of the labeler's sessions, else -inf: a session read
        into a cache before then is stale (`SessionManager.cached`)."""
        return self._revoked.get(labeler_id, -math.inf)

    def _sessions_revoked(self, labeler_id: int) -> None:
        self._revoked[labeler_id] = time.monotonic()  # after the COMMIT: a cache that read before it re-reads

    def create_session(self, labeler_id: int, now: float, expired_before: tuple[float, float] | None = None) -> str:
        with self.write() as s:
            return sessions.create(s, labeler_id, now, expired_before)

    def load_session(self, sid: str):
        with self.read() as s:
            return sessions.load(s, sid)

    def existing_sessions(self, sids: list[str]) -> set[str]:
        """Which of these session ids still have a row (`SessionManager.validate_all`)."""
        with self.read() as s:
            return set(s.scalars(select(WebSession.id).where(WebSession.id.in_(sids))))

    def touch_session(self, sid: str, now: float) -> None:
        with self.write() as s:
            sessions.touch(s, sid, now)

    def end_session(self, sid: str) -> None:
        with self.write() as s:
            sessions.end(s, sid)

    # -- importing ------------------------------------------------------------------------------------------------
    def import_jsonl(self, project: str | int, path: str | Path, model: str | None = None) -> ImportResult:
        return self.import_records(project, read_jsonl(path), model=model)

    def import_records(self, project: str | int, rows: Iterable[dict], model: str | None = None,
                       batch_rows: int = IMPORT_BATCH_ROWS, duty: float | None = None) -> ImportResult:
        """Rows: `{"prompt", "completions": [str | {"text","model","params"}], "id"?, "gold"?, "meta"?}` or one
        completion per row `{"prompt", "completion", "model"?, "params"?, "id"?}` (grouped by prompt or id); a steps
        project: step-format rows `{"prompt", "completions": [steps], "labels"?, "gold"?}`, one item each
        (`importing.parse_step_rows`). All rows are checked before anything is written; then the groups are written
        about `batch_rows` rows per write transaction (the write lock is held briefly, labeling goes on meanwhile),
        and groups already imported (same id or same content) are skipped and counted
        (`ImportResult.already_present`). Interrupted, it leaves whole batches: running it again adds what is
        missing. `project`: a name (str) or an id (int). `duty`: the share of the time the import works
        (`importing.Pacer`); default 1, or IMPORT_SERVER_DUTY while a web server runs in this process (the admin
        upload: the import then leaves the event loop most of the CPU)."""
        p = self.get_project(project)
        if duty is None:  # a web server runs in this process (its lifespan started the checkpointer): share the CPU
            duty = IMPORT_SERVER_DUTY if self._checkpointer is not None else 1.0
        pace = Pacer(duty)
        with self.read() as s:
            groups, res = plan_import(s, p, rows, model, pace)
        for i, batch in enumerate(batches(p, groups, batch_rows)):
            if i:
                pace.pause(IMPORT_PAUSE_S)  # let the requests queued on the write lock in before the next batch
            with self.write() as s:
                if self._checkpointer is not None:  # its COMMIT must not checkpoint (an fsync under the write lock)
                    s.connection().exec_driver_sql("PRAGMA wal_autocheckpoint=0")
                res.add(write_batch(s, p, batch))
        return res

    # -- assignment -----------------------------------------------------------------------------------------------
    def next_assignment(self, project_id: int, labeler_id: int) -> Assignment | None:
        """The labeler's open assignment in this project (resume), else a new one, else None (nothing left)."""
        for _attempt in range(_RETRIES):
            try:
                return _retrying(lambda: self._next_once(project_id, labeler_id))
            except IntegrityError:  # the same labeler racing itself (two tabs): retry, it then finds the open one
                continue
        raise RuntimeError(f"could not assign an item after {_RETRIES} attempts")

    def open_assignment(self, project_id: int, labeler_id: int) -> Assignment | None:
        """The labeler's open assignment in this project (the oldest), if any: a read, nothing is taken (what a GET
        may do)."""
        with self.read() as s:
            return open_assignment(s, project_id, labeler_id)

    def _next_once(self, project_id: int, labeler_id: int) -> Assignment | None:
        if not self.may_label(project_id, labeler_id):  # access.py: not a member of a members-only project
            return None
        with self.write() as s:
            return next_in(s, project_id, labeler_id, self._rng, self._expiry)

    def get_assignment(self, assignment_id: int, labeler_id: int | None = None) -> Assignment:
        """The assignment; with `labeler_id`, raise NotFound unless it belongs to that labeler."""
        with self.read() as s:
            return own_assignment(s, assignment_id, labeler_id)

    def undo(self, project_id: int, labeler_id: int, expected: int | None = None) -> tuple[str, Assignment]:
        """Undo the labeler's last action in the project (`assignment.undo_in`): ("judgement", the assignment,
        reopened for editing) or ("skip", the assignment, open again); UndoRefused when there is nothing to undo or
        the skipped item has no free slot left; UndoneAlready when `expected` (the assignment the client saw as
        the last action) is not the last action any more."""
        def once() -> tuple[str, Assignment]:
            with self.write() as s:
                return undo_in(s, project_id, labeler_id, expected)
        return _retrying(once)

    def last_action(self, project_id: int, labeler_id: int) -> int | None:
        """The assignment of the labeler's last action in the project (what undo would undo), or None: a read."""
        with self.read() as s:
            last = last_action(s, project_id, labeler_id)
        return None if last is None else last[1]

    def reopened_assignment(self, project_id: int, labeler_id: int) -> Assignment | None:
        """The labeler's judgement reopened by undo in this project (its assignment), if any: a read."""
        with self.read() as s:
            return reopened_assignment(s, project_id, labeler_id)

    def skip(self, assignment_id: int, labeler_id: int) -> None:
        def once() -> None:
            with self.write() as s:
                skip_in(s, assignment_id, labeler_id)
        _retrying(once)

    # -- judgements -----------------------------------------------------------------------------------------------
    def submit(self, assignment_id: int, labeler_id: int, fields: Mapping[str, Any], idempotency_key: str,
               started_at: datetime | None = None) -> tuple[Judgement, bool]:
        """Store a judgement (a new version if the assignment already has one). Returns (judgement, created);
        a repeated `idempotency_key` returns the stored judgement and created=False."""
        check_idempotency_key(idempotency_key)
        for _attempt in range(_RETRIES):
            try:
                return _retrying(lambda: self._submit_once(assignment_id, labeler_id, fields, idempotency_key,
                                                           started_at))
            except IntegrityError:
                with self.read() as s:
                    j = judgement_by_key(s, idempotency_key, labeler_id)
                if j is not None:
                    return j, False
                continue  # version race between two edits: retry with the next version
        raise RuntimeError(f"could not store the judgement after {_RETRIES} attempts")

    def _submit_once(self, assignment_id: int, labeler_id: int, fields: Mapping[str, Any], idempotency_key: str,
                     started_at: datetime | None) -> tuple[Judgement, bool]:
        with self.write() as s:
            j, created, _project_id = submit_in(s, assignment_id, labeler_id, fields, idempotency_key, started_at,
                                                self._info)
            return j, created

    def submit_and_next(self, assignment_id: int, labeler_id: int, fields: Mapping[str, Any],
                        idempotency_key: str) -> tuple[Judgement, bool, Assignment | None]:
        """`submit`, then `next_assignment` in the same project, in one write transaction (one round trip and one
        lock hand-off per judgement). On SQLite's hot path the results are `sqlite_hot.StoredJudgement` /
        `AssignmentRef` (the same attributes as the ORM classes, read-only snapshots)."""
        check_idempotency_key(idempotency_key)
        if not self.hot_path:
            return self._submit_and_next_orm(assignment_id, labeler_id, fields, idempotency_key)
        r = self.submit_and_next_batch([(assignment_id, labeler_id, fields, idempotency_key)])[0]
        if isinstance(r, Exception):
            raise r
        return r

    def submit_and_next_batch(self, requests: list[tuple[int, int, Mapping[str, Any], str]]) -> list[Any]:
        """Group commit: `submit_and_next` for several (assignment_id, labeler_id, fields, idempotency_key).
        Returns, per request, what `submit_and_next` returns or the exception it raises. On SQLite the hot path
        stores what it can in one transaction, each request in its own SAVEPOINT (one invalid submission does not
        undo the others), and returns nothing before that COMMIT has returned: a caller that acknowledges a result
        acknowledges a stored judgement; if the COMMIT fails this raises and none of them is stored. What the hot
        path hands back (retries, edits, gold, ...) then runs one by one through the ORM path. Elsewhere than
        SQLite: all of them through the ORM path, one by one.

        Under `db.no_wait()` (the event loop) nothing here waits for the write lock: taken in-process or by another
        process at the start, the whole call raises WouldBlock (nothing written); an ORM-path request that meets it
        later gets a WouldBlock result (nothing written for it). The caller runs those again in a worker thread."""
        results: list[Any] = [None] * len(requests)
        later = list(range(len(requests)))
        if self.hot_path:
            hot = [i for i in later if valid_idempotency_key(requests[i][3])]  # the rest: the ORM path refuses it
            with self._write_lock:
                got, fallback = self._hot_batch([requests[i] for i in hot])
            for i, r in zip(hot, got, strict=True):
                results[i] = r
            taken = set(hot) - {hot[f] for f in fallback}
            later = [i for i in later if i not in taken]
        for i in later:
            try:
                results[i] = self._submit_and_next_orm(*requests[i])
            except Exception as e:  # noqa: BLE001 - handed to that request's caller
                results[i] = e
        return results

    def _hot_batch(self, requests: list) -> tuple[list[Any], list[int]]:
        """sqlite_hot.submit_and_next_batch (call with _write_lock held). SQLite's busy handler sleeps only off the
        event loop: under no_wait() the hot connection's busy_timeout is 0 and a busy BEGIN raises WouldBlock
        (elsewhere: waits up to the lock timeout, then DatabaseBusy). A request whose SAVEPOINT met the lock (not
        expected while the transaction holds it) gets that error too: nothing of it was written."""
        conn = self._hot_connection()
        dbmod.set_busy_timeout(self._hot, 0 if dbmod.waits_off() else int(self.lock_timeout_s * 1000))
        try:
            got, fallback = sqlite_hot.submit_and_next_batch(conn, requests, self._hot_caches)
        except sqlite3.OperationalError as e:
            if not dbmod.is_busy(e):
                raise
            raise dbmod.busy_error() from None
        return [dbmod.busy_error() if dbmod.is_busy(r) else r for r in got], fallback

    def record_ai_judgements(self, project: str | int, labeler_id: int, judgements: list[dict]) -> int:
        """Store an AI labeler's judgements in one write transaction (bulk). Returns the rows written.

        Each dict, in canonical terms ("a" = the item's completion_ids[0]): `item_id`, `shown_order` (how the first
        judging order showed the canonical completions), then pairwise `choice` a|b|tie|both_bad, `strength` (one of
        models.STRENGTHS or None), `picked_position` (0|1|None; None for a|b: taken from shown_order); rank
        `ranking` (a rank per canonical completion, 1 = best); thumbs `thumbs` +1|-1; likert `likert` 1..7 (and
        `flags`); optional `details` (dict: per-order probabilities, `raw_picks`, principle, rationale), `comment`,
        `time_spent_ms`. All are checked first (`validation.validate_ai_judgement`; every mistake raised together
        in one ValidationError naming the item) and nothing is written unless all are valid.

        One assignment per (item, AI labeler), status "done", outside the item's slots: `Item.n_active` / `n_done`
        do not change, so AI labels never take a person's place among the k, never complete an item and never
        enter a person's queue. Judging an item again appends a new version (the current judgement is the newest).
        """
        def once() -> int:
            with self.write() as s:
                return record_ai_in(s, project, labeler_id, judgements)
        return _retrying(once)

    def _submit_and_next_orm(self, assignment_id: int, labeler_id: int, fields: Mapping[str, Any],
                             idempotency_key: str) -> tuple[Judgement, bool, Assignment | None]:
        check_idempotency_key(idempotency_key)
        def once() -> tuple[Judgement, bool, Assignment | None]:
            with self.write() as s:
                j, created, project_id = submit_in(s, assignment_id, labeler_id, fields, idempotency_key, None,
                                                   self._info)
                if not access.may_label(s, project_id, labeler_id, self._access):  # no longer a member: no next
                    return j, created, None
                return j, created, next_in(s, project_id, labeler_id, self._rng, self._expiry)
        try:
            return _retrying(once)
        except IntegrityError:  # a concurrent duplicate or version race: fall back to the two-step path
            j, created = self.submit(assignment_id, labeler_id, fields, idempotency_key)
            return j, created, self.next_assignment(self.get_assignment(assignment_id).project_id, labeler_id)

    # -- reading --------------------------------------------------------------------------------------------------
    def item_view(self, item, shown_order: list[int]) -> dict:
        """What a labeler sees: `{"messages", "is_chat", "completions": [{"text"}, ...]}`, the completions in the
        shown order. Blind: only the texts, nothing that tells where a completion came from (its model, params), nor
        whether the item is gold, nor its id (admins read those elsewhere)."""
        view = self._views.get(item.id)
        if view is None:
            with self.engine.connect() as conn:
                view = reading.load_item_view(conn, item.prompt_id, item.completion_ids)
            self._views.put(item.id, view)
        head, canon = view
        return {**head, "completions": [{"text": canon[i]["text"]} for i in shown_order]}

    def judgement_history(self, assignment_id: int) -> list[Judgement]:
        with self.read() as s:
            return reading.judgement_history(s, assignment_id)

    def current_judgement(self, assignment_id: int) -> Judgement | None:
        with self.read() as s:
            return reading.current_judgement(s, assignment_id)

    def labeler_history(self, project_id: int, labeler_id: int, limit: int = 200) -> list[dict]:
        """The labeler's current judgements, newest first: `{"judgement", "assignment", "prompt"}`, `prompt` the
        text of the item's prompt (its last user turn) that "My judgements" shows to tell the items apart."""
        with self.read() as s:
            rows = reading.labeler_history(s, project_id, labeler_id, limit)
            messages = dict(s.execute(select(Item.id, Prompt.messages).join(Prompt, Prompt.id == Item.prompt_id)
                                      .where(Item.id.in_({r["assignment"].item_id for r in rows}))).all())
        return [{**r, "prompt": _last_user_turn(messages.get(r["assignment"].item_id) or [])} for r in rows]

    def progress(self, project_id: int, labeler_id: int) -> dict:
        with self.read() as s:
            return reading.progress(s, project_id, labeler_id)

    def project_summary(self, project_id: int) -> dict:
        with self.read() as s:
            return reading.project_summary(s, project_id)

    def current_judgements(self, project_id: int) -> list[dict]:
        """The current (latest-version) judgement of every done assignment in the project, as plain dicts."""
        with self.read() as s:
            return reading.current_judgements(s, project_id)

    def prompts_and_completions(self, project_id: int) -> tuple[dict[int, Prompt], dict[int, Completion]]:
        with self.read() as s:
            return reading.prompts_and_completions(s, project_id)

    # -- admin: settings after creation, members, review and adjudication ---------------------------------------
    def may_label(self, project_id: int, labeler_id: int) -> bool:
        """Whether the labeler may see and label the project (`access.py`: members-only projects; cached)."""
        hit = self._access.get(project_id, labeler_id)
        if hit is not None:
            return hit
        with self.read() as s:
            return access.may_label(s, project_id, labeler_id, self._access)

    def update_project(self, project: str | int, guidelines_md: str | None = None,
                       settings: Mapping[str, Any] | None = None) -> Project:
        """Change a project's guidelines and/or settings (checked by `projects.check_settings`; the `gold_seed` is
        kept when not given; `questions` cannot change once the project has judgements). The caches that hold the
        project's rules are cleared here at once; other processes see the change within their TTL."""
        def forget() -> None:
            self._info.forget(p.id)
            self._access.clear()

        with self.write(after_commit=forget) as s:
            p = find_project(s, project)
            if guidelines_md is not None:
                p.guidelines_md = guidelines_md
            if settings is not None:
                new = check_settings(p.task_type, settings, p.overlap_k)
                old = dict(p.settings or {})
                if "gold_seed" in old:
                    new.setdefault("gold_seed", old["gold_seed"])
                if new.get("questions") != old.get("questions") and s.scalar(
                        select(Judgement.id).join(Assignment, Assignment.id == Judgement.assignment_id)
                        .where(Assignment.project_id == p.id).limit(1)) is not None:
                    raise UserError("settings.questions: cannot change once the project has judgements")
                p.settings = new
        return p

    def project_members(self, project_id: int) -> set[int]:
        with self.read() as s:
            return access.members_of(s, project_id)

    def set_project_members(self, project_id: int, labeler_ids: Iterable[int]) -> None:
        """Make exactly these labelers the project's members (who may label it when its access is "members")."""
        ids = set(labeler_ids)
        with self.write(after_commit=self._access.clear) as s:
            known = set(s.scalars(select(Labeler.id).where(Labeler.id.in_(ids)))) if ids else set()
            if ids - known:
                raise UserError(f"members: no labeler {min(ids - known)}")
            access.set_members(s, project_id, ids)

    def adjudicate(self, project_id: int, item_id: int, admin_id: int, decision: str,
                   fields: Mapping[str, Any] | None = None, note: str = ""):
        """An admin's decision on an item (`review.adjudicate`: accept | override with `fields` | exclude)."""
        with self.write() as s:
            return review.adjudicate(s, project_id, item_id, admin_id, decision, fields, note)

    def adjudications(self, project_id: int) -> dict[int, dict]:
        """item id -> its newest adjudication (`review.latest_adjudications`)."""
        with self.read() as s:
            return review.latest_adjudications(s, project_id)

    def item_review(self, project_id: int, item_id: int) -> dict:
        with self.read() as s:
            return review.item_review(s, project_id, item_id)

