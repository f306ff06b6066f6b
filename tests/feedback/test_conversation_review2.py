"""Fixes from the second review of the conversation task (review 17b): a finished job is "storing" before its state
says done, and storing a result never holds the worker's listener (H1); the labeler's error text replaces only
whole model names (H2); the expiry's UPDATE re-checks the assignment's time, so a concurrent keep-alive wins (H3);
an expired assignment whose slot is free is taken back when the labeler acts or waits, and the state poll keeps a
generating conversation's assignment alive (H4)."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, SECRET, api_login
from sqlalchemy import update
from sqlalchemy.sql.dml import Update

from alignloop.feedback import conversations as conv
from alignloop.feedback.app import create_app
from alignloop.feedback.assignment import ExpiryClock, expire_stale
from alignloop.feedback.generation import GenerationJob, GenerationWorker, public_error
from alignloop.feedback.models import Assignment, Item, Project, utcnow
from alignloop.feedback.web import conversations as webconv

ONE = [{"text": "one"}, {"text": "two"}]


def _project(store, overlap_k=1, prompts=("hello", "again"), **settings):
    store.create_project("cv", "conversation", overlap_k=overlap_k,
                         settings={"models": ["m"], "assignment_timeout_s": 60, **settings})
    if prompts:
        store.import_records("cv", [{"prompt": t} for t in prompts])
    return store.get_project("cv")


def _age(store, assignment_id, seconds=3600):
    with store.write() as s:
        s.execute(update(Assignment).where(Assignment.id == assignment_id)
                  .values(created_at=utcnow() - timedelta(seconds=seconds)))


def _expire(store, project_id):
    """The expiry as the next request of any labeler runs it: the number of assignments released."""
    with store.write() as s:
        return expire_stale(s, s.get(Project, project_id), ExpiryClock())


def _assignment(store, aid):
    """(status, the item's n_active, seconds since the assignment's time restarted)."""
    with store.read() as s:
        a = s.get(Assignment, aid)
        return a.status, s.get(Item, a.item_id).n_active, (utcnow() - a.created_at).total_seconds()


def _wait(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# -- H1 -----------------------------------------------------------------------------------------------------------
def test_a_finished_job_is_storing_before_on_done_runs(store):
    """The worker finishes a job (its state done) before its listener calls on_done: in between the page must say
    "storing", not "could not be saved ... retry"."""
    p = _project(store)
    ann = store.add_labeler("ann", PASSWORD)
    c, t = conv.take_conversation(store, p.id, ann.id)
    w = GenerationWorker("gen_fakes:echo", in_process=True)  # never started: its table only
    gen = webconv.Generation(store, worker=w)
    job = GenerationJob(conv.job_id(t), t.id, list(t.context), ["m"])
    w._status[job.job_id] = {"state": "running", "partial": ["", ""], "error": None}
    with w._lock:
        finished = w._finish_locked(job, [{"text": "one", "model": "m", "params": {}, "stopped": True},
                                          {"text": "two", "model": "m", "params": {}, "stopped": True}], None, 5)
    assert w.status(job.job_id)["state"] == "done"           # the worker's own view: finished
    view = conv.conversation_state(store, c.id, ann.id, live=gen.status)["turns"][0]
    assert (view["status"], view["error"]) == ("pending", None)
    assert view["job"]["state"] == "storing"
    gen.deliver(*finished)                                     # what the listener does next
    assert _wait(lambda: conv.conversation_state(store, c.id, ann.id)["turns"][0]["status"] == "ready")
    gen.stop()
    # stored: still "storing" to a state read made just before the store (never "interrupted")
    view = webconv.Generation.status(gen, job.job_id)
    assert view is None or view["state"] == "storing"


def test_the_listener_serves_the_next_job_while_a_result_is_being_stored(store, monkeypatch):
    """A slow store (a busy database, its retries) of one job's result must not stop the worker's listener from
    taking the next job's result; both turns show storing meanwhile, then ready."""
    p = _project(store)
    ann, bob = store.add_labeler("ann", PASSWORD), store.add_labeler("bob", PASSWORD)
    ca, ta = conv.take_conversation(store, p.id, ann.id)
    cb, tb = conv.take_conversation(store, p.id, bob.id)
    gate, real = threading.Event(), conv.turn_generated

    def slow(store_, turn_id, *a, **k):
        if turn_id == ta.id:
            gate.wait(30)
        return real(store_, turn_id, *a, **k)

    monkeypatch.setattr(conv, "turn_generated", slow)
    w = GenerationWorker("gen_fakes:echo", in_process=True, timeout_s=30)
    w.start()
    gen = webconv.Generation(store, worker=w)
    try:
        gen.submit(ta, p.settings)
        assert _wait(lambda: w.status(conv.job_id(ta))["state"] == "done")
        gen.submit(tb, p.settings)
        assert _wait(lambda: w.status(conv.job_id(tb))["state"] == "done", timeout=5), w.status(conv.job_id(tb))
        for c, lab in ((ca, ann), (cb, bob)):
            view = conv.conversation_state(store, c.id, lab.id, live=gen.status)["turns"][0]
            assert (view["status"], view["job"]["state"]) == ("pending", "storing")
        gate.set()
        assert _wait(lambda: all(conv.conversation_state(store, c.id, lab.id)["turns"][0]["status"] == "ready"
                                 for c, lab in ((ca, ann), (cb, bob))))
    finally:
        gate.set()
        w.stop()
        gen.stop()


def test_a_result_that_could_not_be_stored_is_offered_for_retry(store, monkeypatch):
    p = _project(store)
    ann = store.add_labeler("ann", PASSWORD)
    c, t = conv.take_conversation(store, p.id, ann.id)

    def busy(*a, **k):
        raise webconv.DatabaseBusy("database is locked")

    monkeypatch.setattr(conv, "turn_generated", busy)
    w = GenerationWorker("gen_fakes:echo", in_process=True, timeout_s=30)
    w.start()
    gen = webconv.Generation(store, worker=w)
    monkeypatch.setattr(gen, "STORE_RETRY_DELAYS_S", (0.0,))
    try:
        gen.submit(t, p.settings)
        assert _wait(lambda: conv.conversation_state(store, c.id, ann.id, live=gen.status)["turns"][0]["status"]
                     == "interrupted")
        assert "could not be saved" in conv.conversation_state(store, c.id, ann.id, live=gen.status)["turns"][0][
            "error"]
    finally:
        w.stop()
        gen.stop()


# -- H2 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("models", "error", "shown"), [
    (["/srv/checkpoints/model"], "the model was still loading after 600 s: check the model, or give it more time",
     "the model was still loading after 600 s: check the model, or give it more time"),
    (["ai/memory"], "CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA out of memory. Tried to allocate 2.00 GiB"),
    (["org/out"], "exit code -9: out of memory?", "exit code -9: out of memory?"),
    (["runs/sft/final"], "the final answer was cut", "the final answer was cut"),
    (["gpt2"], "gpt2-large is another model; mygpt2 too", "gpt2-large is another model; mygpt2 too"),
    (["model"], "the model exploded", "the model exploded"),
    # still replaced: whole names and paths, a hub id in a URL, the folder of a file, a name with "the"/"model"
    (["/srv/checkpoints/model"], "could not load /srv/checkpoints/model: no config",
     "could not load the model: no config"),
    (["org/gpt2"], "see https://huggingface.co/org/gpt2/resolve/main/config.json.",
     "see https://huggingface.co/the model/resolve/main/config.json."),
    (["org/gpt2"], "The gpt2 model ran out of memory; so did gpt2.", "The model ran out of memory; so did the model."),
    (["runs/policy-v3"], "policy-v3: bad weights in runs/policy-v3", "the model: bad weights in the model"),
])
def test_public_error_replaces_only_whole_names(models, error, shown):
    assert public_error(error, models) == shown


# -- H3 -----------------------------------------------------------------------------------------------------------
class _KeepAliveInBetween:
    """A session through which `expire_stale` runs, with a conversation's keep-alive committed between its SELECT
    and its UPDATE (what PostgreSQL's READ COMMITTED lets another transaction do)."""

    def __init__(self, s, assignment_id):
        self.s, self.aid, self.touched = s, assignment_id, False

    def execute(self, stmt, *a, **k):
        if not self.touched and isinstance(stmt, Update) and stmt.table.name == "assignments":
            self.touched = True
            self.s.execute(update(Assignment).where(Assignment.id == self.aid).values(created_at=utcnow()))
        return self.s.execute(stmt, *a, **k)


def test_the_expiry_does_not_undo_a_keep_alive_made_after_its_select(store):
    p = _project(store)
    ann = store.add_labeler("ann", PASSWORD)
    a = store.next_assignment(p.id, ann.id)
    _age(store, a.id)
    with store.write() as s:
        n = expire_stale(_KeepAliveInBetween(s, a.id), s.get(Project, p.id), ExpiryClock())
    status, n_active, age = _assignment(store, a.id)
    assert (n, status, n_active) == (0, "assigned", 1) and age < 60
    _age(store, a.id)
    assert _expire(store, p.id) == 1  # without a keep-alive it expires as before
    assert _assignment(store, a.id)[:2] == ("expired", 0)


# -- H4 -----------------------------------------------------------------------------------------------------------
def test_a_resumed_conversation_takes_its_expired_slot_back(store):
    p = _project(store, prompts=("hello",))
    ann, bob = store.add_labeler("ann", PASSWORD), store.add_labeler("bob", PASSWORD)
    c, t = conv.take_conversation(store, p.id, ann.id)
    assert conv.turn_generated(store, t.id, ONE, 3)
    _age(store, c.assignment_id)  # ann paused past the timeout ...
    assert _expire(store, p.id) == 1 and _assignment(store, c.assignment_id)[:2] == ("expired", 0)
    # ... and comes back before anyone took her opening: choosing takes the slot back
    conv.choose(store, c.id, ann.id, 0, 3, conv.conversation_state(store, c.id, ann.id)["revision"])
    status, n_active, age = _assignment(store, c.assignment_id)
    assert (status, n_active) == ("assigned", 1) and age < 60
    assert store.next_assignment(p.id, bob.id) is None  # overlap_k 1: the opening is ann's again
    ended = conv.end_conversation(store, c.id, ann.id, 6, "", None)
    assert ended.status == "ended" and conv.conversation_state(store, c.id, ann.id)["note"] is None
    assert _assignment(store, c.assignment_id)[:2] == ("done", 1)  # n_active counts live and done labels


def test_a_slot_taken_by_another_labeler_is_not_taken_twice(store):
    p = _project(store, prompts=("hello",))
    ann, bob = store.add_labeler("ann", PASSWORD), store.add_labeler("bob", PASSWORD)
    c, t = conv.take_conversation(store, p.id, ann.id)
    assert conv.turn_generated(store, t.id, ONE, 3)
    _age(store, c.assignment_id)
    assert _expire(store, p.id) == 1
    b = store.next_assignment(p.id, bob.id)  # bob took ann's opening meanwhile
    assert b is not None and b.item_id == _item_of(store, c.assignment_id)
    conv.choose(store, c.id, ann.id, 0, 3, conv.conversation_state(store, c.id, ann.id)["revision"])
    assert _assignment(store, c.assignment_id)[:2] == ("expired", 1)  # n_active: bob's only


def _item_of(store, aid):
    with store.read() as s:
        return s.get(Assignment, aid).item_id


class _RunningWorker:
    """A given worker whose every job is still generating (a first turn's model loading for minutes)."""

    def __init__(self):
        self.on_done = None

    def status(self, job_id):
        return {"state": "running", "position": 0, "partial": ["", ""], "error": None}

    def submit(self, job):
        pass


def test_the_state_poll_keeps_a_generating_conversations_assignment_alive(store):
    p = _project(store, prompts=("hello",))
    store.add_labeler("ann", PASSWORD)
    bob = store.add_labeler("bob", PASSWORD)
    app = create_app(store, secret_key=SECRET, generation=_RunningWorker())
    c, h = api_login(lambda: TestClient(app), "ann")
    cid = c.post("/api/p/cv/conversations", headers=h).json()["conversation_id"]
    with store.read() as s:
        aid = s.get(conv.Conversation, cid).assignment_id
    _age(store, aid, seconds=10)  # polled 10 s ago: no write yet (at most every 15 s with a 60 s timeout)
    assert c.get(f"/api/p/cv/conversations/{cid}").json()["turns"][0]["status"] == "pending"
    assert _assignment(store, aid)[2] >= 10
    _age(store, aid, seconds=50)  # waiting for the model for 50 s of a 60 s timeout: the poll restarts it
    c.get(f"/api/p/cv/conversations/{cid}")
    assert _assignment(store, aid)[2] < 5
    assert _expire(store, p.id) == 0
    _age(store, aid)  # expired while nobody polled (a network break), the slot still free: the next poll takes it
    assert _expire(store, p.id) == 1
    c.get(f"/api/p/cv/conversations/{cid}")
    assert _assignment(store, aid)[:2] == ("assigned", 1)
    assert store.next_assignment(p.id, bob.id) is None
    # a conversation that waits for the labeler (no turn generating) is not kept alive by reading its state
    with store.read() as s:
        tid = s.scalar(conv.select(conv.ConversationTurn.id).where(conv.ConversationTurn.conversation_id == cid))
    assert conv.turn_generated(store, tid, ONE, 3)
    _age(store, aid)
    c.get(f"/api/p/cv/conversations/{cid}")
    assert _assignment(store, aid)[2] >= 3600
