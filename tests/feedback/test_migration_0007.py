"""Migration 0007 (judgements.text, demonstration_reviews, conversations, conversation_turns): down to 0006 and up
again keeps every prompt, item and judgement of the older tasks (plain ADD/DROP COLUMN, no table copy that would
cascade-delete on SQLite), drops the new tables on the way down, and gives them back empty and usable on the way up."""
from fb_helpers import PASSWORD
from sqlalchemy import inspect

from alignloop.feedback import conversations as conv
from alignloop.feedback import db as dbmod
from alignloop.feedback.store import Store

NEW_TABLES = {"demonstration_reviews", "conversations", "conversation_turns"}


def _counts(conn) -> tuple[int, int, int]:
    return tuple(conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in ("prompts", "items", "judgements"))


def test_migration_0007_down_and_up_keeps_the_data(tmp_path):
    from alembic import command

    path = tmp_path / "m.db"
    store = Store(str(path))
    store.create_project("hh", "pairwise", overlap_k=1)
    store.import_records("hh", [{"prompt": "p", "completions": ["a", "b"]},
                                {"prompt": "q", "completions": ["c", "d"]}])
    lab = store.add_labeler("ann", PASSWORD)
    a = store.next_assignment(1, lab.id)
    store.submit(a.id, lab.id, {"choice": "left", "strength": "better"}, "key-0007-0001")
    store.dispose()

    engine = dbmod.open_engine(str(path))
    with engine.connect() as conn:
        before = _counts(conn)
    assert before == (2, 2, 1)
    with engine.begin() as conn:
        command.downgrade(dbmod.alembic_config(conn), "0006")
    with engine.connect() as conn:
        assert not set(inspect(conn).get_table_names()) & NEW_TABLES
        assert "text" not in [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(judgements)")]
        assert _counts(conn) == before
    engine.dispose()

    store = Store(str(path))  # upgrades to head again
    try:
        assert dbmod.stored_revision(store.engine) == dbmod.HEAD
        with store.engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= NEW_TABLES
            assert _counts(conn) == before
        (rec,) = store.current_judgements(1)
        assert rec["choice"] in ("a", "b") and rec["strength"] == "better"
        # the new tables work after the round trip: a conversation opens and its first turn is pending
        store.create_project("cv", "conversation", overlap_k=1, settings={"models": ["m"]})
        store.import_records("cv", [{"prompt": "hello"}])
        c, turn = conv.take_conversation(store, store.get_project("cv").id, lab.id)
        assert c is not None and turn.status == "pending" and turn.context == [{"role": "user", "content": "hello"}]
    finally:
        store.dispose()
