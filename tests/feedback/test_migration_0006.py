"""Migration 0006 (sessions, project members, adjudications, prompts.source_key): down and up again keeps every
prompt, item and judgement (plain ADD/DROP COLUMN, no table copy that would cascade-delete on SQLite)."""
from fb_helpers import PASSWORD
from sqlalchemy import inspect

from alignloop.feedback import db as dbmod
from alignloop.feedback.store import Store


def _counts(conn) -> tuple[int, int, int]:
    return tuple(conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in ("prompts", "items", "judgements"))


def test_migration_0006_down_and_up_keeps_the_data(tmp_path):
    from alembic import command

    path = tmp_path / "m.db"
    store = Store(str(path))
    store.create_project("hh", "pairwise", overlap_k=1)
    store.import_records("hh", [{"prompt": "p", "completions": ["a", "b"]},
                                {"prompt": "q", "completions": ["c", "d"]}])
    lab = store.add_labeler("ann", PASSWORD)
    a = store.next_assignment(1, lab.id)
    store.submit(a.id, lab.id, {"choice": "left", "strength": "slightly_better"}, "key-0006-0001")
    store.dispose()

    engine = dbmod.open_engine(str(path))
    with engine.connect() as conn:
        before = _counts(conn)
    assert before == (2, 2, 1)
    with engine.begin() as conn:
        command.downgrade(dbmod.alembic_config(conn), "0005")
    with engine.connect() as conn:
        names = set(inspect(conn).get_table_names())
        assert not names & {"sessions", "project_members", "adjudications"}
        assert "source_key" not in [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(prompts)")]
        assert _counts(conn) == before
    engine.dispose()

    store = Store(str(path))  # upgrades to head again
    try:
        assert dbmod.stored_revision(store.engine) == dbmod.HEAD
        with store.engine.connect() as conn:
            assert {"sessions", "project_members", "adjudications"} <= set(inspect(conn).get_table_names())
            assert _counts(conn) == before
        (rec,) = store.current_judgements(1)
        assert rec["choice"] in ("a", "b") and rec["strength"] == "slightly_better"
    finally:
        store.dispose()
