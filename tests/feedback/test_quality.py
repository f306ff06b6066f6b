"""Quality statistics against hand-worked values."""
import math

import numpy as np
import pytest

from alignloop.feedback import quality as q


def test_majority_vote_and_ties():
    ann = {1: {"a": "x", "b": "x", "c": "y"}, 2: {"a": "x", "b": "y"}, 3: {}}
    assert q.majority_vote(ann) == {1: "x", 2: None, 3: None}


def test_leave_one_out_agreement_hand_worked():
    # item 1: ann=a, bob=a, cy=b  -> ann: others {a,b} tie -> 1/2; bob: 1/2; cy: others a,a -> 0
    # item 2: ann=b, bob=a        -> ann: 0; bob: 0
    ann = {1: {"ann": "a", "bob": "a", "cy": "b"}, 2: {"ann": "b", "bob": "a"}}
    loo = q.leave_one_out_agreement(ann)
    assert loo["ann"] == pytest.approx(0.25)
    assert loo["bob"] == pytest.approx(0.25)
    assert loo["cy"] == pytest.approx(0.0)
    assert q.leave_one_out_agreement({1: {"solo": "a"}}) == {"solo": None}


def test_cohen_kappa_hand_worked():
    # po = 3/4; pe = .5*.25 + .5*.75 = .5; kappa = (.75 - .5) / .5 = .5
    assert q.cohen_kappa(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx(0.5)
    assert math.isnan(q.cohen_kappa(["a", "a"], ["a", "a"]))
    ann = {1: {"x": "a", "y": "a"}, 2: {"x": "a", "y": "b"}, 3: {"x": "b", "y": "b"}, 4: {"x": "b", "y": "b"}}
    assert q.pairwise_cohen_kappa(ann) == {("x", "y"): pytest.approx(0.5)}
    assert q.mean_pairwise_kappa(ann) == pytest.approx(0.5)


def test_fleiss_kappa_wikipedia_example():
    # Fleiss (1971) worked example on Wikipedia: 10 subjects, 14 raters, 5 categories, kappa = 0.210
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                      [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert q.fleiss_kappa_table(table) == pytest.approx(0.20993, abs=1e-4)
    # the same through annotations
    ann = {}
    for i, row in enumerate(table):
        labels = [c for c, n in enumerate(row) for _ in range(n)]
        ann[i] = {f"r{j}": lab for j, lab in enumerate(labels)}
    assert q.fleiss_kappa(ann) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_small_hand_worked():
    # 2 items x 2 raters: (a,a), (a,b). P1 = 1, P2 = 0, Pbar = .5; p_a = 3/4, p_b = 1/4, Pe = 10/16
    # kappa = (.5 - .625) / .375 = -1/3
    assert q.fleiss_kappa({1: {"x": "a", "y": "a"}, 2: {"x": "a", "y": "b"}}) == pytest.approx(-1 / 3)


def test_krippendorff_alpha_hand_worked():
    # 2 coders, nominal, c1 = a a b b, c2 = a b b b: coincidences o_aa=2, o_ab=o_ba=1, o_bb=4, n=8, n_a=3, n_b=5
    # D_o = 2/8, D_e = 2*3*5/(8*7) = 30/56, alpha = 1 - (2/8)/(30/56) = 1 - 7/15 = 8/15
    ann = {1: {"c1": "a", "c2": "a"}, 2: {"c1": "a", "c2": "b"}, 3: {"c1": "b", "c2": "b"}, 4: {"c1": "b", "c2": "b"}}
    assert q.krippendorff_alpha(ann, "nominal") == pytest.approx(8 / 15)


def test_krippendorff_alpha_reference_data():
    # Krippendorff (2011) "Computing Krippendorff's alpha-reliability", 4 coders x 12 units with missing values
    nan = None
    data = [[1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
            [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan]]
    ann = {u: {c: data[c][u] for c in range(4) if data[c][u] is not None} for u in range(12)}
    assert q.krippendorff_alpha(ann, "nominal") == pytest.approx(0.743, abs=1e-3)
    assert q.krippendorff_alpha(ann, "interval") == pytest.approx(0.849, abs=1e-3)


def test_position_bias_binomial():
    # 8 left of 10: two-sided p = 2 * (C(10,8) + C(10,9) + C(10,10)) / 2^10 = 112/1024
    pb = q.position_bias([0] * 8 + [1] * 2)
    assert pb["n"] == 10 and pb["left_share"] == pytest.approx(0.8)
    assert pb["p_value"] == pytest.approx(112 / 1024)
    assert q.position_bias([])["left_share"] is None


def test_gold_accuracy_tie_rate_time():
    ann = {1: {"a": "x", "b": "y"}, 2: {"a": "x"}}
    g = q.gold_accuracy(ann, {1: "x", 2: "y"})
    assert g["a"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert g["b"] == {"n": 1, "correct": 0, "accuracy": 0.0}
    assert q.tie_rate(["a", "tie", "b", "tie"]) == 0.5
    assert q.median_seconds([1000, 3000, None, 2000]) == 2.0


def test_dawid_skene_recovers_truth_against_a_bad_majority():
    # 3 truthful experts on 20 items; on items 0-4 two spammers (always "a") plus one noisy labeler outvote
    # expert "e1" alone. Majority gets those wrong; Dawid-Skene learns e1 is reliable and spammers uninformative.
    rng = np.random.default_rng(0)
    truth = {i: ("a" if i % 2 else "b") for i in range(40)}
    ann = {}
    for i, t in truth.items():
        labs = {"e1": t, "e2": t, "s1": "a", "s2": "a"}
        if i < 10:
            labs.pop("e2")  # only e1 is there to say "b"
        ann[i] = labs
    ds = q.dawid_skene(ann)
    assert ds.converged
    acc = np.mean([ds.consensus[i] == truth[i] for i in truth])
    mv = q.majority_vote(ann)
    mv_acc = np.mean([mv[i] == truth[i] for i in truth])
    assert acc == 1.0 and mv_acc < 1.0
    assert ds.confusion["e1"]["b"]["b"] > 0.9
    assert sum(ds.posteriors[0].values()) == pytest.approx(1.0)
    del rng


def test_labeler_stats_and_flags():
    recs = []
    # 12 items, 4 labelers; "bad" always picks left and disagrees; fast
    for i in range(12):
        good = "a" if i % 2 else "b"
        for w in ("g1", "g2", "g3"):
            recs.append({"item_id": i, "labeler": w, "choice": good, "picked_position": i % 2, "is_gold": False,
                         "gold_answer": None, "time_spent_ms": 10_000})
        recs.append({"item_id": i, "labeler": "bad", "choice": "b" if good == "a" else "a", "picked_position": 0,
                     "is_gold": False, "gold_answer": None, "time_spent_ms": 500})
    for i in range(100, 104):
        recs.append({"item_id": i, "labeler": "bad", "choice": "b", "picked_position": 0, "is_gold": True,
                     "gold_answer": {"choice": "a"}, "time_spent_ms": 500})
        recs.append({"item_id": i, "labeler": "g1", "choice": "a", "picked_position": 1, "is_gold": True,
                     "gold_answer": {"choice": "a"}, "time_spent_ms": 9000})
    st = q.labeler_stats(recs, "pairwise")
    assert st["g1"]["agreement"] == 1.0 and st["bad"]["agreement"] == 0.0
    assert st["bad"]["gold_accuracy"] == 0.0 and st["g1"]["gold_accuracy"] == 1.0
    assert st["bad"]["left_share"] == 1.0
    flags = q.flag_labelers(st, q.Thresholds(min_items=5))
    assert flags["g1"] == [] and flags["g2"] == []
    reasons = " ".join(flags["bad"])
    assert "agreement" in reasons and "gold" in reasons and "position" in reasons and "median" in reasons
    pa = q.project_agreement(recs, "pairwise")
    assert set(pa) == {"fleiss_kappa", "krippendorff_alpha", "mean_cohen_kappa"}


def test_label_of_each_task():
    assert q.label_of("rank", {"ranking": [2, 1, 1]}) == (1, 2)
    assert q.label_of("thumbs", {"thumbs": -1}) == -1
    assert q.label_of("likert", {"likert": 6}) == 6
    assert q.gold_is_correct("likert")(5, 6) and not q.gold_is_correct("likert")(4, 6)
