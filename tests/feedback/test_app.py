"""Every route and rule of the web app, with FastAPI's test client."""
import json
import re

import pytest
from fb_helpers import PASSWORD, Labeling, assignment_of, csrf_of, field_of, label_page


@pytest.fixture
def setup(store):
    store.create_project("pw", "pairwise", overlap_k=2,
                         guidelines_md="# Rules\n\nPrefer **helpful** answers.\n\n<script>alert('g')</script>\n"
                                       "[x](javascript:alert(1))")
    store.import_records("pw", [
        {"prompt": "Say <b>hi</b>", "completions": ["<script>alert('xss')</script>", "<img src=x onerror=alert(1)>"]},
        {"prompt": [{"role": "system", "content": "Be kind"}, {"role": "user", "content": "first turn"},
                    {"role": "assistant", "content": "earlier answer"}, {"role": "user", "content": "second turn"}],
         "completions": ["c1", "c2"]},
    ])
    store.create_project("rk", "rank", overlap_k=1)
    store.import_records("rk", [{"prompt": "rank these", "completions": ["r0", "r1", "r2"]}])
    store.create_project("th", "thumbs", overlap_k=1)
    store.import_records("th", [{"prompt": "thumbs", "completions": ["t0"]}])
    store.create_project("lk", "likert", overlap_k=1)
    store.import_records("lk", [{"prompt": "likert", "completions": ["l0"]}])
    for name in ("ann", "bob"):
        store.add_labeler(name, PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    return store


def test_sign_in_required_and_redirects(setup, make_client):
    c = make_client()
    for path in ("/", "/p/pw/label", "/p/pw/guidelines", "/p/pw/history", "/admin", "/admin/p/pw"):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), path
    assert c.get("/api/p/pw/next").status_code == 401
    assert c.get("/healthz").json() == {"ok": True}


def test_login_errors_csrf_and_open_redirect(setup, make_client):
    c = make_client()
    page = c.get("/login?next=//evil.example.com")
    assert 'value="/"' in page.text  # unsafe next replaced
    tok = csrf_of(page.text)
    r = c.post("/login", data={"username": "ann", "password": "nope", "csrf_token": tok})
    assert r.status_code == 401 and "Wrong username or password" in r.text
    r = c.post("/login", data={"username": "", "password": "", "csrf_token": tok})
    assert r.status_code == 422 and "Enter your username" in r.text
    r = c.post("/login", data={"username": "ann", "password": PASSWORD})  # no CSRF token
    assert r.status_code == 403 and "CSRF" in r.text
    r = c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": tok,
                               "next": "/p/pw/guidelines"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/p/pw/guidelines"
    cookie = c.cookies.get("alignloop_session")
    assert cookie and "ann" not in cookie  # signed, opaque-ish
    # tampered cookie -> signed out
    c.cookies.clear()
    c.cookies.set("alignloop_session", cookie[:-6] + ("abcdef" if not cookie.endswith("abcdef") else "ghijkl"))
    assert c.get("/", follow_redirects=False).status_code == 303


def test_logout_needs_csrf(setup, make_client):
    c = make_client("ann")
    assert c.post("/logout", data={}).status_code == 403
    page = c.get("/")
    r = c.post("/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    assert c.get("/", follow_redirects=False).status_code == 303


def test_projects_and_guidelines_markdown_is_safe(setup, make_client):
    c = make_client("ann")
    r = c.get("/")
    assert all(n in r.text for n in ("pw", "rk", "th", "lk"))
    g = c.get("/p/pw/guidelines").text
    assert "<h1>Rules</h1>" in g and "<strong>helpful</strong>" in g
    assert "<script>alert('g')" not in g and "&lt;script&gt;" in g
    assert 'href="javascript:' not in g
    assert c.get("/p/nope/guidelines").status_code == 404


def test_security_headers(setup, make_client):
    r = make_client("ann").get("/p/pw/label")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"


def test_model_text_is_escaped(setup, make_client):
    c = make_client("ann")
    html = label_page(c, "pw").text
    if "first turn" in html:  # got the multi-turn item first: do it, then the XSS one comes
        Labeling(c, "pw").submit({"choice": "tie"})
        html = label_page(c, "pw").text
    assert "<script>alert('xss')" not in html and "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "Say &lt;b&gt;hi&lt;/b&gt;" in html


def test_multi_turn_context_rendered(setup, make_client):
    c = make_client("ann")
    lab = Labeling(c, "pw")
    html = lab.page().text
    if "first turn" not in html:
        lab.submit({"choice": "tie"})
        html = lab.page().text
    for text in ("Be kind", "first turn", "earlier answer", "second turn"):
        assert text in html
    assert html.index("first turn") < html.index("earlier answer") < html.index("second turn")
    assert 'class="msg role-assistant"' in html and 'class="msg role-system"' in html


def test_pairwise_submit_validation_and_order(setup, make_client, store):
    c = make_client("ann")
    lab = Labeling(c, "pw")
    page = lab.page()
    aid = assignment_of(page.text)
    a = store.get_assignment(aid)
    _, r = lab.submit({"choice": "left"}, page)
    assert r.status_code == 422 and "say how much better" in r.text
    assert assignment_of(r.text) == aid  # same item, form re-shown with the choice kept
    assert re.search(r'value="left"\s+checked', r.text)
    _, r = lab.submit({}, page)
    assert r.status_code == 422 and "choose the better response" in r.text
    _, r = lab.submit({"choice": "left", "strength": "slightly_better", "comment": "close"}, page)
    assert r.status_code == 200 and str(r.url).endswith("/p/pw/label")
    j = store.current_judgement(aid)
    assert j.picked_position == 0 and j.strength == "slightly_better" and j.comment == "close"
    assert j.choice == "ab"[a.shown_order[0]]  # canonical choice = what was shown on the left
    assert j.shown_order == a.shown_order
    assert "1 done" in r.text  # progress


def test_tie_and_both_bad(setup, make_client, store):
    c = make_client("ann")
    lab = Labeling(c, "pw")
    aid1, r = lab.submit({"choice": "tie"})
    aid2, r = lab.submit({"choice": "both_bad", "strength": "better"})  # strength ignored
    assert store.current_judgement(aid1).choice == "tie"
    j2 = store.current_judgement(aid2)
    assert j2.choice == "both_bad" and j2.strength is None and j2.picked_position is None
    assert 'id="all-done"' in r.text


def test_order_randomised_per_labeler(store, make_client):
    store.create_project("many", "rank", overlap_k=40)
    store.import_records("many", [{"prompt": "p", "completions": [f"c{i}" for i in range(6)]}])
    orders = set()
    for i in range(12):
        lab = store.add_labeler(f"u{i}", PASSWORD)
        a = store.next_assignment(store.get_project("many").id, lab.id)
        orders.add(tuple(a.shown_order))
    assert len(orders) > 1


def test_rank_thumbs_likert_forms(setup, make_client, store):
    c = make_client("ann")
    lab = Labeling(c, "rk")
    page = lab.page()
    assert page.text.count('<select name="rank_') == 3
    _, r = lab.submit({"rank_0": "2", "rank_1": "2", "rank_2": ""}, page)
    assert r.status_code == 422 and "rank from 1 to 3" in r.text
    aid, r = lab.submit({"rank_0": "2", "rank_1": "1", "rank_2": "2"}, page)
    assert r.status_code == 200
    a = store.get_assignment(aid)
    ranking = store.current_judgement(aid).ranking
    assert ranking[a.shown_order[1]] == 1 and sorted(ranking) == [1, 2, 2]

    lab = Labeling(c, "th")
    _, r = lab.submit({})
    assert r.status_code == 422 and "thumbs up or thumbs down" in r.text
    aid, r = lab.submit({"thumbs": "down", "comment": "rude <b>"})
    j = store.current_judgement(aid)
    assert (j.thumbs, j.comment) == (-1, "rude <b>")

    lab = Labeling(c, "lk")
    page = lab.page()
    assert "Hallucination" in page.text and 'data-key="h"' in page.text
    _, r = lab.submit({"likert": "9"}, page)
    assert r.status_code == 422 and "from 1 (worst) to 7" in r.text
    aid, r = lab.submit({"likert": "3", "flags": ["hallucination", "harmful"]}, page)
    j = store.current_judgement(aid)
    assert (j.likert, j.flags) == (3, ["hallucination", "harmful"])
    # history shows the judgement escaped
    h = c.get("/p/th/history").text
    assert "rude &lt;b&gt;" in h


def test_skip_resume_and_progress(setup, make_client, store):
    c = make_client("ann")
    first = assignment_of(label_page(c, "pw").text)
    assert assignment_of(c.get("/p/pw/label").text) == first  # reload resumes the same item
    page = c.get("/p/pw/label")
    r = c.post(f"/p/pw/skip/{first}", data={"csrf_token": csrf_of(page.text)})
    assert r.status_code == 200
    second = assignment_of(r.text)
    assert second != first and "1 skipped" in r.text
    assert c.post(f"/p/pw/skip/{second}", data={}).status_code == 403  # CSRF


def test_labeler_cannot_touch_others_work(setup, make_client, store):
    ann, bob = make_client("ann"), make_client("bob")
    page = label_page(ann, "pw")
    aid = assignment_of(page.text)
    bob_page = label_page(bob, "pw")
    tok = csrf_of(bob_page.text)
    r = bob.post(f"/p/pw/label/{aid}", data={"csrf_token": tok, "idempotency_key": "bobkey-123",
                                            "choice": "tie"})
    assert r.status_code == 404
    assert bob.post(f"/p/pw/skip/{aid}", data={"csrf_token": tok}).status_code == 404
    Labeling(ann, "pw").submit({"choice": "tie"}, page)
    assert bob.get(f"/p/pw/edit/{aid}").status_code == 404
    assert "pw" in bob.get("/p/pw/history").text and f"/edit/{aid}\"" not in bob.get("/p/pw/history").text


def test_two_labelers_get_the_same_item_with_k2(setup, make_client, store):
    ann, bob = make_client("ann"), make_client("bob")
    a_items, b_items = set(), set()
    for c, got in ((ann, a_items), (bob, b_items)):
        lab = Labeling(c, "pw")
        for _ in range(2):
            aid, _r = lab.submit({"choice": "tie"})
            got.add(store.get_assignment(aid).item_id)
    assert a_items == b_items and len(a_items) == 2
    carl = store.add_labeler("carl", PASSWORD)
    assert store.next_assignment(store.get_project("pw").id, carl.id) is None  # k = 2 reached


def test_edit_creates_a_new_version(setup, make_client, store):
    c = make_client("ann")
    aid, _ = Labeling(c, "pw").submit({"choice": "left", "strength": "better"})
    page = c.get(f"/p/pw/edit/{aid}")
    assert page.status_code == 200 and "Save new version" in page.text
    assert re.search(r'value="left"\s+checked', page.text) and re.search(r'value="better"\s+checked', page.text)
    r = c.post(f"/p/pw/label/{aid}", data={"csrf_token": csrf_of(page.text), "choice": "tie",
                                           "idempotency_key": field_of(page.text, "idempotency_key"),
                                           "shown_at": field_of(page.text, "shown_at")})
    assert r.status_code == 200 and str(r.url).endswith("/p/pw/history")
    assert [j.choice for j in store.judgement_history(aid)][1] == "tie"
    assert len(store.judgement_history(aid)) == 2
    assert ">2<" in r.text  # version column


def test_labeler_refused_admin_pages(setup, make_client):
    c = make_client("ann")
    for path in ("/admin", "/admin/p/pw", "/admin/p/pw/export"):
        r = c.get(path)
        assert r.status_code == 403 and "admins only" in r.text, path
    page = c.get("/")
    r = c.post("/admin/labelers", data={"csrf_token": csrf_of(page.text), "username": "evil", "password": "x" * 10})
    assert r.status_code == 403
    assert 'href="/admin"' not in page.text


def test_admin_dashboard_labelers_and_export(setup, make_client, store):
    for name in ("ann", "bob"):
        c = make_client(name)
        lab = Labeling(c, "pw")
        for _ in range(2):
            lab.submit({"choice": "left", "strength": "significantly_better"})
    admin = make_client("boss")
    home = admin.get("/admin")
    assert home.status_code == 200 and "ann" in home.text and "Dashboard" in home.text
    dash = admin.get("/admin/p/pw")
    assert dash.status_code == 200
    for text in ("Fleiss", "Krippendorff", "Cohen", "Leave-one-out agreement", "Share of left picks", "<svg"):
        assert text in dash.text
    # add a labeler: validation then success
    r = admin.post("/admin/labelers", data={"csrf_token": csrf_of(home.text), "username": "new one",
                                            "password": "longpassword"})
    assert r.status_code == 422 and "username" in r.text
    r = admin.post("/admin/labelers", data={"csrf_token": csrf_of(home.text), "username": "newbie",
                                            "password": "longpassword"})
    assert r.status_code == 200 and "newbie" in r.text
    r = admin.get("/admin/p/pw/export?format=preference&mode=all")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(x) for x in r.text.splitlines()]
    assert len(rows) == 4 and all(x["margin"] == 1.0 for x in rows)
    assert admin.get("/admin/p/pw/export?format=bogus").status_code == 400
    assert admin.get("/admin/p/th/export?format=preference").status_code == 400


def test_json_api(setup, make_client, store):
    c = make_client()
    assert c.post("/api/login", data={"username": "ann", "password": PASSWORD}).status_code == 415
    assert c.post("/api/login", json={"username": "ann", "password": "bad"}).status_code == 401
    tok = c.post("/api/login", json={"username": "ann", "password": PASSWORD}).json()["csrf_token"]
    nxt = c.post("/api/p/pw/next", headers={"X-CSRF-Token": tok}).json()
    aid = nxt["assignment_id"]
    assert nxt["task_type"] == "pairwise" and len(nxt["completions"]) == 2
    body = {"choice": "right", "strength": "better", "idempotency_key": "api-key-0001"}
    assert c.post(f"/api/assignments/{aid}/judgement", json=body).status_code == 403  # no CSRF header
    hdr = {"X-CSRF-Token": tok, "Content-Type": "application/json"}
    assert c.post(f"/api/assignments/{aid}/judgement", content=b"{not json", headers=hdr).status_code == 400
    assert c.post(f"/api/assignments/{aid}/judgement", content=b"[1, 2]", headers=hdr).status_code == 400
    assert c.post("/api/assignments/x1/judgement", json=body, headers={"X-CSRF-Token": tok}).status_code == 404
    assert make_client().post(f"/api/assignments/{aid}/judgement", json=body).status_code == 401  # signed out
    r = c.post(f"/api/assignments/{aid}/judgement", json=body, headers={"X-CSRF-Token": tok})
    assert r.status_code == 201 and r.json()["created"] is True
    r2 = c.post(f"/api/assignments/{aid}/judgement", json=body, headers={"X-CSRF-Token": tok})
    assert r2.status_code == 200 and r2.json()["judgement_id"] == r.json()["judgement_id"]
    r = c.post(f"/api/assignments/{aid}/judgement", json={"choice": "right", "idempotency_key": "api-key-0002"},
               headers={"X-CSRF-Token": tok})
    assert r.status_code == 422 and "strength" in r.json()["fields"]
    r = c.post(f"/api/assignments/{aid}/judgement?next=1", json={**body, "idempotency_key": "api-key-0003"},
               headers={"X-CSRF-Token": tok})
    assert r.status_code == 201 and r.json()["version"] == 2  # an edit, plus the next item in the same reply
    nxt = r.json()["next"]
    assert nxt["assignment_id"] != aid and nxt["task_type"] == "pairwise" and len(nxt["completions"]) == 2
    aid2 = c.get("/api/p/pw/next").json()["assignment_id"]
    assert aid2 == nxt["assignment_id"]
    assert c.post(f"/api/assignments/{aid2}/skip", headers={"X-CSRF-Token": tok}).json() == {"skipped": aid2}
    assert c.get("/api/p/pw/next").status_code == 405  # a GET takes nothing: no open item
    assert c.post("/api/p/pw/next", headers={"X-CSRF-Token": tok}).json() == {"assignment_id": None}


def test_secret_key_sources(tmp_path, monkeypatch):
    import os
    import stat

    from alignloop.errors import UserError
    from alignloop.feedback.security import SECRET_ENV, resolve_secret_key

    url = f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.delenv(SECRET_ENV, raising=False)
    k1 = resolve_secret_key(None, url)  # generated file next to the database, private
    path = tmp_path / "feedback-secret.key"
    assert path.exists() and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert resolve_secret_key(None, url) == k1 and len(k1) >= 32
    monkeypatch.setenv(SECRET_ENV, "e" * 40)
    assert resolve_secret_key(None, url) == "e" * 40
    assert resolve_secret_key("x" * 32, url) == "x" * 32
    with pytest.raises(UserError, match="at least 32"):
        resolve_secret_key("short", url)


def test_sessions_survive_an_app_restart_with_the_same_key(store):
    from fastapi.testclient import TestClient

    from alignloop.feedback.app import create_app

    store.add_labeler("ann", PASSWORD)
    c1 = TestClient(create_app(store, secret_key="k" * 40))
    page = c1.get("/login")
    c1.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": csrf_of(page.text)})
    c2 = TestClient(create_app(store, secret_key="k" * 40), cookies=dict(c1.cookies))
    assert c2.get("/", follow_redirects=False).status_code == 200
    c3 = TestClient(create_app(store, secret_key="z" * 40), cookies=dict(c1.cookies))
    assert c3.get("/", follow_redirects=False).status_code == 303  # another key: the cookie is not trusted


def test_login_throttled_after_repeated_failures(setup, make_client):
    c = make_client()
    tok = csrf_of(c.get("/login").text)
    for _ in range(5):
        r = c.post("/login", data={"username": "ann", "password": "nope nope", "csrf_token": tok})
        assert r.status_code == 401
    r = c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": tok})
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    assert c.post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 429
    # another username is not affected
    r = c.post("/login", data={"username": "bob", "password": PASSWORD, "csrf_token": tok}, follow_redirects=False)
    assert r.status_code == 303


def test_server_lifespan_checkpoints_in_the_background_and_freezes_the_gc(store):
    import gc

    from fastapi.testclient import TestClient

    from alignloop.feedback.app import create_app

    app = create_app(store, secret_key="k" * 40)
    assert store._checkpointer is None and gc.get_freeze_count() == 0
    with TestClient(app) as c:  # the lifespan runs: startup ... shutdown
        assert c.get("/healthz").json() == {"ok": True}
        assert store._checkpointer is not None and store._checkpointer.is_alive()
        assert gc.get_freeze_count() > 0  # what was loaded at startup is out of the collector's way
    assert store._checkpointer is None and gc.get_freeze_count() == 0
    with TestClient(create_app(store, secret_key="k" * 40, background_checkpoints=False)):
        assert store._checkpointer is None


def test_concurrent_api_submissions_are_group_committed(store):
    """Submissions arriving together share one transaction; each reply comes after that COMMIT (acknowledged =>
    stored), and invalid ones in the same group get their own 422."""
    import asyncio

    import httpx
    from sqlalchemy import select

    from alignloop.feedback.app import create_app
    from alignloop.feedback.models import Judgement

    store.create_project("gc", "pairwise", overlap_k=2)
    store.import_records("gc", [{"prompt": f"p{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(8)])
    for i in range(4):
        store.add_labeler(f"gc{i}", PASSWORD)
    batches = []
    real_batch = store.submit_and_next_batch

    def spy(reqs):
        out = real_batch(reqs)
        with store.read() as s:  # by the time results exist, they are committed (visible to another connection)
            stored = set(s.scalars(select(Judgement.idempotency_key)))
        batches.append((len(reqs), all(r[3] in stored for r, o in zip(reqs, out, strict=True) if isinstance(o, tuple))))
        return out

    store.submit_and_next_batch = spy
    app = create_app(store, secret_key="k" * 40)

    async def run():
        transport = httpx.ASGITransport(app=app)
        clients, jobs = [], []
        for i in range(4):
            c = httpx.AsyncClient(transport=transport, base_url="http://t")
            tok = (await c.post("/api/login", json={"username": f"gc{i}", "password": PASSWORD})).json()["csrf_token"]
            aid = (await c.post("/api/p/gc/next", headers={"X-CSRF-Token": tok})).json()["assignment_id"]
            body = {"choice": "left", "idempotency_key": f"gc-key-{i:04d}"}
            if i != 3:
                body["strength"] = "better"
            clients.append(c)
            jobs.append(c.post(f"/api/assignments/{aid}/judgement?next=1", json=body, headers={"X-CSRF-Token": tok}))
        replies = await asyncio.gather(*jobs)
        for c in clients:
            await c.aclose()
        return replies

    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [201, 201, 201, 422]
    assert all(r.json()["next"]["assignment_id"] for r in replies[:3])
    assert batches and max(n for n, _ in batches) >= 2 and all(ok for _, ok in batches)
    with store.read() as s:
        assert sorted(s.scalars(select(Judgement.idempotency_key))) == ["gc-key-0000", "gc-key-0001", "gc-key-0002"]
