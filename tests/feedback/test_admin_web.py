"""Admin in the browser, with FastAPI's test client: creating a project, its settings and guidelines after creation,
importing a file, labelers (deactivate, reset a password), members-only projects (and that the hot path never
hands a non-member an item), the review page and adjudication, the rank dashboard and the export forms."""
import json
import uuid

import pytest
from fb_helpers import PASSWORD, csrf_of

from alignloop.errors import UserError
from alignloop.feedback import sqlite_hot
from alignloop.feedback.errors import NotFound, ValidationError
from alignloop.feedback.projects import check_settings


def _admin(store, make_client):
    store.add_labeler("boss", PASSWORD, role="admin")
    return make_client("boss")


def _tok(c, path="/admin"):
    return csrf_of(c.get(path).text)


def _create_form(**over):
    form = {"name": "hh", "task_type": "pairwise", "overlap_k": "3", "gold_rate": "0", "guidelines": "# Be kind",
            "access": "all", "allow_ties": "on", "strength_required": "on", "min_labels": "",
            "assignment_timeout_s": "", "more_settings": ""}
    form.update(over)
    return {k: v for k, v in form.items() if v is not None}


# -- settings: one checker --------------------------------------------------------------------------------------
def test_check_settings_names_the_setting():
    assert check_settings("pairwise", {"allow_ties": False, "min_labels": 2, "access": "members"}, 3) == {
        "allow_ties": False, "min_labels": 2, "access": "members"}
    for bad, field in [({"colour": 1}, "settings.colour"), ({"allow_ties": "no"}, "settings.allow_ties"),
                       ({"strength_required": 1}, "settings.strength_required"),
                       ({"min_labels": 0}, "settings.min_labels"), ({"min_labels": 4}, "settings.min_labels"),
                       ({"min_labels": True}, "settings.min_labels"), ({"access": "some"}, "settings.access"),
                       ({"assignment_timeout_s": -1}, "settings.assignment_timeout_s"),
                       ({"thresholds": {"min_itemz": 1}}, "settings.thresholds.min_itemz"),
                       ({"flags": [{"name": "x", "label": "X", "key": "1"}]}, "settings.flags[0].key"),
                       ({"questions": [{"name": "a", "question": "?"}]}, None)]:
        with pytest.raises(UserError) as e:
            check_settings("rank" if field is None else "pairwise", bad, 3)
        assert (field or "settings.questions") in str(e.value)


# -- create, settings, guidelines --------------------------------------------------------------------------------
def test_create_project_in_the_browser_and_errors_name_the_field(store, make_client):
    c = _admin(store, make_client)
    page = c.get("/admin/projects/new")
    assert page.status_code == 200 and 'name="more_settings"' in page.text
    tok = csrf_of(page.text)
    r = c.post("/admin/projects", data={**_create_form(min_labels="x"), "csrf_token": tok})
    assert r.status_code == 422 and "min_labels: a whole number" in r.text and 'value="hh"' in r.text
    r = c.post("/admin/projects", data={**_create_form(more_settings='{"colour": 1}'), "csrf_token": tok})
    assert r.status_code == 422 and "settings.colour: unknown setting" in r.text
    r = c.post("/admin/projects", data={**_create_form(name="a b"), "csrf_token": tok})
    assert r.status_code == 422 and "project name" in r.text
    assert store.list_projects() == []
    r = c.post("/admin/projects", data={**_create_form(allow_ties=None, min_labels="2", more_settings=json.dumps(
        {"thresholds": {"min_items": 4}}), guidelines="# <script>x</script>"), "csrf_token": tok},
        follow_redirects=False)
    assert r.status_code == 303
    p = store.get_project("hh")
    assert r.headers["location"] == f"/admin/p/{p.id}/settings?created=1"
    assert (p.task_type, p.overlap_k, p.guidelines_md) == ("pairwise", 3, "# <script>x</script>")
    assert p.settings["allow_ties"] is False and p.settings["strength_required"] is True
    assert p.settings["min_labels"] == 2 and p.settings["thresholds"] == {"min_items": 4}
    assert isinstance(p.settings["gold_seed"], int) and p.settings["access"] == "all"
    assert "<script>x</script>" not in c.get(f"/admin/p/{p.id}/settings").text  # escaped in the textarea
    # no CSRF token: refused, nothing created
    assert c.post("/admin/projects", data=_create_form(name="other")).status_code == 403
    store.add_labeler("ann", PASSWORD)
    labeler = make_client("ann")
    assert labeler.get("/admin/projects/new").status_code == 403
    assert labeler.post("/admin/projects", data={**_create_form(name="x2"), "csrf_token": _tok(labeler, "/")}
                        ).status_code == 403


def test_edit_settings_and_guidelines_reach_the_labelers_at_once(store, make_client):
    p = store.create_project("pw", "pairwise", overlap_k=1, guidelines_md="old rules")
    seed = p.settings["gold_seed"]
    store.import_records("pw", [{"prompt": "q", "completions": ["a", "b"]}])
    store.add_labeler("ann", PASSWORD)
    ann = make_client("ann")
    assert "old rules" in ann.get("/p/pw/guidelines").text
    assert store.question_names(p.id)  # the project info cache is now warm
    c = _admin(store, make_client)
    tok = _tok(c, f"/admin/p/{p.id}/settings")
    form = {**_create_form(allow_ties=None, min_labels="1", guidelines="new *rules*"), "csrf_token": tok}
    r = c.post(f"/admin/p/{p.id}/settings", data=form, follow_redirects=False)
    assert r.status_code == 303, r.text
    q = store.get_project(p.id)
    assert q.guidelines_md == "new *rules*" and q.settings["allow_ties"] is False and q.settings["min_labels"] == 1
    assert q.settings["gold_seed"] == seed  # kept
    assert "new <em>rules</em>" in ann.get("/p/pw/guidelines").text
    # the submit paths' project info cache saw the change at once (not after its TTL): a tie is now refused
    a = store.next_assignment(p.id, store.authenticate("ann", PASSWORD).id)
    with pytest.raises(ValidationError) as e:
        store.submit(a.id, a.labeler_id, {"choice": "tie"}, uuid.uuid4().hex)
    assert "choice" in e.value.errors
    r = c.post(f"/admin/p/{p.id}/settings", data={**form, "min_labels": "5"})
    assert r.status_code == 422 and "settings.min_labels: a whole number from 1 to 1" in r.text
    r = c.post(f"/admin/p/{p.id}/settings", data={**form, "more_settings": "{nope"})
    assert r.status_code == 422 and "more settings: not valid JSON" in r.text
    assert store.get_project(p.id).settings["min_labels"] == 1
    assert c.get("/admin/p/999/settings").status_code == 404


# -- import ---------------------------------------------------------------------------------------------------------
def test_import_a_file_in_the_browser(store, make_client):
    p = store.create_project("pw", "pairwise", overlap_k=1)
    c = _admin(store, make_client)
    tok = _tok(c, f"/admin/p/{p.id}/import")
    rows = b'{"id": "r1", "prompt": "q1", "completions": ["a", "b"]}\n{"id": "r2", "prompt": "q2", ' \
           b'"completions": ["c", "d", "e"]}\n'
    r = c.post(f"/admin/p/{p.id}/import", data={"csrf_token": tok}, files={"file": ("rows.jsonl", rows)})
    assert r.status_code == 200 and "2 prompts added" in r.text and "4 items" in r.text, r.text
    r = c.post(f"/admin/p/{p.id}/import", data={"csrf_token": tok}, files={"file": ("rows.jsonl", rows)})
    assert "0 prompts added" in r.text and "2 already imported" in r.text
    assert store.project_summary(p.id)["items"] == 4
    bad = b'{"prompt": "q3", "completions": ["a", "b"]}\n{"prompt": "q4"}\n'
    r = c.post(f"/admin/p/{p.id}/import", data={"csrf_token": tok}, files={"file": ("bad.jsonl", bad)})
    assert r.status_code == 422 and "bad.jsonl line 2" in r.text
    assert store.project_summary(p.id)["items"] == 4  # nothing of the bad file written
    r = c.post(f"/admin/p/{p.id}/import", data={"csrf_token": "wrong"}, files={"file": ("rows.jsonl", rows)})
    assert r.status_code == 403


# -- labelers -------------------------------------------------------------------------------------------------------
def test_deactivate_reactivate_and_reset_password(store, make_client):
    ann = store.add_labeler("ann", PASSWORD)
    c = _admin(store, make_client)
    ann_client = make_client("ann")
    assert ann_client.get("/", follow_redirects=False).status_code == 200
    tok = _tok(c)
    r = c.post(f"/admin/labelers/{ann.id}/active", data={"csrf_token": tok, "active": "0"}, follow_redirects=False)
    assert r.status_code == 303
    assert store.get_labeler(ann.id).active is False
    assert ann_client.get("/", follow_redirects=False).status_code == 303  # signed out at once
    c.post(f"/admin/labelers/{ann.id}/active", data={"csrf_token": tok, "active": "1"})
    assert store.get_labeler(ann.id).active is True
    r = c.post(f"/admin/labelers/{ann.id}/password", data={"csrf_token": tok, "password": "ann"})
    assert r.status_code == 422 and "password" in r.text.lower()
    r = c.post(f"/admin/labelers/{ann.id}/password", data={"csrf_token": tok, "password": "a brand new secret"})
    assert r.status_code == 200 and "password of labeler ann reset" in r.text
    assert store.authenticate("ann", "a brand new secret") is not None
    assert store.authenticate("ann", PASSWORD) is None
    boss = store.authenticate("boss", PASSWORD)
    r = c.post(f"/admin/labelers/{boss.id}/active", data={"csrf_token": tok, "active": "0"})
    assert r.status_code == 422 and "cannot deactivate yourself" in r.text
    assert c.post("/admin/labelers/99999/active", data={"csrf_token": tok, "active": "0"}).status_code == 404


# -- members ----------------------------------------------------------------------------------------------------------
def test_members_only_project_is_404_for_others_and_the_hot_path_hands_them_nothing(store, make_client):
    # no expiry checks: the SQLite hot path takes the submissions below (it hands expiry rounds to the ORM path)
    p = store.create_project("secret", "pairwise", overlap_k=2, settings={"assignment_timeout_s": 0})
    store.import_records("secret", [{"prompt": f"q{i}", "completions": ["a", "b"]} for i in range(4)])
    ann, bob = store.add_labeler("ann", PASSWORD), store.add_labeler("bob", PASSWORD)
    c = _admin(store, make_client)
    tok = _tok(c, f"/admin/p/{p.id}/members")
    r = c.post(f"/admin/p/{p.id}/members", data={"csrf_token": tok, "access": "members", "member": [str(ann.id)]},
               follow_redirects=False)
    assert r.status_code == 303
    assert store.get_project(p.id).settings["access"] == "members" and store.project_members(p.id) == {ann.id}
    bob_c, ann_c = make_client("bob"), make_client("ann")
    assert "secret" not in bob_c.get("/").text and "secret" in ann_c.get("/").text
    for path in ("/p/secret/label", "/p/secret/guidelines", "/p/secret/history"):
        assert bob_c.get(path).status_code == 404, path
        assert ann_c.get(path).status_code == 200, path
    bob_tok = csrf_of(bob_c.get("/").text)
    assert bob_c.post("/api/p/secret/next", headers={"X-CSRF-Token": bob_tok}).status_code == 404
    assert bob_c.get("/api/p/secret/next").status_code == 404
    assert store.next_assignment(p.id, bob.id) is None
    # ann labels; removed from the members meanwhile, she gets no next item: not from the SQLite hot path ...
    a = store.next_assignment(p.id, ann.id)
    assert a is not None
    c.post(f"/admin/p/{p.id}/members", data={"csrf_token": tok, "access": "members"})
    assert store.project_members(p.id) == set()
    with store._write_lock:
        got, fallback = sqlite_hot.submit_and_next_batch(store._hot_connection(), [
            (a.id, ann.id, {"choice": "left", "strength": "better"}, uuid.uuid4().hex)], store._hot_caches)
    assert fallback == [] and got[0][1] is True and got[0][2] is None
    # ... an edit of it is refused (404 like a missing assignment, review16 F7) ...
    with pytest.raises(NotFound):
        store.submit_and_next(a.id, ann.id, {"choice": "right", "strength": "better"}, uuid.uuid4().hex)
    # ... and the ORM path (here for a first judgement of an item taken while a member) hands her no next item
    c.post(f"/admin/p/{p.id}/members", data={"csrf_token": tok, "access": "members", "member": [str(ann.id)]})
    a2 = store.next_assignment(p.id, ann.id)
    c.post(f"/admin/p/{p.id}/members", data={"csrf_token": tok, "access": "members"})
    _j, created, nxt = store._submit_and_next_orm(a2.id, ann.id, {"choice": "right", "strength": "better"},
                                                  uuid.uuid4().hex)
    assert created and nxt is None
    assert store.next_assignment(p.id, ann.id) is None
    # back to everyone: bob may label
    c.post(f"/admin/p/{p.id}/members", data={"csrf_token": tok, "access": "all"})
    assert bob_c.get("/p/secret/guidelines").status_code == 200
    assert store.next_assignment(p.id, bob.id) is not None


# -- review and adjudication --------------------------------------------------------------------------------------
def _judge(store, project_id, labeler_id, fields):
    """Take the labeler's next item and judge it; a pairwise `choice` "a" / "b" is canonical (the screen side is
    worked out from the shown order)."""
    a = store.next_assignment(project_id, labeler_id)
    if fields.get("choice") in ("a", "b"):
        left = "a" if a.shown_order[0] == 0 else "b"
        fields = {**fields, "choice": "left" if fields["choice"] == left else "right"}
    store.submit(a.id, labeler_id, fields, uuid.uuid4().hex)
    return a


def test_review_page_shows_every_label_and_adjudication_is_stored(store, make_client):
    p = store.create_project("pw", "pairwise", overlap_k=2)
    store.import_records("pw", [{"prompt": "Which <b>one</b>?", "completions": [
        {"text": "first <i>answer</i>", "model": "model-x"}, {"text": "second", "model": "model-y"}]}])
    ann, bob = store.add_labeler("ann", PASSWORD), store.add_labeler("bob", PASSWORD)
    _judge(store, p.id, ann.id, {"choice": "a", "strength": "better", "comment": "A <is> kinder"})
    _judge(store, p.id, bob.id, {"choice": "b", "strength": "slightly_better"})
    c = _admin(store, make_client)
    listing = c.get(f"/admin/p/{p.id}/review")
    assert listing.status_code == 200 and 'id="review-table"' in listing.text
    item_id = store.current_judgements(p.id)[0]["item_id"]
    assert f"/admin/p/{p.id}/items/{item_id}" in listing.text
    page = c.get(f"/admin/p/{p.id}/items/{item_id}").text
    for text in ("ann", "bob", "model-x", "model-y", "A &lt;is&gt; kinder", "first &lt;i&gt;answer&lt;/i&gt;",
                 "Which &lt;b&gt;one&lt;/b&gt;?", ann.public_id):
        assert text in page, text
    assert "<i>answer" not in page
    tok = csrf_of(page)
    r = c.post(f"/admin/p/{p.id}/items/{item_id}/adjudicate", data={"csrf_token": tok, "decision": "override",
                                                                    "choice": "left"})
    assert r.status_code == 422 and "strength" in r.text
    r = c.post(f"/admin/p/{p.id}/items/{item_id}/adjudicate", data={
        "csrf_token": tok, "decision": "override", "choice": "right", "strength": "significantly_better",
        "note": "B is right"}, follow_redirects=False)
    assert r.status_code == 303
    adj = store.adjudications(p.id)[item_id]
    assert adj["decision"] == "override" and adj["answer"] == {"choice": "b", "strength": "significantly_better"}
    assert adj["note"] == "B is right" and adj["admin"] == "boss"
    assert "B is right" in c.get(f"/admin/p/{p.id}/items/{item_id}").text
    assert f"items/{item_id}" not in c.get(f"/admin/p/{p.id}/review").text  # decided: off the to-do list
    assert f"items/{item_id}" in c.get(f"/admin/p/{p.id}/review?show=adjudicated").text
    assert c.post(f"/admin/p/{p.id}/items/{item_id}/adjudicate", data={"decision": "exclude"}).status_code == 403
    assert c.get(f"/admin/p/{p.id}/items/999999").status_code == 404
    assert c.post(f"/admin/p/{p.id}/items/{item_id}/adjudicate",
                  data={"csrf_token": tok, "decision": "maybe"}).status_code == 422
    ann_c = make_client("ann")
    assert ann_c.get(f"/admin/p/{p.id}/items/{item_id}").status_code == 403


# -- dashboards and export forms --------------------------------------------------------------------------------------
def test_rank_dashboard_has_rank_columns(store, make_client):
    p = store.create_project("rk", "rank", overlap_k=2)
    store.import_records("rk", [{"prompt": "rank", "completions": [{"text": "x", "model": "big"},
                                                                   {"text": "y", "model": "small"},
                                                                   {"text": "z", "model": "small"}]}])
    ann, bob = store.add_labeler("ann", PASSWORD), store.add_labeler("bob", PASSWORD)
    for lab in (ann, bob):
        a = store.next_assignment(p.id, lab.id)
        # rank the canonical completions 1, 2, 3 whatever the shown order
        fields = {f"rank_{pos}": str(canon + 1) for pos, canon in enumerate(a.shown_order)}
        store.submit(a.id, lab.id, fields, uuid.uuid4().hex)
    page = make_client_admin_page(store, make_client, "/admin/p/rk")
    assert 'id="rank-model-table"' in page and "Kendall's W" in page and "Left picks" not in page
    assert "Kendall's τ with the others" in page
    # both rank x first: model big mean rank 1.00, small 2.50; W = 1, order agreement 100 %
    assert "<td>big</td><td>2</td><td>1.00</td><td>100%</td>" in page
    assert "<td>small</td><td>4</td><td>2.50</td><td>0%</td>" in page
    assert '<div class="n">1.00</div>Kendall' in page and '<div class="n">100%</div>pairwise order' in page
    from click.testing import CliRunner

    from alignloop.cli.feedback import feedback

    r = CliRunner().invoke(feedback, ["stats", "--db", store.url.removeprefix("sqlite:///"), "--project", "rk",
                                      "--json"])
    rank = json.loads(r.output)["rank"]
    assert rank["kendall_w"] == 1.0 and rank["pair_agreement"] == 1.0
    assert [(m["name"], m["mean_rank"]) for m in rank["by_model"]] == [("big", 1), ("small", 2.5)]


def make_client_admin_page(store, make_client, path):
    c = _admin(store, make_client)
    r = c.get(path)
    assert r.status_code == 200, r.text
    return r.text


@pytest.mark.parametrize("task,fields,label", [("thumbs", {"thumbs": "up"}, True),
                                               ("likert", {"likert": "6"}, True)])
def test_thumbs_and_likert_have_a_working_export_form(store, make_client, task, fields, label):
    p = store.create_project("t", task, overlap_k=1)
    store.import_records("t", [{"prompt": "q", "completions": ["only"]}])
    ann = store.add_labeler("ann", PASSWORD)
    _judge(store, p.id, ann.id, fields)
    c = _admin(store, make_client)
    page = c.get("/admin/p/t").text
    form = page[page.index('id="export-form"'):]
    assert "<option>unpaired</option>" in form and "<option>preference</option>" not in form
    r = c.get("/admin/p/t/export")  # the form's default format for the task
    assert r.status_code == 200, r.text
    assert [json.loads(x) for x in r.text.splitlines()] == [
        {"prompt": "q", "completion": "only", "label": label, "labelers": [ann.public_id], "comments": [""],
         "flags": [], "labeler_attributes": {}}]
    assert json.loads(r.headers["x-export-summary"])["rows"] == 1


def test_web_export_of_nothing_says_why_unless_allowed(store, make_client):
    p = store.create_project("pw", "pairwise", overlap_k=3)
    store.import_records("pw", [{"prompt": "q", "completions": ["a", "b"]}])
    ann = store.add_labeler("ann", PASSWORD)
    _judge(store, p.id, ann.id, {"choice": "a", "strength": "better"})
    c = _admin(store, make_client)
    r = c.get("/admin/p/pw/export?format=preference")
    assert r.status_code == 422 and "0 rows exported" in r.text and "fewer than min_labels = 2" in r.text
    r = c.get("/admin/p/pw/export?format=preference&allow_empty=true")
    assert r.status_code == 200 and r.text == ""
    r = c.get("/admin/p/pw/export?format=preference&min_labels=1")
    assert r.status_code == 200 and json.loads(r.text)["chosen"] == "a"
    assert c.get("/admin/p/pw/export?min_labels=0").status_code == 400
