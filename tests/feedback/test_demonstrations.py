"""Demonstrations (issue 17): the settings, the text submission on both submit paths, prompt-only imports, the
admin's review, the exports (sft, messages, preference) and their round trips into `alignloop sft` / `alignloop rm`,
and that stats / dashboards work on demonstration and conversation projects."""
from __future__ import annotations

import json
import math
import re
import uuid

import pytest
from click.testing import CliRunner
from fb_helpers import PASSWORD, api_login, csrf_of, label_page

from alignloop.errors import UserError
from alignloop.feedback import demonstrations as demos
from alignloop.feedback.errors import Forbidden, ValidationError
from alignloop.feedback.projects import check_settings

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _key() -> str:
    return uuid.uuid4().hex


def _demo_project(store, name="demos", rows=None, **settings):
    p = store.create_project(name, "demonstration", overlap_k=2, settings=settings or {"min_chars": 5})
    store.import_records(p.id, rows if rows is not None else [
        {"prompt": "Write a haiku about rain."},
        {"prompt": CHAT, "completion": "Blue, probably."}])
    return p


def _write(store, p, lab, texts: dict[str, str]) -> dict[str, int]:
    """The labeler writes a demonstration of every item (text chosen by the prompt's last message):
    {prompt text: assignment id}."""
    out = {}
    while (a := store.next_assignment(p.id, lab.id)) is not None:
        prompt = store.item_view(a.item, a.shown_order)["messages"][-1]["content"]
        store.submit(a.id, lab.id, {"text": texts[prompt]}, _key())
        out[prompt] = a.id
    return out


# -- settings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("task_type", "settings", "names"), [
    ("demonstration", {"min_chars": 0}, "settings.min_chars"),
    ("demonstration", {"min_chars": "20"}, "settings.min_chars"),
    ("demonstration", {"min_chars": 50, "max_chars": 40}, "settings.min_chars"),
    ("pairwise", {"min_chars": 10}, "settings.min_chars: a setting of demonstration projects"),
    ("demonstration", {"models": ["m"]}, "settings.models: a setting of conversation projects"),
    ("conversation", {"models": []}, "settings.models"),
    ("conversation", {"models": ["a", "b", "c"]}, "settings.models"),
    ("conversation", {"models": ["a", " "]}, "settings.models"),
    ("conversation", {"generation": {"top_p": 0}}, "settings.generation.top_p"),
    ("conversation", {"generation": {"max_new_tokens": 5000}}, "settings.generation.max_new_tokens"),
    ("conversation", {"generation": {"temperature": True}}, "settings.generation.temperature"),
    ("conversation", {"generation": {"beams": 2}}, "settings.generation.beams"),
    ("conversation", {"max_turns": 0}, "settings.max_turns"),
    ("conversation", {"open_start": "yes"}, "settings.open_start"),
    ("steps", {"open_start": True}, "settings.open_start: a setting of conversation projects"),
])
def test_settings_refused_naming_the_setting(task_type, settings, names):
    with pytest.raises(UserError) as e:
        check_settings(task_type, settings)
    assert names in str(e.value)


def test_settings_accepted_with_defaults_filled():
    assert check_settings("demonstration", {"min_chars": 5, "max_chars": 100}) == {"min_chars": 5, "max_chars": 100}
    got = check_settings("conversation", {"models": [" ./a ", "hub/b"], "generation": {"top_k": 5},
                                          "max_turns": 3, "open_start": True})
    assert got == {"models": ["./a", "hub/b"], "max_turns": 3, "open_start": True,
                   "generation": {"max_new_tokens": 128, "temperature": 0.8, "top_p": 1.0, "top_k": 5}}


# -- the submission: both paths, 422 naming "text", nothing stored -------------------------------------------------
@pytest.mark.parametrize("hot", [False, True], ids=["orm", "hot_path"])
def test_api_submission_checked_and_stored(store, make_client, hot):
    _demo_project(store, min_chars=10, max_chars=40)
    store.add_labeler("ann", PASSWORD)
    c, h = api_login(make_client)
    item = c.post("/api/p/demos/next", headers=h).json()
    aid = item["assignment_id"]
    url = f"/api/assignments/{aid}/judgement" + ("?next=1" if hot else "")
    for fields, says in [({}, "write the response"), ({"text": "   "}, "write the response"),
                         ({"text": "too short"}, "too short: 9 characters, at least 10"),
                         ({"text": "x" * 41}, "too long: 41 characters, at most 40"),
                         ({"text": 12345678901}, "must be text"), ({"text": ["a" * 20]}, "must be text")]:
        r = c.post(url, headers=h, json={**fields, "idempotency_key": _key()})
        assert r.status_code == 422, (fields, r.text)
        assert list(r.json()["fields"]) == ["text"] and says in r.json()["fields"]["text"], r.json()
    r = c.post(url, headers=h, content=b'{"text": "\\ud800 twenty characters long", "idempotency_key": "k' +
               _key().encode() + b'"}')
    assert r.status_code in (400, 422) and "surrogate" in r.text
    assert store.current_judgement(aid) is None  # nothing stored
    r = c.post(url, headers=h, json={"text": "  A response of the right size.\n", "comment": "ok",
                                     "idempotency_key": _key()})
    assert r.status_code == 201, r.text
    j = store.current_judgement(aid)
    assert (j.text, j.comment, j.version) == ("A response of the right size.", "ok", 1)
    if hot:
        assert r.json()["next"]["assignment_id"] is not None  # the reply carries the next item
    r = c.post(f"/api/assignments/{aid}/judgement", headers=h, json={"text": "An edited response, longer.",
                                                                     "idempotency_key": _key()})
    assert r.status_code == 201 and r.json()["version"] == 2  # an edit is a new version
    assert [x.text for x in store.judgement_history(aid)] == ["A response of the right size.",
                                                              "An edited response, longer."]


def test_web_form_submission_and_history(store, make_client):
    """The label page's form: 422 page naming the problem (text kept in the box), then stored; the history shows
    the written text and the edit page prefills it; the original of an edited answer is on the page, escaped."""
    _demo_project(store, rows=[{"prompt": "Say <b>hi</b>", "completion": "<script>alert(1)</script> hello"}],
                  min_chars=10)
    store.add_labeler("ann", PASSWORD)
    c = make_client("ann")
    page = label_page(c, "demos")
    assert 'id="demo-text"' in page.text and "&lt;script&gt;alert(1)&lt;/script&gt; hello" in page.text
    assert "<script>alert(1)" not in page.text
    aid = int(re.search(r'action="/p/demos/label/(\d+)"', page.text).group(1))
    data = {"csrf_token": csrf_of(page.text), "idempotency_key": _key()}
    r = c.post(f"/p/demos/label/{aid}", data={**data, "text": "short <i>"})
    assert r.status_code == 422 and "too short" in r.text and "short &lt;i&gt;</textarea>" in r.text
    r = c.post(f"/p/demos/label/{aid}", data={**data, "text": "Hello! A friendly <greeting> for you."})
    assert r.status_code == 200 and store.current_judgement(aid).text == "Hello! A friendly <greeting> for you."
    h = c.get("/p/demos/history")
    assert "Hello! A friendly &lt;greeting&gt; for you." in h.text and "not reviewed yet" in h.text
    e = c.get(f"/p/demos/edit/{aid}")
    assert ">Hello! A friendly &lt;greeting&gt; for you.</textarea>" in e.text and "Save new version" in e.text


def test_conversation_label_and_next_redirect_to_converse(store, make_client):
    store.create_project("chat", "conversation", settings={"models": ["m"]})
    store.add_labeler("ann", PASSWORD)
    c = make_client("ann")
    r = c.get("/p/chat/label", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/p/chat/converse"
    r = c.post("/p/chat/next", data={"csrf_token": csrf_of(c.get("/").text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/p/chat/converse"


# -- imports ------------------------------------------------------------------------------------------------------
def _jsonl(tmp_path, rows) -> str:
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(f)


@pytest.mark.parametrize(("task_type", "bad", "says"), [
    ("conversation", {"prompt": "hi", "completion": "hello"}, "imports prompts only"),
    ("conversation", {"prompt": "hi", "completions": ["a", "b"]}, "imports prompts only"),
    ("conversation", {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "must end with a user message"),
    ("demonstration", {"prompt": "hi", "completions": ["a", "b"]}, "at most ONE sampled answer"),
    ("demonstration", {"prompt": "hi", "completion": "  "}, "line 2"),
    ("demonstration", {"prompt": "hi", "gold": {"text": "x"}}, "'gold' is not used"),
    ("demonstration", {"completion": "no prompt"}, "missing field 'prompt'"),
])
def test_import_errors_name_the_line(store, tmp_path, task_type, bad, says):
    p = store.create_project("p", task_type)
    path = _jsonl(tmp_path, [{"prompt": "fine"}, bad])
    with pytest.raises(UserError) as e:
        store.import_jsonl(p.id, path)
    assert "line 2" in str(e.value) and says in str(e.value)
    assert store.project_summary(p.id)["items"] == 0  # nothing written


def test_import_prompt_rows_one_item_each_idempotent(store, tmp_path):
    d = store.create_project("d", "demonstration")
    rows = [{"prompt": "write"}, {"prompt": CHAT, "completions": [{"text": "orig", "model": "m1"}]},
            {"id": 7, "prompt": "edit", "completion": "sampled"}]
    r = store.import_jsonl(d.id, _jsonl(tmp_path, rows))
    assert (r.prompts, r.completions, r.items) == (3, 2, 3)
    again = store.import_jsonl(d.id, _jsonl(tmp_path, rows))
    assert (again.prompts, again.already_present) == (0, 3)
    c = store.create_project("c", "conversation")
    r = store.import_records(c.id, [{"prompt": "open"}, {"prompt": CHAT}])
    assert (r.prompts, r.completions, r.items) == (2, 0, 2)


# -- review -------------------------------------------------------------------------------------------------------
def test_review_accept_reject_newest_wins_and_edits_are_pending(store):
    p = _demo_project(store)
    ann, boss = store.add_labeler("ann", PASSWORD), store.add_labeler("boss", PASSWORD, role="admin")
    _write(store, p, ann, {"Write a haiku about rain.": "Rain taps on the roof, soft.",
                           "Name a colour.": "Blue, like the sky."})
    first = {r["text"]: r for r in demos.demonstration_records(store, p.id, "all")}
    jid = first["Rain taps on the roof, soft."]["judgement_id"]
    demos.review_demonstration(store, p.id, jid, boss.id, "reject", "Too plain")
    assert demos.demonstration_records(store, p.id, "rejected")[0]["review"]["note"] == "Too plain"
    demos.review_demonstration(store, p.id, jid, boss.id, "accept", " Fine after all ")
    assert [r["text"] for r in demos.demonstration_records(store, p.id, "accepted")] == [
        "Rain taps on the roof, soft."]
    assert demos.demonstration_records(store, p.id, "rejected") == []
    assert [r["text"] for r in demos.demonstration_records(store, p.id, "pending")] == ["Blue, like the sky."]
    # the labeler edits the accepted one: a new version, not reviewed yet
    store.submit(first["Rain taps on the roof, soft."]["assignment_id"], ann.id, {"text": "Rain taps the tin roof."},
                 _key())
    pending = demos.demonstration_records(store, p.id, "pending")
    assert sorted((r["text"], r["version"]) for r in pending) == [("Blue, like the sky.", 1),
                                                                  ("Rain taps the tin roof.", 2)]
    with pytest.raises(ValidationError) as e:
        demos.review_demonstration(store, p.id, jid, boss.id, "maybe")
    assert "decision" in e.value.errors
    with pytest.raises(Forbidden):
        demos.review_demonstration(store, p.id, jid, ann.id, "accept")
    other = _demo_project(store, "other")
    with pytest.raises(ValidationError):  # a demonstration filter only on demonstration projects
        demos.demonstration_records(store, store.create_project("pw", "pairwise").id)
    with pytest.raises(UserError):  # a judgement of another project
        demos.review_demonstration(store, other.id, jid, boss.id, "accept")


def test_admin_review_page_and_labeler_sees_note(store, make_client):
    p = _demo_project(store)
    ann = store.add_labeler("ann", PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    _write(store, p, ann, {"Write a haiku about rain.": "Rain taps on the roof, soft.",
                           "Name a colour.": "Blue, like the sky <b>."})
    admin = make_client("boss")
    page = admin.get(f"/admin/p/{p.id}/demonstrations")
    assert page.status_code == 200 and page.text.count('class="demo-card') == 2
    assert "Blue, like the sky &lt;b&gt;." in page.text and "Blue, probably." in page.text  # the text and original
    assert f'href="/admin/p/{p.id}/demonstrations"' in admin.get(f"/admin/p/{p.id}/review").text  # in the nav
    jid = next(r["judgement_id"] for r in demos.demonstration_records(store, p.id) if r["text"].startswith("Blue"))
    url = f"/admin/p/{p.id}/demonstrations/{jid}/review"
    assert admin.post(url, data={"decision": "reject", "note": "x"}).status_code in (400, 403)  # no CSRF token
    assert demos.demonstration_records(store, p.id, "rejected") == []
    labeler = make_client("ann")
    assert labeler.post(url, data={"csrf_token": csrf_of(labeler.get("/").text), "decision": "accept"}
                        ).status_code == 403
    r = admin.post(url, data={"csrf_token": csrf_of(page.text), "decision": "reject",
                              "note": "Say which blue <please>", "show": "pending"})
    assert r.status_code == 200 and "Rejected" not in r.text  # back on the "not reviewed" list: it left it
    rejected = admin.get(f"/admin/p/{p.id}/demonstrations?show=rejected")
    assert rejected.text.count('class="demo-card') == 1 and "Say which blue &lt;please&gt;" in rejected.text
    bad = admin.post(url, data={"csrf_token": csrf_of(page.text), "decision": "maybe"})
    assert bad.status_code == 422 and "decision" in bad.text
    h = labeler.get("/p/demos/history")
    assert "Rejected" in h.text and "Say which blue &lt;please&gt;" in h.text
    assert admin.get(f"/admin/p/{p.id}/demonstrations?show=nonsense").status_code == 422


# -- exports ------------------------------------------------------------------------------------------------------
def test_exports_exact_rows_edits_replace_and_rejected_left_out(store):
    p = _demo_project(store, rows=[{"prompt": "Write a haiku about rain."},
                                   {"prompt": CHAT, "completion": "Blue, probably."},
                                   {"prompt": "Fix: teh cat", "completion": "The cat."}])
    ann, boss = store.add_labeler("ann", PASSWORD), store.add_labeler("boss", PASSWORD, role="admin")
    aids = _write(store, p, ann, {"Write a haiku about rain.": "Rain taps on the roof, soft.",
                                  "Name a colour.": "Blue.", "Fix: teh cat": "The cat."})
    store.submit(aids["Name a colour."], ann.id, {"text": "Blue, like a clear sky."}, _key())  # an edit: version 2
    meta = {"labeler": store.get_labeler(ann.id).public_id, "labeler_attributes": {}, "comment": "", "flags": []}
    rows, summary = demos.export_demonstration_rows(store, p.id, "sft")
    assert rows == [{"prompt": "Write a haiku about rain.", "completion": "Rain taps on the roof, soft."},
                    {"prompt": "Fix: teh cat", "completion": "The cat."},
                    {"prompt": CHAT, "completion": [{"role": "assistant", "content": "Blue, like a clear sky."}]}]
    assert summary["rows"] == 3 and summary["left_out"] == {}
    rows, _ = demos.export_demonstration_rows(store, p.id, "messages")
    assert rows[2] == {"messages": [*CHAT, {"role": "assistant", "content": "Blue, like a clear sky."}]}
    assert rows[0] == {"messages": [{"role": "user", "content": "Write a haiku about rain."},
                                    {"role": "assistant", "content": "Rain taps on the roof, soft."}]}
    rows, summary = demos.export_demonstration_rows(store, p.id, "preference")
    assert [{k: v for k, v in r.items() if k != "time_spent_ms"} for r in rows] == [
        {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "Blue, like a clear sky."}],
         "rejected": [{"role": "assistant", "content": "Blue, probably."}], **meta}]
    assert summary["left_out"] == {"written_from_scratch": 1, "not_edited": 1}
    jid = next(r["judgement_id"] for r in demos.demonstration_records(store, p.id) if r["text"] == "The cat.")
    demos.review_demonstration(store, p.id, jid, boss.id, "reject", "unchanged")
    rows, summary = demos.export_demonstration_rows(store, p.id, "sft")
    assert [r["completion"] for r in rows][:1] == ["Rain taps on the roof, soft."] and len(rows) == 2
    assert summary["left_out"] == {"rejected": 1}
    rows, summary = demos.export_demonstration_rows(store, p.id, "sft", review="accepted")
    assert rows == [] and summary["left_out"] == {"not_accepted": 2, "rejected": 1}
    assert "2 not accepted; 1 rejected" in demos.empty_message(summary)
    assert len(demos.export_demonstration_rows(store, p.id, "sft", review="all")[0]) == 3


def test_cli_export_formats_review_and_empty(store, tmp_path):
    from alignloop.cli.feedback import feedback

    p = _demo_project(store)
    ann = store.add_labeler("ann", PASSWORD)
    run = CliRunner().invoke
    out = tmp_path / "d.jsonl"
    r = run(feedback, ["export", "--db", store.url, "--project", "demos", "--out", str(out)])
    assert r.exit_code == 2 and "no demonstrations yet" in r.output and not out.exists()
    r = run(feedback, ["export", "--db", store.url, "--project", "demos", "--out", str(out), "--allow-empty"])
    assert r.exit_code == 0 and out.read_text() == ""
    _write(store, p, ann, {"Write a haiku about rain.": "Rain taps on the roof, soft.", "Name a colour.": "Blue."})
    for fmt, n in (("sft", 2), ("messages", 2), ("preference", 1)):
        r = run(feedback, ["export", "--db", store.url, "--project", "demos", "--format", fmt, "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert len(out.read_text().splitlines()) == n and f"wrote {n} {fmt} rows" in r.output
    r = run(feedback, ["export", "--db", store.url, "--project", "demos", "--review", "accepted", "--out", str(out)])
    assert r.exit_code == 2 and "not accepted" in r.output
    r = run(feedback, ["export", "--db", store.url, "--project", "demos", "--format", "ranking", "--out", str(out)])
    assert r.exit_code == 2 and "exports sft, messages, preference" in r.output
    store.create_project("chat", "conversation")
    r = run(feedback, ["export", "--db", store.url, "--project", "chat", "--format", "unpaired", "--out", str(out)])
    assert r.exit_code == 2 and "exports sft, messages, preference" in r.output
    r = run(feedback, ["export", "--db", store.url, "--project", "chat", "--out", str(out)])  # to conversations.py
    assert r.exit_code == 2 and "0 rows exported from the conversations" in r.output


def test_cli_create_task_options_and_stats(store):
    from alignloop.cli.feedback import feedback

    run = CliRunner().invoke
    r = run(feedback, ["create", "--db", store.url, "--project", "d", "--task-type", "demonstration",
                       "--min-chars", "40"])
    assert r.exit_code == 0, r.output
    assert store.get_project("d").settings["min_chars"] == 40
    r = run(feedback, ["create", "--db", store.url, "--project", "c", "--task-type", "conversation", "--model", "a",
                       "--model", "b", "--max-new-tokens", "32", "--temperature", "0.5", "--max-turns", "4",
                       "--open-start"])
    assert r.exit_code == 0, r.output
    s = store.get_project("c").settings
    assert (s["models"], s["generation"]["max_new_tokens"], s["generation"]["temperature"], s["max_turns"],
            s["open_start"]) == (["a", "b"], 32, 0.5, 4, True)
    r = run(feedback, ["create", "--db", store.url, "--project", "x", "--task-type", "pairwise", "--min-chars", "5"])
    assert r.exit_code == 2 and "settings.min_chars" in r.output and "Traceback" not in r.output
    r = run(feedback, ["create", "--db", store.url, "--project", "y", "--task-type", "conversation", "--model", "a",
                       "--model", "b", "--model", "c"])
    assert r.exit_code == 2 and "at most 2" in r.output
    p = store.get_project("d")
    store.import_records(p.id, [{"prompt": "p1"}])
    ann = store.add_labeler("ann", PASSWORD)
    _write(store, p, ann, {"p1": "x" * 50})
    r = run(feedback, ["stats", "--db", store.url, "--project", "d", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)["demonstrations"]
    assert (d["n"], d["mean_chars"], d["labelers"]["ann"]["n"], d["reviews"]) == (1, 50, 1, {"pending": 1})
    r = run(feedback, ["stats", "--db", store.url, "--project", "c", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["conversations"]["n"] == 0
    assert run(feedback, ["stats", "--db", store.url, "--project", "c"]).exit_code == 0


def test_dashboard_and_web_export(store, make_client):
    p = _demo_project(store)
    ann = store.add_labeler("ann", PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    store.create_project("chat", "conversation")
    _write(store, p, ann, {"Write a haiku about rain.": "Rain taps on the roof, soft.", "Name a colour.": "Blue."})
    admin = make_client("boss")
    d = admin.get("/admin/p/demos")
    assert d.status_code == 200 and 'id="demo-labeler-table"' in d.text
    assert admin.get("/admin/p/chat").status_code == 200
    r = admin.get("/admin/p/demos/export?format=messages")
    assert r.status_code == 200 and len(r.text.splitlines()) == 2
    assert json.loads(r.headers["X-Export-Summary"])["rows"] == 2
    assert admin.get("/admin/p/demos/export?format=sft&review=accepted").status_code == 422
    assert admin.get("/admin/p/demos/export?format=ranking").status_code == 400


# -- round trips: the exports train -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, train_tokenizer

    tok = train_tokenizer(default_corpus(300), vocab_size=300)
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("demo_base"), tokenizer=tok, n_layer=1, n_embd=32,
                                     n_head=2))


def _trained(tmp_path, cli_args: list[str]) -> tuple[dict, list[dict]]:
    """Run `alignloop <args>` and return (summary.json, metrics.jsonl rows) of its output folder."""
    from alignloop.cli import cli

    r = CliRunner().invoke(cli, [*cli_args, "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                                 "--per-device-batch-size", "4", "--logging-steps", "1", "--no-progress",
                                 "--no-tensorboard"])
    assert r.exit_code == 0, r.output
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / "run" / "summary.json").read_text()), metrics


def _round_trip_project(store, n: int = 6):
    p = store.create_project("rt", "demonstration", overlap_k=1, settings={"min_chars": 5})
    store.import_records(p.id, [{"prompt": f"review {i}:", "completion": f"it was fine {i}"} for i in range(n)])
    ann = store.add_labeler("ann", PASSWORD)
    _write(store, p, ann, {f"review {i}:": f"it was great fun {i}" for i in range(n)})
    return p


def test_sft_export_trains(store, tmp_path, tiny_model):
    from alignloop.cli.feedback import feedback

    _round_trip_project(store)
    out = tmp_path / "sft.jsonl"
    r = CliRunner().invoke(feedback, ["export", "--db", store.url, "--project", "rt", "--format", "sft", "--out",
                                      str(out)])
    assert r.exit_code == 0, r.output
    summary, metrics = _trained(tmp_path, ["sft", "--model", tiny_model, "--train-file", str(out)])
    assert summary["data"][0]["rows"] == 6 and summary["data"][0]["records"] == 6
    losses = [m["loss/sft"] for m in metrics if "loss/sft" in m]
    assert losses and all(math.isfinite(x) for x in losses)


def test_edit_preference_export_trains_rm(store, tmp_path, tiny_model):
    from alignloop.cli.feedback import feedback

    _round_trip_project(store)
    out = tmp_path / "pref.jsonl"
    r = CliRunner().invoke(feedback, ["export", "--db", store.url, "--project", "rt", "--format", "preference",
                                      "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("it was great fun 0", "it was fine 0")
    summary, metrics = _trained(tmp_path, ["rm", "--model", tiny_model, "--train-file", str(out),
                                           "--max-length", "64"])
    assert summary["data"][0]["rows"] == 6 and summary["data"][0]["pairs"] == 6
    losses = [v for m in metrics for k, v in m.items() if k.startswith("loss")]
    assert losses and all(math.isfinite(x) for x in losses)


def test_serve_passes_the_generation_options(store, monkeypatch):
    """`serve --gen-queue/--gen-timeout/--gen-threads` reach create_app."""
    import uvicorn

    import alignloop.feedback.app as app_mod
    from alignloop.cli.feedback import feedback

    seen = {}

    def fake_create_app(store, secret_key=None, secure_cookies=False, session_max_age=0, session_idle_timeout=0,
                        max_body_bytes=0, max_import_bytes=0, generation_queue=8, generation_timeout_s=120.0,
                        generation_threads=1):
        seen.update(generation_queue=generation_queue, generation_timeout_s=generation_timeout_s,
                    generation_threads=generation_threads)
        return "app"

    monkeypatch.setattr(app_mod, "create_app", fake_create_app)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    r = CliRunner().invoke(feedback, ["serve", "--db", store.url, "--gen-queue", "3", "--gen-timeout", "9.5",
                                      "--gen-threads", "2", "--secret-key", "s" * 48])
    assert r.exit_code == 0, r.output
    assert seen == {"generation_queue": 3, "generation_timeout_s": 9.5, "generation_threads": 2, "app": "app"}
    r = CliRunner().invoke(feedback, ["serve", "--db", store.url, "--gen-queue", "0"])
    assert r.exit_code == 2 and "--gen-queue" in r.output


def test_conversation_stats_count_conversations_turns_and_ratings(store, make_client):
    """Stats and the dashboard of a conversation project read its conversations (H2's store functions)."""
    from alignloop.cli.feedback import feedback
    from alignloop.feedback import conversations as conv

    p = store.create_project("chat", "conversation", overlap_k=2, settings={"models": ["m"]})
    store.import_records(p.id, [{"prompt": "Plan a picnic."}, {"prompt": "Name a bird."}])
    ann = store.add_labeler("ann", PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    for rating in (6, 3):
        c, turn = conv.take_conversation(store, p.id, ann.id)
        conv.turn_generated(store, turn.id, [{"text": "A"}, {"text": "B"}], 5)
        conv.choose(store, c.id, ann.id, 0, 2, None)
        conv.end_conversation(store, c.id, ann.id, rating, "", None)
    c, turn = conv.take_conversation(store, p.id, store.add_labeler("bob", PASSWORD).id)  # one open, pending
    r = CliRunner().invoke(feedback, ["stats", "--db", store.url, "--project", "chat", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["conversations"]
    assert (got["n"], got["ended"], got["open"], got["turns"], got["mean_rating"], got["ratings"]) == (
        3, 2, 1, 3, 4.5, 2)
    assert got["turns_by_status"] == {"chosen": 2, "pending": 1}
    page = make_client("boss").get("/admin/p/chat")
    assert page.status_code == 200 and 'id="conversation-cards"' in page.text and "4.50" in page.text
