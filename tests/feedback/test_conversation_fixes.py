"""An ended conversation stays ended: undo (page and API) and edit are refused with a clear 409, "My judgements"
offers no Edit link for it, and the generic judgement routes (submit, skip) refuse a conversation's assignment
instead of storing a judgement without turns or failing with a 500."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, SECRET, api_login, csrf_of

from alignloop.feedback import conversations as conv
from alignloop.feedback.app import create_app
from alignloop.feedback.models import Assignment, Judgement


@pytest.fixture
def ended(store):
    """A conversation project with one conversation of ann's, ended with rating 5: (project, labeler, conversation)."""
    store.create_project("cv", "conversation", overlap_k=1, settings={"models": ["m"]})
    store.import_records("cv", [{"prompt": "hello"}, {"prompt": "again"}])
    lab = store.add_labeler("ann", PASSWORD)
    p = store.get_project("cv")
    c, turn = conv.take_conversation(store, p.id, lab.id)
    assert conv.turn_generated(store, turn.id, [{"text": "one"}, {"text": "two"}], 3)
    st = conv.conversation_state(store, c.id, lab.id)
    conv.choose(store, c.id, lab.id, 0, 3, st["revision"])
    st = conv.conversation_state(store, c.id, lab.id)
    conv.end_conversation(store, c.id, lab.id, 5, "fine", st["revision"])
    return p, lab, c


def _judgement_rows(store):
    with store.read() as s:
        return [(j.assignment_id, j.version, j.likert) for j in s.query(Judgement)]


def test_undo_and_edit_of_an_ended_conversation_are_refused(store, ended, make_client):
    _p, lab, c = ended
    before = _judgement_rows(store)
    assert before == [(c.assignment_id, 1, 5)]
    web = make_client("ann")
    page = web.get("/p/cv/history").text
    assert "/edit/" not in page and "5/7" in page and 'href="/p/cv/converse"' in page
    r = web.post("/p/cv/undo", data={"csrf_token": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 409 and "conversation cannot be undone" in r.text
    r = web.get(f"/p/cv/edit/{c.assignment_id}")
    assert r.status_code == 409 and "cannot be edited" in r.text
    app = create_app(store, secret_key=SECRET)
    api, h = api_login(lambda: TestClient(app), "ann")
    r = api.post("/api/p/cv/undo", headers=h)
    assert r.status_code == 409 and "conversation cannot be undone" in r.text
    with store.read() as s:
        assert s.get(Assignment, c.assignment_id).status == "done"
    assert _judgement_rows(store) == before
    assert conv.conversation_state(store, c.id, lab.id)["status"] == "ended"


def test_generic_submit_and_skip_refuse_a_conversation_assignment(store, ended):
    p, lab, _c = ended
    other, _turn = conv.take_conversation(store, p.id, lab.id)  # the second opening, still open
    app = create_app(store, secret_key=SECRET)
    api, h = api_login(lambda: TestClient(app), "ann")
    before = _judgement_rows(store)
    r = api.post(f"/api/assignments/{other.assignment_id}/submit", json={"likert": 4, "idempotency_key": "k" * 12},
                 headers=h)
    assert 400 <= r.status_code < 500, r.text
    assert _judgement_rows(store) == before
    with store.read() as s:
        assert s.get(Assignment, other.assignment_id).status == "assigned"


@pytest.mark.parametrize("hot", [False, True])
def test_time_spent_is_capped_for_an_item_open_for_weeks(store, hot):
    """An item opened 30 days ago: (now - assigned) = 2.59e9 ms > 2**31 - 1, the 32-bit column of PostgreSQL;
    both submit paths store MAX_TIME_MS instead of a value the column cannot hold."""
    from datetime import timedelta

    from alignloop.feedback.validation import MAX_TIME_MS

    store.create_project("pw", "pairwise", overlap_k=1)
    store.import_records("pw", [{"prompt": "p", "completions": ["a", "b"]}])
    lab = store.add_labeler("ann", PASSWORD)
    a = store.next_assignment(store.get_project("pw").id, lab.id)
    with store.write() as s:
        row = s.get(Assignment, a.id)
        row.created_at = row.created_at - timedelta(days=30)
    fields = {"choice": "left", "strength": "better"}
    if hot:
        (res,) = store.submit_and_next_batch([(a.id, lab.id, fields, "key-weeks-hot")])
        assert not isinstance(res, Exception), res
    else:
        store.submit(a.id, lab.id, fields, "key-weeks-orm")
    with store.read() as s:
        assert s.query(Judgement).one().time_spent_ms == MAX_TIME_MS


def test_a_failed_turns_error_names_no_model_to_the_labeler(store):
    """The backend's error names the model ("could not load model '/models/secret-7b'"): the store keeps it for
    admins, the labeler's state says "the model" instead (blind: an error must not tell which side is which)."""
    store.create_project("cv", "conversation", overlap_k=1, settings={"models": ["/models/secret-7b", "other-3b"]})
    store.import_records("cv", [{"prompt": "hello"}])
    lab = store.add_labeler("ann", PASSWORD)
    c, turn = conv.take_conversation(store, store.get_project("cv").id, lab.id)
    error = "could not load model '/models/secret-7b': no such folder; other-3b was fine"
    assert conv.turn_failed(store, turn.id, error)
    shown = conv.conversation_state(store, c.id, lab.id)["turns"][0]["error"]
    assert "secret-7b" not in shown and "other-3b" not in shown and "the model" in shown
    assert conv.get_turn(store, c.id, lab.id, 0).error == error
