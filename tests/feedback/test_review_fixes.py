"""Fixes from the issue-16 review: an override on a several-question project answers the first question only and
the other questions' exports keep the item's votes (F1); overrides apply to `labelers=all` exports only (F8);
Kendall's W with tied rankings (mid-ranks and the tie correction, F4); the label page's counts are the same for a
gold item as for a normal one (F2); an empty number field in the web export form means the project's setting (F10)."""

import json
import re

import pytest
from fb_helpers import PASSWORD, csrf_of

from alignloop.feedback.export import ExportOptions, export_records

QUESTIONS = [{"name": "helpful", "question": "Which is more helpful?"},
             {"name": "harmless", "question": "Which is more harmless?"}]


def _side(a, canonical: str) -> str:
    """The screen side (left | right) that shows canonical completion "a" or "b" in assignment `a`."""
    return "left" if a.shown_order[0] == "ab".index(canonical) else "right"


@pytest.fixture
def two_questions(store):
    """Pairwise, k = 2, questions helpful and harmless; P1 and P2; ann and bob answer A (better) to both questions
    on both items; boss is an admin."""
    p = store.create_project("qq", "pairwise", overlap_k=2, settings={"questions": QUESTIONS})
    store.import_records(p.id, [{"prompt": "P1", "completions": ["x1", "y1"]},
                                {"prompt": "P2", "completions": ["x2", "y2"]}])
    labs = [store.add_labeler(name, PASSWORD) for name in ("ann", "bob")]
    n = 0
    for lab in labs:
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            n += 1
            vote = {"choice": _side(a, "a"), "strength": "better"}
            store.submit(a.id, lab.id, {"answers": {"helpful": vote, "harmless": vote}}, f"key-{n:08d}")
    boss = store.add_labeler("boss", PASSWORD, role="admin")
    item_of = {store.prompts_and_completions(p.id)[0][r["prompt_id"]].messages[-1]["content"]: r["item_id"]
               for r in store.current_judgements(p.id)}
    return store, p, labs, boss, item_of


def _export(store, p, **kw):
    return export_records(store, p.id, ExportOptions(exclude_flagged=False, **kw))


def _pairs(rows):
    return sorted((r["prompt"], r.get("criterion"), r["chosen"], r["margin"]) for r in rows)


def test_override_answers_the_first_question_and_the_others_keep_the_votes(two_questions):
    """F1: before the fix the "harmless" export lost P1 altogether once P1 was overridden."""
    store, p, labs, boss, item_of = two_questions
    store.adjudicate(p.id, item_of["P1"], boss.id, "override", {"choice": "right", "strength": "significantly_better"})
    helpful, summary = _export(store, p, criterion="helpful")
    assert _pairs(helpful) == [("P1", "helpful", "y1", 1.0),              # the override's answer
                               ("P2", "helpful", "x2", 2 / 3)]            # the votes
    assert helpful[0]["labelers"] == [boss.public_id] and summary["overridden_items"] == 1
    harmless, _ = _export(store, p, criterion="harmless")
    assert _pairs(harmless) == [("P1", "harmless", "x1", 2 / 3), ("P2", "harmless", "x2", 2 / 3)]
    assert sorted(harmless[0]["labelers"]) == sorted(lab.public_id for lab in labs)
    every, _ = _export(store, p, criterion="all")
    assert _pairs(every) == sorted(_pairs(helpful) + _pairs(harmless))
    # mode all: the override is P1's one helpful row; P1's harmless rows are ann's and bob's
    rows, _ = _export(store, p, criterion="all", mode="all")
    assert sorted((r["prompt"], r["criterion"], r["labeler"]) for r in rows if r["prompt"] == "P1") == sorted(
        [("P1", "helpful", boss.public_id)] + [("P1", "harmless", lab.public_id) for lab in labs])
    # exclude still leaves every question's export
    store.adjudicate(p.id, item_of["P1"], boss.id, "exclude")
    assert [r["prompt"] for r in _export(store, p, criterion="all")[0]] == ["P2", "P2"]


def test_overrides_apply_to_the_export_of_every_labeler_only(store):
    """F8: before the fix a `labelers=ai` export carried the admin's override row and lost the AI's own label."""
    p = store.create_project("mix", "pairwise", overlap_k=1)
    store.import_records(p.id, [{"prompt": f"p{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(2)])
    ann = store.add_labeler("ann", PASSWORD)
    while (a := store.next_assignment(p.id, ann.id)) is not None:
        store.submit(a.id, ann.id, {"choice": _side(a, "a"), "strength": "better"}, f"key-ann-{a.id:06d}")
    items = sorted({r["item_id"] for r in store.current_judgements(p.id)})
    judge = store.add_ai_labeler("judge", "some/model")
    store.record_ai_judgements(p.id, judge.id, [{"item_id": i, "shown_order": [0, 1], "choice": "a",
                                                 "strength": "better"} for i in items])
    boss = store.add_labeler("boss", PASSWORD, role="admin")
    store.adjudicate(p.id, items[0], boss.id, "override", {"choice": "right", "strength": "better"}, note="B")
    by = {}
    for labelers in ("all", "human", "ai"):
        rows, summary = _export(store, p, labelers=labelers, mode="all", min_labels=1)
        by[labelers] = (sorted((r["prompt"], r["chosen"], r["labeler"]) for r in rows),
                        summary["overridden_items"], summary.get("overrides_not_applied"))
    assert by["ai"] == ([("p0", "a0", judge.public_id), ("p1", "a1", judge.public_id)], 0, 1)
    assert by["human"] == ([("p0", "a0", ann.public_id), ("p1", "a1", ann.public_id)], 0, 1)
    assert by["all"] == (sorted([("p0", "b0", boss.public_id), ("p1", "a1", ann.public_id),
                                 ("p1", "a1", judge.public_id)]), 1, 0)
    # consensus too: the AI's own answer for p0, not the admin's
    rows, _ = _export(store, p, labelers="ai", min_labels=1)
    assert sorted((r["prompt"], r["chosen"], r["labelers"][0]) for r in rows) == [
        ("p0", "a0", judge.public_id), ("p1", "a1", judge.public_id)]
    # an exclusion is about the item: it leaves every kind's export
    store.adjudicate(p.id, items[0], boss.id, "exclude")
    assert [r["prompt"] for r in _export(store, p, labelers="ai", min_labels=1)[0]] == ["p1"]




# -- F4: Kendall's W with ties -------------------------------------------------------------------------------------

def test_kendall_w_with_ties_hand_worked():
    """Before the fix identical tied rankings scored 1.33, 0.33 and 0 (competition ranks, no tie correction)."""
    from alignloop.feedback.dashboard import kendall_w

    assert kendall_w([[1, 1, 3], [1, 1, 3]]) == 1.0          # identical rankings with ties: W = 1
    assert kendall_w([[1, 2, 2], [1, 2, 2], [1, 2, 2]]) == 1.0
    assert kendall_w([[1, 1, 1], [1, 1, 1]]) is None         # everything tied: nothing to agree on
    # R = (4.5, 4.5, 9), S = 13.5, sum T = 2^3 - 2 = 6: W = 12 * 13.5 / (9 * 24 - 3 * 6) = 162 / 198 = 9/11
    assert kendall_w([[1, 2, 3], [1, 1, 3], [2, 1, 3]]) == pytest.approx(9 / 11, abs=1e-12)
    # untied rankings as before: reversed = 0, identical = 1
    assert kendall_w([[1, 2, 3], [3, 2, 1]]) == 0.0 and kendall_w([[1, 2, 3, 4]] * 3) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_kendall_w_matches_an_independent_computation(seed):
    """W = Friedman's tie-corrected chi-square / (m (n - 1)), from scipy (its own mid-ranks and tie correction)."""
    import random

    stats = pytest.importorskip("scipy.stats")
    from alignloop.feedback.dashboard import kendall_w

    rng = random.Random(seed)
    for _ in range(40):
        m, n = rng.randint(2, 6), rng.randint(3, 6)
        rankings = []
        for _ in range(m):  # competition ranks with random ties, as stored
            values = [rng.randint(1, n - 1) for _ in range(n)]
            rankings.append([1 + sum(v < x for v in values) for x in values])
        if all(len(set(r)) == 1 for r in rankings):
            continue
        chi2 = stats.friedmanchisquare(*zip(*rankings, strict=True)).statistic
        assert kendall_w(rankings) == pytest.approx(chi2 / (m * (n - 1)), abs=1e-9)
        assert 0 <= kendall_w(rankings) <= 1 + 1e-12


def test_mid_ranks():
    stats = pytest.importorskip("scipy.stats")
    from alignloop.feedback.dashboard import mid_ranks

    assert mid_ranks([1, 1, 3]) == [1.5, 1.5, 3] and mid_ranks([1, 2, 2]) == [1, 2.5, 2.5]
    assert mid_ranks([2, 1, 1, 4]) == [3, 1.5, 1.5, 4] == list(stats.rankdata([2, 1, 1, 4]))


def test_rank_dashboard_w_is_one_for_identical_tied_rankings(store):
    from alignloop.feedback.dashboard import dashboard_data

    p = store.create_project("rr", "rank", overlap_k=2)
    store.import_records(p.id, [{"prompt": f"P{i}", "completions": [f"x{i}", f"y{i}", f"z{i}"]} for i in range(3)])
    n = 0
    for lab in [store.add_labeler(f"u{i}", PASSWORD) for i in range(2)]:
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            n += 1
            canon = [1, 1, 3]  # both: A and B tied first, C last
            store.submit(a.id, lab.id, {f"rank_{pos}": str(canon[c]) for pos, c in enumerate(a.shown_order)},
                         f"key-{n:08d}")
    rank = dashboard_data(store, p)["rank"]
    assert (rank["kendall_w"], rank["w_items"]) == (1.0, 3)


# -- F2: the label page's counts do not mark a gold item ------------------------------------------------------------

def _gold_project(store, name="g", n=10, n_gold=5, gold_rate=0.4, seed=7):
    p = store.create_project(name, "pairwise", overlap_k=1, gold_rate=gold_rate, settings={"gold_seed": seed})
    store.import_records(p.id, [{"prompt": f"{name}{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(n)]
                         + [{"prompt": f"{name}G{i}", "completions": [f"ga{i}", f"gb{i}"], "gold": {"choice": "a"}}
                            for i in range(n_gold)])
    return p


def test_remaining_forecasts_every_item_the_labeler_will_get_gold_included(store):
    """Before the fix `remaining` counted non-gold items only (10 here) while the labeler was given 13."""
    for seed in (7, 8, 9):
        p = _gold_project(store, f"g{seed}", seed=seed)
        lab = store.add_labeler(f"ann{seed}", PASSWORD)
        before = store.progress(p.id, lab.id)["remaining"]
        given = []
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            given.append(a.is_gold)
            pr = store.progress(p.id, lab.id)
            assert pr["open"] + pr["remaining"] == before - (len(given) - 1)  # taking one: unchanged
            store.submit(a.id, lab.id, {"choice": "tie"}, f"key-{seed}-{a.id:06d}")
        assert before == len(given) and any(given) and not all(given), (seed, before, given)
        assert store.progress(p.id, lab.id)["remaining"] == 0


def _counts(html: str) -> tuple[int, int, int]:
    """(done, left, the progress bar's max) as the label page shows them."""
    done, left = re.search(r"(\d+) done · (\d+) left", html).groups()
    top = re.search(r'<progress max="(\d+)"', html).group(1)
    return int(done), int(left), int(top)


def test_label_page_counts_move_the_same_on_gold_and_normal_items(store, make_client):
    """F2: the label page of a gold item is indistinguishable from a normal one's in its counts: every item page
    shows done + left and the bar's max as the one before it, each submission moves one from left to done. Before
    the fix "N left" stayed the same (and the max grew by one) on every gold item."""
    p = _gold_project(store)
    lab = store.add_labeler("ann", PASSWORD)
    c = make_client("ann")
    r = c.get("/p/g/label")
    start_left = int(re.search(r"(\d+) left", r.text).group(1))
    seen = []  # (gold, done, left, max) per item page
    for step in range(40):
        if 'id="start-form"' in r.text:
            r = c.post("/p/g/next", data={"csrf_token": csrf_of(r.text)})
        if 'id="all-done"' in r.text:
            break
        a = store.open_assignment(p.id, lab.id)
        seen.append((a.is_gold, *_counts(r.text)))
        action = re.search(r'action="(/p/[^"]+/label/\d+)"', r.text).group(1)
        r = c.post(action, data={"csrf_token": csrf_of(r.text), "choice": "tie", "idempotency_key": f"key-{step:06d}"})
        assert r.status_code == 200
    golds = [g for g, *_ in seen]
    assert any(golds) and not all(golds) and len(seen) == start_left
    assert [(done, left, top) for _, done, left, top in seen] == [
        (k, start_left - k, start_left) for k in range(len(seen))]


# -- F10: the web export form's empty number fields -------------------------------------------------------------

def test_web_export_empty_fields_mean_the_defaults_and_bad_ones_are_the_apps_page(store, make_client):
    """Before the fix a cleared "Min. labels" (or Likert threshold) field was FastAPI's raw JSON 422."""
    p = store.create_project("lk", "likert", overlap_k=1, settings={"min_labels": 1})
    store.import_records(p.id, [{"prompt": "q", "completion": "c"}])
    ann = store.add_labeler("ann", PASSWORD)
    a = store.next_assignment(p.id, ann.id)
    store.submit(a.id, ann.id, {"likert": "6"}, "key-likert-000001")
    store.add_labeler("boss", PASSWORD, role="admin")
    c = make_client("boss")
    # the dashboard's form, every field as the browser sends it, the two number fields cleared
    r = c.get("/admin/p/lk/export?format=unpaired&likert_threshold=&min_labels=&labelers=all&include_gold=false"
              "&mode=consensus&exclude_flagged=true&allow_empty=false")
    assert (r.status_code, r.headers["content-type"]) == (200, "application/x-ndjson")
    summary = json.loads(r.headers["x-export-summary"])
    assert (summary["min_labels"], summary["rows"]) == (1, 1)                  # the project's setting
    assert json.loads(r.text)["label"] is True                               # 6 >= the default threshold 5
    r = c.get("/admin/p/lk/export?likert_threshold=7&min_labels=1")
    assert r.status_code == 200 and json.loads(r.text)["label"] is False
    for query, field in (("min_labels=abc", "min_labels"), ("likert_threshold=1.5", "likert_threshold"),
                         ("exclude_flagged=maybe", "exclude_flagged"), ("min_labels=%D9%A3", "min_labels")):
        r = c.get(f"/admin/p/lk/export?{query}")
        assert (r.status_code, r.headers["content-type"].split(";")[0]) == (400, "text/html"), query
        assert f"export {field}" in r.text, query
    assert c.get("/admin/p/lk/export?min_labels=0").status_code == 400      # still checked by ExportOptions
