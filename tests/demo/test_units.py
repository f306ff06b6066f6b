"""Fast tests of the demo's pieces: gold scorer, simulated labelers through the store, evaluation maths, report."""
from __future__ import annotations

import json
import random

import pytest

from alignloop.demo import domain
from alignloop.evaluation import (
    Samples,
    best_of_n,
    first_of_each,
    summarize,
    win_rate,
)


def test_gold_score_prefers_positive_well_formed_reviews():
    g = domain.gold_score
    assert g("the plot was great . the acting was superb .") == 2.0
    assert g("the plot was awful . i hated the cast .") == -2.0
    assert g("the plot was great .") == 1.0 - 2.0                      # one sentence: too short
    assert g("great great great great . fun .") == 3.0                 # each word counts at most twice
    assert g("the plot was fine . highly recommended .") == 1.5
    assert g("a waste of time . the cast was odd .") == -1.5
    long = " ".join(["the film was long ."] * 12)                      # 48 words: rambling
    assert g(long) == pytest.approx(-0.25 * 8)
    assert domain.gold_scores(["p", "q"], ["fun . fun .", "dull . dull ."]) == [2.0, -2.0]


def test_generated_data_is_deterministic_and_disjoint():
    assert domain.demonstrations(5, seed=3) == domain.demonstrations(5, seed=3)
    train, held = domain.prompt_split(n_train=100, n_eval=20, seed=0)
    assert len(train) == 100 and len(held) == 20 and not set(train) & set(held)
    rows = domain.pretraining_corpus(50)
    assert all(r["text"].startswith("Review of ") for r in rows)
    # the demonstrations cover both signs of the gold score (the SFT model is not aligned yet)
    golds = [domain.gold_score(r["completion"]) for r in domain.demonstrations(300)]
    assert min(golds) < -1 and max(golds) > 1


def test_win_rate_best_of_n_and_summary():
    assert win_rate([1, 2, 3, 0], [0, 2, 4, -1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    cand = Samples(["a"] * 4 + ["b"] * 4, ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"], [3] * 8, [0.0] * 8)
    cand.scores = {"rm": [0, 5, 1, 9, 2, 1, 0, 3], "gold": [0, 1, 2, 3, 4, 5, 6, 7]}
    b2 = best_of_n(cand, 4, 2)
    assert b2.responses == ["a1", "b0"] and b2.scores["gold"] == [1, 4]
    b4 = best_of_n(cand, 4, 4)
    assert b4.responses == ["a3", "b3"]
    import math

    assert b4.kl == [pytest.approx(math.log(4) - 3 / 4)] * 2
    assert best_of_n(cand, 4, 1).kl == [0.0, 0.0]
    first = first_of_each(cand, 4)
    assert first.responses == ["a0", "b0"]
    s = summarize(b4, first)
    assert s["gold/mean"] == 5.0 and s["gold/win_rate"] == 1.0 and s["rm/win_rate"] == 1.0 and s["n"] == 2


def test_simulated_labelers_flag_the_careless_one(tmp_path):
    from alignloop.feedback import quality
    from alignloop.feedback.store import Store
    from alignloop.pipeline.labelers import (
        default_labelers,
        gold_agreement,
        simulate_labeling,
    )
    from alignloop.pipeline.stages import percent_agreement as _percent_agreement

    rng = random.Random(0)
    rows = [{"prompt": f"Review of film {i}:", "completions": [domain.review(rng) for _ in range(3)]}
            for i in range(40)]
    store = Store(str(tmp_path / "fb.db"), seed=0)  # seeded display order: reproducible
    store.create_project("p", "pairwise", overlap_k=3)
    store.import_records("p", rows)
    counts = simulate_labeling(store, "p", default_labelers(4), domain.gold_scores, seed=0)
    assert sum(counts.values()) == 120 * 3 and all(c > 0 for c in counts.values())
    p = store.get_project("p")
    records = store.current_judgements(p.id)
    stats = quality.labeler_stats(records, "pairwise")
    flags = quality.flag_labelers(stats, quality.Thresholds(min_median_seconds=0.0))
    assert flags["careless"] and not any(flags[f"judge{i}"] for i in range(1, 5))
    ga = gold_agreement(records, store, p.id, domain.gold_scores)
    assert all(ga[f"judge{i}"] > 0.75 for i in range(1, 5)) and 0.3 < ga["careless"] < 0.7
    ann = quality.annotations_from_records("pairwise", records)
    assert 0.6 < _percent_agreement(ann, {"careless"}) < 0.95
    store.dispose()


def test_report_from_a_minimal_run_folder(tmp_path):
    from alignloop.pipeline.report import write_report

    (tmp_path / "stages.json").write_text(json.dumps({"sft": 3.0, "round-1/rm": 2.0}))
    (tmp_path / "eval").mkdir()
    summ = {"SFT": {"gold/mean": 0.1, "gold/sem": 0.1, "kl": 0.0, "rm/mean": 0.0, "length": 10},
            "PPO": {"gold/mean": 1.0, "gold/sem": 0.1, "gold/win_rate": 0.7, "kl": 3.0, "rm/mean": 1.0,
                    "length": 11}}
    bon = {"1": {"gold/mean": 0.1, "rm/mean": 0.0, "kl": 0.0}, "4": {"gold/mean": 0.8, "rm/mean": 1.2, "kl": 0.64}}
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"summary": summ, "best_of_n": bon, "prompts": 2,
                                                                "samples_per_prompt": 1, "gold": "x:y"}))
    (tmp_path / "eval" / "samples_SFT.jsonl").write_text(json.dumps({"prompt": "P", "response": "r", "gold": 0.0}))
    out = write_report(tmp_path, notes=["stage X unavailable: test"])
    md = (tmp_path / "report.md").read_text()
    assert "| PPO | 1.000 ± 0.100 | 0.70 |" in md and "stage X unavailable" in md
    assert set(out["plots"]) == {"frontier", "best_of_n", "times"}
    assert all((tmp_path / p).stat().st_size > 5000 for p in out["plots"].values())
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_ai_agreement_by_order_first_order_against_both_by_hand(tmp_path):
    """Three pairs, gold prefers the positive review each time. The AI labeler's stored p_orders (P(a is better)
    from each order) and choices, written by hand:
      pair 1: a better; orders (0.9, 0.7) -> first order says a (right), both orders a (right)
      pair 2: b better; orders (0.6, 0.2) -> first order says a (wrong: a shown first, position bias), both: mean 0.4
              -> b (right)
      pair 3: b better; orders (0.5, 0.5) -> a tie in both views (wrong, counted as a tie)
    single_order = 1/3, both_orders = 2/3, ties 1 and 1. A pair whose gold scores are equal is left out."""
    from alignloop.ai_feedback.judge import project_items
    from alignloop.feedback.store import Store
    from alignloop.pipeline.labelers import ai_agreement_by_order

    good, bad = "the plot was great . i loved the music .", "the plot was boring . i hated the music ."
    rows = [{"prompt": "Review of A:", "completions": [good, bad]},
            {"prompt": "Review of B:", "completions": [bad, good]},
            {"prompt": "Review of C:", "completions": [bad + " ", good]},
            {"prompt": "Review of D:", "completions": [good, good + " "]}]   # equal gold: not counted
    store = Store(str(tmp_path / "fb.db"))
    store.create_project("p", "pairwise")
    store.import_records("p", rows)
    p = store.get_project("p")
    lab = store.add_ai_labeler("ai-x", "x")
    its = project_items(store, p.id)
    verdicts = [(0.9, 0.7, "a"), (0.6, 0.2, "b"), (0.5, 0.5, "tie"), (0.6, 0.6, "a")]
    store.record_ai_judgements(p.id, lab.id, [
        {"item_id": it.id, "shown_order": [0, 1], "choice": c, "strength": None if c == "tie" else "better",
         "picked_position": None if c == "tie" else "ab".index(c),
         "details": {"p_orders": [p1, p2], "raw_picks": [0, 1]}}
        for it, (p1, p2, c) in zip(its, verdicts, strict=True)])
    res = ai_agreement_by_order(store.current_judgements(p.id), store, p.id, domain.gold_scores)
    assert res == {"ai-x": {"gold/single_order": pytest.approx(1 / 3), "gold/both_orders": pytest.approx(2 / 3),
                            "gold/ties_single": 1, "gold/ties_both": 1, "gold/pairs": 3}}    # no people yet
    # a person who picks a every time: the majority is a on all 4 items. First order: a, a, tie, a -> 3/4; both
    # orders: a, b, tie, a -> 2/4
    alice = store.add_labeler("alice", "correct-horse-battery")
    while (a := store.next_assignment(p.id, alice.id)) is not None:
        store.submit(a.id, alice.id, {"choice": "left" if a.shown_order[0] == 0 else "right", "strength": "better"},
                     idempotency_key=f"alice-{a.id}-key")
    res = ai_agreement_by_order(store.current_judgements(p.id), store, p.id, None)["ai-x"]
    assert res == {"people/single_order": 0.75, "people/both_orders": 0.5, "people/ties_single": 1,
                   "people/ties_both": 1, "people/pairs": 4}
    store.dispose()
