"""Engine creation and migrations for the feedback store.

`open_engine(url)` accepts a SQLAlchemy URL (`sqlite:///x.db`, `postgresql://...`) or a plain file path (taken as a
SQLite file). SQLite runs in WAL mode with a busy timeout; write transactions on SQLite begin with
`BEGIN IMMEDIATE` (through `write_engine(engine)`) so a read-then-write never fails on a lock upgrade.
`upgrade(engine)` runs the Alembic migrations in `migrations/` to head, programmatically.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from alignloop.errors import UserError

MIGRATIONS = Path(__file__).parent / "migrations"
_log = logging.getLogger(__name__)
HEAD = "0006"  # the newest revision in migrations/versions (tests/feedback/test_store.py checks it against Alembic)


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
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            mode = conn.get_execution_options().get("sqlite_begin", "")
            conn.exec_driver_sql(f"BEGIN {mode}".strip())

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
