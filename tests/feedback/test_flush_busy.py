"""The group commit of the JSON API's submit + next (`api.GroupCommit.flush`) runs on the event loop, but never
waits there for SQLite's write lock: while another connection (another process, an import batch of this process)
holds it, the batch is stored by a worker thread and answered back on the loop, so the server keeps answering
(/healthz within 100 ms). Each submission is stored once and answered once, after its COMMIT; a lock held past the
store's lock timeout is a 503 with Retry-After and nothing stored. A free lock: no thread hop."""
from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import httpx
import pytest
from fb_helpers import PASSWORD, SECRET
from sqlalchemy import select

from alignloop.feedback.app import create_app
from alignloop.feedback.db import waits_off
from alignloop.feedback.errors import WouldBlock
from alignloop.feedback.models import Judgement
from alignloop.feedback.store import Store
from alignloop.feedback.web.api import GroupCommit

LABELERS = ("ann", "bob")


@pytest.fixture
def make_store(tmp_path):
    stores = []

    def make(lock_timeout_s: float = 5.0) -> Store:
        s = Store(str(tmp_path / "fb.db"), lock_timeout_s=lock_timeout_s)
        s.create_project("pw", "pairwise", overlap_k=2)
        s.import_records("pw", [{"prompt": f"q{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(3)])
        for name in LABELERS:
            s.add_labeler(name, PASSWORD)
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.dispose()


def hold_sqlite_lock(store: Store):
    """Another connection (as another process would) that takes SQLite's write lock: BEGIN IMMEDIATE."""
    def hold(locked: threading.Event, release: threading.Event):
        conn = sqlite3.connect(store.url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        conn.execute("COMMIT")
        conn.close()
    return hold


def hold_write_lock(store: Store):
    """A writer of this process (an import batch) holding the store's in-process write lock."""
    def hold(locked: threading.Event, release: threading.Event):
        with store._write_lock:
            locked.set()
            release.wait(10)
    return hold


async def while_locked(store: Store, holder, hold_s: float, keys: list[str]):
    """Each labeler submits with next=1 (same event-loop turn: one batch) while `holder` holds the lock for
    `hold_s`; 0.2 s later /healthz is asked. Returns (replies, /healthz seconds from when it was due, submit
    seconds, which submissions were answered by then)."""
    app = create_app(store, secret_key=SECRET)
    transport = httpx.ASGITransport(app=app)
    clients, jobs = [], []
    for name, key in zip(LABELERS, keys, strict=True):
        c = httpx.AsyncClient(transport=transport, base_url="http://t")
        clients.append(c)
        tok = (await c.post("/api/login", json={"username": name, "password": PASSWORD})).json()["csrf_token"]
        aid = (await c.post("/api/p/pw/next", headers={"X-CSRF-Token": tok})).json()["assignment_id"]
        jobs.append((c, f"/api/assignments/{aid}/judgement?next=1",
                     {"choice": "left", "strength": "better", "idempotency_key": key}, {"X-CSRF-Token": tok}))
    locked, release = threading.Event(), threading.Event()
    th = threading.Thread(target=holder(store), args=(locked, release))
    th.start()
    assert locked.wait(5)
    timer = threading.Timer(hold_s, release.set)  # a thread: released on time even if the loop sleeps
    timer.start()
    t0 = time.perf_counter()
    submits = [asyncio.ensure_future(c.post(url, json=body, headers=h)) for c, url, body, h in jobs]
    await asyncio.sleep(0.2)  # the submissions have met the lock; a loop asleep on it wakes up only after it
    done_early = [s.done() for s in submits]
    health = await clients[0].get("/healthz")
    health_s = time.perf_counter() - t0 - 0.2    # from when it was due to be asked
    assert health.status_code == 200
    replies = await asyncio.gather(*submits)
    submit_s = time.perf_counter() - t0
    timer.join(10)
    th.join(10)
    for c in clients:
        await c.aclose()
    return replies, health_s, submit_s, done_early


def stored_keys(store: Store) -> list[str]:
    with store.read() as s:
        return sorted(s.scalars(select(Judgement.idempotency_key)))


@pytest.mark.parametrize("holder", [hold_sqlite_lock, hold_write_lock], ids=["other-connection", "in-process"])
def test_submit_with_next_waits_for_the_lock_off_the_event_loop(make_store, holder):
    store = make_store()
    keys = ["busy-key-ann-01", "busy-key-bob-01"]
    replies, health_s, submit_s, done_early = asyncio.run(while_locked(store, holder, 1.0, keys))
    assert health_s < 0.1, f"/healthz took {health_s:.3f} s while the submissions waited for the lock"
    assert done_early == [False, False]            # not answered before the lock was free ...
    assert submit_s >= 0.9                         # ... they waited for it (about 1 s) ...
    assert [r.status_code for r in replies] == [201, 201], [r.text for r in replies]  # ... then stored
    assert all(r.json()["next"]["assignment_id"] for r in replies)
    assert len({r.json()["judgement_id"] for r in replies}) == 2
    assert stored_keys(store) == keys              # each once


def test_a_lock_held_past_the_lock_timeout_is_a_503_and_nothing_stored(make_store):
    store = make_store(lock_timeout_s=0.3)
    keys = ["late-key-ann-01", "late-key-bob-01"]
    replies, health_s, _submit_s, _done = asyncio.run(while_locked(store, hold_sqlite_lock, 1.2, keys))
    assert health_s < 0.1
    assert [r.status_code for r in replies] == [503, 503]
    assert all(r.headers["Retry-After"] == "2" and "busy" in r.json()["error"] for r in replies)
    assert stored_keys(store) == []


class StubStore:
    """submit_and_next_batch answering from a script, recording (requests, on the loop's thread, under no_wait)."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def submit_and_next_batch(self, requests):
        self.calls.append(([r[3] for r in requests], threading.current_thread() is threading.main_thread(),
                           waits_off()))
        return self.answers.pop(0)


async def flush_all(gc: GroupCommit, keys: list[str]):
    futs = [asyncio.ensure_future(gc.submit_and_next(i, 1, {}, k)) for i, k in enumerate(keys)]
    return await asyncio.gather(*futs, return_exceptions=True)


def test_flush_runs_only_what_would_block_again_in_a_thread():
    """What met the lock (WouldBlock: nothing written) is stored again from a worker thread; the rest is answered
    from the loop's own attempt; every request exactly once."""
    bad = ValueError("invalid")
    store = StubStore(["r0", WouldBlock("busy"), bad], ["r1 from the thread"])
    out = asyncio.run(flush_all(GroupCommit(store), ["k0", "k1", "k2"]))
    assert out == ["r0", "r1 from the thread", bad]
    assert store.calls == [(["k0", "k1", "k2"], True, True), (["k1"], False, False)]


def test_flush_with_a_free_lock_stays_on_the_loop():
    store = StubStore(["r0", "r1"])
    assert asyncio.run(flush_all(GroupCommit(store), ["k0", "k1"])) == ["r0", "r1"]
    assert store.calls == [(["k0", "k1"], True, True)]  # one call, on the loop, no thread hop


def test_a_whole_batch_that_would_block_goes_to_a_thread():
    class Busy(StubStore):
        def submit_and_next_batch(self, requests):
            if waits_off():
                self.calls.append("loop")
                raise WouldBlock("busy")
            return super().submit_and_next_batch(requests)

    store = Busy(["r0", "r1"])
    assert asyncio.run(flush_all(GroupCommit(store), ["k0", "k1"])) == ["r0", "r1"]
    assert store.calls == ["loop", (["k0", "k1"], False, False)]
