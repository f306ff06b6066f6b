"""Fixes from the review of the conversation task (review 17): an active conversation's assignment does not expire
and an expired one never dead-ends the labeler (F1); a result the store could not save shows the turn interrupted,
after a few tries on a busy database (F2); one open_start conversation per double-clicked Start (F3); a refused
message stays in the box (F8, real browser); an open_start opening stays its labeler's own (F12); no worker is
built after shutdown (F13); Start is offered while the labeler holds an item (F14); time_spent clamped (F15); the
generic review queue leaves conversation ratings alone (F16)."""
from __future__ import annotations

import os
import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, SECRET, api_login
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from alignloop.feedback import conversations as conv
from alignloop.feedback import review
from alignloop.feedback.app import create_app
from alignloop.feedback.errors import DatabaseBusy
from alignloop.feedback.models import Assignment, Conversation, ConversationTurn, Item, Judgement, utcnow
from alignloop.feedback.validation import MAX_TIME_MS
from alignloop.feedback.web import conversations as webconv

ONE = [{"text": "one"}, {"text": "two"}]


def _project(store, overlap_k=1, prompts=("hello", "again"), **settings):
    store.create_project("cv", "conversation", overlap_k=overlap_k,
                         settings={"models": ["m"], "assignment_timeout_s": 60, **settings})
    if prompts:
        store.import_records("cv", [{"prompt": t} for t in prompts])
    return store.get_project("cv")


def _chosen_conversation(store, p, lab, first_message=None):
    if first_message is None:
        c, t = conv.take_conversation(store, p.id, lab.id)
    else:
        c, t = conv.take_open_conversation(store, p.id, lab.id, first_message)
    assert conv.turn_generated(store, t.id, ONE, 3)
    conv.choose(store, c.id, lab.id, 0, 3, conv.conversation_state(store, c.id, lab.id)["revision"])
    return c


def _age(store, assignment_id, seconds=3600):
    with store.write() as s:
        s.execute(update(Assignment).where(Assignment.id == assignment_id)
                  .values(created_at=utcnow() - timedelta(seconds=seconds)))
    store._expiry.last.clear()  # the next request checks expiry at once


def _assignment(store, aid):
    with store.read() as s:
        a = s.get(Assignment, aid)
        return a.status, s.get(Item, a.item_id).n_done


# -- F1 -----------------------------------------------------------------------------------------------------------
def test_talking_keeps_the_conversations_assignment_alive(store):
    p = _project(store)
    ann, bob = store.add_labeler("ann", PASSWORD), store.add_labeler("bob", PASSWORD)
    c, t = conv.take_conversation(store, p.id, ann.id)
    assert conv.turn_generated(store, t.id, ONE, 3)
    _age(store, c.assignment_id)  # ann read the answers for an hour (timeout 60 s), then chose
    conv.choose(store, c.id, ann.id, 0, 3, conv.conversation_state(store, c.id, ann.id)["revision"])
    _age(store, c.assignment_id)
    t1 = conv.add_message(store, c.id, ann.id, "and then?", conv.conversation_state(store, c.id, ann.id)["revision"])
    assert conv.turn_failed(store, t1.id, "boom")
    _age(store, c.assignment_id)
    conv.retry_turn(store, c.id, ann.id, 1)
    cb, _ = conv.take_conversation(store, p.id, bob.id)  # would expire ann's assignment were it stale
    assert _assignment(store, c.assignment_id) == ("assigned", 0)
    with store.read() as s:
        assert s.get(Assignment, cb.assignment_id).item_id != s.get(Assignment, c.assignment_id).item_id


def test_a_conversation_whose_slot_was_taken_still_ends_and_the_labeler_moves_on(store):
    p = _project(store)
    ann, bob = store.add_labeler("ann", PASSWORD), store.add_labeler("bob", PASSWORD)
    c = _chosen_conversation(store, p, ann)
    _age(store, c.assignment_id)  # left open overnight: expired, and bob gets the item
    cb, _ = conv.take_conversation(store, p.id, bob.id)
    with store.read() as s:
        assert s.get(Assignment, cb.assignment_id).item_id == s.get(Assignment, c.assignment_id).item_id
    ended = conv.end_conversation(store, c.id, ann.id, 5, "late", conv.conversation_state(store, c.id, ann.id)
                                  ["revision"])
    assert (ended.status, ended.rating, ended.comment) == ("ended", 5, "late")
    assert _assignment(store, c.assignment_id) == ("expired", 0)  # not counted toward the item's labels
    assert conv.conversation_state(store, c.id, ann.id)["note"] == conv.UNCOUNTED_NOTE  # and she is told
    with store.read() as s:
        assert [(j.likert, j.comment) for j in s.scalars(select(Judgement).where(
            Judgement.assignment_id == c.assignment_id))] == [(5, "late")]
    rows, summary = conv.export_conversation_rows(store, p.id, "preference")
    assert summary["conversations"] == 1 and len(rows) == 1
    nxt, turn = conv.take_conversation(store, p.id, ann.id)  # not stuck: a new conversation on the other item
    assert nxt.id != c.id and turn is not None and turn.context[-1]["content"] == "again"


# -- F2 -----------------------------------------------------------------------------------------------------------
def test_on_done_tries_again_on_a_busy_database(store, monkeypatch):
    p = _project(store)
    ann = store.add_labeler("ann", PASSWORD)
    c, t = conv.take_conversation(store, p.id, ann.id)
    real, calls = conv.turn_generated, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) < 3:
            raise DatabaseBusy("database is locked")
        return real(*a, **k)

    monkeypatch.setattr(conv, "turn_generated", flaky)
    gen = webconv.Generation(store)
    monkeypatch.setattr(gen, "STORE_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    gen.on_done(SimpleNamespace(job_id=conv.job_id(t), turn_id=t.id), ONE, None, 5)
    assert len(calls) == 3
    assert conv.conversation_state(store, c.id, ann.id)["turns"][0]["status"] == "ready"


class _DoneWorker:
    """A given worker that finished every job (its result never reached the store) and records submissions."""

    def __init__(self, state="done"):
        self.state, self.jobs, self.on_done = state, [], None

    def status(self, job_id):
        return {"state": self.state, "position": 0, "partial": ["x", "y"], "error": None}

    def submit(self, job):
        self.jobs.append(job.job_id)


def test_a_finished_job_whose_result_was_not_stored_shows_interrupted_and_retries(store):
    _project(store)
    store.add_labeler("ann", PASSWORD)
    w = _DoneWorker()
    app = create_app(store, secret_key=SECRET, generation=w)
    c, h = api_login(lambda: TestClient(app), "ann")
    cid = c.post("/api/p/cv/conversations", headers=h).json()["conversation_id"]
    turn = c.get(f"/api/p/cv/conversations/{cid}").json()["turns"][0]
    assert turn["status"] == "interrupted" and "retry" in turn["error"]
    r = c.post(f"/api/p/cv/conversations/{cid}/turns/0/retry", headers=h)
    assert r.status_code == 200
    assert (r.json()["turns"][0]["attempts"], len(w.jobs)) == (2, 2)
    w.state = "running"
    assert c.get(f"/api/p/cv/conversations/{cid}").json()["turns"][0]["status"] == "pending"


def test_a_result_being_stored_is_not_offered_for_retry(store):
    p = _project(store)
    ann = store.add_labeler("ann", PASSWORD)
    c, t = conv.take_conversation(store, p.id, ann.id)
    gen = webconv.Generation(store, worker=_DoneWorker())
    gen._storing.add(conv.job_id(t))  # on_done is still trying
    assert conv.conversation_state(store, c.id, ann.id, live=gen.status)["turns"][0]["status"] == "pending"


# -- F3 -----------------------------------------------------------------------------------------------------------
def test_a_double_clicked_open_start_opens_one_conversation(store):
    p = _project(store, prompts=(), open_start=True)
    ann = store.add_labeler("ann", PASSWORD)
    barrier, out = threading.Barrier(4), []

    def go():
        barrier.wait()
        out.append(conv.take_open_conversation(store, p.id, ann.id, "my first message"))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Conversation)) == 1
        assert s.scalar(select(func.count()).select_from(ConversationTurn)) == 1
    assert len({c.id for c, _ in out}) == 1 and sum(t is not None for _, t in out) == 1


def test_the_schema_refuses_a_second_open_conversation(store):
    """What protects PostgreSQL's parallel writers: a partial unique index (ended conversations may be many)."""
    p = _project(store, prompts=(), open_start=True)
    ann = store.add_labeler("ann", PASSWORD)
    c, _ = conv.take_open_conversation(store, p.id, ann.id, "first")
    now = utcnow()
    with pytest.raises(IntegrityError), store.write() as s:
        with store.read() as r:
            prompt_id = r.get(Item, r.get(Assignment, c.assignment_id).item_id).prompt_id
        item = Item(project_id=p.id, prompt_id=prompt_id, completion_ids=[], n_active=1, n_done=0)
        s.add(item)
        s.flush()
        a = Assignment(item_id=item.id, labeler_id=ann.id, project_id=p.id, status="assigned", is_gold=False,
                       shown_order=[])
        s.add(a)
        s.flush()
        s.add(Conversation(assignment_id=a.id, project_id=p.id, labeler_id=ann.id, status="open", revision=1,
                           created_at=now, updated_at=now))
        s.flush()
    with store.write() as s:
        s.execute(update(Conversation).values(status="ended"))
    c2, t2 = conv.take_open_conversation(store, p.id, ann.id, "second")
    assert c2.id != c.id and t2 is not None


# -- F12 ----------------------------------------------------------------------------------------------------------
def test_an_open_start_opening_stays_its_labelers_own(store):
    p = _project(store, prompts=(), open_start=True)
    ann, bob = store.add_labeler("ann", PASSWORD), store.add_labeler("bob", PASSWORD)
    c = _chosen_conversation(store, p, ann, first_message="my secret opening")
    _age(store, c.assignment_id)
    assert store.next_assignment(p.id, bob.id) is None  # ann's expired: still not bob's opening
    assert _assignment(store, c.assignment_id)[0] == "expired"
    with store.write() as s:
        s.get(type(p), p.id).overlap_k = 3  # more labels per item: still nobody else's
    store._expiry.last.clear()
    assert store.next_assignment(p.id, bob.id) is None
    ended = conv.end_conversation(store, c.id, ann.id, 6, "", conv.conversation_state(store, c.id, ann.id)["revision"])
    assert ended.status == "ended" and _assignment(store, c.assignment_id) == ("done", 1)  # her own: counted


# -- F13 ----------------------------------------------------------------------------------------------------------
def test_no_worker_is_built_after_shutdown(store):
    _project(store)
    store.add_labeler("ann", PASSWORD)
    app = create_app(store, secret_key=SECRET, generation_backend="gen_fakes:echo")
    gen = app.state.generation
    try:
        gen.stop()  # the lifespan's end; a request is still in flight
        c, h = api_login(lambda: TestClient(app), "ann")
        r = c.post("/api/p/cv/conversations", headers=h)
        assert r.status_code == 503 and "the server is shutting down" in r.json()["error"]
        assert gen._worker is None
        turn = r.json()["state"]["turns"][0]
        assert turn["status"] == "failed" and "shutting down" in turn["error"]
    finally:
        if gen._worker is not None:
            gen._worker.stop()


# -- F14 ----------------------------------------------------------------------------------------------------------
def test_start_is_offered_while_the_labeler_holds_an_item(store, make_client):
    p = _project(store, prompts=("hello",))
    ann = store.add_labeler("ann", PASSWORD)
    store.next_assignment(p.id, ann.id)  # what the generic POST /api/p/cv/next does
    page = make_client("ann").get("/p/cv/converse").text
    assert 'id="start"' in page and 'id="all-done"' not in page


# -- F15 ----------------------------------------------------------------------------------------------------------
def test_time_spent_is_clamped(store):
    p = _project(store, assignment_timeout_s=0)
    ann = store.add_labeler("ann", PASSWORD)
    c = _chosen_conversation(store, p, ann)
    with store.write() as s:
        s.execute(update(Conversation).where(Conversation.id == c.id)
                  .values(created_at=utcnow() - timedelta(days=40)))
        s.execute(update(Assignment).where(Assignment.id == c.assignment_id)
                  .values(created_at=utcnow() - timedelta(days=40)))
    conv.end_conversation(store, c.id, ann.id, 4, "", None)
    with store.read() as s:
        assert s.scalar(select(Judgement.time_spent_ms)) == MAX_TIME_MS


# -- F16 ----------------------------------------------------------------------------------------------------------
def test_ratings_of_different_conversations_are_no_disagreement(store, make_client):
    p = _project(store, overlap_k=2, prompts=("hello",))
    store.add_labeler("boss", PASSWORD, role="admin")
    for name, rating in (("ann", 1), ("bob", 7)):
        lab = store.add_labeler(name, PASSWORD)
        c = _chosen_conversation(store, p, lab)
        conv.end_conversation(store, c.id, lab.id, rating, "", None)
    assert review.review_queue(store.current_judgements(p.id), "conversation", {}, "attention") == []
    r = make_client("boss").get(f"/admin/p/{p.id}/review", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/admin/p/{p.id}/conversations"


# -- F8 (a real browser) ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="chromium is not installed")
def test_a_refused_message_stays_in_the_box(server, browser):
    import json
    import uuid

    from fb_helpers import login
    from playwright.sync_api import expect

    store, base = server
    name, user = f"cvb{uuid.uuid4().hex[:6]}", f"u{uuid.uuid4().hex[:6]}"
    store.create_project(name, "conversation", overlap_k=1, settings={"models": ["m"]})
    store.import_records(name, [{"prompt": "hello"}])
    lab = store.add_labeler(user, PASSWORD)
    p = store.get_project(name)
    c = _chosen_conversation(store, p, lab)
    ctx, page = login(browser, base, user)
    try:
        reply = {}

        def fake(route):
            # 409: another tab sent its message first (its turn is pending); 201: this one's turn
            state = conv.conversation_state(store, c.id, lab.id)
            user = "typed" if reply["status"] == 201 else "the other tab's message"
            state["turns"].append({**state["turns"][0], "idx": 1, "status": "pending", "user": user,
                                   "candidates": None, "choice": None, "chosen_side": None})
            state["can_send"] = False
            body = state if reply["status"] == 201 else {"error": "this conversation changed in another tab",
                                                         "state": state}
            route.fulfill(status=reply["status"], content_type="application/json", body=json.dumps(body))

        page.route("**/messages", fake)
        page.goto(f"{base}/p/{p.url_key}/converse")
        page.wait_for_selector("#compose:not([hidden])")
        reply["status"] = 409
        page.fill("#message", "typed")
        page.press("#message", "Enter")
        expect(page.locator("body")).to_contain_text("another tab")
        assert page.input_value("#message") == "typed"
        reply["status"] = 201  # the page again (the real state: can send), the message sent this time
        page.goto(f"{base}/p/{p.url_key}/converse")
        page.wait_for_selector("#compose:not([hidden])")
        page.fill("#message", "typed")
        page.press("#message", "Enter")
        expect(page.locator("#message")).to_have_value("")
    finally:
        ctx.close()
