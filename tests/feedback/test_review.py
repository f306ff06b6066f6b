"""Review and adjudication in the store and the export: the newest decision per item counts; override replaces the
votes (margin from its strength), exclude drops the item, accept keeps the consensus and lets an item with fewer
than min_labels labels through; min_labels (setting and export parameter); an empty export is loud (CLI)."""
import json
import uuid

import pytest
from click.testing import CliRunner
from fb_helpers import PASSWORD

from alignloop.cli.feedback import feedback
from alignloop.errors import UserError
from alignloop.feedback import review
from alignloop.feedback.errors import NotFound, ValidationError
from alignloop.feedback.export import ExportOptions, export_records


def _pick(a, canonical: str, strength: str | None = None) -> dict:
    """The form fields that choose canonical completion "a" or "b" whatever the shown order."""
    left = "a" if a.shown_order[0] == 0 else "b"
    out = {"choice": "left" if canonical == left else "right"}
    return {**out, "strength": strength} if strength else out


def _prompt_of(store, a) -> str:
    return store.item_view(a.item, a.shown_order)["messages"][-1]["content"]


@pytest.fixture
def judged(store):
    """Pairwise, k = 3: q0 judged A, A, B (A wins, margins 2/3 and 1/3); q1 judged once (the others skipped it);
    q2 judged B, B."""
    p = store.create_project("pw", "pairwise", overlap_k=3)
    store.import_records("pw", [{"prompt": f"q{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(3)])
    plan = {"ann": {"q0": ("a", "better"), "q1": ("a", "slightly_better"), "q2": ("b", "better")},
            "bob": {"q0": ("a", "slightly_better"), "q2": ("b", "better")},
            "cat": {"q0": ("b", "significantly_better")}}
    labs = {}
    for name, answers in plan.items():
        lab = labs[name] = store.add_labeler(name, PASSWORD)
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            q = _prompt_of(store, a)
            if q in answers:
                store.submit(a.id, lab.id, _pick(a, *answers[q]), uuid.uuid4().hex)
            else:
                store.skip(a.id, lab.id)
    boss = store.add_labeler("boss", PASSWORD, role="admin")
    items = {r["item_id"]: None for r in store.current_judgements(p.id)}
    item_of = {}
    for r in store.current_judgements(p.id):
        item_of[store.prompts_and_completions(p.id)[0][r["prompt_id"]].messages[-1]["content"]] = r["item_id"]
    assert len(items) == 3
    return store, p, labs, boss, item_of


def _rows(store, p, **kw):
    opts = ExportOptions(exclude_flagged=False, **kw)
    return export_records(store, p.id, opts)


def test_min_labels_default_leaves_out_single_label_items_and_counts_them(judged):
    store, p, *_ = judged
    rows, summary = _rows(store, p)
    assert sorted((r["prompt"], r["chosen"], round(r["margin"], 3)) for r in rows) == [
        ("q0", "a0", 0.5), ("q2", "b2", 0.667)]
    assert summary["min_labels"] == 2 and summary["dropped"]["too_few_labels"] == 1
    rows, summary = _rows(store, p, min_labels=1)  # the parameter overrides the setting
    assert sorted(r["prompt"] for r in rows) == ["q0", "q1", "q2"] and "too_few_labels" not in summary["dropped"]
    rows, summary = _rows(store, p, min_labels=3)
    assert [r["prompt"] for r in rows] == ["q0"] and summary["dropped"]["too_few_labels"] == 2
    store.update_project(p.id, settings={**p.settings, "min_labels": 3})
    assert [r["prompt"] for r in _rows(store, p)[0]] == ["q0"]
    with pytest.raises(UserError, match="min_labels"):
        _rows(store, p, min_labels=0)


def test_override_exclude_accept_with_values(judged):
    store, p, labs, boss, item_of = judged
    store.adjudicate(p.id, item_of["q0"], boss.id, "override", {"choice": "right", "strength": "significantly_better"},
                     note="B is the safe one")
    store.adjudicate(p.id, item_of["q1"], boss.id, "accept")
    store.adjudicate(p.id, item_of["q2"], boss.id, "override", {"choice": "tie"})
    store.adjudicate(p.id, item_of["q2"], boss.id, "exclude", note="broken prompt")  # the newest counts
    rows, summary = _rows(store, p)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["margin"]) for r in rows] == [
        ("q0", "b0", "a0", 1.0),              # the override's strength, not the votes' 0.5 for a0
        ("q1", "a1", "b1", 1 / 3)]            # accepted: one label is enough
    assert rows[0]["labelers"] == [boss.public_id] and rows[0]["comments"] == ["B is the safe one"]
    assert rows[1]["labelers"] == [labs["ann"].public_id]
    assert (summary["overridden_items"], summary["excluded_items"], summary["accepted_items"]) == (1, 1, 1)
    # mode all: the override is the item's one row; the excluded item has none; q1's one judgement stays
    rows, _ = _rows(store, p, mode="all")
    assert sorted((r["prompt"], r["chosen"], r["labeler"]) for r in rows) == [
        ("q0", "b0", boss.public_id), ("q1", "a1", labs["ann"].public_id)]
    # the other formats follow the override too
    rows, _ = _rows(store, p, format="unpaired")
    assert {(r["completion"], r["label"]) for r in rows if r["prompt"] == "q0"} == {("b0", True), ("a0", False)}


def test_adjudication_is_checked(judged):
    store, p, _labs, boss, item_of = judged
    with pytest.raises(ValidationError) as e:
        store.adjudicate(p.id, item_of["q0"], boss.id, "override", {"choice": "left"})
    assert "strength" in e.value.errors
    with pytest.raises(ValidationError) as e:
        store.adjudicate(p.id, item_of["q0"], boss.id, "perhaps")
    assert "decision" in e.value.errors
    with pytest.raises(NotFound):
        store.adjudicate(p.id, 10**6, boss.id, "accept")
    other = store.create_project("other", "pairwise", overlap_k=1)
    with pytest.raises(NotFound):  # an item of another project
        store.adjudicate(other.id, item_of["q0"], boss.id, "accept")
    assert store.adjudications(p.id) == {}


def test_review_queue_lists_disagreement_flags_and_comments(judged):
    store, p, _labs, boss, item_of = judged
    queue = review.review_queue(store.current_judgements(p.id), "pairwise", store.adjudications(p.id))
    assert [r["item_id"] for r in queue] == [item_of["q0"]]  # the one with disagreement; q2 agrees, q1 alone
    assert queue[0]["disagree"] and queue[0]["labels"] == 3
    assert {r["item_id"] for r in review.review_queue(store.current_judgements(p.id), "pairwise", {}, "all")} == \
        set(item_of.values())
    store.adjudicate(p.id, item_of["q0"], boss.id, "accept")
    adjs = store.adjudications(p.id)
    assert review.review_queue(store.current_judgements(p.id), "pairwise", adjs) == []
    assert [r["decision"] for r in review.review_queue(store.current_judgements(p.id), "pairwise", adjs,
                                                       "adjudicated")] == ["accept"]
    data = store.item_review(p.id, item_of["q0"])
    assert sorted(j["labeler"] for j in data["judgements"]) == ["ann", "bob", "cat"]
    assert [c["text"] for c in data["completions"]] == ["a0", "b0"]


@pytest.mark.parametrize("task,rows,fields,answer,expect", [
    ("rank", {"prompt": "r", "completions": ["x", "y", "z"]}, {"rank_0": "3", "rank_1": "1", "rank_2": "2"},
     {"ranking": [3, 1, 2]}, {"prompt": "r", "completions": ["x", "y", "z"], "ranking": [3, 1, 2]}),
    ("thumbs", {"prompt": "t", "completions": ["only"]}, {"thumbs": "down"}, {"thumbs": -1},
     {"prompt": "t", "completion": "only", "label": False}),
    ("likert", {"prompt": "l", "completions": ["only"]}, {"likert": "6"}, {"likert": 6},
     {"prompt": "l", "completion": "only", "label": True}),
])
def test_override_other_task_types(store, task, rows, fields, answer, expect):
    p = store.create_project("t", task, overlap_k=1)
    store.import_records("t", [rows])
    boss = store.add_labeler("boss", PASSWORD, role="admin")
    item_id = 1
    store.adjudicate(p.id, item_id, boss.id, "override", fields)
    assert store.adjudications(p.id)[item_id]["answer"] == answer
    fmt = "ranking" if task == "rank" else "unpaired"
    out, _ = export_records(store, p.id, ExportOptions(format=fmt))  # no labels at all: the override alone
    assert [{k: r[k] for k in expect} for r in out] == [expect]


def test_cli_empty_export_fails_loudly_unless_allowed(judged, tmp_path):
    store, p, *_ = judged
    db = store.url.removeprefix("sqlite:///")
    out = tmp_path / "o.jsonl"
    r = CliRunner().invoke(feedback, ["export", "--db", db, "--project", "pw", "--out", str(out),
                                      "--labelers", "ai"])
    assert r.exit_code != 0 and "0 rows exported" in r.output and "no judgements" in r.output
    assert not out.exists()
    r = CliRunner().invoke(feedback, ["export", "--db", db, "--project", "pw", "--out", str(out),
                                      "--min-labels", "3", "--allow-empty", "--labelers", "ai"])
    assert r.exit_code == 0, r.output
    assert out.read_text() == ""
    # every labeler flagged (reading faster than the project's threshold): 0 rows, non-zero, saying why
    store.update_project(p.id, settings={**p.settings, "thresholds": {"min_items": 1, "min_median_seconds": 1e9}})
    r = CliRunner().invoke(feedback, ["export", "--db", db, "--project", "pw", "--out", str(out)])
    assert r.exit_code != 0 and "flagged labelers left out: ann, bob, cat" in r.output, r.output
    r = CliRunner().invoke(feedback, ["export", "--db", db, "--project", "pw", "--out", str(out),
                                      "--min-labels", "1", "--include-flagged"])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(x)["prompt"] for x in out.read_text().splitlines()) == ["q0", "q1", "q2"]
