"""The arithmetic demo's pieces (alignloop.demo.arith_demo) by hand: its tokenizer, the methods' views of a scored
pool, verifier accuracy, the tables, the plot, and `alignloop demo --task` refusing a run folder of the other task."""
from __future__ import annotations

import json

import pytest

from alignloop.demo import arith_demo as ad
from alignloop.demo import arithmetic as ar

P = ar.Problem(7, (("+", 5), ("*", 3), ("+", 2)))


def test_tokenizer_reads_digits_one_by_one():
    tok = ad.arith_tokenizer([P.prompt + P.solution()] * 50 + ["Q: 12+34\n12+34=46\nAnswer: 46\n"] * 50)
    pieces = tok.tokenize("12*3=36\n")
    assert pieces[:3] == ["1", "2", "*"] and "3" in pieces and "6" in pieces and pieces[-1] == "Ċ"
    assert tok.decode(tok("Q: 7+5*3+2\nAnswer: 38\n")["input_ids"]) == "Q: 7+5*3+2\nAnswer: 38\n"
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"


def cand(steps, scores):
    """A scored test candidate as the eval stage stores it."""
    text = "".join(s + "\n" for s in steps)
    c = ad.candidate(P.prompt, text)
    c["scores"] = scores
    return c


def pool():
    right = ["7+5=12", "12*3=36", "36+2=38", "Answer: 38"]
    wrong = ["7+5=12", "12*3=35", "35+2=37", "Answer: 37"]
    lucky = ["7+5=13", "12*3=36", "36+2=38", "Answer: 38"]
    return [{"prompt": P.prompt, "right": 38, "candidates": [
        # the PRMs see the error in `wrong`; the ORM prefers it
        cand(right, {"prm_auto": [0.9, 0.8, 0.9, 0.9], "prm_human": [0.9, 0.9, 0.9, 0.9], "orm": [0.5, .5, .5, 0.4]}),
        cand(wrong, {"prm_auto": [0.9, 0.2, 0.1, 0.1], "prm_human": [0.9, 0.3, 0.2, 0.2], "orm": [0.5, .5, .5, 0.8]}),
        cand(lucky, {"prm_auto": [0.3, 0.4, 0.6, 0.7], "prm_human": [0.6, 0.4, 0.3, 0.2], "orm": [0.5, .5, .5, 0.6]}),
    ]}]


def test_candidate_and_method_views():
    c = pool()[0]["candidates"]
    assert [x["correct"] for x in c] == [True, False, True] and [x["answer"] for x in c] == [38, 37, 38]
    assert c[2]["gold_steps"] == [-1, -1, -1, -1]        # right by luck after a wrong first step
    views = ad.method_pools(pool())
    assert views["PRM auto (min)"][0]["scores"] == pytest.approx([0.8, 0.1, 0.3])
    assert views["PRM auto (last)"][0]["scores"] == pytest.approx([0.9, 0.1, 0.7])
    assert views["ORM"][0]["scores"] == pytest.approx([0.4, 0.8, 0.6])
    assert views["oracle (pass@N)"][0]["scores"] == [1.0, 0.0, 1.0]


def test_best_of_n_curves_by_hand():
    size = ad.ArithSize(test_samples=3, best_of_n=[1, 2, 3, 64], vote_subsets=4000)
    curves = ad.best_of_n_curves(pool(), size)
    assert list(curves["ORM"]) == ["1", "2", "3"]                          # N beyond the pool is left out
    # N=1: 2 of 3 right. N=3: the PRM picks `right`, the ORM picks `wrong` (0.8)
    assert curves["PRM auto (min)"] == pytest.approx({"1": 2 / 3, "2": 1.0, "3": 1.0})
    # ORM sorted: wrong (0.8), lucky (0.6), right (0.4): N=2 weights [2, 1, 0] / 3 -> 1/3
    assert curves["ORM"] == pytest.approx({"1": 2 / 3, "2": 1 / 3, "3": 0.0})
    # majority: 38 has two votes of three; N=2: the subsets {r,w} and {w,l} tie (1/2), {r,l} wins -> 2/3
    assert curves["majority voting"]["3"] == 1.0
    assert curves["majority voting"]["2"] == pytest.approx(2 / 3, abs=0.03)
    assert curves["oracle (pass@N)"] == pytest.approx({"1": 2 / 3, "2": 1.0, "3": 1.0})


def test_verifier_accuracy_by_hand():
    flat = pool()[0]["candidates"]
    acc = ad.verifier_accuracy(flat)
    # prm_auto's steps against gold: right [+,+,+,+] all >= 0.5 (4 hits); wrong [+,-,-,-] vs 0.9,0.2,0.1,0.1 (4);
    # lucky [-,-,-,-] vs 0.3,0.4,0.6,0.7 (2 of 4) -> 10 / 12
    assert acc["prm_auto"]["step_accuracy"] == pytest.approx(10 / 12)
    # first predicted error: right none = none, wrong 1 = 1, lucky 0 = 0
    assert acc["prm_auto"]["first_error_accuracy"] == 1.0
    # outcome by min >= 0.5: right 0.8 yes (right), wrong 0.1 no (right), lucky 0.3 no (wrong: it is correct)
    assert acc["prm_auto"]["outcome_accuracy"] == pytest.approx(2 / 3)
    # the ORM by its last score: 0.4 no (wrong), 0.8 yes (wrong), 0.6 yes (right)
    assert acc["orm"]["outcome_accuracy"] == pytest.approx(1 / 3) and set(acc["orm"]) == {"outcome_accuracy",
                                                                                          "step_auc"}
    # step AUC of the running min against the first-error labels: prm_auto's good steps (right: 0.9 0.8 0.8 0.8,
    # wrong's first 0.9) all above its bad ones (0.2 0.1 0.1, lucky 0.3 x 4) -> 1. The ORM's running min: good
    # 0.4 and 0.5 x 4 against bad 0.5 x 7: (0 + 4 x 1/2) / 5 = 0.4
    assert acc["prm_auto"]["step_auc"] == 1.0 and acc["orm"]["step_auc"] == pytest.approx(0.4)
    # the base model's likelihood, when scored: its AUC only
    for c in flat:
        c["scores"][ad.LIKELIHOOD] = c["scores"]["prm_auto"]
    assert ad.verifier_accuracy(flat)[ad.LIKELIHOOD] == {"step_auc": 1.0}


def test_tables_and_plot(tmp_path):
    curves = {"ORM": {"1": 0.5, "2": 0.25}, "majority voting": {"1": 0.5, "2": float("nan")}}
    md = ad.best_of_n_table(curves)
    assert md.splitlines() == ["| method | N=1 | N=2 |", "|---|---|---|", "| ORM | 0.500 | 0.250 |",
                               "| majority voting | 0.500 | – |"]
    path = ad.plot_curves({"ORM": {"1": 0.5, "2": 0.25, "4": 0.3}}, tmp_path / "plots" / "p.png")
    assert path.exists() and path.stat().st_size > 1000


def test_demo_refuses_a_run_folder_of_the_other_task(tmp_path):
    from alignloop.cli import main

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "demo.json").write_text(json.dumps({"size": {}, "seed": 0}))        # a movie-review run
    with pytest.raises(SystemExit) as e:
        main(["demo", "--task", "arithmetic", "--output-dir", str(tmp_path / "a")])
    assert e.value.code == 2
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "demo.json").write_text(json.dumps({"task": "arithmetic", "size": {}, "seed": 0}))
    with pytest.raises(SystemExit) as e:
        main(["demo", "--output-dir", str(tmp_path / "b"), "--quick"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["demo", "--task", "arithmetic", "--ai-feedback", "--output-dir", str(tmp_path / "c")])
    assert e.value.code == 2
