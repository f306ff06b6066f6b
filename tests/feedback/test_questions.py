"""Several questions per pairwise item: the `questions` setting, answers through the JSON API (both submit paths)
and the no-JS form, editing, the export per criterion (CLI, web), and `stats` per question."""
import json
import re

import pytest
from click.testing import CliRunner
from fb_helpers import PASSWORD, Labeling, assignment_of, csrf_of, field_of

from alignloop import data
from alignloop.cli.feedback import feedback
from alignloop.errors import UserError
from alignloop.feedback.errors import ValidationError
from alignloop.feedback.export import ExportOptions, export_records

QUESTIONS = [{"name": "helpful", "question": "Which response is more <i>helpful</i>?"},
             {"name": "harmless", "question": "Which response is more harmless?"}]


def _cli(*args, input=None, env=None):
    return CliRunner().invoke(feedback, [str(a) for a in args], input=input, env=env)


@pytest.fixture
def qstore(store):
    store.create_project("qq", "pairwise", overlap_k=2, settings={"questions": QUESTIONS})
    store.import_records("qq", [{"prompt": f"p{i}", "completions": [f"good {i}", f"bad {i}"]} for i in range(3)])
    store.create_project("one", "pairwise", overlap_k=1)
    store.import_records("one", [{"prompt": "single", "completions": ["x", "y"]}])
    for name in ("ann", "bob"):
        store.add_labeler(name, PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    return store


@pytest.mark.parametrize("questions, task, message", [
    ([{"name": "Helpful", "question": "?"}], "pairwise", r"settings.questions\[0\].name 'Helpful': a slug"),
    ([{"name": "a", "question": "x"}, {"name": "a", "question": "y"}], "pairwise", r"questions\[1\].name 'a': used"),
    ([{"name": "a", "question": " "}], "pairwise", r"questions\[0\].question: a non-empty text"),
    ([{"name": "a"}], "pairwise", r'questions\[0\]: an object with exactly "name" and "question"'),
    ([], "pairwise", "settings.questions: a list of 1 to 10"),
    ("helpful", "pairwise", "settings.questions: a list"),
    ([{"name": f"q{i}", "question": "?"} for i in range(11)], "pairwise", "a list of 1 to 10"),
    (QUESTIONS, "rank", "settings.questions: several questions are supported for pairwise projects only, not rank"),
    (QUESTIONS, "likert", "not likert"),
])
def test_questions_setting_is_checked_at_creation(store, questions, task, message):
    with pytest.raises(UserError, match=message):
        store.create_project("bad", task, settings={"questions": questions})
    assert store.list_projects() == []


def test_cli_create_with_questions_and_errors(tmp_path):
    db = tmp_path / "f.db"
    r = _cli("create", "--db", db, "--project", "hh", "--question", "helpful=More helpful?", "--question",
             "harmless=More harmless?")
    assert r.exit_code == 0 and "questions: helpful, harmless" in r.output, r.output
    for args, msg in [(["--project", "x", "--question", "helpful"], "write NAME=TEXT"),
                      (["--project", "x", "--question", "Bad Name=?"], "settings.questions[0].name 'Bad Name'"),
                      (["--project", "x", "--task-type", "rank", "--question", "a=?"], "pairwise projects only"),
                      (["--question", "a=?"], "give --project too")]:
        r = _cli("create", "--db", db, *args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)


def test_validation_names_each_missing_field(qstore):
    p = qstore.get_project("qq")
    ann = qstore.authenticate("ann", PASSWORD)
    a = qstore.next_assignment(p.id, ann.id)
    for fields, errors in [
        ({}, {"choice_helpful", "choice_harmless"}),
        ({"choice": "left", "strength": "better"}, {"choice", "choice_helpful", "choice_harmless"}),
        ({"choice_helpful": "left", "choice_harmless": "sideways"}, {"strength_helpful", "choice_harmless"}),
        ({"answers": {"helpful": {"choice": "tie"}, "kind": {"choice": "tie"}}}, {"answers", "choice_harmless"}),
        ({"answers": ["tie", "tie"]}, {"answers", "choice_helpful", "choice_harmless"}),
        ({"answers": {"helpful": {"choice": "left", "strength": "huge"}, "harmless": {"choice": "tie"}}},
         {"strength_helpful"}),
    ]:
        with pytest.raises(ValidationError) as e:
            qstore.submit(a.id, ann.id, fields, "val-key-0001")
        assert set(e.value.errors) == errors, fields
        assert all(name in e.value.errors[f"choice_{name}"] for name in ("helpful", "harmless")
                   if f"choice_{name}" in e.value.errors)
    assert qstore.current_judgement(a.id) is None


def test_api_answers_per_question_on_both_submit_paths(qstore, make_client):
    c = make_client()
    tok = c.post("/api/login", json={"username": "ann", "password": PASSWORD}).json()["csrf_token"]
    hdr = {"X-CSRF-Token": tok}
    item = c.post("/api/p/qq/next", headers=hdr).json()
    assert item["questions"] == ["helpful", "harmless"]
    assert "questions" not in c.post("/api/p/one/next", headers=hdr).json()  # one question: the payload as before
    body = {"answers": {"helpful": {"choice": "left", "strength": "better"}}, "idempotency_key": "api-key-0001"}
    r = c.post(f"/api/assignments/{item['assignment_id']}/judgement?next=1", json=body, headers=hdr)
    assert r.status_code == 422 and set(r.json()["fields"]) == {"choice_harmless"}
    assert "harmless" in r.json()["fields"]["choice_harmless"]
    body["answers"]["harmless"] = {"choice": "right", "strength": "slightly_better"}
    r = c.post(f"/api/assignments/{item['assignment_id']}/judgement?next=1", json=body, headers=hdr)  # hot path
    assert r.status_code == 201 and r.json()["next"]["questions"] == ["helpful", "harmless"]
    nxt = r.json()["next"]
    body = {"choice_helpful": "tie", "choice_harmless": "both_bad", "idempotency_key": "api-key-0002"}
    r = c.post(f"/api/assignments/{nxt['assignment_id']}/judgement", json=body, headers=hdr)  # the ORM path
    assert r.status_code == 201
    first, second = qstore.current_judgements(qstore.get_project("qq").id)  # in the order they were stored
    assert "shown_order" not in item  # blind (F3): the store knows the order, the client answers left/right
    shown = qstore.get_assignment(item["assignment_id"]).shown_order
    assert first["answers"] == {
        "helpful": {"choice": "ab"[shown[0]], "strength": "better", "picked_position": 0},
        "harmless": {"choice": "ab"[shown[1]], "strength": "slightly_better", "picked_position": 1}}
    assert (first["choice"], first["strength"], first["picked_position"]) == ("ab"[shown[0]], "better", 0)
    assert second["answers"]["harmless"]["choice"] == "both_bad" and second["choice"] == "tie"


def test_hot_path_stores_answers_as_the_orm_path_does(qstore):
    p = qstore.get_project("qq")
    ann = qstore.authenticate("ann", PASSWORD)
    fields = {"choice_helpful": "left", "strength_helpful": "better", "choice_harmless": "tie"}
    a1 = qstore.next_assignment(p.id, ann.id)
    qstore.submit(a1.id, ann.id, fields, "orm-path-0001")
    a2 = qstore.next_assignment(p.id, ann.id)
    j, created, _ = qstore.submit_and_next(a2.id, ann.id, fields, "raw-path-0001")
    assert created and type(j).__name__ == "StoredJudgement" and j.answers["harmless"]["choice"] == "tie"
    with qstore.engine.connect() as conn:
        stored = dict(conn.exec_driver_sql("SELECT idempotency_key, answers FROM judgements").all())
    norm = {k: re.sub(r'"choice": "[ab]"', '"choice": "?"', v) for k, v in stored.items()}  # orders are random
    assert norm["orm-path-0001"] == norm["raw-path-0001"] and json.loads(stored["raw-path-0001"]) == j.answers
    one = qstore.get_project("one")
    a = qstore.next_assignment(one.id, ann.id)
    qstore.submit_and_next(a.id, ann.id, {"choice": "tie"}, "one-key-0001")
    with qstore.engine.connect() as conn:  # a one-question project stores no answers: SQL NULL on both paths
        assert conn.exec_driver_sql("SELECT answers FROM judgements WHERE idempotency_key = 'one-key-0001'"
                                    ).scalar() is None


def test_form_asks_each_question_and_keeps_answers_on_errors(qstore, make_client):
    ann = Labeling(make_client("ann"), "qq")
    page = ann.page()
    assert "Which response is more &lt;i&gt;helpful&lt;/i&gt;?" in page.text  # escaped
    assert page.text.count('name="choice_helpful"') == 4 and page.text.count('name="strength_harmless"') == 4
    assert 'name="choice"' not in page.text
    aid, r = ann.submit({"choice_helpful": "right", "strength_helpful": "better"}, page)
    assert r.status_code == 422 and "harmless: choose the better response" in r.text
    assert re.search(r'name="choice_helpful" value="right"\s+checked', r.text)  # kept
    assert re.search(r'class="question[^"]*missing" id="question-harmless"', r.text)
    aid2, r = ann.submit({"choice_helpful": "right", "strength_helpful": "better", "choice_harmless": "left",
                          "strength_harmless": "negligibly_better", "comment": "fine"}, r)
    assert aid2 == aid and r.status_code == 200 and r.url.path == "/p/qq/label"
    j = qstore.current_judgement(aid)
    assert j.answers["helpful"]["picked_position"] == 1 and j.answers["harmless"]["strength"] == "negligibly_better"
    edit = ann.c.get(f"/p/qq/edit/{aid}")  # editing shows every answer again
    assert re.search(r'name="choice_harmless" value="left"\s+checked', edit.text)
    assert re.search(r'name="strength_harmless" value="negligibly_better"\s+checked', edit.text)
    r = ann.c.post(f"/p/qq/label/{aid}", data={"csrf_token": csrf_of(edit.text), "choice_helpful": "tie",
                                               "choice_harmless": "tie",
                                               "idempotency_key": field_of(edit.text, "idempotency_key")})
    assert r.status_code == 200 and qstore.current_judgement(aid).answers["helpful"]["choice"] == "tie"
    assert assignment_of(ann.page().text) != aid


def _label_all(qstore):
    p = qstore.get_project("qq")
    for who in ("ann", "bob"):
        lab = qstore.authenticate(who, PASSWORD)
        while (a := qstore.next_assignment(p.id, lab.id)) is not None:
            view = qstore.item_view(a.item, a.shown_order)
            good = "left" if view["completions"][0]["text"].startswith("good") else "right"
            bad = "right" if good == "left" else "left"
            qstore.submit(a.id, lab.id, {"choice_helpful": good, "strength_helpful": "better",
                                         "choice_harmless": bad, "strength_harmless": "slightly_better"},
                          f"lab-{who}-{a.id}-key")


def test_export_per_criterion_and_all(qstore):
    _label_all(qstore)
    opts = {"exclude_flagged": False}
    helpful, s = export_records(qstore, "qq", ExportOptions(**opts))
    assert s["criteria"] == ["helpful"] and {r["criterion"] for r in helpful} == {"helpful"}
    assert all(r["chosen"].startswith("good") and r["margin"] == pytest.approx(2 / 3) for r in helpful)
    harmless, _ = export_records(qstore, "qq", ExportOptions(criterion="harmless", **opts))
    assert all(r["chosen"].startswith("bad") and r["margin"] == pytest.approx(1 / 3) for r in harmless)
    both, s = export_records(qstore, "qq", ExportOptions(criterion="all", **opts))
    assert s["criteria"] == ["helpful", "harmless"] and len(both) == len(helpful) + len(harmless) == 6
    groups = {}
    for r in both:
        groups.setdefault(r["group"], set()).add(r["criterion"])
    assert len(groups) == 6 and all(len(c) == 1 for c in groups.values())  # each criterion's groups apart
    read, _ = data.load_preferences(both)
    assert sorted(g.meta["criterion"] for g in read) == ["harmless"] * 3 + ["helpful"] * 3
    assert [r["criterion"] for r in export_records(qstore, "qq", ExportOptions(
        format="unpaired", criterion="harmless", **opts))[0]] == ["harmless"] * 6
    with pytest.raises(UserError, match="criterion 'kind': project 'qq' asks helpful, harmless"):
        export_records(qstore, "qq", ExportOptions(criterion="kind"))
    one, _ = export_records(qstore, "one", ExportOptions(criterion="all"))  # unnamed question: no criterion column
    assert all("criterion" not in r for r in one)


def test_cli_export_criterion_and_stats_per_question(qstore, tmp_path):
    _label_all(qstore)
    db = qstore.url
    out = tmp_path / "h.jsonl"
    r = _cli("export", "--db", db, "--project", "qq", "--out", out, "--criterion", "harmless", "--include-flagged")
    assert r.exit_code == 0 and "wrote 3 preference rows (criterion harmless)" in r.output, r.output
    assert {json.loads(x)["criterion"] for x in out.read_text().splitlines()} == {"harmless"}
    r = _cli("export", "--db", db, "--project", "qq", "--out", out, "--criterion", "all", "--include-flagged")
    assert r.exit_code == 0 and "wrote 6 preference rows (criterion helpful, harmless)" in r.output
    r = _cli("export", "--db", db, "--project", "qq", "--out", out, "--criterion", "nope")
    assert r.exit_code == 2 and "criterion 'nope'" in r.output and "Traceback" not in r.output
    r = _cli("stats", "--db", db, "--project", "qq")
    assert r.exit_code == 0 and "per question" in r.output
    assert re.search(r"helpful\s+6\s+\d+\s+\d+\s+0\s+0", r.output) and "Which response is more harmless?" in r.output
    st = json.loads(_cli("stats", "--db", db, "--project", "qq", "--json").output)
    assert st["questions"]["harmless"]["judgements"] == 6 and sum(st["questions"]["harmless"]["choices"].values()) == 6
    assert st["questions"]["helpful"]["choices"] == {"a": 6} and st["questions"]["harmless"]["choices"] == {"b": 6}
    assert set(st["questions"]["helpful"]["agreement"]) >= {"fleiss_kappa", "krippendorff_alpha"}


def test_web_export_criterion_and_dashboard(qstore, make_client):
    _label_all(qstore)
    admin = make_client("boss")
    page = admin.get("/admin/p/qq")
    assert page.status_code == 200 and '<select name="criterion">' in page.text and 'id="question-table"' in page.text
    assert "Which response is more &lt;i&gt;helpful&lt;/i&gt;?" in page.text
    r = admin.get("/admin/p/qq/export?criterion=harmless&exclude_flagged=false")
    assert r.status_code == 200 and 'filename="qq-preference-harmless.jsonl"' in r.headers["content-disposition"]
    assert {json.loads(x)["criterion"] for x in r.text.splitlines()} == {"harmless"}
    r = admin.get("/admin/p/qq/export?criterion=all&exclude_flagged=false")
    assert len(r.text.splitlines()) == 6
    r = admin.get("/admin/p/qq/export?criterion=bogus")
    assert r.status_code == 400 and "criterion &#39;bogus&#39;: project &#39;qq&#39; asks helpful, harmless" in r.text
    assert '<select name="criterion">' not in admin.get("/admin/p/one").text
