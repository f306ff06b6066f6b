"""Store: schema/migrations, import, assignment rules, append-only judgements, idempotency, concurrency."""
import json
import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from alignloop.errors import UserError
from alignloop.feedback import db as dbmod
from alignloop.feedback.models import Assignment, Base, Item, Judgement
from alignloop.feedback.store import Store
from alignloop.feedback.validation import ValidationError, competition_ranks, validate_submission


def test_migrations_create_the_models_schema(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(dbmod.alembic_config()).get_current_head() == dbmod.HEAD
    assert dbmod.stored_revision(dbmod.open_engine(str(tmp_path / "empty.db"))) is None
    s = Store(str(tmp_path / "m.db"))
    assert dbmod.current_revision(s.engine) == dbmod.HEAD == dbmod.stored_revision(s.engine)
    with s.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000  # db.DEFAULT_LOCK_TIMEOUT_S
    Store(str(tmp_path / "m.db"))  # idempotent upgrade
    with pytest.raises(UserError):
        Store(str(tmp_path / "other.db"), create=False)


def test_upgrade_from_0001_and_the_next_item_query_needs_no_sort(tmp_path):
    engine = dbmod.open_engine(str(tmp_path / "old.db"))
    dbmod.upgrade(engine, "0001")
    assert dbmod.stored_revision(engine) == "0001"
    engine.dispose()
    s = Store(str(tmp_path / "old.db"))  # upgrades to head
    assert dbmod.stored_revision(s.engine) == dbmod.HEAD
    with s.engine.connect() as conn:
        cols = [r[2] for r in conn.exec_driver_sql("PRAGMA index_info(ix_items_queue)")]
        assert cols == ["project_id", "is_gold", "n_active", "n_done", "id"]
        from alignloop.feedback.sqlite_hot import SQL_CANDIDATES as _SQL_CANDIDATES
        plan = " ".join(r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + _SQL_CANDIDATES, (1, 3, 1)))
    assert "ix_items_queue" in plan and "TEMP B-TREE" not in plan, plan  # walks the index in ORDER BY order
    s.dispose()


def test_sqlite_pragmas(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000  # db.DEFAULT_LOCK_TIMEOUT_S
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with store._write_lock:
        hot = store._hot_connection()  # the submit hot path's connection has the same settings
        assert hot.execute("PRAGMA synchronous").fetchone()[0] == 1
        assert hot.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert hot.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert hot.isolation_level is None  # autocommit: the hot path issues BEGIN IMMEDIATE / COMMIT itself


def test_project_and_labeler_validation(store):
    with pytest.raises(UserError, match="task type"):
        store.create_project("x", "essay")
    with pytest.raises(UserError, match="overlap"):
        store.create_project("x", "pairwise", overlap_k=0)
    with pytest.raises(UserError, match="project name"):
        store.create_project("bad name!", "pairwise")
    store.create_project("x", "pairwise")
    with pytest.raises(UserError, match="already exists"):
        store.create_project("x", "pairwise")
    with pytest.raises(UserError, match="at least 8"):
        store.add_labeler("ann", "short")
    lab = store.add_labeler("ann", "long enough pw")
    assert lab.password_hash.startswith("$argon2id$")
    assert store.authenticate("ann", "long enough pw").id == lab.id
    assert store.authenticate("ann", "wrong password") is None
    assert store.authenticate("nobody", "long enough pw") is None


def test_import_both_formats_and_errors(store, tmp_path):
    store.create_project("pw", "pairwise")
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p1", "completions": ["a", {"text": "b", "model": "m", "params": {"temperature": 0.7}}, "c"]},
        {"prompt": "p2", "completion": "x", "model": "m1"},
        {"prompt": "p2", "completion": "y", "model": "m2"},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "more"}], "completions": ["q", "r"], "gold": {"choice": "b"}},
    ]) + "\n")
    r = store.import_jsonl("pw", f)
    assert (r.prompts, r.completions, r.items, r.gold_items) == (3, 7, 3 + 1 + 1, 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    with pytest.raises(UserError, match="line 1: needs 'completions'"):
        store.import_jsonl("pw", bad)
    bad.write_text('{"prompt": "p", "completions": ["a", "b"]}\nnot json\n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        store.import_jsonl("pw", bad)
    with pytest.raises(UserError, match="gold"):
        store.import_records("pw", [{"prompt": "g", "completions": ["a", "b"], "gold": {"choice": "left"}}])
    store.create_project("rk", "rank")
    assert store.import_records("rk", [{"prompt": "p", "completions": ["a", "b", "c"]}]).items == 1
    store.create_project("th", "thumbs")
    assert store.import_records("th", [{"prompt": "p", "completions": ["a", "b", "c"]}]).items == 3


def _project(store, n_items=6, k=2, task="pairwise", gold=0, gold_rate=0.0):
    p = store.create_project(f"p{task}{n_items}{k}{gold}", task, overlap_k=k, gold_rate=gold_rate)
    rows = [{"prompt": f"prompt {i}", "completions": [f"x{i}", f"y{i}"] if task != "thumbs" else [f"x{i}"]}
            for i in range(n_items)]
    rows += [{"prompt": f"gold {i}", "completions": [f"good{i}", f"bad{i}"], "gold": {"choice": "a"}}
             for i in range(gold)]
    store.import_records(p.name, rows)
    return p


def _answer(store, a, lab, key, choice="left"):
    return store.submit(a.id, lab.id, {"choice": choice, "strength": "better"}, key)


def test_k_distinct_labelers_never_twice_fewer_labels_first(store):
    p = _project(store, n_items=3, k=2)
    labs = [store.add_labeler(f"l{i}", "labeler pass 1") for i in range(4)]
    seen = Counter()
    first_items = []
    for lab in labs:
        got = []
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            got.append(a.item_id)
            _answer(store, a, lab, f"key-{lab.id}-{a.id}-xxxx")
        assert len(got) == len(set(got))  # never twice to the same labeler
        seen.update(got)
        first_items.append(got[:1])
    assert all(v == 2 for v in seen.values()) and len(seen) == 3  # each item to exactly k labelers
    # fewer labels first: l0 takes items 1,2,3; l1 too; l2 and l3 get nothing
    with store.read() as s:
        assert {i.n_done for i in s.scalars(select(Item))} == {2}


def test_fewer_labels_first_order(store):
    p = _project(store, n_items=3, k=3)
    a_lab, b_lab = store.add_labeler("a", "labeler pass 1"), store.add_labeler("b", "labeler pass 1")
    a1 = store.next_assignment(p.id, a_lab.id)
    _answer(store, a1, a_lab, "k-a-1xxxx")
    b1 = store.next_assignment(p.id, b_lab.id)
    assert b1.item_id != a1.item_id  # the item a already labeled has more labels, so b gets another


def test_resume_returns_open_assignment_and_skip_releases_slot(store):
    p = _project(store, n_items=2, k=1)
    a_lab, b_lab = store.add_labeler("a", "labeler pass 1"), store.add_labeler("b", "labeler pass 1")
    a1 = store.next_assignment(p.id, a_lab.id)
    assert store.next_assignment(p.id, a_lab.id).id == a1.id  # reload -> same item, same order
    assert store.next_assignment(p.id, a_lab.id).shown_order == a1.shown_order
    store.skip(a1.id, a_lab.id)
    a2 = store.next_assignment(p.id, a_lab.id)
    assert a2.item_id != a1.item_id  # never the skipped item again
    b1 = store.next_assignment(p.id, b_lab.id)
    assert b1.item_id == a1.item_id  # the skipped slot went to someone else
    with pytest.raises(ValidationError, match="skipped"):
        _answer(store, a1, a_lab, "k-skipped-1")
    assert store.progress(p.id, a_lab.id)["skipped"] == 1


def test_gold_items_mixed_at_rate(store):
    from alignloop.feedback.assignment import gold_seed, is_gold_turn

    p = _project(store, n_items=30, k=1, gold=10, gold_rate=0.25)
    lab = store.add_labeler("a", "labeler pass 1")
    kinds = []
    for _ in range(20):
        a = store.next_assignment(p.id, lab.id)
        kinds.append(a.is_gold)
        _answer(store, a, lab, f"k-{a.id}-xxxx")
    seed = gold_seed(store.get_project(p.id))
    want = [is_gold_turn(seed, lab.id, i, 0.25) for i in range(20)]
    if sum(want) <= 10:  # (10 gold items: a labeler gets each once)
        assert kinds == want  # the i-th assignment is gold by the project's seeded draw (tests/…/test_labeler_flow)
    # gold items do not count toward k: a second labeler also gets gold items, by their own draws
    lab2 = store.add_labeler("b", "labeler pass 1")
    golds = 0
    for _ in range(8):
        a = store.next_assignment(p.id, lab2.id)
        golds += a.is_gold
        _answer(store, a, lab2, f"k-{a.id}-yyyy")
    assert golds == sum(is_gold_turn(seed, lab2.id, i, 0.25) for i in range(8))


def test_judgements_are_versioned_and_idempotent(store):
    p = _project(store, n_items=1, k=1)
    lab = store.add_labeler("a", "labeler pass 1")
    other = store.add_labeler("b", "labeler pass 1")
    a = store.next_assignment(p.id, lab.id)
    j1, created = _answer(store, a, lab, "key-one-1", "left")
    assert created and j1.version == 1
    j1b, created = _answer(store, a, lab, "key-one-1", "right")  # retry of the same submission
    assert not created and j1b.id == j1.id
    j2, created = store.submit(a.id, lab.id, {"choice": "tie"}, "key-two-2")
    assert created and j2.version == 2
    hist = store.judgement_history(a.id)
    assert [h.version for h in hist] == [1, 2] and hist[0].strength == "better"  # v1 untouched
    assert store.current_judgement(a.id).choice == "tie"
    assert [r["choice"] for r in store.current_judgements(p.id)] == ["tie"]
    with store.read() as s:
        assert s.scalar(select(Item.n_done)) == 1  # an edit is not another label
    with pytest.raises(UserError):
        store.submit(a.id, other.id, {"choice": "tie"}, "key-three-3")  # not theirs
    with pytest.raises(ValidationError):
        store.submit(a.id, lab.id, {"choice": "tie"}, "short")


def test_validate_submission_rules():
    assert validate_submission("pairwise", [1, 0], {"choice": "left", "strength": "better"}) == {
        "flags": [], "comment": "", "picked_position": 0, "choice": "b", "strength": "better"}
    with pytest.raises(ValidationError) as e:
        validate_submission("pairwise", [0, 1], {"choice": "left"})
    assert "strength" in e.value.errors
    assert validate_submission("pairwise", [0, 1], {"choice": "both_bad"})["choice"] == "both_bad"
    with pytest.raises(ValidationError):
        validate_submission("pairwise", [0, 1], {"choice": "<script>"})
    r = validate_submission("rank", [2, 0, 1], {"rank_0": "1", "rank_1": "2", "rank_2": "2"})
    assert r["ranking"] == [2, 2, 1]  # canonical order: completion 2 shown first got rank 1
    with pytest.raises(ValidationError, match="ranked 1"):
        validate_submission("rank", [0, 1], {"rank_0": "2", "rank_1": "2"})
    with pytest.raises(ValidationError, match="rank from 1 to 2"):
        validate_submission("rank", [0, 1], {"rank_0": "1", "rank_1": "9"})
    assert validate_submission("thumbs", [0], {"thumbs": "down", "comment": " meh "}) == {
        "flags": [], "comment": "meh", "thumbs": -1}
    assert validate_submission("likert", [0], {"likert": "6", "flags": ["harmful"]}, ["harmful"])["likert"] == 6
    with pytest.raises(ValidationError) as e:
        validate_submission("likert", [0], {"likert": "8", "flags": ["nope"]}, ["harmful"])
    assert set(e.value.errors) == {"likert", "flags"}
    assert competition_ranks([1, 3, 3]) == [1, 2, 2] and competition_ranks([1, 1, 2]) == [1, 1, 3]


def test_concurrent_assignment_keeps_k_and_submissions_exactly_once(tmp_path):
    s = Store(str(tmp_path / "c.db"))
    p = _project(s, n_items=40, k=3)
    labs = [s.add_labeler(f"c{i}", "labeler pass 1") for i in range(8)]
    errors = []

    def work(lab):
        try:
            n = 0
            while (a := s.next_assignment(p.id, lab.id)) is not None:
                key = f"conc-{lab.id}-{a.id}"
                _answer(s, a, lab, key)
                _answer(s, a, lab, key)  # a retry is a no-op
                n += 1
        except Exception as e:  # noqa: BLE001 - pragma: no cover, reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(lab,)) for lab in labs]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors
    with s.read() as ss:
        assert ss.scalar(select(func.count()).select_from(Judgement)) == 40 * 3
        per_item = Counter(ss.scalars(select(Assignment.item_id)))
        assert set(per_item.values()) == {3}
        pairs = ss.execute(select(Assignment.item_id, Assignment.labeler_id)).all()
        assert len(pairs) == len(set(pairs))
    s.dispose()


def test_abandoned_assignments_expire(store):
    from datetime import timedelta

    from sqlalchemy import update as sa_update

    from alignloop.feedback.models import utcnow

    store.expiry_check_interval_s = 0.0
    p = store.create_project("exp", "pairwise", overlap_k=1, settings={"assignment_timeout_s": 60})
    store.import_records("exp", [{"prompt": f"p{i}", "completions": ["x", "y"]} for i in range(2)])
    a_lab, b_lab = store.add_labeler("a", "labeler pass 1"), store.add_labeler("b", "labeler pass 1")
    a1 = store.next_assignment(p.id, a_lab.id)
    a2 = store.next_assignment(p.id, b_lab.id)
    assert a2.item_id != a1.item_id

    def age(assignment):
        with store.write() as s:
            s.execute(sa_update(Assignment).where(Assignment.id == assignment.id)
                      .values(created_at=utcnow() - timedelta(seconds=120)))
    age(a1)
    store.submit(a2.id, b_lab.id, {"choice": "tie"}, "b-first-0001")
    b2 = store.next_assignment(p.id, b_lab.id)  # a's abandoned item is released and given to b
    assert b2 is not None and b2.item_id == a1.item_id
    assert store.get_assignment(a1.id).status == "expired"
    with pytest.raises(ValidationError, match="another labeler"):
        store.submit(a1.id, a_lab.id, {"choice": "tie"}, "a-late-00001")
    # a late submission whose slot is still free is accepted
    store.skip(b2.id, b_lab.id)
    _j, created = store.submit(a1.id, a_lab.id, {"choice": "tie"}, "a-late-00002")
    assert created and store.get_assignment(a1.id).status == "done"
    with store.read() as s:
        assert s.get(Item, a1.item_id).n_active == 1


def test_submit_and_next_fast_path_keeps_the_rules(store):
    p = _project(store, n_items=12, k=2)
    labs = [store.add_labeler(f"f{i}", "labeler pass 1") for i in range(3)]
    nxt = {lab.id: store.next_assignment(p.id, lab.id) for lab in labs}
    n = 0
    while any(nxt.values()):
        for lab in labs:
            a = nxt[lab.id]
            if a is None:
                continue
            view = store.item_view(a.item, a.shown_order)
            assert len(view["completions"]) == 2
            j, created, nxt[lab.id] = store.submit_and_next(a.id, lab.id, {"choice": "right", "strength": "better"},
                                                            f"fast-{a.id}-{lab.id}")
            assert created and j.version == 1 and j.picked_position == 1 and j.choice == "ab"[a.shown_order[1]]
            again = store.submit_and_next(a.id, lab.id, {"choice": "tie"}, f"fast-{a.id}-{lab.id}")
            assert again[1] is False and again[0].id == j.id  # a retried submission: stored once
            n += 1
    assert n == 24
    with store.read() as s:
        items = s.scalars(select(Item)).all()
        assert {(i.n_active, i.n_done) for i in items} == {(2, 2)}
        assert set(s.scalars(select(Assignment.status))) == {"done"}
        assert s.scalar(select(func.count()).select_from(Judgement)) == 24
    recs = store.current_judgements(p.id)
    assert len(recs) == 24 and all(r["time_spent_ms"] is not None for r in recs)
    # the fast path's judgement reads back like any other
    assert {r["strength"] for r in recs} == {"better"} and {r["picked_position"] for r in recs} == {1}


def test_sqlite_hot_path_rows_match_the_orm_path(store):
    """submit_and_next on SQLite writes plain SQL: its rows must be stored exactly as the ORM path stores them."""
    p = _project(store, n_items=4, k=2)
    lab = store.add_labeler("hot", "labeler pass 1")
    a1 = store.next_assignment(p.id, lab.id)
    _j_orm, _ = store.submit(a1.id, lab.id, {"choice": "left", "strength": "slightly_better", "comment": " c "},
                            "orm-path-0001")
    a2 = store.next_assignment(p.id, lab.id)
    j_raw, created, a3 = store.submit_and_next(a2.id, lab.id, {"choice": "left", "strength": "slightly_better",
                                                               "comment": " c "}, "raw-path-0001")
    assert created and type(j_raw).__name__ == "StoredJudgement"  # the hot path took it
    assert a3 is not None and a3.item_id not in (a1.item_id, a2.item_id)
    with store.engine.connect() as conn:
        rows = {r[0]: r[1:] for r in conn.exec_driver_sql(
            "SELECT idempotency_key, typeof(created_at), length(created_at), shown_order, flags, ranking, comment, "
            "strength, version FROM judgements")}
        a_rows = conn.exec_driver_sql("SELECT id, typeof(created_at), length(created_at), typeof(shown_order), "
                                      "is_gold FROM assignments ORDER BY id").all()
    orm, raw = rows["orm-path-0001"], rows["raw-path-0001"]
    assert raw[:2] == orm[:2] == ("text", 26)  # "YYYY-MM-DD HH:MM:SS.ffffff"
    assert raw[3:] == orm[3:] and raw[4] is None  # flags "[]", no ranking, comment stripped, strength, version 1
    assert {r[1:] for r in a_rows} == {("text", 26, "text", 0)}
    with store.read() as s:
        back = s.get(Judgement, j_raw.id)
        assert back.created_at == j_raw.created_at and back.shown_order == a2.shown_order
        assert back.choice == "ab"[a2.shown_order[0]] and back.picked_position == 0 and back.flags == []
        nxt = s.get(Assignment, a3.id)
        assert (nxt.status, nxt.shown_order, nxt.created_at) == ("assigned", a3.shown_order, a3.created_at)
        assert s.get(Assignment, a2.id).status == "done" and s.get(Item, a2.item_id).n_done == 1
    assert store.next_assignment(p.id, lab.id).id == a3.id  # the new one is this labeler's open assignment
    assert store.item_view(a3.item, a3.shown_order) == store.item_view(store.get_assignment(a3.id).item,
                                                                       a3.shown_order)


def test_sqlite_hot_path_invalid_or_other_cases_write_nothing(store):
    p = _project(store, n_items=4, k=2)
    lab, other = store.add_labeler("h1", "labeler pass 1"), store.add_labeler("h2", "labeler pass 1")
    a = store.next_assignment(p.id, lab.id)
    with pytest.raises(ValidationError, match="strength"):
        store.submit_and_next(a.id, lab.id, {"choice": "left"}, "invalid-0001")
    with pytest.raises(Exception, match="no such assignment"):
        store.submit_and_next(a.id, other.id, {"choice": "tie"}, "not-mine-0001")
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Judgement)) == 0
        assert s.get(Assignment, a.id).status == "assigned"
    # the transaction was closed each time: the next submission goes through
    j, created, _ = store.submit_and_next(a.id, lab.id, {"choice": "tie"}, "valid-00001")
    assert created and j.choice == "tie"
    # two open assignments (two tabs): submitting one hands back the other, as next_assignment would
    b = store.next_assignment(p.id, lab.id)
    with store.write() as s:
        item = s.scalars(select(Item).where(Item.id.not_in([a.item_id, b.item_id]))).first()
        item.n_active += 1
        s.add(Assignment(item_id=item.id, labeler_id=lab.id, project_id=p.id, shown_order=[1, 0]))
    _j, _c, nxt = store.submit_and_next(b.id, lab.id, {"choice": "tie"}, "two-tabs-0001")
    assert nxt.item_id == item.id and nxt.shown_order == [1, 0] and nxt.item.completion_ids == item.completion_ids


def test_background_checkpointer_takes_checkpoints_off_the_hot_path(store):
    import time

    p = _project(store, n_items=20, k=2)
    lab = store.add_labeler("ck", "labeler pass 1")
    a = store.next_assignment(p.id, lab.id)
    assert store.start_checkpointer(interval_s=0.01) and not store.start_checkpointer()  # one thread only
    with store._write_lock:
        assert store._hot_connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for n in range(10):
        _j, _c, a = store.submit_and_next(a.id, lab.id, {"choice": "tie"}, f"ckpt-key-{n:04d}")
    seen = store.checkpoints
    deadline = time.monotonic() + 10
    while store.checkpoints < seen + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.checkpoints >= seen + 2
    with store.engine.connect() as conn:  # everything written so far is already back in the database file
        _busy, wal_frames, backfilled = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
    assert wal_frames == backfilled
    thread = store._checkpointer
    store.stop_checkpointer()
    assert not thread.is_alive() and store._checkpointer is None
    with store._write_lock:
        assert store._hot_connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000


class _FailingCommit:
    """The hot SQLite connection, except that COMMIT fails (a disk error at the worst moment)."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql, *args):
        import sqlite3

        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_sqlite_hot_path_failed_commit_is_not_acknowledged(store, monkeypatch):
    """The reply is built only after COMMIT returned: a failing COMMIT raises (no acknowledgement), leaves nothing
    stored and no transaction open on the hot connection."""
    import sqlite3

    p = _project(store, n_items=4, k=2)
    lab = store.add_labeler("cf", "labeler pass 1")
    a = store.next_assignment(p.id, lab.id)
    real = store._hot_connection

    monkeypatch.setattr(store, "_hot_connection", lambda: _FailingCommit(real()))
    with pytest.raises(sqlite3.OperationalError):
        store.submit_and_next(a.id, lab.id, {"choice": "tie"}, "commit-fails-1")
    monkeypatch.setattr(store, "_hot_connection", real)
    with store._write_lock:
        assert not real().in_transaction
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Judgement)) == 0
        assert s.get(Assignment, a.id).status == "assigned"
    j, created, _ = store.submit_and_next(a.id, lab.id, {"choice": "tie"}, "commit-fails-1")  # the client's retry
    assert created and j.id is not None


def test_group_commit_batch_stores_each_valid_submission_once(store):
    p = _project(store, n_items=10, k=2)
    labs = [store.add_labeler(f"g{i}", "labeler pass 1") for i in range(4)]
    a = [store.next_assignment(p.id, lab.id) for lab in labs]
    reqs = [(a[0].id, labs[0].id, {"choice": "left", "strength": "better"}, "group-key-0000"),
            (a[1].id, labs[1].id, {"choice": "left"}, "group-key-0001"),              # invalid: no strength
            (a[2].id, labs[3].id, {"choice": "tie"}, "group-key-0002"),               # not labs[3]'s assignment
            (a[2].id, labs[2].id, {"choice": "tie"}, "bad key"),                      # malformed key
            (a[3].id, labs[3].id, {"choice": "both_bad"}, "group-key-0003"),
            (a[3].id, labs[3].id, {"choice": "both_bad"}, "group-key-0003")]          # its retry, same batch
    r = store.submit_and_next_batch(reqs)
    assert r[0][1] is True and r[0][0].choice == "ab"[a[0].shown_order[0]] and r[0][2] is not None
    assert isinstance(r[1], ValidationError) and "strength" in r[1].errors
    assert type(r[2]).__name__ == "NotFound"
    assert isinstance(r[3], ValidationError) and "idempotency_key" in r[3].errors
    assert r[4][1] is True and r[5][1] is False and r[5][0].id == r[4][0].id  # stored once
    with store.read() as s:
        keys = sorted(s.scalars(select(Judgement.idempotency_key)))
        assert keys == ["group-key-0000", "group-key-0003"]
        assert s.get(Assignment, a[1].id).status == "assigned" and s.get(Assignment, a[2].id).status == "assigned"
        assert s.get(Item, a[1].item_id).n_done == 0
    # the invalid ones can be sent again, corrected
    r = store.submit_and_next_batch([(a[1].id, labs[1].id, {"choice": "tie"}, "group-key-0001")])
    assert r[0][1] is True


def test_group_commit_failed_commit_stores_nothing(store, monkeypatch):
    import sqlite3

    p = _project(store, n_items=6, k=2)
    labs = [store.add_labeler(f"gf{i}", "labeler pass 1") for i in range(3)]
    reqs = [(store.next_assignment(p.id, lab.id).id, lab.id, {"choice": "tie"}, f"gf-key-{i:04d}")
            for i, lab in enumerate(labs)]
    real = store._hot_connection

    monkeypatch.setattr(store, "_hot_connection", lambda: _FailingCommit(real()))
    with pytest.raises(sqlite3.OperationalError):
        store.submit_and_next_batch(reqs)
    monkeypatch.setattr(store, "_hot_connection", real)
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Judgement)) == 0
    assert all(r[1] is True for r in store.submit_and_next_batch(reqs))  # the clients' retries
