"""The store on PostgreSQL: migrations, import, concurrent assignment (k, never twice), idempotent and versioned
judgements, export. Uses $ALIGNLOOP_TEST_POSTGRES_URL (a database it may create databases on), or starts a throw-away
cluster with `initdb`/`pg_ctl` when they are on PATH. Skipped without a PostgreSQL driver (psycopg)."""
import os
import shutil
import subprocess
import threading
import uuid
from collections import Counter

import pytest

pytestmark = pytest.mark.slow
psycopg = pytest.importorskip("psycopg")

from fb_helpers import free_port  # noqa: E402 - after the skip above, on purpose


@pytest.fixture(scope="module")
def pg_admin_url(tmp_path_factory):
    url = os.environ.get("ALIGNLOOP_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("no PostgreSQL: set ALIGNLOOP_TEST_POSTGRES_URL or put initdb/pg_ctl on PATH")
    import tempfile

    root = tempfile.mkdtemp(prefix="alignloop-pg-")  # not under pytest's 0700 folders: postgres must reach it
    data = __import__("pathlib").Path(root) / "data"
    port = free_port()
    as_root = os.geteuid() == 0
    if as_root:  # PostgreSQL refuses to run as root: use the postgres account
        try:
            import pwd
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user")
        os.chown(data.parent, pw.pw_uid, pw.pw_gid)

    def run(*cmd):
        full = ["runuser", "-u", "postgres", "--", *cmd] if as_root else list(cmd)
        subprocess.run(full, check=True, capture_output=True, cwd="/tmp")
    run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    run("pg_ctl", "-D", str(data), "-o", f"-p {port} -k {data.parent} -c listen_addresses=127.0.0.1", "-w",
        "-l", str(data.parent / "log"), "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # plain URL: the store picks the driver
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_store(pg_admin_url):
    from sqlalchemy import create_engine, text

    from alignloop.feedback.store import Store

    name = f"fb_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    base = pg_admin_url.rsplit("/", 1)[0]
    s = Store(f"{base}/{name}")
    yield s
    s.dispose()
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def test_postgres_schema_matches_models(pg_store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from alignloop.feedback import db as dbmod
    from alignloop.feedback.models import Base

    assert pg_store.engine.dialect.name == "postgresql"
    assert dbmod.current_revision(pg_store.engine) == dbmod.HEAD
    with pg_store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_postgres_concurrent_labeling_and_export(pg_store):
    from sqlalchemy import func, select

    from alignloop.feedback.export import ExportOptions, export_records
    from alignloop.feedback.models import Assignment, Judgement
    from alignloop.feedback.quality import Thresholds

    s = pg_store
    p = s.create_project("pg", "pairwise", overlap_k=3, gold_rate=0.1)
    s.import_records("pg", [{"prompt": f"p{i}", "completions": [f"good {i}", f"bad {i}"]} for i in range(30)]
                     + [{"prompt": f"g{i}", "completions": ["good g", "bad g"], "gold": {"choice": "a"}}
                        for i in range(3)])
    labs = [s.add_labeler(f"pg{i}", "labeler pass 1") for i in range(8)]
    errors = []

    def work(lab):
        try:
            a = s.next_assignment(p.id, lab.id)
            n = 0
            while a is not None:
                view = s.item_view(a.item, a.shown_order)
                fields = {"choice": "left" if view["completions"][0]["text"].startswith("good") else "right",
                          "strength": "better"}
                key = f"pg-key-{lab.id}-{a.id}"
                if n % 2:  # both paths: submit + next, and submit_and_next in one transaction
                    s.submit(a.id, lab.id, fields, key)
                    s.submit(a.id, lab.id, fields, key)  # retry: stored once
                    a = s.next_assignment(p.id, lab.id)
                else:
                    j1, created, nxt = s.submit_and_next(a.id, lab.id, fields, key)
                    j2, created2, _ = s.submit_and_next(a.id, lab.id, fields, key)  # retry: stored once
                    assert created and not created2 and j1.id == j2.id
                    a = nxt
                n += 1
        except Exception as e:  # noqa: BLE001 - pragma: no cover, reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(lab,)) for lab in labs]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors
    with s.read() as ss:
        per_item = Counter(ss.scalars(select(Assignment.item_id).where(Assignment.is_gold.is_(False))))
        assert len(per_item) == 30 and set(per_item.values()) == {3}
        pairs = ss.execute(select(Assignment.item_id, Assignment.labeler_id)).all()
        assert len(pairs) == len(set(pairs))
        n_j = ss.scalar(select(func.count()).select_from(Judgement))
        assert n_j == len(pairs)
    # an edit is a new version
    a = s.next_assignment(p.id, labs[0].id)
    assert a is None
    rows, _summary = export_records(s, "pg", ExportOptions(thresholds=Thresholds(min_items=10 ** 6)))
    assert len(rows) == 30 and all(r["chosen"].startswith("good") for r in rows)


def test_postgres_ai_labeler_judgements(pg_store):
    """AI judgements on PostgreSQL: bulk insert, a second version, NULL details/ranking, export by labeler kind."""
    from sqlalchemy import select

    from alignloop.feedback.export import ExportOptions, export_records
    from alignloop.feedback.models import Item
    from alignloop.feedback.quality import Thresholds

    s = pg_store
    p = s.create_project("pgai", "pairwise", overlap_k=1)
    s.import_records("pgai", [{"prompt": f"p{i}", "completions": [f"good {i}", f"bad {i}"]} for i in range(20)])
    with s.read() as ss:
        items = list(ss.scalars(select(Item.id).where(Item.project_id == p.id).order_by(Item.id)))
    judge = s.add_ai_labeler("pg-judge", "some/model")
    assert s.add_ai_labeler("pg-judge", "some/model").id == judge.id and s.authenticate("pg-judge", "x") is None
    batch = [{"item_id": i, "shown_order": [1, 0], "choice": "a", "strength": None, "picked_position": None,
              "details": {"raw_picks": [1, 1]} if n % 2 else None} for n, i in enumerate(items)]
    assert s.record_ai_judgements(p.id, judge.id, batch) == 20
    assert s.record_ai_judgements("pgai", judge.id, batch[:5]) == 5
    recs = s.current_judgements(p.id)
    assert len(recs) == 20 and {r["labeler_kind"] for r in recs} == {"ai"}
    assert sorted(r["version"] for r in recs) == [1] * 15 + [2] * 5 and {r["picked_position"] for r in recs} == {1}
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM judgements j JOIN items i ON i.id = j.item_id "
                                    f"WHERE i.project_id = {p.id} AND j.details IS NULL AND j.ranking IS NULL"
                                    ).scalar() == 13  # 10 first versions + 3 second versions without details
    with s.read() as ss:
        assert {(it.n_active, it.n_done) for it in ss.scalars(select(Item).where(Item.project_id == p.id))} == {(0, 0)}
    th = Thresholds(min_items=10 ** 6)
    assert len(export_records(s, "pgai", ExportOptions(labelers="ai", thresholds=th))[0]) == 20
    assert export_records(s, "pgai", ExportOptions(labelers="human", thresholds=th))[0] == []
