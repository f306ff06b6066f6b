"""Engine creation and migrations for the feedback store.

`open_engine(url)` accepts a SQLAlchemy URL (`sqlite:///x.db`, `postgresql://...`) or a plain file path (taken as a
SQLite file). SQLite runs in WAL mode with a busy timeout; write transactions on SQLite begin with
`BEGIN IMMEDIATE` (through `write_engine(engine)`) so a read-then-write never fails on a lock upgrade.
`upgrade(engine)` runs the Alembic migrations in `migrations/` to head, programmatically.
"""
from __future__ import annotations

import contextvars
import importlib.util
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from alignloop.errors import UserError

from .errors import DatabaseBusy, WouldBlock

MIGRATIONS = Path(__file__).parent / "migrations"
_log = logging.getLogger(__name__)
HEAD = "0007"  # the newest revision in migrations/versions (tests/feedback/test_store.py checks it against Alembic)


def normalise_url(db: str) -> str:
    """A plain path becomes a SQLite URL; `postgresql://` picks psycopg (3) when psycopg2 is not installed."""
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    if db.startswith(("postgresql://", "postgres://")):
        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + db.split("://", 1)[1]
        if db.startswith("postgres://"):
            return "postgresql://" + db.split("://", 1)[1]
    return db


def open_engine(db: str, busy_timeout_ms: int = 30_000, synchronous: str = "NORMAL") -> Engine:
    """Create an engine. SQLite: WAL, busy timeout, foreign keys, `synchronous` (NORMAL keeps every committed
    transaction across a process crash in WAL mode; FULL also across power loss)."""
    url = make_url(normalise_url(db))
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            parent = Path(url.database).parent
            if not parent.exists():
                raise UserError(f"database folder {parent} does not exist")
            create_private(Path(url.database))
        engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
                               pool_size=20, max_overflow=20)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            _record.info["busy_ms"] = busy_timeout_ms
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            mode = conn.get_execution_options().get("sqlite_begin", "")
            if mode:  # a writer: under no_wait() (the event loop) it must not sleep in SQLite's busy handler
                set_busy_timeout(conn.connection, 0 if _NOWAIT.get() else busy_timeout_ms)
            conn.exec_driver_sql(f"BEGIN {mode}".strip())

        @event.listens_for(engine, "handle_error")
        def _on_error(ctx):
            if is_busy(ctx.original_exception):
                return busy_error()  # raised instead of SQLAlchemy's OperationalError
            return None

        return engine
    try:
        if url.get_backend_name() == "postgresql":
            return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)
        return create_engine(url)
    except ModuleNotFoundError as e:
        raise UserError(f"{url.render_as_string(hide_password=True)}: the database driver is not installed ({e.name}); "
                        "for PostgreSQL: pip install 'psycopg[binary]'") from None


def create_private(path: Path) -> None:
    """Create the SQLite file empty with mode 0600 (owner only: it holds password hashes) before SQLite opens it;
    SQLite gives its -wal and -shm files the database file's mode. An existing file keeps its mode, with a warning
    when others may read it."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            _log.warning("%s has mode %o: other users may read it (it holds password hashes); chmod 600 it", path,
                         mode)


# -- waiting for the write lock: bounded, and never on the event loop ---------------------------------------------
# A SQLite writer waits for the write lock: in-process on `WriteLock`, across processes in SQLite's busy handler
# (busy_timeout). Both waits are bounded by the store's lock timeout (then DatabaseBusy: the web app's 503). Work run
# on the event loop (`web/common.db_call`) runs under `no_wait()`: a taken lock raises WouldBlock at once, before
# anything is written, and the work is run again in a worker thread, so the loop never sleeps on a lock (a big import
# once froze every request, /healthz included, for 30 s).
DEFAULT_LOCK_TIMEOUT_S = 5.0
_NOWAIT: contextvars.ContextVar[bool] = contextvars.ContextVar("alignloop_feedback_db_nowait", default=False)
_SQLITE_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary result codes)


@contextmanager
def no_wait() -> Iterator[None]:
    """Within this block a taken write lock (in-process or SQLite's) raises WouldBlock instead of waiting."""
    token = _NOWAIT.set(True)
    try:
        yield
    finally:
        _NOWAIT.reset(token)


def busy_error() -> DatabaseBusy:
    if _NOWAIT.get():
        return WouldBlock("the database is busy (its write lock is taken)")
    return DatabaseBusy("the database is busy (another writer held its lock too long); try again in a moment")


def is_busy(e: BaseException | None) -> bool:
    """SQLite's "database is locked" / "database table is locked" (SQLITE_BUSY / SQLITE_LOCKED)."""
    if not isinstance(e, sqlite3.OperationalError):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_BUSY_CODES
    return "locked" in str(e)


def set_busy_timeout(pool_conn, ms: int) -> None:
    """Set a pooled SQLite connection's busy_timeout when it differs from what it has (one PRAGMA on a change)."""
    if pool_conn.info.get("busy_ms") != ms:
        pool_conn.driver_connection.execute(f"PRAGMA busy_timeout={int(ms)}")
        pool_conn.info["busy_ms"] = ms


class WriteLock:
    """The in-process queue of one store's SQLite writers: a lock whose wait is bounded (`timeout_s`, then
    DatabaseBusy) and, under `no_wait()`, not taken at all when busy (WouldBlock)."""

    def __init__(self, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()

    def __enter__(self) -> WriteLock:
        if not self._lock.acquire(blocking=not _NOWAIT.get(), timeout=-1 if _NOWAIT.get() else self.timeout_s):
            raise busy_error()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


def write_engine(engine: Engine) -> Engine:
    """The same engine, whose transactions take the write lock up front on SQLite (no effect elsewhere)."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_begin="IMMEDIATE")
    return engine


def alembic_config(connection=None):
    from alembic.config import Config  # noqa: PLC0415 - heavy: Alembic stays off the server's start-up path

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to `revision` (idempotent). A database already at HEAD is left alone without loading
    Alembic (which took a noticeable part of a server restart)."""
    if revision == "head" and stored_revision(engine) == HEAD:
        return
    from alembic import command  # noqa: PLC0415 - heavy: loaded only when a migration runs

    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)


def stored_revision(engine: Engine) -> str | None:
    """The revision recorded in `alembic_version`, read with one query (None when there is none)."""
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    except DBAPIError:
        return None
    return rows[0][0] if len(rows) == 1 else None


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415 - heavy: Alembic only when asked

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_initialised(engine: Engine) -> bool:
    return "projects" in inspect(engine).get_table_names()


def waits_off() -> bool:
    """Whether `no_wait()` is on here (a writer must not wait for the lock). (H6: for the hot path's own
    connection, whose BEGIN IMMEDIATE does not go through the engine's "begin" event.)"""
    return _NOWAIT.get()
