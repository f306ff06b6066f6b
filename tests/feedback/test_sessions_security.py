"""Sessions and sign-in security: server-side sessions (sign-out, deactivation, password change, idle and absolute
timeouts, the in-process cache), the request body limit and sign-in before the body, password rules, the sign-in
throttle per username and per address (bounded memory), and the SQLite file's mode."""
import asyncio
import json
import logging
import os
import stat
import time

import pytest
from fb_helpers import PASSWORD, SECRET, csrf_of
from sqlalchemy import event, select

from alignloop.errors import UserError
from alignloop.feedback.models import WebSession
from alignloop.feedback.security import password_problem
from alignloop.feedback.sessions import to_datetime
from alignloop.feedback.store import Store
from alignloop.feedback.web.auth import FailureLog, LoginThrottle


class Clock:
    def __init__(self):
        self.t = 1_800_000_000.0

    def __call__(self):
        return self.t


@pytest.fixture
def app_with(store):
    from alignloop.feedback.app import create_app

    def make(**kw):
        return create_app(store, secret_key=SECRET, **kw)

    return make


def client(app, username=None, password=PASSWORD):
    from fastapi.testclient import TestClient

    c = TestClient(app)
    if username:
        r = c.post("/api/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return c


def signed_in(c) -> bool:
    """Whether the client's session still works, on the JSON API and on a page."""
    api = c.get("/api/p/none/next").status_code  # 404 (no such project) when signed in, 401 when not
    page = c.get("/", follow_redirects=False).status_code
    assert (api == 401) == (page == 303), (api, page)
    return api != 401


def copy_of(c, app):
    from fastapi.testclient import TestClient

    return TestClient(app, cookies=dict(c.cookies))


def session_rows(store, labeler_id=None):
    with store.read() as s:
        q = select(WebSession)
        if labeler_id is not None:
            q = q.where(WebSession.labeler_id == labeler_id)
        return list(s.scalars(q))


# -- server-side sessions -----------------------------------------------------------------------------------------
def test_a_copied_cookie_is_dead_after_sign_out(store, app_with):
    ann = store.add_labeler("ann", PASSWORD)
    app = app_with()
    c = client(app, "ann")
    stolen = copy_of(c, app)
    assert signed_in(stolen) and len(session_rows(store, ann.id)) == 1
    page = c.get("/")
    r = c.post("/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert session_rows(store, ann.id) == []  # the row is gone ...
    assert not signed_in(stolen) and not signed_in(c)  # ... so the copy no longer works (the API says 401)
    r = stolen.post("/api/assignments/1/judgement", json={"choice": "left"})
    assert r.status_code == 401


def test_sign_in_again_ends_the_clients_previous_session(store, app_with):
    store.add_labeler("ann", PASSWORD)
    app = app_with()
    c = client(app, "ann")
    before = copy_of(c, app)
    r = c.post("/api/login", json={"username": "ann", "password": PASSWORD})
    assert r.status_code == 200
    assert signed_in(c) and not signed_in(before)
    assert len(session_rows(store)) == 1


def test_deactivation_and_password_change_end_every_session(store, app_with):
    ann = store.add_labeler("ann", PASSWORD)
    bob = store.add_labeler("bob", PASSWORD)
    app = app_with()
    phone, laptop, other = client(app, "ann"), client(app, "ann"), client(app, "bob")
    assert signed_in(phone) and signed_in(laptop)  # both cached now
    store.set_active("ann", False)
    assert not signed_in(phone) and not signed_in(laptop)  # at once (in-process), not after a cache's TTL
    assert signed_in(other)  # bob is untouched
    assert session_rows(store, ann.id) == []
    assert client(app).post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 401
    store.set_active("ann", True)
    assert not signed_in(phone)  # reactivation does not bring the old sessions back

    c = client(app, "bob")
    assert signed_in(c)
    new_password = "a brand new phrase"
    store.set_password(bob.id, new_password)
    assert not signed_in(c) and not signed_in(other) and session_rows(store, bob.id) == []
    assert store.authenticate("bob", PASSWORD) is None and store.authenticate("bob", new_password).id == bob.id
    assert store.revoke_sessions(bob.id) == 0


def test_set_password_checks_the_rules_and_set_active_finds_by_name_or_id(store):
    ann = store.add_labeler("annabelle", PASSWORD)
    with pytest.raises(UserError, match="at least 8"):
        store.set_password("annabelle", "short")
    with pytest.raises(UserError, match="username"):
        store.set_password(ann.id, " AnnaBelle ")
    with pytest.raises(UserError, match="too common"):
        store.set_password(ann.id, "qwerty123")
    assert store.authenticate("annabelle", PASSWORD) is not None  # unchanged after the refusals
    assert store.set_active(ann.id, False).active is False
    assert store.authenticate("annabelle", PASSWORD) is None
    assert store.set_active("annabelle", True).active is True
    judge = store.add_ai_labeler("judge-1", "some/model")
    with pytest.raises(UserError, match="AI labeler"):
        store.set_password(judge.id, PASSWORD)


def test_idle_and_absolute_timeouts(store, app_with):
    store.add_labeler("ann", PASSWORD)
    clock = Clock()
    app = app_with(clock=clock, session_idle_timeout=3600, session_max_age=10 * 3600)
    app.state.web.sessions.cache_ttl_s = 3600.0  # even a cached session is checked against the clock
    c = client(app, "ann")
    assert signed_in(c)
    clock.t += 3000
    assert signed_in(c)  # used within the idle timeout: it goes on
    clock.t += 3601
    assert not signed_in(c)  # idle for more than an hour
    assert session_rows(store) == []

    c = client(app, "ann")
    start = clock.t
    while clock.t - start < 9.5 * 3600:  # active every 50 minutes: never idle
        clock.t += 3000
        assert signed_in(c), (clock.t - start) / 3600
    clock.t = start + 10 * 3600 + 1
    assert not signed_in(c)  # 10 h after sign-in however active


def test_idle_timeout_reads_last_seen_across_processes(store, app_with, tmp_path):
    """Another process (another Store and app on the same file) sees the session's last use within a minute."""
    store.add_labeler("ann", PASSWORD)
    clock = Clock()
    app = app_with(clock=clock, session_idle_timeout=3600)
    c = client(app, "ann")
    clock.t += 2000
    assert signed_in(c)  # writes last_seen_at (more than a minute since it was written)
    other_store = Store(store.url)
    try:
        from alignloop.feedback.app import create_app

        other = create_app(other_store, secret_key=SECRET, clock=clock, session_idle_timeout=3600)
        clock.t += 2000  # 4000 s after sign-in, 2000 s after the last request
        assert signed_in(copy_of(c, other))
    finally:
        other_store.dispose()


def test_the_session_check_reads_the_database_at_most_once_per_ttl_and_writes_last_seen_once_a_minute(store,
                                                                                                      app_with):
    store.create_project("pw", "pairwise", overlap_k=1)
    store.import_records("pw", [{"prompt": "p", "completions": ["a", "b"]}])
    store.add_labeler("ann", PASSWORD)
    clock = Clock()
    app = app_with(clock=clock)
    app.state.web.sessions.cache_ttl_s = 3600.0
    c = client(app, "ann")
    assert signed_in(c)
    statements = []

    def record(conn, cursor, sql, params, context, executemany):
        statements.append(sql)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        for _ in range(20):
            clock.t += 2
            assert c.get("/api/p/pw/next").status_code in (200, 405)
        reads = [q for q in statements if "sessions" in q]
        assert reads == []  # 20 signed-in requests, no session query
        clock.t += 61
        assert signed_in(c)
        writes = [q for q in statements if "UPDATE sessions" in q]
        assert len(writes) == 1  # last_seen_at: written once the minute has passed
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    (row,) = session_rows(store)
    assert row.last_seen_at == to_datetime(clock.t)


def test_the_session_cache_is_bounded_and_keeps_the_newest(store):
    from alignloop.feedback.sessions import MISS, SessionManager

    labs = [store.add_labeler(f"u{i}", PASSWORD) for i in range(3)]
    m = SessionManager(store, cache_max=2, cache_ttl_s=3600)
    tokens = [m.start(lab) for lab in labs]
    assert [m.refresh(t).id for t in tokens] == [lab.id for lab in labs]
    assert m.cached(tokens[0]) is MISS  # evicted (the oldest), still valid: read again
    assert [m.cached(t).id for t in tokens[1:]] == [labs[1].id, labs[2].id]
    assert m.refresh(tokens[0]).id == labs[0].id


def test_one_query_renews_every_cached_session_and_drops_ended_ones(store, app_with):
    """The validator (`SessionManager.validate_all`, every half TTL while the server runs): one SELECT renews all
    copies whose rows exist, so requests keep answering from memory past the TTL without a per-session read; a row
    deleted elsewhere (another process's sign-out) drops its copy, and the next request reads (MISS)."""
    from alignloop.feedback.sessions import MISS, SessionManager, token_id

    labs = [store.add_labeler(f"u{i}", PASSWORD) for i in range(5)]
    m = SessionManager(store, cache_ttl_s=1.0)
    tokens = [m.start(lab) for lab in labs]
    for t in tokens:
        m.refresh(t)
    for t in tokens:
        m._entries[token_id(t)].loaded -= 0.9  # near the end of the TTL
    statements = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        store.end_session(token_id(tokens[0]))  # signed out by another process: only the row goes
        statements.clear()
        assert m.validate_all() == 4
        assert len([q for q in statements if "sessions" in q]) == 1  # one query for all five
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    for e in m._entries.values():
        e.loaded -= 0.5  # 1.4 s after the first read: alive only because the validator renewed them
    assert m.lookup(tokens[0]) == (MISS, True)
    assert [m.lookup(t)[0].id for t in tokens[1:]] == [lab.id for lab in labs[1:]]
    assert all(m.lookup(t)[1] is False for t in tokens[1:])  # nothing due: no background work either

    # a revocation in this process during the validator's read still wins (the renewal time is taken before it)
    store.set_active(labs[1].username, False)
    m.validate_all()
    assert m.lookup(tokens[1]) == (MISS, True)


def test_the_server_runs_the_validator_and_stops_it(store, app_with):
    from fastapi.testclient import TestClient

    store.add_labeler("ann", PASSWORD)
    app = app_with()
    m = app.state.web.sessions
    with TestClient(app):
        assert m._validator is not None and m._validator.is_alive()
        thread = m._validator
    assert m._validator is None and not thread.is_alive()


def test_another_process_sees_a_sign_out_within_two_seconds(store, app_with):
    store.add_labeler("ann", PASSWORD)
    app = app_with()
    c = client(app, "ann")
    other_store = Store(store.url)  # another process: its own store, caches and revocation record
    try:
        from alignloop.feedback.app import create_app

        other = create_app(other_store, secret_key=SECRET)
        copy = copy_of(c, other)
        assert signed_in(copy)  # cached there now
        c.post("/logout", data={"csrf_token": csrf_of(c.get("/").text)})
        time.sleep(1.1)  # the other process's cache holds a session for at most 1 s
        assert not signed_in(copy)
    finally:
        other_store.dispose()


# -- body limit, and sign-in before the body is read ---------------------------------------------------------------
def test_body_over_the_limit_gets_413_by_content_length_and_when_chunked(store, app_with):
    store.add_labeler("ann", PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    app = app_with(max_body_bytes=10_000, max_import_bytes=50_000)
    c = client(app, "ann")
    big = json.dumps({"comment": "x" * 20_000})
    r = c.post("/api/assignments/1/judgement", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]

    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    r = c.post("/api/assignments/1/judgement", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = c.post("/p/x/label/1", content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    small = json.dumps({"choice": "left"})
    assert c.post("/api/assignments/1/judgement", content=small).status_code not in (401, 413)
    # the import upload has its own, larger limit
    admin = client(app, "boss")
    r = admin.post("/admin/p/1/import", content=b"x" * 20_000, headers={"content-type": "text/plain"})
    assert r.status_code != 413
    r = admin.post("/admin/p/1/import", content=b"x" * 60_000, headers={"content-type": "text/plain"})
    assert r.status_code == 413


def test_unauthenticated_requests_are_refused_before_their_body_is_read(store, app_with):
    app = app_with()
    body = b'{"choice": "left", "comment": "' + b"x" * 500_000 + b'"}'

    async def call(method, path, content_type="application/json"):
        read = []
        sent = []

        async def receive():
            read.append(1)
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"testserver"), (b"content-type", content_type.encode()),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "state": {}}
        await app(scope, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"]), read

    for path in ("/api/assignments/1/judgement", "/api/assignments/1/skip", "/api/p/pw/next"):
        status, _headers, read = asyncio.run(call("POST", path))
        assert status == 401 and read == [], path
    for path in ("/p/pw/label/1", "/logout", "/admin/labelers", "/admin/p/1/import"):
        status, headers, read = asyncio.run(call("POST", path, "application/x-www-form-urlencoded"))
        assert status == 303 and headers[b"location"].startswith(b"/login?next=") and read == [], path
    status, _headers, read = asyncio.run(call("POST", "/api/login"))  # public: read, and refused on its merits
    assert status == 401 and read == [1]


# -- password rules -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("username, password, rule", [
    ("ann", "short", "at least 8 characters"),
    ("ann", " " * 8, "only spaces"),
    ("ann", "\t" * 3 + " " * 6, "only spaces"),
    ("annabelle", "AnnaBelle", "not be the username"),
    ("annabelle", "  annabelle  ", "not be the username"),
    ("ann", "password123", "too common"),
    ("ann", "Password", "too common"),
    ("ann", " 12345678 ", "too common"),
])
def test_password_rules(store, username, password, rule):
    assert rule in password_problem(password, username)
    with pytest.raises(UserError, match=rule):
        store.add_labeler(username, password)
    assert store.list_labelers() == []


def test_good_passwords_pass(store):
    for pw in (PASSWORD, "annabelle!", "Tr0ub4dor&3"):
        assert password_problem(pw, "annabelle") is None
    assert store.add_labeler("annabelle", "annabelle!").username == "annabelle"


def test_cli_refuses_weak_passwords(store):
    from click.testing import CliRunner

    from alignloop.cli.feedback import feedback

    db = store.url.removeprefix("sqlite:///")
    r = CliRunner().invoke(feedback, ["add-labeler", "--db", db, "ann", "--password-env", "PW"],
                           env={"PW": "        "})
    assert r.exit_code != 0 and "only spaces" in r.output
    r = CliRunner().invoke(feedback, ["add-labeler", "--db", db, "annabelle", "--password-env", "PW"],
                           env={"PW": "ANNABELLE  "})
    assert r.exit_code != 0 and "at least 8" not in r.output and "username" in r.output
    r = CliRunner().invoke(feedback, ["add-labeler", "--db", db, "ann", "--password-env", "PW"],
                           env={"PW": "ANN     "})  # 3 characters once the spaces go (F9)
    assert r.exit_code != 0 and "at least 8" in r.output
    assert store.list_labelers() == []


def test_admin_page_refuses_a_weak_password(store, app_with):
    store.add_labeler("boss", PASSWORD, role="admin")
    app = app_with()
    admin = client(app, "boss")
    home = admin.get("/admin")
    r = admin.post("/admin/labelers", data={"csrf_token": csrf_of(home.text), "username": "newbie",
                                            "password": "password1"})
    assert r.status_code == 422 and "too common" in r.text
    assert [lab.username for lab in store.list_labelers()] == ["boss"]


# -- the sign-in throttle -----------------------------------------------------------------------------------------
def test_throttle_per_address_across_usernames(store, app_with):
    store.add_labeler("ann", PASSWORD)
    app = app_with()
    app.state.web.throttle = LoginThrottle(max_failures=5, max_ip_failures=4)
    c = client(app)
    for name in ("u1", "u2", "u3", "ann"):  # 4 failures, each with a different username (each under its 5)
        assert c.post("/api/login", json={"username": name, "password": "wrong password"}).status_code == 401
    r = c.post("/api/login", json={"username": "ann", "password": PASSWORD})
    assert r.status_code == 429 and "your address" in r.json()["error"]  # even the right password, from here
    page = c.get("/login")
    r = c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": csrf_of(page.text)})
    assert r.status_code == 429 and "your address" in r.text


def test_throttle_per_username_and_window():
    clock = Clock()
    t = LoginThrottle(max_failures=3, max_ip_failures=100, window_s=300, clock=clock)
    for i in range(3):
        assert t.refusal("Ann", f"10.0.0.{i}") is None
        t.failed("Ann", f"10.0.0.{i}")  # three addresses: the username's count still adds up
    assert "this username" in t.refusal("ann", "10.0.0.9")
    assert t.refusal("bob", "10.0.0.9") is None
    clock.t += 301
    assert t.refusal("ann", "10.0.0.9") is None  # the window has passed
    t.failed("ann", "1.1.1.1")
    t.succeeded("ANN")
    assert "ann" not in t.users and "1.1.1.1" in t.ips  # success clears the username's count, not the address's


def test_throttle_memory_is_bounded_and_keeps_the_recent_entries():
    clock = Clock()
    log = FailureLog(max_failures=2, window_s=300, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        log.failed(key)
        clock.t += 1
    log.failed("a")  # a is now the most recent
    assert log.blocked("a")
    log.failed("d")  # over 3 keys: the one whose last failure is oldest (b) goes, nothing else
    assert len(log) == 3 and "b" not in log and all(k in log for k in ("a", "c", "d"))
    assert log.blocked("a")  # the name under attack keeps its count
    for i in range(1000):  # a flood of new names never wipes everything at once
        log.failed(f"x{i}")
        assert len(log) == 3
    t = LoginThrottle(max_tracked=10)
    for i in range(100):
        t.failed(f"user{i}", f"10.0.{i}.1")
    assert len(t.users) == 10 and len(t.ips) == 10 and "user99" in t.users and "10.0.99.1" in t.ips


# -- the database file ------------------------------------------------------------------------------------------------
def test_sqlite_file_is_created_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        s = Store(str(tmp_path / "private.db"))
        s.add_labeler("ann", PASSWORD)
        paths = [tmp_path / n for n in ("private.db", "private.db-wal", "private.db-shm")]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths if p.exists()}
        s.dispose()
    finally:
        os.umask(old)
    assert modes["private.db"] == 0o600 and len(modes) == 3, modes
    assert set(modes.values()) == {0o600}


def test_an_existing_readable_file_is_left_as_it_is_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.db"
    Store(str(path)).dispose()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="alignloop.feedback.db"):
        Store(str(path)).dispose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert "chmod 600" in caplog.text


def test_cli_set_password_deactivate_and_reactivate(store):
    from click.testing import CliRunner

    from alignloop.cli.feedback import feedback

    db = store.url.removeprefix("sqlite:///")
    ann = store.add_labeler("ann", PASSWORD)
    store.create_session(ann.id, time.time())
    run = CliRunner().invoke
    r = run(feedback, ["set-password", "--db", db, "ann", "--password-stdin"], input="12345678\n")
    assert r.exit_code == 2 and "too common" in r.output
    r = run(feedback, ["set-password", "--db", db, "ann", "--password-stdin"], input="a new long phrase\n")
    assert r.exit_code == 0 and "password changed for ann" in r.output
    assert store.authenticate("ann", "a new long phrase") is not None and session_rows(store, ann.id) == []
    r = run(feedback, ["set-password", "--db", db, "nobody", "--password-env", "PW"], env={"PW": PASSWORD})
    assert r.exit_code == 2 and "no labeler 'nobody'" in r.output
    store.create_session(ann.id, time.time())
    r = run(feedback, ["deactivate", "--db", db, "ann"])
    assert r.exit_code == 0 and "deactivated ann" in r.output
    assert store.authenticate("ann", "a new long phrase") is None and session_rows(store, ann.id) == []
    r = run(feedback, ["reactivate", "--db", db, "ann"])
    assert r.exit_code == 0 and store.authenticate("ann", "a new long phrase") is not None


def test_cli_serve_passes_the_session_and_body_limits(store, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from alignloop.cli.feedback import feedback

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app))
    db = store.url.removeprefix("sqlite:///")
    r = CliRunner().invoke(feedback, ["serve", "--db", db, "--secret-key", SECRET, "--session-idle-hours", "2",
                                      "--session-max-days", "1", "--max-body-mb", "0.5", "--max-import-mb", "8"])
    assert r.exit_code == 0, r.output
    sessions = served["app"].state.web.sessions
    assert (sessions.idle_s, sessions.max_s) == (7200, 86400)
    gate = next(m for m in served["app"].user_middleware if m.cls.__name__ == "Gate")
    assert (gate.kwargs["max_body"], gate.kwargs["max_import_body"]) == (2**19, 8 * 2**20)
