"""Server-side sign-in sessions: what makes sign-out, deactivation and a password change end a session.

A session is a random token kept in the signed session cookie (`sid`); the `sessions` table keeps its SHA-256 (never
the token itself), the labeler, when it began and when it was last used. A session ends when:

    sign-out                        its row is deleted (`SessionManager.end`)
    deactivation, password change   all the labeler's rows are deleted (`Store.set_active` / `set_password` /
                                    `revoke_sessions`)
    idle timeout (default 12 h)     no request for that long
    absolute timeout (default 14 d) that long after sign-in, however active

Every signed-in request needs its session checked, and the JSON submit route serves ~1000 requests/s: the check
must not read the database each time. `SessionManager` keeps the sessions it has read in memory and re-reads one
from the database when its copy is older than `cache_ttl_s` (1 s: another server process's sign-out or deactivation
takes effect within it), at once when the store says the labeler's sessions were revoked in this process, and
writes `last_seen_at` at most once per `touch_every_s` (60 s) per session. Times come from `clock` (epoch seconds;
tests pass their own); the table holds naive UTC datetimes like every other table.
"""
from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from .db import is_busy, no_wait
from .errors import DatabaseBusy, WouldBlock
from .models import Labeler, WebSession
from .security import new_token

if TYPE_CHECKING:
    from .store import Store

SESSION_IDLE_S = 12 * 3600
SESSION_MAX_S = 14 * 24 * 3600
CACHE_TTL_S = 1.0
TOUCH_EVERY_S = 60.0
TOUCH_RETRY_S = 5.0  # a last_seen_at write that met the write lock taken: tried again this much later
CACHE_MAX = 50_000
MISS = object()  # `SessionManager.cached`: the cache cannot answer alone, call `refresh` (it reads the database)


def token_id(token: str) -> str:
    """The row id of a session token: its SHA-256 (hex). A leaked table does not hand out sessions."""
    return hashlib.sha256(token.encode()).hexdigest()


def to_datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC).replace(tzinfo=None)


def to_epoch(dt: datetime) -> float:
    return dt.replace(tzinfo=UTC).timestamp()


# -- the table (ORM functions; `Store` wraps each in a transaction) -----------------------------------------------
def create(s: Session, labeler_id: int, now: float, expired_before: tuple[float, float] | None = None) -> str:
    """Insert a session for `labeler_id`; return its token. `expired_before` = (idle, absolute) limits as epoch
    times: the labeler's sessions last used before the first or begun before the second are deleted first (sign-in
    is when a labeler's dead sessions are cleared out)."""
    if expired_before is not None:
        idle_limit, max_limit = expired_before
        s.execute(delete(WebSession).where(WebSession.labeler_id == labeler_id, or_(
            WebSession.last_seen_at < to_datetime(idle_limit), WebSession.created_at < to_datetime(max_limit))))
    token = new_token(32)
    at = to_datetime(now)
    s.add(WebSession(id=token_id(token), labeler_id=labeler_id, created_at=at, last_seen_at=at))
    return token


def load(s: Session, sid: str) -> tuple[WebSession, Labeler] | None:
    row = s.get(WebSession, sid)
    if row is None:
        return None
    lab = s.get(Labeler, row.labeler_id)
    return None if lab is None else (row, lab)


def touch(s: Session, sid: str, now: float) -> None:
    s.execute(update(WebSession).where(WebSession.id == sid).values(last_seen_at=to_datetime(now)))


def end(s: Session, sid: str) -> None:
    s.execute(delete(WebSession).where(WebSession.id == sid))


def end_all(s: Session, labeler_id: int) -> int:
    return s.execute(delete(WebSession).where(WebSession.labeler_id == labeler_id)).rowcount


# -- the in-process cache ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Entry:
    labeler: Labeler
    created: float      # sign-in (clock time)
    seen: float         # last request (clock time), kept in memory
    seen_stored: float  # last_seen_at as the table has it
    loaded: float       # time.monotonic() just before the row was read


class SessionManager:
    """One app's sessions: sign-in, sign-out and the per-request check (see the module's docstring)."""

    def __init__(self, store: Store, idle_s: float = SESSION_IDLE_S, max_s: float = SESSION_MAX_S,
                 clock: Callable[[], float] = time.time, cache_ttl_s: float = CACHE_TTL_S,
                 touch_every_s: float = TOUCH_EVERY_S, cache_max: int = CACHE_MAX):
        self.store, self.idle_s, self.max_s, self.clock = store, idle_s, max_s, clock
        self.cache_ttl_s, self.touch_every_s, self.cache_max = cache_ttl_s, touch_every_s, cache_max
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()  # refresh runs in worker threads: one writer of `_entries` at a time

    def start(self, labeler: Labeler) -> str:
        """A new session for `labeler` (a database write: call it off the event loop). Returns its token."""
        now = self.clock()
        return self.store.create_session(labeler.id, now, (now - self.idle_s, now - self.max_s))

    def end(self, token: str) -> None:
        """Sign-out: the session's row is deleted and forgotten here (a database write)."""
        sid = token_id(token)
        with self._lock:
            self._entries.pop(sid, None)
        self.store.end_session(sid)

    def cached(self, token: str):
        """The session's labeler from memory, or MISS when only `refresh` can tell (not cached, cached for longer
        than `cache_ttl_s`, revoked since it was read, timed out, or `last_seen_at` due to be written)."""
        e = self._entries.get(token_id(token))
        if e is None or time.monotonic() - e.loaded >= self.cache_ttl_s \
                or e.loaded <= self.store.sessions_revoked_at(e.labeler.id):
            return MISS
        now = self.clock()
        if self._expired(e, now) or now - e.seen_stored >= self.touch_every_s:
            return MISS
        e.seen = now
        return e.labeler

    def refresh(self, token: str) -> Labeler | None:
        """The session's labeler read from the database (None: no such session, its labeler is inactive, or it
        timed out, whereupon its row is deleted); `last_seen_at` written when due. Blocking: off the event loop."""
        sid = token_id(token)
        with self._lock:
            old = self._entries.pop(sid, None)
        loaded = time.monotonic()
        found = self.store.load_session(sid)
        if found is None:
            return None
        row, lab = found
        if not lab.active or lab.kind != "human":
            return None
        now = self.clock()
        e = _Entry(lab, to_epoch(row.created_at), to_epoch(row.last_seen_at), to_epoch(row.last_seen_at), loaded)
        if old is not None:
            e.seen = max(e.seen, old.seen)
        if self._expired(e, now):
            _best_effort(self.store.end_session, sid)  # a busy database: the row goes at a later check
            return None
        if now - e.seen_stored >= self.touch_every_s:
            # not stored (the write lock taken): tried again TOUCH_RETRY_S later; the request itself goes on
            stored = _best_effort(self.store.touch_session, sid, now)
            e.seen_stored = now if stored else now - self.touch_every_s + TOUCH_RETRY_S
        e.seen = now
        with self._lock:
            if len(self._entries) >= self.cache_max:
                del self._entries[next(iter(self._entries))]  # the longest-cached entry; the others stay
            self._entries[sid] = e
        return lab

    def _expired(self, e: _Entry, now: float) -> bool:
        return now - e.seen > self.idle_s or now - e.created > self.max_s


def _best_effort(fn, *args) -> bool:
    """Run a bookkeeping write (`last_seen_at`, deleting an expired session's row) without waiting for the write
    lock (`db.no_wait()`): True if it was stored, False if the lock was taken (in-process or by another process:
    WouldBlock, DatabaseBusy, SQLite's "database is locked"). The gate runs it outside the app's error handlers,
    so a busy database must neither fail the request (it was a 500) nor hold it for the lock timeout."""
    try:
        with no_wait():
            fn(*args)
    except (DatabaseBusy, WouldBlock, OperationalError, sqlite3.OperationalError) as e:
        if not isinstance(e, (DatabaseBusy, WouldBlock)) and not is_busy(getattr(e, "orig", e)):
            raise
        return False
    return True
