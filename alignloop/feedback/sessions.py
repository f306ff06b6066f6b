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
takes effect within it; while the server runs, one query every half TTL renews all copies whose rows still exist,
`validate_all`, so requests do not wait for per-session reads), at once when the store says the labeler's sessions
were revoked in this process, and writes `last_seen_at` at most once per `touch_every_s` (60 s) per session.
Times come from `clock` (epoch seconds; tests pass their own); the table holds naive UTC datetimes like every other
table.
"""
from __future__ import annotations

import hashlib
import logging
import math
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

log = logging.getLogger(__name__)
SESSION_IDLE_S = 12 * 3600
SESSION_MAX_S = 14 * 24 * 3600
CACHE_TTL_S = 1.0
TOUCH_EVERY_S = 60.0
TOUCH_RETRY_S = 5.0  # a last_seen_at write that met the write lock taken: tried again this much later
CACHE_MAX = 50_000
VALIDATE_CHUNK = 500  # session ids per `SELECT ... IN (...)` of the validator
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
        self._refreshing: set[str] = set()  # sessions with a background refresh in flight
        self._ended: dict[str, float] = {}  # sessions signed out here lately -> time.monotonic() of the sign-out

    def start(self, labeler: Labeler) -> str:
        """A new session for `labeler` (a database write: call it off the event loop). Returns its token."""
        now = self.clock()
        return self.store.create_session(labeler.id, now, (now - self.idle_s, now - self.max_s))

    def end(self, token: str) -> None:
        """Sign-out: the session's row is deleted and forgotten here (a database write). A `refresh` that read the
        row before the DELETE must not cache it again afterwards: `_ended` remembers when (for two TTLs)."""
        sid = token_id(token)
        self.store.end_session(sid)
        now = time.monotonic()
        with self._lock:
            self._entries.pop(sid, None)
            self._ended = {k: t for k, t in self._ended.items() if now - t < 2 * self.cache_ttl_s}
            self._ended[sid] = now

    def cached(self, token: str):
        """The session's labeler from memory, or MISS when only `refresh` can tell (not cached, cached for longer
        than `cache_ttl_s`, revoked since it was read, or timed out)."""
        return self.lookup(token)[0]

    def lookup(self, token: str) -> tuple:
        """(labeler or MISS, due): what memory says, and whether `last_seen_at` is due to be written (the caller
        then runs `refresh_quietly` in the background: no request waits for it). A copy past the TTL, revoked in
        this process or timed out is MISS (the caller refreshes it before answering): the TTL is the hard bound on
        how long another process's sign-out takes. While the server runs, `validate_all` renews every copy
        half-way through its TTL in one query, so busy sessions never reach it (per-session re-reads, one per
        session per second, had put a thread hop under ~4 % of the requests and doubled the load test's p99)."""
        e = self._entries.get(token_id(token))
        if e is None:
            return MISS, True
        if time.monotonic() - e.loaded >= self.cache_ttl_s \
                or e.loaded <= self.store.sessions_revoked_at(e.labeler.id):
            return MISS, True
        now = self.clock()
        if self._expired(e, now):
            return MISS, True
        e.seen = now
        return e.labeler, now - e.seen_stored >= self.touch_every_s

    def validate_all(self) -> int:
        """Renew every cached copy whose row still exists, in one query per VALIDATE_CHUNK sessions; forget the
        others (signed out, deactivated or re-passworded in another process). A row's existence is the whole test:
        every way a session ends deletes it, and timeouts are checked per request. Returns how many were renewed."""
        with self._lock:
            sids = list(self._entries)
        t0 = time.monotonic()  # before the read: a revocation during it still wins (`lookup` compares with it)
        alive = set()
        for i in range(0, len(sids), VALIDATE_CHUNK):
            alive |= self.store.existing_sessions(sids[i:i + VALIDATE_CHUNK])
        with self._lock:
            for sid in sids:
                e = self._entries.get(sid)
                if e is None:
                    continue
                if sid in alive:
                    e.loaded = max(e.loaded, t0)
                else:
                    del self._entries[sid]
        return len(alive)

    def start_validator(self) -> None:
        """A daemon thread running `validate_all` every half TTL while the server runs (the app's lifespan)."""
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.cache_ttl_s / 2):
                try:
                    self.validate_all()
                except Exception:  # a busy or failing read: copies then lapse into per-request refreshes
                    log.warning("session validation failed", exc_info=True)

        self._validator = threading.Thread(target=loop, name="session-validator", daemon=True)
        self._validator.start()

    def stop_validator(self) -> None:
        if getattr(self, "_validator", None) is not None:
            self._stop.set()
            self._validator.join()
            self._validator = None

    def refresh_quietly(self, token: str) -> None:
        """A background `refresh` (one at a time per session) for a due `last_seen_at`: errors are logged, never
        raised (no request waits on it; a failed one is tried again TOUCH_RETRY_S later)."""
        sid = token_id(token)
        with self._lock:
            if sid in self._refreshing:
                return
            self._refreshing.add(sid)
        try:
            self.refresh(token)
        except Exception:  # a background bookkeeping read: log it; the next request retries
            log.warning("background session refresh failed", exc_info=True)
        finally:
            with self._lock:
                self._refreshing.discard(sid)

    def refresh(self, token: str) -> Labeler | None:
        """The session's labeler read from the database (None: no such session, its labeler is inactive, or it
        timed out, whereupon its row is deleted); `last_seen_at` written when due. Blocking: off the event loop."""
        sid = token_id(token)
        old = self._entries.get(sid)  # kept while reading: the other requests of this session go on meanwhile
        loaded = time.monotonic()
        found = self.store.load_session(sid)
        if found is None or not found[1].active or found[1].kind != "human":
            self._forget(sid)
            return None
        row, lab = found
        now = self.clock()
        e = _Entry(lab, to_epoch(row.created_at), to_epoch(row.last_seen_at), to_epoch(row.last_seen_at), loaded)
        if old is not None:
            e.seen = max(e.seen, old.seen)
        if self._expired(e, now):
            self._forget(sid)
            _best_effort(self.store.end_session, sid)  # a busy database: the row goes at a later check
            return None
        if now - e.seen_stored >= self.touch_every_s:
            # not stored (the write lock taken): tried again TOUCH_RETRY_S later; the request itself goes on
            stored = _best_effort(self.store.touch_session, sid, now)
            e.seen_stored = now if stored else now - self.touch_every_s + TOUCH_RETRY_S
        e.seen = now
        with self._lock:
            if self._ended.get(sid, -math.inf) >= loaded:  # signed out after this read began: not cached again
                return None
            self._entries.pop(sid, None)  # re-inserted last: eviction below goes by when an entry was read
            if len(self._entries) >= self.cache_max:
                del self._entries[next(iter(self._entries))]  # the longest-cached entry; the others stay
            self._entries[sid] = e
        return lab

    def _forget(self, sid: str) -> None:
        with self._lock:
            self._entries.pop(sid, None)

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
