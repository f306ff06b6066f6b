"""The steps task type (process supervision): importing step rows, the form and JSON API, validation and the
"first error" rule, both submit paths, agreement per step by hand, the steps export read back as the step format,
AI labelers, the CLI and migration 0004."""
import json
import math

import pytest
from click.testing import CliRunner
from fb_helpers import PASSWORD, Labeling, assignment_of, csrf_of, field_of

from alignloop.cli.feedback import feedback as feedback_cli
from alignloop.data import read_steps, write_rows
from alignloop.errors import UserError
from alignloop.feedback import db as dbmod
from alignloop.feedback import quality
from alignloop.feedback.export import ExportOptions, export_records, majority_step_labels, project_options
from alignloop.feedback.models import Item, Judgement
from alignloop.feedback.store import Store
from alignloop.feedback.validation import ValidationError, validate_submission

CHAT = [{"role": "system", "content": "Show your work."}, {"role": "user", "content": "What is 2 + 3 * 4?"}]
SOL_A = ["3 * 4 = 12", "2 + 12 = 14", "The answer is 14."]
SOL_B = ["2 + 3 = 5", "5 * 4 = 20"]


def _steps_project(store, name="st", k=3, rows=None, **kw):
    p = store.create_project(name, "steps", overlap_k=k, **kw)
    store.import_records(name, rows if rows is not None else [
        {"prompt": "What is 2 + 3 * 4?", "completions": SOL_A},
        {"prompt": CHAT, "completions": SOL_B}])
    return p


def _label_all(store, p, plan: dict[str, dict[tuple, list]], key="steps-key"):
    """Each labeler labels every item it gets: plan[labeler][tuple of the item's steps] = labels."""
    labs = {}
    for name, by_steps in plan.items():
        lab = labs[name] = store.add_labeler(name, PASSWORD)
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            steps = tuple(c["text"] for c in store.item_view(a.item, a.shown_order)["completions"])
            store.submit(a.id, lab.id, {"step_labels": by_steps[steps]}, f"{key}-{name}-{a.id}")
    return labs


# -- import -------------------------------------------------------------------------------------------------------
def test_import_step_rows_one_item_per_solution(store):
    p = store.create_project("st", "steps", overlap_k=2)
    r = store.import_records("st", [
        {"prompt": "What is 2 + 3 * 4?", "completions": SOL_A, "labels": [1, 1, 1]},   # labels of a non-gold row
        {"prompt": "What is 2 + 3 * 4?", "completions": SOL_B},                         # same prompt: shared
        {"prompt": "gold one", "completions": ["a", "b", "c"], "labels": [1, 0, -1], "gold": True},
        {"prompt": "gold two", "completions": ["x", "y"], "gold": {"labels": [True, False]}},
        {"prompt": CHAT, "completion": "3 * 4 = 12\n\n2 + 12 = 14\n  \n"},           # a text split into steps
    ])
    # prompts: 4 distinct; steps 3 + 2 + 3 + 2 + 2; one item per row
    assert (r.prompts, r.completions, r.items, r.gold_items) == (4, 12, 5, 2)
    assert len(r.warnings) == 1 and "1 non-gold row(s) carry labels" in r.warnings[0]
    with store.read() as s:
        items = list(s.query(Item).filter(Item.project_id == p.id).order_by(Item.id))
    assert [len(i.completion_ids) for i in items] == [3, 2, 3, 2, 2]
    assert items[0].prompt_id == items[1].prompt_id and items[0].gold_answer is None
    assert [i.gold_answer for i in items if i.is_gold] == [{"step_labels": [1, 0, -1]}, {"step_labels": [1, -1]}]
    view = store.item_view(items[4], [0, 1])
    assert [c["text"] for c in view["completions"]] == ["3 * 4 = 12", "2 + 12 = 14"] and view["is_chat"]
    assert [c["text"] for c in store.item_view(items[0], [0, 1, 2])["completions"]] == SOL_A  # steps in order


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "completions": ["ok", "two\nlines"]}, "step 1 ('completions[1]')"),
    ({"prompt": "p", "completions": ["ok", "  "]}, "non-empty string"),
    ({"prompt": "p", "completions": []}, "non-empty list"),
    ({"prompt": "p", "completion": "\n\n"}, "has no steps"),
    ({"prompt": "p", "completions": ["a", "b"], "gold": True}, "a gold steps row needs 'labels'"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [1], "gold": True}, "(2 of them)"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [1, 2], "gold": True}, "+1 good, 0 neutral, -1 bad"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [1, "bad"], "gold": True}, "+1 good"),
    ({"prompt": "p", "completions": ["a", "b"], "gold": {"choice": "a"}}, "must be true (with 'labels')"),
    ({"completions": ["a"]}, "missing field 'prompt'"),
])
def test_import_errors_name_the_row_and_field(store, row, message):
    store.create_project("st", "steps")
    with pytest.raises(UserError, match="record 1") as e:
        store.import_records("st", [row])
    assert message in str(e.value)
    assert store.project_summary(store.get_project("st").id)["items"] == 0  # nothing written


def test_import_file_errors_name_the_line_and_max_steps(store, tmp_path):
    store.create_project("st", "steps", settings={"max_steps": 2})
    f = tmp_path / "steps.jsonl"
    f.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n"
                 + json.dumps({"prompt": "q", "completions": ["a", "b\nc"]}) + "\n")
    with pytest.raises(UserError, match=r"steps.jsonl line 2: step 1"):
        store.import_jsonl("st", f)
    with pytest.raises(UserError, match=r"record 1: 3 steps; a steps item shows at most 2 \(project setting"):
        store.import_records("st", [{"prompt": "p", "completions": ["a", "b", "c"]}])


# -- validation and the "first error" rule -------------------------------------------------------------------------
def test_validate_steps_submission_and_first_error():
    order = [0, 1, 2, 3]
    v = validate_submission("steps", order, {"step_0": "good", "step_1": "neutral", "step_2": "bad", "step_3": "1"})
    assert v["step_labels"] == [1, 0, -1, 1]
    assert validate_submission("steps", order, {"step_labels": [1, 0, -1, -1]})["step_labels"] == [1, 0, -1, -1]
    assert validate_submission("steps", order, {"step_labels": [True, "+1", "-1", "0"]})["step_labels"] == [1, 1, -1, 0]
    # JSON clients that send every number as a float: 1.0 is +1 (0.5 is no rating)
    assert validate_submission("steps", order, {"step_labels": [1.0, 0.0, -1.0, 1]})["step_labels"] == [1, 0, -1, 1]
    with pytest.raises(ValidationError):
        validate_submission("steps", order, {"step_labels": [1, 0.5, -1, 1]})
    # first error at step index 2: earlier rated steps keep their rating (step 0 neutral), unrated earlier ones
    # become good (step 1), it and every later step bad, overriding a later rating (step 3 "good")
    v = validate_submission("steps", order, {"step_0": "neutral", "step_3": "good", "first_error": "2"})
    assert v["step_labels"] == [0, 1, -1, -1]
    assert validate_submission("steps", order, {"first_error": 0})["step_labels"] == [-1, -1, -1, -1]
    assert validate_submission("steps", [0, 1], {"step_labels": [1, 1], "first_error": "1"})["step_labels"] == [1, -1]


@pytest.mark.parametrize("fields, errors", [
    ({"step_0": "good"}, {"step_1": "rate step 2: good, neutral or bad",
                          "step_2": "rate step 3: good, neutral or bad"}),
    ({"step_0": "good", "step_1": "great", "step_2": "bad"}, {"step_1": "step 2: unknown rating 'great'"}),
    ({"step_0": "good", "step_1": "good", "step_2": "bad", "step_3": "bad"}, {"steps": "has 3 steps"}),
    ({"step_labels": [1, 0]}, {"step_labels": "a list of 3 labels"}),
    ({"step_labels": [1, 2, 0]}, {"step_1": "unknown rating 2"}),
    ({"step_labels": [1, 1, 1], "step_0": "good"}, {"step_labels": "not both"}),
    ({"first_error": "3"}, {"first_error": "from 0 to 2"}),
    ({"first_error": "x", "step_0": "good", "step_1": "good", "step_2": "good"}, {"first_error": "'x'"}),
])
def test_validate_steps_errors(fields, errors):
    with pytest.raises(ValidationError) as e:
        validate_submission("steps", [0, 1, 2], fields)
    for k, msg in errors.items():
        assert msg in e.value.errors[k], (k, e.value.errors)


# -- the store: order, both submit paths, edits ---------------------------------------------------------------------
def test_steps_are_shown_in_order_and_both_submit_paths_store_them_alike(tmp_path):
    store = Store(str(tmp_path / "fb.db"), seed=3)
    try:
        p = _steps_project(store, k=2, rows=[{"prompt": f"p{i}", "completions": [f"s{j}" for j in range(6)]}
                                             for i in range(4)])
        lab = store.add_labeler("ann", PASSWORD)
        a1 = store.next_assignment(p.id, lab.id)
        assert a1.shown_order == list(range(6))  # never shuffled (a seeded shuffle of 6 would move something)
        store.submit(a1.id, lab.id, {"step_labels": [1, 0, -1, -1, -1, -1]}, "orm-steps-0001")
        a2 = store.next_assignment(p.id, lab.id)
        j2, created, a3 = store.submit_and_next(a2.id, lab.id, {"step_0": "good", "first_error": "1"},
                                                "hot-steps-0001")
        assert created and type(j2).__name__ == "StoredJudgement"  # the SQLite hot path took it
        assert j2.step_labels == [1, -1, -1, -1, -1, -1] and a3.shown_order == list(range(6))
        with store.engine.connect() as conn:
            rows = dict(conn.exec_driver_sql("SELECT idempotency_key, step_labels FROM judgements").all())
            ranking = conn.exec_driver_sql("SELECT count(*) FROM judgements WHERE ranking IS NULL").scalar()
            order = conn.exec_driver_sql("SELECT shown_order FROM assignments WHERE id = ?", (a3.id,)).scalar()
        assert rows == {"orm-steps-0001": "[1, 0, -1, -1, -1, -1]", "hot-steps-0001": "[1, -1, -1, -1, -1, -1]"}
        assert ranking == 2 and order == "[0, 1, 2, 3, 4, 5]"
        with pytest.raises(ValidationError) as e:  # invalid on the hot path: 4xx-style error, nothing written
            store.submit_and_next(a3.id, lab.id, {"step_labels": [1, 1]}, "hot-steps-0002")
        assert "step_labels" in e.value.errors
        # an edit appends version 2
        j1b, created = store.submit(a1.id, lab.id, {"step_labels": [1, 1, 1, 1, 1, -1]}, "orm-steps-0002")
        assert created and j1b.version == 2
        recs = {r["item_id"]: r for r in store.current_judgements(p.id)}
        assert recs[a1.item_id]["step_labels"] == [1, 1, 1, 1, 1, -1] and recs[a1.item_id]["version"] == 2
        # the other task types store no step labels
        pw = store.create_project("pw", "pairwise", overlap_k=1)
        store.import_records("pw", [{"prompt": "p", "completions": ["x", "y"]}])
        a = store.next_assignment(pw.id, lab.id)
        j, _ = store.submit(a.id, lab.id, {"choice": "tie"}, "pairwise-0001")
        with store.read() as s:
            assert s.get(Judgement, j.id).step_labels is None
    finally:
        store.dispose()


# -- agreement per step, by hand ------------------------------------------------------------------------------------
def _records():
    """Three labelers; item 1 has 3 steps, item 2 has 2 (non-gold); item 3 is gold [1, -1]."""
    labels = {1: {"A": [1, 1, -1], "B": [1, -1, -1], "C": [1, 0, -1]},
              2: {"A": [1, 1], "B": [1, 1], "C": [-1, -1]},
              3: {"A": [1, -1], "B": [1, 1], "C": [-1, -1]}}
    return [{"item_id": i, "labeler": w, "is_gold": i == 3, "gold_answer": {"step_labels": [1, -1]} if i == 3 else None,
             "step_labels": ls, "time_spent_ms": 5000, "labeler_kind": "human"}
            for i, by in labels.items() for w, ls in by.items()]


def test_agreement_per_step_by_hand():
    """Units (non-gold steps) and their labels A/B/C: (1,0) 1/1/1, (1,1) 1/-1/0, (1,2) -1/-1/-1, (2,0) 1/1/-1,
    (2,1) 1/1/-1.

    Leave-one-out: A = (1 + 0 + 1 + 1/2 + 1/2) / 5 = 0.6 (the others tie at (2,0), (2,1): 1/2 each); B = 0.6 the same
    way; C = (1 + 0 + 1 + 0 + 0) / 5 = 0.4. Pooled pairwise: 15 pairs, 3 + 0 + 3 + 1 + 1 = 8 agree: 8/15.
    By position: step 1 (units (1,0), (2,0)): 4 of 6 pairs; step 2: 1 of 6; step 3: 3 of 3.
    Fleiss over the 5 units, categories (-1, 0, 1): rows [0,0,3] [1,1,1] [3,0,0] [1,0,2] [1,0,2]; P_i = 1, 0, 1, 1/3,
    1/3, P_bar = 8/15; p = (6, 1, 8)/15, P_e = 101/225; kappa = (120 - 101) / (225 - 101) = 19/124.
    Fleiss at step 1: rows [0,3], [1,2] (categories -1, 1): P_bar = (1 + 1/3)/2 = 2/3, P_e = (1 + 25)/36 = 13/18;
    kappa = (12/18 - 13/18) / (5/18) = -1/5.
    First error: item 1 at 2 / 1 / 2 (pairs A-C agree), item 2 none / none / 0 (A-B agree): 2 of 6 pairs.
    Gold item 3 ([1, -1]): A 2/2, B 1/2, C 1/2 steps right; gold_n counts 1 solution each. Neutral steps (the tie
    rate) over all of a labeler's 7 steps: C 1 of 7, A and B none."""
    recs = _records()
    stats = quality.labeler_stats(recs, "steps")
    assert {w: d["agreement"] for w, d in stats.items()} == pytest.approx({"A": 0.6, "B": 0.6, "C": 0.4})
    assert {w: (d["gold_n"], d["gold_accuracy"]) for w, d in stats.items()} == {"A": (1, 1.0), "B": (1, 0.5),
                                                                                 "C": (1, 0.5)}
    assert {w: (d["n"], d["steps_n"]) for w, d in stats.items()} == dict.fromkeys("ABC", (3, 7))
    assert stats["C"]["tie_rate"] == pytest.approx(1 / 7) and stats["A"]["tie_rate"] == 0.0
    flags = quality.flag_labelers(stats, quality.Thresholds(min_items=3, min_agreement=0.5, min_gold_items=1,
                                                            min_gold_accuracy=0.7))
    assert flags["A"] == []
    assert flags["B"] == ["gold accuracy 0.50 < 0.7"]
    assert flags["C"] == ["agreement 0.40 < 0.5", "gold accuracy 0.50 < 0.7"]
    ag = quality.project_agreement(recs, "steps")
    assert ag["fleiss_kappa"] == pytest.approx(19 / 124)
    assert set(ag) == {"fleiss_kappa", "krippendorff_alpha", "mean_cohen_kappa", "krippendorff_alpha_ordinal"}
    st = quality.step_agreement(recs)
    assert (st["percent_agreement"], st["pairs"], st["units"]) == (pytest.approx(8 / 15), 15, 5)
    assert (st["first_error_agreement"], st["first_error_pairs"]) == (pytest.approx(1 / 3), 6)
    pos = st["by_position"]
    assert [(r["step"], r["units"]) for r in pos] == [(1, 2), (2, 2), (3, 1)]
    assert [r["percent_agreement"] for r in pos] == pytest.approx([4 / 6, 1 / 6, 1.0])
    assert pos[0]["fleiss_kappa"] == pytest.approx(-0.2) and math.isnan(pos[2]["fleiss_kappa"])
    ann = quality.annotations_from_records("steps", recs)
    assert ann[(1, 1)] == {"A": 1, "B": -1, "C": 0} and (3, 0) not in ann  # per step; gold left out
    assert quality.first_error([1, 0, -1, -1]) == 2 and quality.first_error([1, 1]) is None


# -- export ---------------------------------------------------------------------------------------------------------
PLAN = {"ann": {tuple(SOL_A): [1, 1, -1], tuple(SOL_B): [1, 1]},
        "bob": {tuple(SOL_A): [1, -1, -1], tuple(SOL_B): [1, -1]},
        "cy": {tuple(SOL_A): [1, 0, -1], tuple(SOL_B): [0, -1]}}


def test_majority_step_labels_ties_are_neutral():
    assert majority_step_labels([[1, 1, -1], [1, -1, -1], [1, 0, 1]]) == [1, 0, -1]
    assert majority_step_labels([[1, -1], [-1, -1]]) == [0, -1]  # a 1-1 tie -> 0
    assert majority_step_labels([[1, 0, -1]]) == [1, 0, -1]


def test_export_steps_rows_by_hand_and_read_back(store, tmp_path):
    """Consensus (majority per step, ties -> 0): solution A: step 1 1/1/1 -> 1; step 2 1/-1/0 (a three-way tie)
    -> 0; step 3 -1/-1/-1 -> -1. Solution B: step 1 1/1/0 -> 1; step 2 1/-1/-1 -> -1."""
    p = _steps_project(store)
    _label_all(store, p, PLAN)
    rows, summary = export_records(store, "st", ExportOptions(format="steps"))
    assert rows == [{"prompt": "What is 2 + 3 * 4?", "completions": SOL_A, "labels": [1, 0, -1]},
                    {"prompt": CHAT, "completions": SOL_B, "labels": [1, -1]}]
    assert (summary["judgements"], summary["used"], summary["rows"]) == (6, 6, 2)
    every, _ = export_records(store, "st", ExportOptions(format="steps", mode="all"))
    assert sorted((r["completions"][0], tuple(r["labels"])) for r in every) == sorted(
        (steps[0], tuple(labels)) for by in PLAN.values() for steps, labels in by.items())
    ds, _ = export_records(store, "st", ExportOptions(format="steps", consensus="dawid_skene"))
    assert [r["completions"] for r in ds] == [SOL_A, SOL_B] and all(set(r["labels"]) <= {1, 0, -1} for r in ds)
    # the contract's reader takes them back, in memory and from a file written by alignloop.data's writer
    back = read_steps(rows)
    assert [(r["prompt"], r["completions"], r["labels"]) for r in back] == [
        (x["prompt"], x["completions"], x["labels"]) for x in rows]
    write_rows(rows, tmp_path / "steps.jsonl")
    assert [r["labels"] for r in read_steps(str(tmp_path / "steps.jsonl"))] == [[1, 0, -1], [1, -1]]
    with pytest.raises(UserError, match="steps format is a steps project's only format"):
        export_records(store, "st", ExportOptions(format="preference"))
    store.create_project("pw", "pairwise")
    with pytest.raises(UserError, match="steps format"):
        export_records(store, "pw", ExportOptions(format="steps"))


def test_export_leaves_out_a_flagged_labeler(store):
    """Four labelers; cy contradicts the others. Units: A1 1/1/1/-1, A2 1/1/-1/-1, A3 -1/-1/-1/1, B1 1/1/1/1,
    B2 -1/-1/-1/1 (ann/bob/dan/cy). Leave-one-out: ann = bob = dan = 4/5 (each misses one unit: ann and bob A2,
    where the others' majority is -1; dan A2, where it is 1), cy = 1/5 (B1 only): flagged below 0.5.
    Without cy: A = [1, 1, -1] (A2 is 1, 1, -1), B = [1, -1]; with cy, A2 ties 2-2 -> 0: A = [1, 0, -1]."""
    p = _steps_project(store, k=4, settings={"thresholds": {"min_items": 2, "min_agreement": 0.5,
                                                            "min_median_seconds": 0}})
    _label_all(store, p, {"ann": {tuple(SOL_A): [1, 1, -1], tuple(SOL_B): [1, -1]},
                          "bob": {tuple(SOL_A): [1, 1, -1], tuple(SOL_B): [1, -1]},
                          "dan": {tuple(SOL_A): [1, -1, -1], tuple(SOL_B): [1, -1]},
                          "cy": {tuple(SOL_A): [-1, -1, 1], tuple(SOL_B): [1, 1]}})
    stats = quality.labeler_stats(store.current_judgements(p.id), "steps")
    assert {w: d["agreement"] for w, d in stats.items()} == pytest.approx({"ann": 0.8, "bob": 0.8, "dan": 0.8,
                                                                           "cy": 0.2})
    p = store.get_project("st")
    rows, summary = export_records(store, "st", project_options(p, format="steps"))
    assert summary["flagged_labelers"] == ["cy"] and summary["used"] == 6
    assert [r["labels"] for r in rows] == [[1, 1, -1], [1, -1]]
    rows, summary = export_records(store, "st", project_options(p, format="steps", exclude_flagged=False))
    assert summary["used"] == 8 and [r["labels"] for r in rows] == [[1, 0, -1], [1, -1]]


# -- AI labelers ----------------------------------------------------------------------------------------------------
def test_ai_labeler_step_judgements(store):
    p = _steps_project(store, k=1)
    lab = _label_all(store, p, {"ann": PLAN["ann"]})["ann"]
    items = {len(r["completion_ids"]): r["item_id"] for r in store.current_judgements(p.id)}
    judge = store.add_ai_labeler("judge", "stub-verifier")
    with pytest.raises(ValidationError) as e:
        store.record_ai_judgements("st", judge.id, [
            {"item_id": items[3], "shown_order": [1, 0, 2], "step_labels": [1, 1, 1]},
            {"item_id": items[2], "shown_order": [0, 1], "step_labels": [1, 2]},
            {"item_id": items[2], "shown_order": [0, 1], "step_labels": ["good", "bad"]},
            {"item_id": items[2], "shown_order": [0, 1], "choice": "a"}])
    keys = set(e.value.errors)
    assert any(k.endswith("[0]).shown_order") for k in keys) and any(k.endswith("[1]).step_labels") for k in keys)
    assert any(k.endswith("[2]).step_labels") for k in keys) and any(k.endswith("[3]).fields") for k in keys)
    n = store.record_ai_judgements("st", judge.id, [
        {"item_id": items[3], "shown_order": [0, 1, 2], "step_labels": [1, 1, -1]},   # as ann: 3 of 3 steps
        {"item_id": items[2], "shown_order": [0, 1], "step_labels": [True, False]}])  # ann [1, 1]: 1 of 2
    assert n == 2
    ai = {r["item_id"]: r for r in store.current_judgements(p.id) if r["labeler_kind"] == "ai"}
    assert ai[items[2]]["step_labels"] == [1, -1]
    agree = quality.ai_human_agreement(store.current_judgements(p.id), "steps")["ai"]["judge"]
    assert (agree["n"], agree["majority_agreement"]) == (5, pytest.approx(4 / 5)) and agree["position"] is None
    assert lab.id != judge.id


# -- the web app: form (works without JS), JSON API, pages ----------------------------------------------------------
@pytest.fixture
def web_setup(store):
    _steps_project(store, k=2, rows=[
        {"prompt": "What is 2 + 3 * 4?", "completions": ["3 * 4 = 12", "<script>alert('x')</script>", "= 14"]},
        {"prompt": CHAT, "completions": SOL_B}])
    for name in ("ann", "bob"):
        store.add_labeler(name, PASSWORD)
    store.add_labeler("boss", PASSWORD, role="admin")
    return store


def test_json_api_steps(web_setup, make_client):
    c = make_client()
    tok = c.post("/api/login", json={"username": "ann", "password": PASSWORD}).json()["csrf_token"]
    hdr = {"X-CSRF-Token": tok}
    nxt = c.post("/api/p/st/next", headers=hdr).json()
    assert nxt["task_type"] == "steps" and "shown_order" not in nxt  # blind (review16 F3); steps: solution order
    assert nxt["steps"] == ["3 * 4 = 12", "<script>alert('x')</script>", "= 14"]
    aid = nxt["assignment_id"]
    url = f"/api/assignments/{aid}/judgement"
    for body, field, text in [({"step_labels": [1, 0]}, "step_labels", "a list of 3 labels"),
                              ({"step_0": "good"}, "step_1", "rate step 2"),
                              ({"step_labels": [1, 5, 0]}, "step_1", "unknown rating 5"),
                              ({"first_error": 7}, "first_error", "from 0 to 2")]:
        r = c.post(url, json={**body, "idempotency_key": f"bad-{field}-0001"}, headers=hdr)
        assert r.status_code == 422 and text in r.json()["fields"][field], r.json()
    r = c.post(url, json={"step_0": "neutral", "first_error": 1, "idempotency_key": "steps-api-0001"}, headers=hdr)
    assert r.status_code == 201
    r = c.post(url + "?next=1", json={"step_labels": [1, 1, 1], "idempotency_key": "steps-api-0001"}, headers=hdr)
    assert r.status_code == 200 and r.json()["created"] is False  # a retry: stored once
    nxt = r.json()["next"]
    assert nxt["steps"] == SOL_B and nxt["messages"] == CHAT
    r = c.post(f"/api/assignments/{nxt['assignment_id']}/judgement?next=1",
               json={"step_labels": [1, -1], "idempotency_key": "steps-api-0002"}, headers=hdr)
    assert r.status_code == 201 and r.json()["next"] == {"assignment_id": None}
    recs = sorted(web_setup.current_judgements(web_setup.get_project("st").id), key=lambda x: x["item_id"])
    assert [x["step_labels"] for x in recs] == [[0, -1, -1], [1, -1]]


def test_form_labeling_without_js_first_error_button_edit_and_pages(web_setup, make_client):
    c = make_client("bob")
    lab = Labeling(c, "st")
    page = lab.page()
    html = page.text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html and "<script>alert(" not in html  # escaped
    assert 'data-task="steps"' in html and html.count('class="first-error"') == 3
    assert html.index('id="step-0"') < html.index('id="step-1"') < html.index('id="step-2"')
    # an incomplete form: 422, each missing step named, the given rating kept
    aid, r = lab.submit({"step_0": "neutral"}, page)
    assert r.status_code == 422
    assert "rate step 2: good, neutral or bad" in r.text and "rate step 3: good, neutral or bad" in r.text
    assert 'name="step_0" value="neutral" checked' in r.text and 'class="step missing"' in r.text
    # the "first error" button of step 2 submits the form (no JS): step 1 keeps "neutral", steps 2 and 3 bad
    data = {"csrf_token": csrf_of(r.text), "idempotency_key": field_of(r.text, "idempotency_key"), "step_0": "neutral",
            "first_error": "1"}
    r = c.post(f"/p/st/label/{aid}", data=data)
    assert r.status_code == 200 and assignment_of(r.text) != aid  # on to the next item
    # the next one: every step rated with the radio buttons
    _aid2, r = lab.submit({"step_0": "good", "step_1": "bad"}, r)
    assert r.status_code == 200 and 'id="all-done"' in r.text
    recs = {x["item_id"]: x for x in web_setup.current_judgements(web_setup.get_project("st").id)}
    assert sorted(x["step_labels"] for x in recs.values()) == [[0, -1, -1], [1, -1]]
    hist = c.get("/p/st/history").text
    assert "steps 0 − −" in hist and "steps + −" in hist
    edit = c.get(f"/p/st/edit/{aid}").text  # the stored labels as the form's values
    assert 'name="step_0" value="neutral" checked' in edit and 'name="step_2" value="bad" checked' in edit
    data = {"csrf_token": csrf_of(edit), "idempotency_key": field_of(edit, "idempotency_key"), "step_0": "good",
            "step_1": "good", "step_2": "good"}
    r = c.post(f"/p/st/label/{aid}", data=data, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/p/st/history"
    recs = {x["item_id"]: x for x in web_setup.current_judgements(web_setup.get_project("st").id)}
    assert sorted((x["step_labels"], x["version"]) for x in recs.values()) == [([1, -1], 1), ([1, 1, 1], 2)]


def test_dashboard_shows_agreement_per_step_and_exports_steps(web_setup, make_client):
    p = web_setup.get_project("st")
    for name, labels in (("ann", {3: [1, 1, -1], 2: [1, 1]}), ("bob", {3: [1, -1, -1], 2: [1, 1]})):
        lab = web_setup.authenticate(name, PASSWORD)
        while (a := web_setup.next_assignment(p.id, lab.id)) is not None:
            web_setup.submit(a.id, lab.id, {"step_labels": labels[len(a.shown_order)]}, f"dash-{name}-{a.id}")
    admin = make_client("boss")
    dash = admin.get("/admin/p/st")
    assert dash.status_code == 200
    assert "Agreement per step" in dash.text and 'id="step-position-table"' in dash.text
    # 5 steps, 4 agree: 80%; per position: step 1 2/2, step 2 1/2, step 3 1/1
    assert "80% pairwise agreement over 5 pairs of labels on 5 steps" in dash.text
    assert "<option>steps</option>" in dash.text and "Neutral steps" in dash.text
    r = admin.get("/admin/p/st/export")  # the steps format by default for a steps project
    rows = [json.loads(x) for x in r.text.splitlines()]
    assert r.status_code == 200 and [x["labels"] for x in rows] == [[1, 0, -1], [1, 1]]
    assert admin.get("/admin/p/st/export?format=preference").status_code == 400


# -- CLI and migration ----------------------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(feedback_cli, [str(a) for a in args])


def test_cli_create_import_stats_export(tmp_path):
    db = tmp_path / "f.db"
    # gold placement is a seeded draw per labeler (assignment.is_gold_turn): seed 0 makes both labelers' first
    # assignment the gold one, so each has a gold accuracy below
    r = _cli("create", "--db", db, "--project", "st", "--task-type", "steps", "--overlap-k", 2, "--gold-rate", 0.3,
             "--settings", '{"gold_seed": 0}')
    assert r.exit_code == 0 and "created project st (steps" in r.output
    data = tmp_path / "s.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "p", "completions": SOL_A}, {"prompt": "q", "completion": "a\nb\n"},
        {"prompt": "g", "completions": ["x", "y"], "labels": [True, False], "gold": True}]) + "\n")
    r = _cli("import", "--db", db, "--project", "st", data)
    assert r.exit_code == 0 and "3 prompts, 7 completions, 3 items (1 gold)" in r.output, r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completions": ["a\nb"]}) + "\n")
    r = _cli("import", "--db", db, "--project", "st", bad)
    assert r.exit_code == 2 and "bad.jsonl line 1: step 0" in r.output
    store = Store(str(db))
    try:
        p = store.get_project("st")
        _label_all(store, p, {"ann": {tuple(SOL_A): [1, 1, -1], ("a", "b"): [1, 1], ("x", "y"): [1, -1]},
                              "bob": {tuple(SOL_A): [1, -1, -1], ("a", "b"): [1, 1], ("x", "y"): [1, 1]}})
    finally:
        store.dispose()
    r = _cli("stats", "--db", db, "--project", "st")
    assert r.exit_code == 0 and "per step: 80% pairwise agreement over 5 pairs on 5 steps" in r.output, r.output
    assert "step 1: 100%" in r.output and "step 2: 50%" in r.output
    st = json.loads(_cli("stats", "--db", db, "--project", "st", "--json").output)
    assert st["step_agreement"]["percent_agreement"] == pytest.approx(0.8)
    assert st["labelers"]["bob"]["gold_accuracy"] == pytest.approx(0.5)
    out = tmp_path / "o.jsonl"
    r = _cli("export", "--db", db, "--project", "st", "--out", out)
    assert r.exit_code == 0 and "wrote 2 steps rows" in r.output, r.output
    assert [x["labels"] for x in map(json.loads, out.read_text().splitlines())] == [[1, 0, -1], [1, 1]]
    r = _cli("export", "--db", db, "--project", "st", "--out", out, "--format", "ranking")
    assert r.exit_code == 2 and "steps format" in r.output


def test_migration_0004_adds_and_drops_step_labels(tmp_path):
    from alembic import command

    engine = dbmod.open_engine(str(tmp_path / "old.db"))
    dbmod.upgrade(engine, "0003")
    with engine.connect() as conn:
        assert "step_labels" not in [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(judgements)")]
    dbmod.upgrade(engine)
    with engine.connect() as conn:
        assert "step_labels" in [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(judgements)")]
    assert dbmod.stored_revision(engine) == dbmod.HEAD
    with engine.begin() as conn:
        command.downgrade(dbmod.alembic_config(conn), "0003")
    with engine.connect() as conn:
        assert "step_labels" not in [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(judgements)")]
    engine.dispose()
