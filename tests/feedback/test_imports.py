"""Imports: bad files give clear errors (no tracebacks), rows are checked before anything is written, `id`s and
content hashes make imports idempotent, rows with their own `completions` are never merged, big imports write in
short batches (resumable after a crash), and a taken write lock never stalls the event loop nor gives a 500."""
from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from click.testing import CliRunner
from fb_helpers import PASSWORD, SECRET, free_port

from alignloop.cli.feedback import feedback
from alignloop.errors import UserError
from alignloop.feedback import importing
from alignloop.feedback.errors import DatabaseBusy
from alignloop.feedback.models import Item, Prompt
from alignloop.feedback.store import Store


def run(*args):
    return CliRunner().invoke(feedback, [str(a) for a in args])


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def counts(store, project_id: int) -> tuple[int, int]:
    with store.read() as s:
        return (s.query(Prompt).filter(Prompt.project_id == project_id).count(),
                s.query(Item).filter(Item.project_id == project_id).count())


@pytest.fixture
def pw(store):
    return store.create_project("pw", "pairwise")


def db_of(store) -> str:
    return store.url.removeprefix("sqlite:///")


# -- reading files ------------------------------------------------------------------------------------------------
def test_non_utf8_file_names_the_file_line_and_byte(store, pw, tmp_path):
    f = tmp_path / "latin1.jsonl"
    data = b'{"prompt": "p", "completions": ["a", "b"]}\n{"prompt": "caf\xe9", "completions": ["a", "b"]}\n'
    f.write_bytes(data)
    at = data.index(b"\xe9")
    with pytest.raises(UserError, match=rf"latin1.jsonl line 2: not UTF-8 text \(byte {at} of the file"):
        store.import_jsonl("pw", f)
    r = run("import", "--db", db_of(store), "--project", "pw", f)
    assert r.exit_code == 2 and "line 2: not UTF-8" in r.output and "Traceback" not in r.output
    assert counts(store, pw.id) == (0, 0)


def test_utf8_bom_is_accepted(store, pw, tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "completions": ["a", "b"]}).encode() + b"\n")
    assert store.import_jsonl("pw", f).items == 1
    rows = list(importing.rows_from_bytes(b"\xef\xbb\xbf" + b'{"prompt": "q", "completions": ["a", "b"]}', "up.jsonl"))
    assert rows == [{"prompt": "q", "completions": ["a", "b"], "_where": "up.jsonl line 1"}]


def test_deeply_nested_json_is_a_clear_error(store, pw, tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text('{"prompt": "p", "completions": ["a", "b"], "meta": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}\n")
    r = run("import", "--db", db_of(store), "--project", "pw", f)
    assert r.exit_code == 2 and "deep.jsonl line 1: JSON nested too deeply" in r.output
    assert "Traceback" not in r.output and "RecursionError" not in r.output
    deep_meta = {"prompt": "p", "completions": ["a", "b"], "meta": {"x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]
                                                                                                 ]]]]]]]]]]]]]]]]]]]]]}}
    with pytest.raises(UserError, match="line 1: 'meta' is nested more than 32 levels"):
        store.import_jsonl("pw", jsonl(tmp_path / "m.jsonl", [deep_meta]))


def test_a_number_too_long_to_read_is_a_clear_error(store, pw, tmp_path):
    """Python refuses integers over 4300 digits (a ValueError, not a JSONDecodeError): review F13."""
    f = tmp_path / "big.jsonl"
    f.write_text('{"prompt": "p", "completions": ["a", "b"], "meta": {"x": ' + "9" * 5000 + "}}\n")
    r = run("import", "--db", db_of(store), "--project", "pw", f)
    assert r.exit_code == 2 and "big.jsonl line 1: a number too long to read" in r.output
    assert "Traceback" not in r.output
    with pytest.raises(UserError, match="up.jsonl line 1: a number too long"):
        list(importing.rows_from_bytes(f.read_bytes(), "up.jsonl"))


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\xef\xbb\xbf"])
def test_empty_file_is_an_error(store, pw, tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(content)
    r = run("import", "--db", db_of(store), "--project", "pw", f)
    assert r.exit_code == 2 and "empty.jsonl: no rows" in r.output


# -- checking rows ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "message"), [
    ([{"prompt": "p", "completions": ["a", "b"]}, {"prompt": "q", "completions": ["a", "  "]}],
     "line 2: completion 1 is empty"),
    ([{"prompt": "p", "completions": ["a", "b"]}, {"prompt": "q", "completions": ["same", "x", "same"]}],
     "line 2: completion 2 is the same text as completion 0"),
    ([{"prompt": "p", "completion": "one"}, {"prompt": "p", "completion": "one"}],
     "line 2: the same completion as an earlier row of this prompt"),
    ([{"prompt": "p", "completion": ""}], "line 1: completion 0 is empty"),
])
def test_empty_or_identical_completions_name_the_line(store, pw, tmp_path, rows, message):
    with pytest.raises(UserError, match=message):
        store.import_jsonl("pw", jsonl(tmp_path / "c.jsonl", rows))
    assert counts(store, pw.id) == (0, 0)  # nothing written


def test_rows_with_their_own_completions_are_never_merged(store, pw, tmp_path):
    rows = [{"prompt": "same", "completions": ["a1", "b1"]}, {"prompt": "same", "completions": ["a2", "b2"]}]
    r = store.import_jsonl("pw", jsonl(tmp_path / "c.jsonl", rows))
    assert (r.prompts, r.items) == (2, 2)  # two pairs, not the 6 pairs of 4 merged completions
    with store.read() as s:
        texts = [sorted(c.text for c in s.query(Prompt).get(i.prompt_id) and
                        [s.get(importing.Completion, cid) for cid in i.completion_ids])
                 for i in s.query(Item).filter(Item.project_id == pw.id).order_by(Item.id)]
    assert texts == [["a1", "b1"], ["a2", "b2"]]
    bad = [{"prompt": "same", "completions": ["a", "b"]},
           {"prompt": "same", "completions": ["c", "d", "e"], "gold": {"choice": "a"}}]
    with pytest.raises(UserError, match=r"c2.jsonl line 2: a pairwise gold item needs exactly 2"):
        store.import_jsonl("pw", jsonl(tmp_path / "c2.jsonl", bad))   # the line of the row at fault


def test_one_completion_rows_are_still_grouped_by_prompt(store, pw, tmp_path):
    rows = [{"prompt": "q", "completion": "x"}, {"prompt": "q", "completion": "y"}, {"prompt": "q", "completion": "z"}]
    r = store.import_jsonl("pw", jsonl(tmp_path / "c.jsonl", rows))
    assert (r.prompts, r.completions, r.items) == (1, 3, 3)


def test_a_bad_row_anywhere_writes_nothing(store, pw, tmp_path):
    rows = [{"prompt": f"p{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(250)] + [{"prompt": "bad"}]
    with pytest.raises(UserError, match="line 251: needs 'completions'"):
        store.import_records("pw", [{**r, "_where": f"f line {i + 1}"} for i, r in enumerate(rows)], batch_rows=200)
    assert counts(store, pw.id) == (0, 0)


# -- idempotent imports -------------------------------------------------------------------------------------------
def test_reimport_without_ids_adds_nothing(store, pw, tmp_path):
    f = jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completions": ["a", "b"]}, {"prompt": "q", "completion": "x"},
                                     {"prompt": "q", "completion": "y"}])
    first = store.import_jsonl("pw", f)
    assert (first.prompts, first.already_present) == (2, 0)
    again = store.import_jsonl("pw", f)
    assert (again.prompts, again.items, again.already_present) == (0, 0, 2)
    assert counts(store, pw.id) == (2, 2)
    r = run("import", "--db", db_of(store), "--project", "pw", f)
    assert r.exit_code == 0 and "0 prompts, 0 completions, 0 items (0 gold) added; 2 already imported" in r.output


def test_ids_make_imports_idempotent_and_conflicts_name_the_line(store, pw, tmp_path):
    rows = [{"id": 7, "prompt": "p", "completions": ["a", "b"]},
            {"id": "x-1", "prompt": "q", "completions": ["c", "d"]}]
    assert store.import_jsonl("pw", jsonl(tmp_path / "a.jsonl", rows)).prompts == 2
    more = rows + [{"id": 8, "prompt": "p", "completions": ["a", "b"]}]  # same content, new id: a new prompt
    r = store.import_jsonl("pw", jsonl(tmp_path / "b.jsonl", more))
    assert (r.prompts, r.already_present) == (1, 2)
    with store.read() as s:
        keys = sorted(s.scalars(Prompt.__table__.select().with_only_columns(Prompt.source_key)))
    assert keys == ["id:7", "id:8", "id:x-1"]
    changed = [{"id": "x-1", "prompt": "q", "completions": ["c", "d"]},
               {"id": 7, "prompt": "p", "completions": ["a", "B"]},
               {"id": 9, "prompt": "new", "completions": ["e", "f"]}]
    with pytest.raises(UserError, match="c.jsonl line 2: id '7' is already imported with other content"):
        store.import_jsonl("pw", jsonl(tmp_path / "c.jsonl", changed))
    assert counts(store, pw.id) == (3, 3)  # id 9 not written either
    twice = [{"id": 1, "prompt": "p", "completions": ["a", "b"]}, {"id": 1, "prompt": "p", "completions": ["a", "b"]},
             {"id": 1, "prompt": "p", "completions": ["a", "c"]}]
    with pytest.raises(UserError, match="d.jsonl line 3: id '1' is already the id of .*d.jsonl line 1"):
        store.import_jsonl("pw", jsonl(tmp_path / "d.jsonl", twice))
    r = store.import_jsonl("pw", jsonl(tmp_path / "e.jsonl", twice[:2]))
    assert (r.prompts, r.already_present) == (1, 1)  # the repeated row counted as already imported
    with pytest.raises(UserError, match="'id' must be a non-empty string or an integer"):
        store.import_records("pw", [{"id": 1.5, "prompt": "p", "completions": ["a", "b"]}])


def test_steps_and_gold_rows_reimport_idempotently(store, tmp_path):
    st = store.create_project("st", "steps")
    rows = [{"id": "s1", "prompt": "2+2?", "completions": ["2+2=4", "So 4."], "gold": {"labels": [1, 1]}},
            {"prompt": "3+3?", "completion": "3+3=6\nSo 6.\n"}]
    f = jsonl(tmp_path / "s.jsonl", rows)
    assert store.import_jsonl("st", f).items == 2
    again = store.import_jsonl("st", f)
    assert (again.prompts, again.already_present) == (0, 2)
    rows[0]["gold"] = {"labels": [1, -1]}  # the same id with another gold answer
    with pytest.raises(UserError, match="line 1: id 's1' is already imported with other content"):
        store.import_jsonl("st", jsonl(tmp_path / "s2.jsonl", rows))
    assert counts(store, st.id) == (2, 2)


# -- batches, crash and resume ------------------------------------------------------------------------------------
def test_big_import_writes_in_batches_and_resumes_after_a_crash(store, pw, monkeypatch):
    rows = [{"prompt": f"p{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(250)]
    real = importing.write_batch
    calls = []

    def crash_on_second(s, p, groups):
        calls.append(len(groups))
        if len(calls) == 2:
            raise RuntimeError("killed mid-import")
        return real(s, p, groups)

    monkeypatch.setattr("alignloop.feedback.store.write_batch", crash_on_second)
    with pytest.raises(RuntimeError):
        store.import_records("pw", rows, batch_rows=400)
    assert calls == [100, 100] and counts(store, pw.id) == (100, 100)  # the first batch committed, alone
    monkeypatch.setattr("alignloop.feedback.store.write_batch", real)
    r = store.import_records("pw", rows, batch_rows=400)
    assert (r.prompts, r.items, r.already_present) == (150, 150, 100)
    assert counts(store, pw.id) == (250, 250)


def test_import_batches_let_other_writers_in(store, pw):
    """A writer waiting while an import runs gets the lock within about one batch, not after the whole import."""
    rows = [{"prompt": f"p{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(3000)]
    lab = store.add_labeler("ann", PASSWORD)
    store.import_records("pw", rows[:10])
    waits = []
    t = threading.Thread(target=store.import_records, args=("pw", rows[10:]), kwargs={"batch_rows": 400})
    t.start()
    while t.is_alive():
        t0 = time.perf_counter()
        with store.write():
            waits.append(time.perf_counter() - t0)
        time.sleep(0.005)
    t.join()
    assert len(waits) >= 3 and max(waits) < 1.0, (len(waits), max(waits))  # before: one wait, the whole import
    assert store.next_assignment(pw.id, lab.id) is not None
    assert counts(store, pw.id) == (3000, 3000)


# -- the write lock: bounded waits, 503 instead of 500, never on the event loop ------------------------------------
def hold_lock(store, seconds: float) -> threading.Thread:
    """A thread that holds the store's in-process write lock for `seconds` (as an import batch would)."""
    got = threading.Event()

    def hold():
        with store.write():
            got.set()
            time.sleep(seconds)

    t = threading.Thread(target=hold)
    t.start()
    got.wait()
    return t


def test_store_write_waits_a_bounded_time(tmp_path):
    store = Store(str(tmp_path / "b.db"), lock_timeout_s=0.2)
    store.create_project("pw", "pairwise")
    t = hold_lock(store, 1.0)
    t0 = time.perf_counter()
    with pytest.raises(DatabaseBusy, match="busy"):
        store.import_records("pw", [{"prompt": "p", "completions": ["a", "b"]}])
    assert time.perf_counter() - t0 < 0.8
    t.join()
    store.dispose()


@pytest.fixture
def busy_client(tmp_path):
    """(store, signed-in API client, csrf) of an app whose store waits at most 0.3 s for the write lock."""
    from fastapi.testclient import TestClient

    from alignloop.feedback.app import create_app

    store = Store(str(tmp_path / "busy.db"), lock_timeout_s=0.3)
    store.create_project("pw", "pairwise", overlap_k=1)
    store.import_records("pw", [{"prompt": f"p{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(5)])
    store.add_labeler("ann", PASSWORD)
    with TestClient(create_app(store, secret_key=SECRET)) as c:
        csrf = c.post("/api/login", json={"username": "ann", "password": PASSWORD}).json()["csrf_token"]
        yield store, c, csrf
    store.dispose()


def test_lock_held_past_the_timeout_gives_503_with_retry_after(busy_client):
    store, c, csrf = busy_client
    t = hold_lock(store, 1.5)
    r = c.post("/api/p/pw/next", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 503 and r.headers["Retry-After"] == "2" and "busy" in r.json()["error"]
    t.join()
    r = c.post("/api/p/pw/next", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["assignment_id"] is not None


def test_other_process_holding_the_lock_gives_503_not_500(busy_client):
    store, c, csrf = busy_client
    a = c.post("/api/p/pw/next", headers={"X-CSRF-Token": csrf}).json()
    other = sqlite3.connect(db_of(store), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. an import running in another process
    try:
        t0 = time.perf_counter()
        r = c.post("/api/p/pw/next", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 503 and time.perf_counter() - t0 < 2  # the issue: 500 after 30 s
        r = c.post(f"/api/assignments/{a['assignment_id']}/judgement?next=1", headers={"X-CSRF-Token": csrf},
                   json={"choice": "left", "strength": "better", "idempotency_key": "k-busy-1"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "2"
        t0 = time.perf_counter()
        assert c.get("/healthz").status_code == 200 and time.perf_counter() - t0 < 0.2
    finally:
        other.execute("ROLLBACK")
        other.close()
    r = c.post(f"/api/assignments/{a['assignment_id']}/judgement?next=1", headers={"X-CSRF-Token": csrf},
               json={"choice": "left", "strength": "better", "idempotency_key": "k-busy-1"})
    assert r.status_code == 201  # the retry with the same key is stored once


def test_a_held_lock_never_stalls_the_event_loop(tmp_path):
    """While the write lock is held (an import batch, far longer than any batch takes), a request that needs it
    waits in a worker thread: /healthz, served by the same event loop meanwhile, answers at once."""
    import httpx
    import uvicorn

    from alignloop.feedback.app import create_app

    store = Store(str(tmp_path / "loop.db"))
    store.create_project("pw", "pairwise", overlap_k=1)
    store.import_records("pw", [{"prompt": f"p{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(3)])
    store.add_labeler("ann", PASSWORD)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(store, secret_key=SECRET), host="127.0.0.1", port=port,
                                        log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base) as c:
            csrf = c.post("/api/login", json={"username": "ann", "password": PASSWORD}).json()["csrf_token"]
            holder = hold_lock(store, 2.0)
            got = {}
            nxt = threading.Thread(target=lambda: got.setdefault(
                "r", c.post("/api/p/pw/next", headers={"X-CSRF-Token": csrf}, timeout=10)))
            nxt.start()
            time.sleep(0.2)  # the next-item request is now waiting for the lock
            t0 = time.perf_counter()
            assert httpx.get(base + "/healthz", timeout=5).status_code == 200
            healthz_s = time.perf_counter() - t0
            holder.join()
            nxt.join()
        assert healthz_s < 0.8, healthz_s  # before: ~1.8 s, the loop itself waited for the lock
        assert got["r"].status_code == 200 and got["r"].json()["assignment_id"] is not None
    finally:
        srv.should_exit = True
        th.join(10)
        store.dispose()


def test_pacer_spreads_an_imports_work_over_time():
    """In the web server's process an import works only IMPORT_SERVER_DUTY of the time (the event loop shares its
    GIL): a Pacer at duty 0.25 makes 30 ms of work take about 120 ms."""
    pace = importing.Pacer(duty=0.25)
    t0 = time.perf_counter()
    worked = 0.0
    while worked < 0.03:
        w0 = time.perf_counter()
        while time.perf_counter() - w0 < 0.0005:  # half a millisecond of "work"
            pass
        worked += time.perf_counter() - w0
        pace()
    assert time.perf_counter() - t0 > 0.09
    free = importing.Pacer()  # duty 1: no sleeps (the CLI)
    t0 = time.perf_counter()
    for _ in range(10_000):
        free()
    assert time.perf_counter() - t0 < 0.05


def test_server_imports_are_paced(store, pw, monkeypatch):
    seen = []
    monkeypatch.setattr("alignloop.feedback.store.Pacer", lambda duty: seen.append(duty) or importing.Pacer(1.0))
    store.import_records("pw", [{"prompt": "p", "completions": ["a", "b"]}])
    assert store.start_checkpointer()  # what the web app's lifespan does
    try:
        store.import_records("pw", [{"prompt": "q", "completions": ["a", "b"]}])
    finally:
        store.stop_checkpointer()
    from alignloop.feedback.store import IMPORT_SERVER_DUTY
    assert seen == [1.0, IMPORT_SERVER_DUTY] and IMPORT_SERVER_DUTY < 0.5


def test_sample_leaves_out_empty_and_repeated_samples(tmp_path, monkeypatch):
    """A small model often samples the same answer twice, or an empty one: `sample` leaves them out (the import
    would refuse them) and says how many."""
    import alignloop.feedback.sampling as sampling

    def c(text):
        return {"text": text, "model": "m", "params": {}}
    scripted = [{"prompt": "p1", "completions": [c("yes"), c("yes"), c("no"), c("  ")]},
                {"prompt": "p2", "completions": [c(""), c("")]}]
    monkeypatch.setattr(sampling, "sample_records", lambda rows, *a, **k: scripted)
    db = tmp_path / "f.db"
    assert run("create", "--db", db, "--project", "pw").exit_code == 0
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "p1"}\n{"prompt": "p2"}\n')
    r = run("sample", "--db", db, "--project", "pw", "--prompts", prompts, "--model", tmp_path / "m", "-n", 4)
    assert r.exit_code == 0, r.output
    assert "sampled 2 completions for 1 prompts: 1 items (4 empty or repeated samples left out)" in r.output


def test_a_lone_surrogate_is_an_error_naming_the_line(store, pw, tmp_path):
    f = tmp_path / "sur.jsonl"
    f.write_text('{"prompt": "p", "completions": ["a", "b"]}\n'
                 '{"prompt": "bad \\ud800 text", "completions": ["a", "b"]}\n')
    r = run("import", "--db", db_of(store), "--project", "pw", f)
    assert r.exit_code == 2 and "sur.jsonl line 2: a string holds a lone surrogate" in r.output
    assert "Traceback" not in r.output and counts(store, pw.id) == (0, 0)


def test_comparable_completions_leaves_out_empty_and_repeated_samples():
    """What the pipeline, `eval --human-db` and `feedback sample` import from a model's samples: an empty (or
    blank) sample and a repeat of another of its prompt are left out and counted; a row left with none goes."""
    rows = [{"prompt": "p", "completions": ["a", "", "a", {"text": "b", "model": "m"}]},
            {"prompt": "q", "completions": [" ", ""]},
            {"prompt": "r", "completions": ["x"]}]
    kept, left_out = importing.comparable_completions(rows)
    assert kept == [{"prompt": "p", "completions": ["a", {"text": "b", "model": "m"}]},
                    {"prompt": "r", "completions": ["x"]}]
    assert left_out == 4
