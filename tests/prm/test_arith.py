"""The arithmetic demo's domain (alignloop.demo.arithmetic), by hand."""
from __future__ import annotations

import random

import pytest

from alignloop.data import join_steps
from alignloop.demo import arithmetic as ar
from alignloop.errors import UserError

P = ar.Problem(7, (("+", 5), ("*", 3), ("+", 2)))   # (7+5)*3+2 = 38


def test_problem_format_and_correct_solution():
    assert P.prompt == "Q: 7+5*3+2\n"
    assert P.values() == [12, 36, 38]
    assert P.answer == 38
    assert P.steps() == ["7+5=12", "12*3=36", "36+2=38", "Answer: 38"]
    assert P.solution() == "7+5=12\n12*3=36\n36+2=38\nAnswer: 38\n"
    assert ar.parse_problem(P.prompt) == P
    assert ar.parse_problem("Q: 40-3*2\n") == ar.Problem(40, (("-", 3), ("*", 2)))
    with pytest.raises(UserError, match="not an arithmetic prompt"):
        ar.parse_problem("Compute 7+5")


def test_verify_answer():
    assert ar.verify_answer(P, P.solution())
    assert ar.verify_answer(P.prompt, "7+5=12\n12*3=36\n36+2=38\nAnswer: 38")     # no final separator: same
    assert not ar.verify_answer(P, "7+5=12\n12*3=35\n35+2=37\nAnswer: 37\n")
    assert not ar.verify_answer(P, "7+5=12\n12*3=36\n36+2=38\n")                 # no answer step
    # right by luck after a wrong step: solved as a final-answer grader sees it
    assert ar.verify_answer(P, "7+5=13\n12*3=36\n36+2=38\nAnswer: 38\n")
    # the first answer step counts
    assert not ar.verify_answer(P, "Answer: 37\nAnswer: 38\n")


def test_verify_steps_first_error_convention():
    assert ar.verify_steps(P, P.steps()) == [1, 1, 1, 1]
    # a wrong product: it and every step after it are bad (even 35+2=37, whose arithmetic is right)
    assert ar.verify_steps(P, ["7+5=12", "12*3=35", "35+2=37", "Answer: 37"]) == [1, -1, -1, -1]
    # right arithmetic but the wrong previous result used (13 was never written)
    assert ar.local_checks(P, ["7+5=12", "13*3=39", "39+2=41", "Answer: 41"]) == [True, False, True, True]
    assert ar.verify_steps(P, ["7+5=12", "13*3=39", "39+2=41", "Answer: 41"]) == [1, -1, -1, -1]
    # the wrong operation, a wrong answer copy, an unreadable step, a step too many
    assert ar.verify_steps(P, ["7*5=35", "35*3=105"]) == [-1, -1]
    assert ar.verify_steps(P, ["7+5=12", "12*3=36", "36+2=38", "Answer: 39"]) == [1, 1, 1, -1]
    assert ar.verify_steps(P, ["7+5=12", "twelve times three", "36+2=38"]) == [1, -1, -1]
    assert ar.verify_steps(P, P.steps() + ["Answer: 38"]) == [1, 1, 1, 1, -1]
    assert ar.first_error(P, P.steps()) is None and ar.first_error(P, ["7+5=11"]) == 0
    assert ar.is_complete(P, P.steps()) and not ar.is_complete(P, P.steps()[:3])


def test_wrong_results_by_kind():
    rng = random.Random(0)
    assert ar.wrong_result(38, "+", 5, "carry", rng) == 33      # carry forgotten: 43 -> 33
    assert ar.wrong_result(41, "-", 3, "carry", rng) == 48      # borrow forgotten: 38 -> 48
    assert ar.wrong_result(12, "+", 3, "carry", rng) == 16      # no carry: off by one (12+3 odd: +1)
    for kind in ar.ERROR_KINDS:
        for _ in range(50):
            r = ar.wrong_result(3, "-", 3, kind, rng)
            assert r != 0 and r >= 0


def test_injected_errors_propagate_or_recover():
    rng = random.Random(1)
    for kind in ("carry", "off", "random"):
        steps = ar.write_solution(P, rng, error_rate=1.0, error_weights={kind: 1.0})
        labels = ar.verify_steps(P, steps)
        assert labels == [-1, -1, -1, -1]
        # each step starts from the previous written result, so only the arithmetic is wrong
        assert ar.local_checks(P, steps)[3] is True
        assert int(steps[1].split("*")[0]) == int(steps[0].split("=")[1])
    steps = ar.write_solution(P, rng, error_rate=1.0, error_weights={"recovered": 1.0})
    # every step wrong, yet the carried values are the true ones: the answer is right by luck
    assert [int(s.split("=")[0].split("+")[0].split("*")[0]) for s in steps[:3]] == [7, 12, 36]
    assert ar.verify_answer(P, join_steps(steps)) and ar.verify_steps(P, steps)[0] == -1


def test_error_rate_and_problem_ranges():
    ps = ar.problems(300, seed=3)
    assert len({p.expression for p in ps}) == 300
    assert all(2 <= len(p.ops) <= 4 and all(0 <= v <= 99 for v in p.values()) for p in ps)
    assert not {p.expression for p in ar.problems(50, seed=4, exclude={p.expression for p in ps})} & \
        {p.expression for p in ps}
    rng = random.Random(5)
    wrong = sum(ar.verify_steps(p, ar.write_solution(p, rng, 0.2))[0] == -1 for p in ps for _ in range(10))
    assert 0.15 < wrong / 3000 < 0.25                                 # the first step is wrong at the error rate
    assert all(ar.verify_steps(p, p.steps()) == [1] * (len(p.ops) + 1) for p in ps)


def test_gold_scorers():
    assert ar.gold_scores([P.prompt] * 2, [P.solution(), "Answer: 1"]) == [1.0, 0.0]
    assert ar.gold_step_scores([P.prompt], [["7+5=12", "12*3=35"]]) == [[1.0, 0.0]]


def test_simulated_labelers():
    steps = ["7+5=12", "12*3=35", "35+2=37", "Answer: 37"]
    perfect = ar.StepLabeler("p", miss=0.0, false_alarm=0.0)
    assert ar.label_steps(perfect, P, steps, random.Random(0)) == [1, -1, -1, -1]
    blind = ar.StepLabeler("b", miss=1.0, false_alarm=0.0)        # misses every error: local checks only
    assert ar.label_steps(blind, P, steps, random.Random(0)) == [1, 1, 1, 1]
    alarmist = ar.StepLabeler("a", miss=0.0, false_alarm=1.0)     # first step called wrong, the rest follow
    assert ar.label_steps(alarmist, P, P.steps(), random.Random(0)) == [-1, -1, -1, -1]
    labs = ar.default_step_labelers(2)
    assert [x.name for x in labs] == ["checker1", "checker2", "careless"] and labs[2].careless
    rng = random.Random(2)
    ps = ar.problems(200, seed=6)
    rows = [{"prompt": p.prompt, "completions": ar.write_solution(p, rng, 0.3)} for p in ps]
    out = ar.simulate_step_labels(rows, labs, seed=0)
    assert len(out) == 600 and {r["labeler"] for r in out} == {"checker1", "checker2", "careless"}
    acc = ar.labeler_step_accuracy(out)
    assert acc["checker1"] > 0.9 and acc["checker2"] > 0.85 and acc["careless"] < 0.8
    maj = ar.majority_step_labels(out)
    assert len(maj) == 200 and all(r["votes"] == 3 for r in maj)
    assert ar.labeler_step_accuracy([{**r, "labeler": "majority"} for r in maj])["majority"] > 0.85


def test_majority_step_labels_by_hand():
    rows = [{"prompt": "Q: 1+1\n", "completions": ["a", "b"], "labels": lab} for lab in ([1, 1], [1, -1], [-1, -1])]
    rows.append({"prompt": "Q: 1+1\n", "completions": ["c"], "labels": [1]})
    rows.append({"prompt": "Q: 1+1\n", "completions": ["c"], "labels": [-1]})
    assert ar.majority_step_labels(rows) == [
        {"prompt": "Q: 1+1\n", "completions": ["a", "b"], "labels": [1, -1], "votes": 3},
        {"prompt": "Q: 1+1\n", "completions": ["c"], "labels": [-1], "votes": 2}]   # a tie is the cautious −1


M = ar.Problem(7, (("+", 5), ("*", 3), ("-", 9)), modulus=10)   # (7+5) mod 10 = 2, 2*3 = 6, 6-9 = -3 mod 10 = 7


def test_digit_problems_mod_10_by_hand():
    assert M.prompt == "Q: 7+5*3-9 mod 10\n"
    assert M.values() == [2, 6, 7] and M.answer == 7
    assert M.steps() == ["7+5=2", "2*3=6", "6-9=7", "Answer: 7"]
    assert ar.parse_problem(M.prompt) == M
    assert ar.verify_answer(M.prompt, M.solution())
    # 7+5=12 is right for integers, wrong mod 10; then 12*3 carries the wrong value on
    assert ar.verify_steps(M, ["7+5=12", "12*3=6", "6-9=7", "Answer: 7"]) == [-1, -1, -1, -1]
    ps = ar.problems(300, seed=3, modulus=10)
    assert all(p.modulus == 10 and 1 <= p.start <= 9 and all(0 <= v <= 9 for v in p.values()) for p in ps)
    assert all(2 <= b <= 9 if op == "*" else 1 <= b <= 9 for p in ps for op, b in p.ops)


def test_digit_errors_by_kind():
    rng = random.Random(0)
    assert ar.wrong_result(7, "+", 5, "operation", rng, 10) == 5    # 7*5 = 35 -> 5 (the wrong operation)
    assert ar.wrong_result(7, "*", 3, "operation", rng, 10) == 0    # 7+3 = 10 -> 0
    assert ar.wrong_result(7, "+", 5, "carry", rng, 10) == 12       # the wrap forgotten: 12, not 2
    for kind in ("operation", "off", "random", "recovered"):
        for a, op, b in ((3, "-", 3), (4, "*", 5), (9, "+", 1)):
            for _ in range(20):
                r = ar.wrong_result(a, op, b, kind, rng, 10)
                assert r != ar.apply(a, op, b, 10) and 0 <= r <= 9, (kind, a, op, b)
    # the default kinds of a digit problem: every written result is a digit
    steps = ar.write_solution(M, random.Random(2), error_rate=1.0)
    assert all(0 <= int(s.split("=")[1]) <= 9 for s in steps[:3]) and ar.verify_steps(M, steps)[0] == -1
