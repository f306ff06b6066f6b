"""Fixes of the issue-16 review (review16.md): no 500 for lone surrogates (F15), deeply nested JSON and huge numbers
(F6), a non-ASCII CSRF token (F14), a busy database during the gate's session write (F5); no `shown_order` for
labelers (F3); password length without surrounding spaces (F9); undo that names what it undoes (F12); no edits by
a labeler removed from a members-only project (F7)."""
from __future__ import annotations

import json
import sqlite3
import time

import pytest
from fb_helpers import PASSWORD, SECRET, api_login, csrf_of, field_of, label_page
from sqlalchemy import select

from alignloop.feedback.models import Assignment, Judgement, Labeler, Project
from alignloop.feedback.security import password_problem, tokens_equal
from alignloop.feedback.store import Store

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000


@pytest.fixture
def thumbs(store):
    store.create_project("pp", "thumbs", overlap_k=1)
    store.import_records("pp", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)])
    store.add_labeler("ann", PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    return store


def _api(make_client, user="ann"):
    c, headers = api_login(make_client, user)
    return c, {**headers, "content-type": "application/json"}


def _judgements(store):
    with store.read() as s:
        return [(j.assignment_id, j.version, j.thumbs, j.comment) for j in s.scalars(select(Judgement)
                                                                                      .order_by(Judgement.id))]


def _statuses(store):
    with store.read() as s:
        return {a.id: a.status for a in s.scalars(select(Assignment))}


# -- F15: lone surrogates -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_next", [False, True])  # ORM path / group commit (the SQLite hot path)
def test_comment_with_a_lone_surrogate_is_422_naming_it(thumbs, make_client, with_next):
    c, h = _api(make_client)
    aid = c.post("/api/p/pp/next", headers=h).json()["assignment_id"]
    body = '{"thumbs": "up", "idempotency_key": "k-00000001", "comment": "x\\ud800y"}'
    r = c.post(f"/api/assignments/{aid}/judgement" + ("?next=1" if with_next else ""), content=body, headers=h)
    assert r.status_code == 422 and "comment" in r.json()["fields"], r.text
    assert _judgements(thumbs) == []
    # the store refuses it too (a caller other than the web app)
    from alignloop.feedback.errors import ValidationError
    with thumbs.read() as s:
        ann = s.scalar(select(Labeler.id).where(Labeler.username == "ann"))
    with pytest.raises(ValidationError) as e:
        thumbs.submit(aid, ann, {"thumbs": "up", "comment": "x\ud800"}, "k-00000002")
    assert "comment" in e.value.errors
    assert _judgements(thumbs) == []


@pytest.mark.parametrize("field", ["username", "password"])
def test_api_login_with_a_lone_surrogate_is_not_a_500(thumbs, make_client, field):
    c = make_client()
    body = {"username": "ann", "password": PASSWORD}
    text = json.dumps(body).replace(f'"{body[field]}"', f'"{body[field]}\\ud800"')
    r = c.post("/api/login", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422 and field in r.json()["fields"], r.text


def test_other_json_text_fields_with_a_lone_surrogate_are_422(thumbs, make_client):
    c, h = _api(make_client)
    aid = c.post("/api/p/pp/next", headers=h).json()["assignment_id"]
    r = c.post(f"/api/assignments/{aid}/judgement", headers=h,
               content='{"thumbs": "up", "idempotency_key": "k-\\udc00-00000001"}')
    assert r.status_code == 422 and "idempotency_key" in r.json()["fields"], r.text
    r = c.post(f"/api/assignments/{aid}/judgement", headers=h,
               content='{"thumbs": "up", "idempotency_key": "k-00000001", "flags": ["a\\ud800"]}')
    assert r.status_code == 422 and "flags[0]" in r.json()["fields"], r.text
    r = c.post(f"/api/assignments/{aid}/judgement", headers=h,
               content='{"thumbs": "up", "idempotency_key": "k-00000001", "x\\ud800": 1}')
    assert r.status_code == 422, r.text
    assert _judgements(thumbs) == []
    # the login form: the form parser turns bytes that are not UTF-8 into U+FFFD (no surrogates): a plain 401
    c2 = make_client()
    tok = csrf_of(c2.get("/login").text)
    r = c2.post("/login", content=f"username=ann%ED%A0%80&password=x%ED%A0%80yyyyyyy&csrf_token={tok}&next=/",
                headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 401, r.text
    # the admin's "more settings" box
    admin = make_client("boss")
    tok = csrf_of(admin.get("/admin/projects/new").text)
    r = admin.post("/admin/projects", data={"csrf_token": tok, "name": "qq", "task_type": "thumbs",
                                            "overlap_k": "1", "min_labels": "1", "assignment_timeout_s": "7200",
                                            "access": "all", "more_settings": '{"x": "a\\ud800"}'})
    assert r.status_code == 422 and "more settings" in r.text, r.text[:300]
    with thumbs.read() as s:
        assert s.scalar(select(Project).where(Project.name == "qq")) is None


def _poison_item(store):
    """Give every stored prompt a lone surrogate, as an import before the import refused them could store it (the
    JSON column keeps the "\\ud800" escape)."""
    conn = sqlite3.connect(store.engine.url.database)
    for pid, messages in conn.execute("SELECT id, messages FROM prompts").fetchall():
        m = json.loads(messages)
        m[-1]["content"] = "bad \ud800 text"
        conn.execute("UPDATE prompts SET messages = ? WHERE id = ?", (json.dumps(m), pid))
    conn.commit()
    conn.close()


def test_an_item_holding_a_lone_surrogate_still_renders(thumbs, make_client):
    _poison_item(thumbs)
    c = make_client("ann")
    r = label_page(c, "pp")
    assert r.status_code == 200 and "bad \ufffd text" in r.text, r.text[:300]
    assert c.get("/p/pp/label").status_code == 200
    c2, h = _api(make_client)
    r = c2.get("/api/p/pp/next")
    assert r.status_code == 200 and "bad \ufffd text" in r.text
    r = c2.post("/api/p/pp/next", headers=h)
    assert r.status_code == 200
    aid = r.json()["assignment_id"]
    r = c2.post(f"/api/assignments/{aid}/judgement?next=1", headers=h,
                content='{"thumbs": "up", "idempotency_key": "k-00000001"}')
    assert r.status_code == 201 and "\ufffd" in r.text, r.text


# -- F6: deep nesting, huge numbers -------------------------------------------------------------------------------
def test_deep_json_and_huge_numbers_are_4xx_not_500(thumbs, make_client):
    anon = make_client()
    for body in (DEEP, '{"username": ' + DEEP + "}", '{"username": "ann", "password": ' + HUGE + "}"):
        r = anon.post("/api/login", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "error" in r.json(), r.text[:200]
    c, h = _api(make_client)
    aid = c.post("/api/p/pp/next", headers=h).json()["assignment_id"]
    for q in ("", "?next=1"):
        for body in ('{"thumbs": "up", "idempotency_key": "k-00000001", "x": ' + DEEP + "}",
                     '{"thumbs": "up", "idempotency_key": "k-00000001", "x": ' + HUGE + "}"):
            r = c.post(f"/api/assignments/{aid}/judgement{q}", content=body, headers=h)
            assert r.status_code == 422, r.text[:200]
        r = c.post(f"/api/assignments/{aid}/judgement{q}", content="{bad", headers=h)
        assert r.status_code == 400
    assert _judgements(thumbs) == []
    admin = make_client("boss")
    tok = csrf_of(admin.get("/admin/projects/new").text)
    for more, says in ((DEEP[:4000], "nested too deeply"), ('{"n": ' + HUGE + "}", "too many digits")):
        r = admin.post("/admin/projects", data={"csrf_token": tok, "name": "qq", "task_type": "thumbs",
                                                "overlap_k": "1", "min_labels": "1", "assignment_timeout_s": "7200",
                                                "access": "all", "more_settings": more})
        assert r.status_code == 422 and says in r.text, r.text[:300]
    with thumbs.read() as s:
        assert s.scalar(select(Project).where(Project.name == "qq")) is None


# -- F14: a non-ASCII CSRF token ----------------------------------------------------------------------------------
def test_non_ascii_csrf_token_is_403(thumbs, make_client):
    assert tokens_equal("é", "abc") is False and tokens_equal("\ud800", "\ud800") is True
    c = make_client()
    c.get("/login")
    r = c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": "é", "next": "/"})
    assert r.status_code == 403
    c2, _h = _api(make_client)
    r = c2.post("/api/p/pp/next", headers={"X-CSRF-Token": b"\xe9\xe9"})
    assert r.status_code == 403
    assert _statuses(thumbs) == {}


# -- F5: the gate's session write on a busy database --------------------------------------------------------------
@pytest.mark.parametrize("holder", ["other_connection", "in_process"])
def test_session_touch_on_a_locked_database_does_not_fail_the_request(tmp_path, holder):
    import threading

    from fastapi.testclient import TestClient

    from alignloop.feedback.app import create_app
    st = Store(str(tmp_path / "fb.db"), lock_timeout_s=0.2)
    try:
        st.create_project("pp", "thumbs", overlap_k=1)
        st.add_labeler("ann", PASSWORD)
        now = [time.time()]
        c = TestClient(create_app(st, secret_key=SECRET, clock=lambda: now[0]), raise_server_exceptions=False)
        assert c.post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 200
        release, held = threading.Event(), threading.Event()
        if holder == "other_connection":  # another process's writer holds SQLite's write lock
            other = sqlite3.connect(str(tmp_path / "fb.db"), timeout=0.05, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
        else:  # a long writer of this process (an import batch) holds the store's lock

            def hold():
                with st.write():
                    held.set()
                    release.wait(10)
            threading.Thread(target=hold, daemon=True).start()
            held.wait(5)
        try:
            now[0] += 61  # the once-a-minute last_seen_at write is due
            time.sleep(1.1)  # past the session cache's TTL: the gate reads and wants to write
            r = c.get("/")
            assert r.status_code == 200, r.text[:200]
            r = c.get("/api/p/pp/next")
            assert r.status_code in (405, 200), r.text[:200]  # the route ran (no open assignment: 405)
        finally:
            if holder == "other_connection":
                other.execute("ROLLBACK")
                other.close()
            release.set()
            time.sleep(0.05)
        now[0] += 6  # past TOUCH_RETRY_S
        time.sleep(1.1)
        assert c.get("/").status_code == 200  # the touch is stored at a later request
        with st.read() as s:
            from alignloop.feedback.models import WebSession
            last = s.scalar(select(WebSession.last_seen_at))
        assert last is not None and abs(last.timestamp() - now[0]) < 5
    finally:
        st.dispose()


# -- F3: no shown_order for labelers -----------------------------------------------------------------------------
def test_api_payload_has_no_shown_order(thumbs, make_client):
    c, h = _api(make_client)
    nxt = c.post("/api/p/pp/next", headers=h).json()
    assert "shown_order" not in nxt and nxt["assignment_id"]
    assert "shown_order" not in c.get("/api/p/pp/next").json()
    r = c.post(f"/api/assignments/{nxt['assignment_id']}/judgement?next=1", headers=h,
               content='{"thumbs": "up", "idempotency_key": "k-00000001"}')
    assert r.status_code == 201 and "shown_order" not in r.json()["next"]
    r = c.post("/api/p/pp/undo", headers=h)
    assert r.status_code == 200 and "shown_order" not in r.json()


# -- F9: the password's length --------------------------------------------------------------------------------------
def test_password_length_does_not_count_surrounding_spaces():
    assert "at least 8" in password_problem("a" + " " * 7, "bob")
    assert "at least 8" in password_problem("xxxxxxx ", "bob")
    assert "at least 8" in password_problem("  abcdefg  ", "bob")
    assert password_problem("  kq7vbxzp  ", "bob") is None
    assert "only spaces" in password_problem(" " * 8, "bob")
    assert password_problem("abc\ud800defgh", "bob") is not None


# -- F12: undo names what it undoes -------------------------------------------------------------------------------
def test_repeated_undo_via_the_api_changes_nothing(thumbs, make_client):
    c, h = _api(make_client)
    a1 = c.post("/api/p/pp/next", headers=h).json()["assignment_id"]
    assert c.post(f"/api/assignments/{a1}/judgement", headers=h,
                  content='{"thumbs": "up", "idempotency_key": "k-00000001"}').status_code == 201
    a2 = c.post("/api/p/pp/next", headers=h).json()["assignment_id"]
    assert c.post(f"/api/assignments/{a2}/skip", headers=h).status_code == 200
    r = c.post("/api/p/pp/undo", headers=h, json={"assignment_id": a2})
    assert r.status_code == 200 and r.json()["undone"] == "skip"
    before = _statuses(thumbs)
    assert before[a1] == "done" and before[a2] == "assigned"
    r = c.post("/api/p/pp/undo", headers=h, json={"assignment_id": a2})  # the retry / double click
    assert r.status_code == 409 and "already undone" in r.json()["error"]
    assert _statuses(thumbs) == before  # the judgement of a1 was not reopened
    r = c.post("/api/p/pp/undo", headers=h, json={"assignment_id": "x"})
    assert r.status_code == 422
    r = c.post("/api/p/pp/undo", headers=h)  # without a token: as before (undoes the last action)
    assert r.status_code == 200 and r.json()["undone"] == "judgement"


def test_repeated_undo_via_the_page_changes_nothing(thumbs, make_client):
    c = make_client("ann")
    page = label_page(c, "pp")
    tok = csrf_of(page.text)
    # judge the first item, skip the second (form posts, as the page does)
    a1 = int(page.text.split('action="/p/pp/label/')[1].split('"')[0])
    r = c.post(f"/p/pp/label/{a1}", data={"csrf_token": tok, "thumbs": "up",
                                          "idempotency_key": field_of(page.text, "idempotency_key")})
    assert r.status_code == 200
    a2 = int(r.text.split('action="/p/pp/label/')[1].split('"')[0])
    r = c.post(f"/p/pp/skip/{a2}", data={"csrf_token": tok})
    assert r.status_code == 200 and f'name="undo_of" value="{a2}"' in r.text
    undo = {"csrf_token": tok, "undo_of": str(a2)}
    assert c.post("/p/pp/undo", data=undo).status_code == 200
    after_first = _statuses(thumbs)
    assert after_first[a2] == "assigned" and after_first[a1] == "done"
    r = c.post("/p/pp/undo", data=undo)  # the second click of the same button
    assert r.status_code == 200
    assert _statuses(thumbs) == after_first
    assert f'name="undo_of" value="{a1}"' in r.text  # the page's button now undoes the judgement


# -- F7: a removed member edits nothing ----------------------------------------------------------------------------
def test_removed_member_cannot_edit_old_judgements(thumbs, make_client):
    p = thumbs.get_project("pp")
    thumbs.update_project(p.id, settings={**p.settings, "access": "members"})
    with thumbs.read() as s:
        ann = s.scalar(select(Labeler.id).where(Labeler.username == "ann"))
    thumbs.set_project_members(p.id, [ann])
    c, h = _api(make_client)
    a1 = c.post("/api/p/pp/next", headers=h).json()["assignment_id"]
    assert c.post(f"/api/assignments/{a1}/judgement", headers=h,
                  content='{"thumbs": "up", "idempotency_key": "k-00000001"}').status_code == 201
    a2 = c.post("/api/p/pp/next", headers=h).json()["assignment_id"]
    thumbs.set_project_members(p.id, [])
    r = c.post(f"/api/assignments/{a1}/judgement", headers=h,
               content='{"thumbs": "down", "idempotency_key": "k-00000002"}')
    assert r.status_code == 404, r.text
    assert _judgements(thumbs) == [(a1, 1, 1, "")]
    # the open item is still taken (README: "finishes the open item")
    r = c.post(f"/api/assignments/{a2}/judgement", headers=h,
               content='{"thumbs": "down", "idempotency_key": "k-00000003"}')
    assert r.status_code == 201
    assert c.get("/api/p/pp/next").status_code == 404


def test_a_second_concurrent_undo_of_one_skip_takes_no_second_slot(tmp_path):
    """F16: two undos of the same skip that both read it as "skipped" (PostgreSQL runs writers side by side; here
    the second one's read is replayed after the first committed): only the first takes a slot. Before the fix the
    second also ran `n_active + 1`, so the item counted one open assignment twice and missed a label for good."""
    from alignloop.feedback.assignment import UndoneAlready, _unskip

    store = Store(str(tmp_path / "u.db"))
    try:
        store.create_project("pp", "pairwise", overlap_k=2)
        store.import_records("pp", [{"prompt": "p", "completions": ["a", "b"]}])
        ann = store.add_labeler("ann", PASSWORD)
        a = store.next_assignment(1, ann.id)
        store.skip(a.id, ann.id)
        with store.read() as s:
            stale = s.get(Assignment, a.id)  # what the second request read: still "skipped"
            assert stale.status == "skipped"
        assert store.undo(1, ann.id, expected=a.id)[0] == "skip"
        with pytest.raises(UndoneAlready), store.write() as s:
            _unskip(s, stale)
        with store.read() as s:
            from alignloop.feedback.models import Item

            item = s.get(Item, a.item_id)
            assert (item.n_active, s.get(Assignment, a.id).status) == (1, "assigned")
    finally:
        store.dispose()


def test_a_cache_read_that_began_before_an_admins_change_is_not_kept():
    """F11: an answer read before a clear / forget (the admin's change committed meanwhile) is used once, never
    cached for the TTL; one read after it is."""
    from alignloop.feedback.access import AccessCache
    from alignloop.feedback.projects import ProjectInfo, ProjectInfoCache

    c = AccessCache()
    before = time.monotonic()
    c.clear()
    assert c.put(1, 2, True, before) is True and c.get(1, 2) is None
    assert c.put(1, 2, False, time.monotonic()) is False and c.get(1, 2) is False

    info = ProjectInfo.of("pairwise", 2, 0.0, {})
    pc = ProjectInfoCache()
    before = time.monotonic()
    pc.forget(7)
    assert pc.put(7, info, before) is info and pc.get(7) is None
    pc.put(8, info, before)  # another project's forget does not matter
    assert pc.get(8) is info
    pc.put(7, info, time.monotonic())
    assert pc.get(7) is info


def test_a_sign_out_during_a_session_read_is_not_undone_by_it(tmp_path):
    """F11: a refresh that read the session row before the sign-out's DELETE must not cache it afterwards."""
    from alignloop.feedback.sessions import MISS, SessionManager

    store = Store(str(tmp_path / "s.db"))
    try:
        lab = store.add_labeler("ann", PASSWORD)
        m = SessionManager(store, cache_ttl_s=60)
        tok = m.start(lab)
        real = store.load_session

        def load_then_sign_out(sid):
            found = real(sid)  # the row as it was
            m.end(tok)         # the sign-out lands while this read is in flight
            return found

        store.load_session = load_then_sign_out
        assert m.refresh(tok) is None
        store.load_session = real
        assert m.cached(tok) is MISS and m.refresh(tok) is None
    finally:
        store.dispose()
