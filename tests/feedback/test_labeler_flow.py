"""The labeler's flow (issue 16, H2): no state change on GET, blindness, seeded gold placement, strict input types,
no 500s for ids past 2**63, the allow_ties / strength_required settings, and undo of the last judgement or skip."""
from __future__ import annotations

import json
import re

import pytest
from fb_helpers import PASSWORD, api_login, assignment_of, csrf_of, field_of, label_page
from sqlalchemy import func, select

from alignloop.feedback.assignment import gold_seed, is_gold_turn
from alignloop.feedback.errors import ValidationError
from alignloop.feedback.models import Assignment, Item, Judgement

SECRET_MODEL = "secret-model-zq7"


def _n_assignments(store) -> int:
    with store.read() as s:
        return s.scalar(select(func.count()).select_from(Assignment))


def _rows(store, labeler_id=None):
    with store.read() as s:
        q = select(Judgement).order_by(Judgement.id)
        if labeler_id is not None:
            q = q.where(Judgement.labeler_id == labeler_id)
        return list(s.scalars(q))


def _pairs(n, prefix="p"):
    return [{"prompt": f"{prefix}{i}", "completions": [{"text": f"x{i}", "model": SECRET_MODEL,
                                                        "params": {"temperature": 0.123457}},
                                                       {"text": f"y{i}", "model": "other-model-qq"}]}
            for i in range(n)]


@pytest.fixture
def flow(store):
    store.create_project("pw", "pairwise", overlap_k=1)
    store.import_records("pw", _pairs(4))
    for u in ("ann", "bob"):
        store.add_labeler(u, PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    return store


_api = api_login


# -- no state change on GET ---------------------------------------------------------------------------------------
def test_get_never_takes_an_assignment(flow, make_client):
    c = make_client("ann")
    for path in ("/", "/p/pw/label", "/p/pw/label", "/p/pw/guidelines", "/p/pw/history"):
        assert c.get(path).status_code == 200
    page = c.get("/p/pw/label")
    assert 'id="start-form"' in page.text and 'action="/p/pw/next"' in page.text and 'id="judge"' not in page.text
    r = c.get("/api/p/pw/next")
    assert r.status_code == 405 and "POST" in r.json()["error"] and r.headers["allow"] == "GET, POST"
    assert _n_assignments(flow) == 0  # no GET inserted an assignment row
    assert c.post("/p/pw/next", data={}).status_code == 403  # the Start form needs the CSRF token
    assert _n_assignments(flow) == 0
    r = c.post("/p/pw/next", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/p/pw/label"
    aid = assignment_of(c.get("/p/pw/label").text)
    assert assignment_of(c.get("/p/pw/label").text) == aid and _n_assignments(flow) == 1  # reload: the same one
    assert c.get("/api/p/pw/next").json()["assignment_id"] == aid  # GET: the open one, nothing new
    assert _n_assignments(flow) == 1


def test_api_next_takes_an_item_only_by_post(flow, make_client):
    c, hdr = _api(make_client)
    assert c.post("/api/p/pw/next").status_code == 403  # no CSRF header
    assert _n_assignments(flow) == 0
    first = c.post("/api/p/pw/next", headers=hdr).json()
    assert first["assignment_id"] is not None and _n_assignments(flow) == 1
    assert c.post("/api/p/pw/next", headers=hdr).json()["assignment_id"] == first["assignment_id"]  # resumed
    assert c.get("/api/p/pw/next").json() == first


def test_submit_and_skip_forms_move_on_to_the_next_item(flow, make_client):
    c = make_client("ann")
    page = label_page(c, "pw")
    aid = assignment_of(page.text)
    r = c.post(f"/p/pw/label/{aid}", data={"csrf_token": csrf_of(page.text), "choice": "tie",
                                          "idempotency_key": field_of(page.text, "idempotency_key")})
    second = assignment_of(r.text)  # after the 303 the label page shows the next item, no Start press needed
    assert second != aid
    r = c.post(f"/p/pw/skip/{second}", data={"csrf_token": csrf_of(r.text)})
    assert assignment_of(r.text) not in (aid, second)


# -- blindness ----------------------------------------------------------------------------------------------------
def _keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


def test_labeler_never_sees_the_source_model_or_gold(store, make_client):
    store.create_project("g", "pairwise", overlap_k=2, gold_rate=0.5, settings={"gold_seed": 7})
    store.import_records("g", _pairs(4) + [{**row, "gold": {"choice": "a"}} for row in _pairs(4, "q")])
    store.add_labeler("ann", PASSWORD)
    c, hdr = _api(make_client)
    replies = [c.post("/api/p/g/next", headers=hdr).json()]
    golds = []
    for n in range(6):
        a = replies[-1]
        with store.read() as s:
            golds.append(s.get(Assignment, a["assignment_id"]).is_gold)
        r = c.post(f"/api/assignments/{a['assignment_id']}/judgement?next=1", headers=hdr,
                   json={"choice": "tie", "idempotency_key": f"blind-key-{n}"})
        assert r.status_code == 201, r.text
        replies += [r.json(), r.json()["next"]]
    assert any(golds) and not all(golds)  # the labeler had gold and non-gold items ...
    text = json.dumps(replies)
    keys = set(_keys(replies))
    assert SECRET_MODEL not in text and "other-model-qq" not in text and "0.123457" not in text
    assert not keys & {"model", "params", "is_gold", "gold", "gold_answer", "item_id", "prompt_id"}
    # ... and no page says which: the label page (form), "My judgements", the edit page
    web = make_client("ann")
    pages = [label_page(web, "g").text, web.get("/p/g/history").text]
    pages.append(web.get(f"/p/g/edit/{replies[0]['assignment_id']}").text)
    for html in pages:
        assert SECRET_MODEL not in html and "other-model-qq" not in html
        assert not re.search(r"\bgold\b", html, re.I)
    # the context itself carries no gold flag or item id (the templates cannot leak what they are not given)
    from alignloop.feedback.web.labeling import BlindAssignment

    assert not {"is_gold", "item_id", "item"} & set(BlindAssignment.__slots__)


# -- gold placement -----------------------------------------------------------------------------------------------
def test_gold_placement_is_random_and_seeded():
    draws = [is_gold_turn("42", 3, i, 0.25) for i in range(2000)]
    assert 0.21 < sum(draws) / len(draws) < 0.29  # about gold_rate of the assignments
    assert draws == [is_gold_turn("42", 3, i, 0.25) for i in range(2000)]  # reproducible
    assert draws != [is_gold_turn("43", 3, i, 0.25) for i in range(2000)]  # another seed: another placement
    assert draws != [is_gold_turn("42", 4, i, 0.25) for i in range(2000)]  # another labeler: another placement
    assert draws[:40] != [i % 4 == 0 for i in range(40)]  # not the old fixed schedule (first, then every 4th)
    assert not any(is_gold_turn("42", 3, i, 0.0) for i in range(200))


def test_store_places_gold_by_the_projects_seed(store):
    lab = store.add_labeler("ann", PASSWORD)
    seen = {}
    for seed in (11, 11, 12):
        name = f"s{len(seen)}"
        p = store.create_project(name, "thumbs", overlap_k=1, gold_rate=0.3, settings={"gold_seed": seed})
        store.import_records(name, [{"prompt": f"q{i}", "completions": [f"c{i}"]} for i in range(30)]
                             + [{"prompt": f"g{i}", "completions": [f"d{i}"], "gold": {"thumbs": "up"}}
                                for i in range(30)])
        kinds = []
        for n in range(20):
            a = store.next_assignment(p.id, lab.id)
            kinds.append(a.is_gold)
            store.submit(a.id, lab.id, {"thumbs": "up"}, f"seed-{name}-{n:03d}")
        assert gold_seed(store.get_project(p.id)) == str(seed)
        assert kinds == [is_gold_turn(str(seed), lab.id, i, 0.3) for i in range(20)]
        seen[name] = kinds
    assert seen["s0"] == seen["s1"] != seen["s2"]  # same seed, same labeler: the same placement


# -- strict input types: 422 naming the field, nothing stored -----------------------------------------------------
@pytest.fixture
def typed(store):
    store.create_project("lk", "likert", overlap_k=1)
    store.import_records("lk", [{"prompt": f"l{i}", "completions": [f"a{i}"]} for i in range(3)])
    store.create_project("rk", "rank", overlap_k=1)
    store.import_records("rk", [{"prompt": f"r{i}", "completions": ["a", "b", "c"]} for i in range(3)])
    store.create_project("th", "thumbs", overlap_k=1)
    store.import_records("th", [{"prompt": f"t{i}", "completions": [f"a{i}"]} for i in range(3)])
    store.create_project("pw", "pairwise", overlap_k=1)
    store.import_records("pw", _pairs(3))
    store.add_labeler("ann", PASSWORD)
    return store


BAD_SUBMISSIONS = [  # (project, fields, the field the 422 names)
    ("lk", {"likert": 5.9}, "likert"),
    ("lk", {"likert": 5.0}, "likert"),
    ("lk", {"likert": True}, "likert"),
    ("lk", {"likert": "\u0663"}, "likert"),  # an Arabic-Indic digit three
    ("lk", {"likert": "5.0"}, "likert"),
    ("lk", {"likert": 8}, "likert"),
    ("lk", {"likert": "1" * 30}, "likert"),
    ("lk", {"likert": 5, "flags": {"harmful": True}}, "flags"),
    ("lk", {"likert": 5, "flags": [["x"]]}, "flags"),
    ("lk", {"likert": 5, "flags": [{}]}, "flags"),
    ("lk", {"likert": 5, "flags": "harmful"}, "flags"),
    ("lk", {"likert": 5, "flags": ["nope"]}, "flags"),
    ("lk", {"likert": 5, "comment": 12}, "comment"),
    ("lk", {"likert": 5, "comment": ["a"]}, "comment"),
    ("rk", {"rank_0": 2.7, "rank_1": 1, "rank_2": 3}, "rank_0"),
    ("rk", {"rank_0": True, "rank_1": 2, "rank_2": 3}, "rank_0"),
    ("rk", {"rank_0": "\u0661", "rank_1": 2, "rank_2": 3}, "rank_0"),
    ("th", {"thumbs": True}, "thumbs"),
    ("th", {"thumbs": 1.0}, "thumbs"),
    ("th", {"thumbs": 2}, "thumbs"),
    ("th", {"thumbs": "yes"}, "thumbs"),
    ("pw", {"choice": "left", "strength": ["better"]}, "strength"),
    ("pw", {"choice": "left", "strength": "very"}, "strength"),
    ("pw", {"choice": ["left"], "strength": "better"}, "choice"),
]


@pytest.mark.parametrize("with_next", [True, False], ids=["hot-path", "orm-path"])
def test_api_refuses_anything_but_the_exact_type(typed, make_client, with_next):
    c, hdr = _api(make_client)
    suffix = "?next=1" if with_next else ""
    for n, (project, fields, field) in enumerate(BAD_SUBMISSIONS):
        aid = c.post(f"/api/p/{project}/next", headers=hdr).json()["assignment_id"]
        r = c.post(f"/api/assignments/{aid}/judgement{suffix}", headers=hdr,
                   json={**fields, "idempotency_key": f"typed-key-{n:04d}"})
        assert r.status_code == 422, (fields, r.status_code, r.text)
        assert field in r.json()["fields"], (fields, r.json())
    assert _rows(typed) == []  # nothing coerced, nothing stored


def test_exact_values_are_accepted(typed, make_client):
    c, hdr = _api(make_client)
    good = [("lk", {"likert": 5, "flags": ["harmful"], "comment": "ok"}, {"likert": 5, "flags": ["harmful"]}),
            ("lk", {"likert": "6"}, {"likert": 6}),  # a form's ASCII digits
            ("rk", {"rank_0": 1, "rank_1": "2", "rank_2": 2}, {}),
            ("th", {"thumbs": -1}, {"thumbs": -1}),
            ("th", {"thumbs": "up"}, {"thumbs": 1})]
    for n, (project, fields, want) in enumerate(good):
        aid = c.post(f"/api/p/{project}/next", headers=hdr).json()["assignment_id"]
        r = c.post(f"/api/assignments/{aid}/judgement?next=1", headers=hdr,
                   json={**fields, "idempotency_key": f"good-key-{n:04d}"})
        assert r.status_code == 201, r.text
        j = _rows(typed)[-1]
        assert all(getattr(j, k) == v for k, v in want.items()), (fields, want)


def test_form_fields_take_only_ascii_digits_and_a_bounded_shown_at(typed, make_client):
    c = make_client("ann")
    rating, shown = "a rating from 1 (worst) to 7 (best)", "when the form was shown"  # the fields' messages
    for fields, message in [({"likert": "\u0663"}, rating), ({"likert": "4", "shown_at": "9" * 30}, shown),
                            ({"likert": "4", "shown_at": "\u0661" * 13}, shown),
                            ({"likert": "4", "shown_at": "1"}, shown)]:
        page = label_page(c, "lk")
        aid = assignment_of(page.text)
        r = c.post(f"/p/lk/label/{aid}", data={"csrf_token": csrf_of(page.text), **fields,
                                              "idempotency_key": field_of(page.text, "idempotency_key")})
        assert r.status_code == 422, (fields, r.status_code)
        assert message in r.text  # the form again, with the field's message
    assert _rows(typed) == []
    page = label_page(c, "lk")
    aid = assignment_of(page.text)
    r = c.post(f"/p/lk/label/{aid}", data={"csrf_token": csrf_of(page.text), "likert": "4",
                                          "shown_at": field_of(page.text, "shown_at"),
                                          "idempotency_key": field_of(page.text, "idempotency_key")})
    assert r.status_code == 200 and [j.likert for j in _rows(typed)] == [4]


def test_ai_judgement_bounds(typed):
    from alignloop.feedback.validation import validate_ai_judgement

    with pytest.raises(ValidationError, match="time_spent_ms"):
        validate_ai_judgement("thumbs", 1, {"shown_order": [0], "thumbs": 1, "time_spent_ms": 10**30})
    judge = typed.add_ai_labeler("judge-1", "m")
    with pytest.raises(ValidationError, match="item_id"):
        typed.record_ai_judgements("th", judge.id, [{"item_id": 2**63, "shown_order": [0], "thumbs": 1}])


# -- ids past the database's integers: 404 / 422, never 500 -------------------------------------------------------
HUGE = (str(2**63), str(10**30))


def _routes(routes, prefix=""):
    """Every (path, methods) of the app, through included routers (FastAPI keeps them nested)."""
    from starlette.routing import Route

    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes, prefix + r.include_context.prefix)
        elif isinstance(r, Route):
            yield prefix + r.path, r.methods


def test_huge_ids_on_every_route_are_4xx(flow, make_client):
    """Every route with a path parameter, each parameter in turn 2**63 and 10**30 (the others valid), as an admin
    (who passes the role checks): never a 500."""
    admin = make_client("boss")
    tok = csrf_of(admin.get("/admin").text)
    seen = []
    for route_path, methods in _routes(admin.app.routes):
        if "{" not in route_path:
            continue
        params = re.findall(r"\{(\w+)(?::\w+)?\}", route_path)
        for huge in HUGE:
            for p in params:
                values = {q: huge if q == p else ("pw" if q == "name" else "1") for q in params}
                path = re.sub(r"\{(\w+)(?::\w+)?\}", lambda m, v=values: v[m.group(1)], route_path)
                for method in sorted(methods - {"HEAD"}):
                    if method == "GET":
                        r = admin.get(path)
                    elif path.startswith("/api/"):
                        r = admin.post(path, json={"choice": "tie", "idempotency_key": "huge-key-01"},
                                       headers={"X-CSRF-Token": tok})
                    else:
                        r = admin.post(path, data={"csrf_token": tok})
                    seen.append(route_path)
                    assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
    # the labeler's routes with ids are among them
    assert {"/api/assignments/{aid:int}/judgement", "/api/assignments/{aid}/skip", "/p/{name}/label/{aid}",
            "/p/{name}/skip/{aid}", "/p/{name}/edit/{aid}", "/p/{name}/label", "/api/p/{name}/next",
            "/p/{name}/undo", "/api/p/{name}/undo"} <= set(seen)


def test_huge_ids_are_404_for_a_labeler(flow, make_client):
    c, hdr = _api(make_client)
    for huge in HUGE:
        assert c.post(f"/api/assignments/{huge}/judgement?next=1", headers=hdr,
                      json={"choice": "tie", "idempotency_key": "huge-key-02"}).status_code == 404
        assert c.post(f"/api/assignments/{huge}/judgement", headers=hdr,
                      json={"choice": "tie", "idempotency_key": "huge-key-03"}).status_code == 404
        assert c.post(f"/api/assignments/{huge}/skip", headers=hdr).status_code == 404
        assert c.get(f"/api/p/{huge}/next").status_code == 404
    web = make_client("ann")
    tok = csrf_of(web.get("/").text)
    for huge in HUGE:
        assert web.get(f"/p/pw/edit/{huge}").status_code == 404
        assert web.post(f"/p/pw/label/{huge}", data={"csrf_token": tok, "choice": "tie"}).status_code == 404
        assert web.post(f"/p/pw/skip/{huge}", data={"csrf_token": tok}).status_code == 404
        assert web.get(f"/p/{huge}/label").status_code == 404


# -- allow_ties and strength_required -----------------------------------------------------------------------------
def test_settings_turn_ties_off_and_strength_optional(store, make_client):
    store.create_project("nt", "pairwise", overlap_k=1, settings={"allow_ties": False})
    store.import_records("nt", _pairs(4))
    store.create_project("rt", "rank", overlap_k=1, settings={"allow_ties": False})
    store.import_records("rt", [{"prompt": f"r{i}", "completions": ["a", "b", "c"]} for i in range(3)])
    store.create_project("so", "pairwise", overlap_k=1, settings={"strength_required": False})
    store.import_records("so", _pairs(3))
    questions = [{"name": "helpful", "question": "H?"}, {"name": "harmless", "question": "S?"}]
    store.create_project("qt", "pairwise", overlap_k=1,
                         settings={"allow_ties": False, "strength_required": False, "questions": questions})
    store.import_records("qt", _pairs(2))
    store.add_labeler("ann", PASSWORD)
    c, hdr = _api(make_client)

    def post(project, fields, key, with_next=True):
        aid = c.post(f"/api/p/{project}/next", headers=hdr).json()["assignment_id"]
        return c.post(f"/api/assignments/{aid}/judgement{'?next=1' if with_next else ''}", headers=hdr,
                      json={**fields, "idempotency_key": key})

    for n, (project, fields, field) in enumerate([
            ("nt", {"choice": "tie"}, "choice"), ("nt", {"choice": "both_bad"}, "choice"),
            ("rt", {"rank_0": 1, "rank_1": 1, "rank_2": 2}, "ranking"),
            ("qt", {"answers": {"helpful": {"choice": "tie"}, "harmless": {"choice": "left"}}}, "choice_helpful")]):
        for with_next in (True, False):
            r = post(project, fields, f"ties-key-{n}-{with_next}", with_next)
            assert r.status_code == 422 and field in r.json()["fields"], r.text
            assert "turned off" in r.json()["fields"][field]
    assert post("nt", {"choice": "left", "strength": "better"}, "ties-ok-1").status_code == 201
    assert post("rt", {"rank_0": 3, "rank_1": 1, "rank_2": 2}, "ties-ok-2").status_code == 201
    # strength optional: a pick alone is stored with strength None; still refused where it is required (nt)
    assert post("so", {"choice": "right"}, "strength-ok-1").status_code == 201
    assert post("so", {"choice": "left"}, "strength-ok-2", with_next=False).status_code == 201
    assert [j.strength for j in _rows(store)[-2:]] == [None, None]
    assert post("qt", {"answers": {"helpful": {"choice": "left"}, "harmless": {"choice": "right"}}},
                "strength-ok-3").status_code == 201
    r = post("nt", {"choice": "left"}, "strength-missing")
    assert r.status_code == 422 and "strength" in r.json()["fields"]


# -- undo ---------------------------------------------------------------------------------------------------------
def test_undo_a_judgement_reopens_it_prefilled_and_the_edit_is_a_new_version(flow, make_client):
    c = make_client("ann")
    page = label_page(c, "pw")
    first = assignment_of(page.text)
    r = c.post(f"/p/pw/label/{first}", data={"csrf_token": csrf_of(page.text), "choice": "left",
                                            "strength": "slightly_better",
                                            "idempotency_key": field_of(page.text, "idempotency_key")})
    second = assignment_of(r.text)
    assert c.post("/p/pw/undo", data={}).status_code == 403  # CSRF
    r = c.post("/p/pw/undo", data={"csrf_token": csrf_of(r.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/p/pw/label"
    page = c.get("/p/pw/label")  # the reopened judgement comes first, prefilled
    assert assignment_of(page.text) == first
    assert re.search(r'name="choice" value="left"[^>]*checked', page.text)
    assert re.search(r'name="strength" value="slightly_better"[^>]*checked', page.text)
    with flow.read() as s:
        assert s.get(Assignment, first).status == "reopened"
        assert s.get(Item, s.get(Assignment, first).item_id).n_done == 1  # still counted: nothing deleted
    r = c.post(f"/p/pw/label/{first}", data={"csrf_token": csrf_of(page.text), "choice": "right",
                                            "strength": "better",
                                            "idempotency_key": field_of(page.text, "idempotency_key")})
    assert r.status_code == 200 and assignment_of(r.text) == second  # on with labeling
    js = [j for j in _rows(flow) if j.assignment_id == first]
    assert [(j.version, j.strength) for j in js] == [(1, "slightly_better"), (2, "better")]
    with flow.read() as s:
        assert s.get(Assignment, first).status == "done"


def test_undo_a_skip_restores_the_item_if_a_slot_is_free(flow, make_client):
    c = make_client("ann")
    page = label_page(c, "pw")
    aid = assignment_of(page.text)
    r = c.post(f"/p/pw/skip/{aid}", data={"csrf_token": csrf_of(page.text)})
    assert assignment_of(r.text) != aid
    r = c.post("/p/pw/undo", data={"csrf_token": csrf_of(r.text)})
    assert assignment_of(r.text) == aid  # back, and shown first
    with flow.read() as s:
        a = s.get(Assignment, aid)
        assert (a.status, a.completed_at, s.get(Item, a.item_id).n_active) == ("assigned", None, 1)
    # a skip whose item went to someone else meanwhile (k = 1: no free slot) cannot be undone: 409, nothing changes
    r = c.post(f"/p/pw/skip/{aid}", data={"csrf_token": csrf_of(r.text)})
    with flow.read() as s:
        item_id = s.get(Assignment, aid).item_id
    bob, bob_hdr = _api(make_client, "bob")
    taken = [bob.post("/api/p/pw/next", headers=bob_hdr).json()["assignment_id"]]
    for n in range(4):  # bob works until he holds that item
        with flow.read() as s:
            if s.get(Assignment, taken[-1]).item_id == item_id:
                break
        r2 = bob.post(f"/api/assignments/{taken[-1]}/judgement?next=1", headers=bob_hdr,
                      json={"choice": "tie", "idempotency_key": f"bob-key-{n:03d}"})
        taken.append(r2.json()["next"]["assignment_id"])
    r = c.post("/p/pw/undo", data={"csrf_token": csrf_of(c.get("/").text)})
    assert r.status_code == 409 and "cannot be undone" in r.text
    with flow.read() as s:
        assert s.get(Assignment, aid).status == "skipped" and s.get(Item, item_id).n_active == 1


def test_api_undo(flow, make_client):
    c, hdr = _api(make_client)
    r = c.post("/api/p/pw/undo", headers=hdr)
    assert r.status_code == 409 and "nothing to undo" in r.json()["error"]
    assert c.post("/api/p/pw/undo").status_code == 403  # CSRF header
    a = c.post("/api/p/pw/next", headers=hdr).json()
    r = c.post(f"/api/assignments/{a['assignment_id']}/judgement?next=1", headers=hdr,
               json={"choice": "left", "strength": "better", "idempotency_key": "undo-key-0001"})
    nxt = r.json()["next"]
    u = c.post("/api/p/pw/undo", headers=hdr).json()
    assert u["undone"] == "judgement" and u["assignment_id"] == a["assignment_id"] and u["version"] == 1
    assert u["values"]["choice"] == "left" and u["values"]["strength"] == "better"
    assert u["completions"] == a["completions"] and "model" not in json.dumps(u)
    r = c.post(f"/api/assignments/{a['assignment_id']}/judgement?next=1", headers=hdr,
               json={"choice": "tie", "idempotency_key": "undo-key-0002"})  # through the hot path's caller
    assert r.status_code == 201 and r.json()["version"] == 2
    assert r.json()["next"]["assignment_id"] == nxt["assignment_id"]  # the open one, as before the undo
    assert c.post(f"/api/assignments/{nxt['assignment_id']}/skip", headers=hdr).status_code == 200
    u = c.post("/api/p/pw/undo", headers=hdr).json()
    assert u["undone"] == "skip" and u["assignment_id"] == nxt["assignment_id"]
    assert c.get("/api/p/pw/next").json()["assignment_id"] == nxt["assignment_id"]
    assert len(_rows(flow)) == 2  # two versions, nothing deleted
