"""Best-of-N, majority voting, the solve-rate estimators and PRM beam search (alignloop.recipes.prm_search), by hand
on tiny pools whose answers are known."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from alignloop.demo.arithmetic import gold_step_scores
from alignloop.recipes import prm_search as ps


def brute_best_of_n(scores, correct, n):
    """The mean over every n-subset of the best-scored candidate's correctness, ties split evenly."""
    vals = []
    for sub in itertools.combinations(range(len(scores)), n):
        top = max(scores[i] for i in sub)
        tied = [i for i in sub if scores[i] == top]
        vals.append(sum(correct[i] for i in tied) / len(tied))
    return sum(vals) / len(vals)


def test_pick_best_and_votes():
    assert ps.pick_best([0.2, 0.9, 0.9, 0.1]) == 1
    assert ps.majority_vote([5, 7, 7, None, 5, 7]) == 7
    assert ps.majority_vote([5, 7]) == 5                                  # a tie: the first seen
    assert ps.majority_vote([None, None]) is None
    assert ps.majority_vote([5, 7, 7], weights=[0.9, 0.3, 0.4]) == 5      # PRM-weighted: 0.9 > 0.7
    assert ps.vote_totals([5, 7, 7, None], [1, 2, 3, 4]) == {5: 1.0, 7: 5.0}


def test_best_of_n_rate_by_hand():
    # sorted by score: 0.9 (wrong), 0.7 (right), 0.5 (right), 0.1 (wrong)
    scores, correct = [0.9, 0.5, 0.7, 0.1], [0, 1, 1, 0]
    # N=2: w = [C(3,1), C(2,1), C(1,1), C(0,1)] / C(4,2) = [3, 2, 1, 0] / 6 -> 2/6 + 1/6
    assert ps.best_of_n_weights(4, 2).tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6, 0])
    assert [ps.best_of_n_rate(scores, correct, n) for n in (1, 2, 3, 4)] == pytest.approx([0.5, 0.5, 0.25, 0.0])
    # ties split evenly: scores (1, 1, 0), correct (1, 0, 1): N=2 subsets {0,1}: 1/2, {0,2}: 1, {1,2}: 0
    assert ps.best_of_n_rate([1, 1, 0], [1, 0, 1], 2) == pytest.approx(0.5)
    assert ps.best_of_n_rate([1, 1, 0], [1, 0, 1], 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="N must be in 1..4"):
        ps.best_of_n_rate(scores, correct, 5)


def test_best_of_n_rate_is_the_mean_over_all_subsets():
    rng = random.Random(0)
    for _ in range(20):
        n_pool = rng.randint(2, 9)
        scores = [rng.choice([0.1, 0.3, 0.5, 0.7]) for _ in range(n_pool)]   # many ties
        correct = [rng.random() < 0.5 for _ in range(n_pool)]
        for n in range(1, n_pool + 1):
            assert ps.best_of_n_rate(scores, correct, n) == pytest.approx(brute_best_of_n(scores, correct, n))


def test_majority_rate_by_hand():
    answers, right = [5, 5, 7, None], 5
    assert ps.majority_rate(answers, right, 1) == pytest.approx(0.5)       # exact at N=1: 2 of 4 say 5
    assert ps.majority_rate(answers, right, 4) == pytest.approx(1.0)       # the whole pool: 5 has 2 votes, 7 one
    # N=2, the 6 subsets: {0,1} 1, {0,2} tie 1/2, {0,3} 1, {1,2} 1/2, {1,3} 1, {2,3} 0 -> 4/6
    assert ps.majority_rate(answers, right, 2, subsets=20000) == pytest.approx(4 / 6, abs=0.015)
    # N=3: {0,1,2} 1, {0,1,3} 1, {0,2,3} 1/2, {1,2,3} 1/2 -> 3/4
    assert ps.majority_rate(answers, right, 3, subsets=20000) == pytest.approx(0.75, abs=0.015)
    assert ps.majority_rate(answers, 9, 2) == 0.0                          # nobody says 9
    assert ps.majority_rate([None, None], 5, 2) == 0.0
    # PRM-weighted voting: one confident right answer out-votes two doubtful wrong ones
    assert ps.majority_rate([5, 7, 7], 5, 3, weights=[0.9, 0.3, 0.4]) == 1.0
    assert ps.majority_rate([5, 7, 7], 5, 3) == 0.0
    # a zero weight still counts the answer as present (a tie at 0 between 5 and 7 is 1/2)
    assert ps.majority_rate([5, 7], 5, 2, weights=[0.0, 0.0]) == pytest.approx(0.5)


def test_solve_rate_curve():
    pools = [{"scores": [0.9, 0.5, 0.7, 0.1], "correct": [0, 1, 1, 0], "answers": [3, 4, 4, 3], "right": 4},
             {"scores": [0.2, 0.8, 0.1, 0.3], "correct": [0, 1, 0, 0], "answers": [1, 2, 1, 1], "right": 2}]
    assert ps.solve_rate_curve(pools, [1, 4], "score") == pytest.approx({1: (0.5 + 0.25) / 2, 4: (0 + 1) / 2})
    got = ps.solve_rate_curve(pools, [1, 4], "majority")
    assert got == pytest.approx({1: (0.5 + 0.25) / 2, 4: (0.5 + 0) / 2})      # pool 1: a 2-2 tie
    # weighted: pool 1's answer 4 has 0.5 + 0.7 = 1.2 against 1.0; pool 2's 2 has 0.8 against 0.2 + 0.1 + 0.3
    assert ps.solve_rate_curve(pools, [4], "weighted") == pytest.approx({4: 1.0})
    with pytest.raises(ValueError, match="method"):
        ps.solve_rate_curve(pools, [1], "oracle")


def test_first_step():
    assert ps.first_step("12*3=36\n36+2=38\n") == ("12*3=36", False)
    assert ps.first_step("Answer: 38") == ("Answer: 38", True)
    assert ps.first_step("") == ("", True)
    # a blank line between steps (the prefix already ends with the separator): skipped, as split_steps skips it
    assert ps.first_step("\n36+2=38\nAnswer: 38") == ("36+2=38", False)
    assert ps.first_step("\n \nAnswer: 38") == ("Answer: 38", True)
    assert ps.first_step("\n") == ("", False)          # only blank: the policy stopped


PROMPT = "Q: 7+5*3+2\n"
# the policy's next steps from each prefix: one wrong and one right each time, the wrong one first
NEXT = {PROMPT: ["7+5=13\n", "7+5=12\n"],
        PROMPT + "7+5=12\n": ["12*3=35\n", "12*3=36\n"],
        PROMPT + "7+5=13\n": ["13*3=39\n", "13*3=39\n"],
        PROMPT + "7+5=12\n12*3=36\n": ["36+2=39\n", "36+2=38\n"],
        PROMPT + "7+5=12\n12*3=35\n": ["35+2=37\n", "35+2=37\n"],
        PROMPT + "7+5=12\n12*3=36\n36+2=38\n": ["Answer: 37\n", "Answer: 38\n"],
        PROMPT + "7+5=12\n12*3=36\n36+2=39\n": ["Answer: 39\n", "Answer: 39\n"],
        PROMPT + "7+5=12\n12*3=36\n36+2=38\nAnswer: 38\n": ["", ""],
        PROMPT + "7+5=12\n12*3=36\n36+2=38\nAnswer: 37\n": ["", ""]}


class Stub:
    def __init__(self):
        self.calls = []

    def __call__(self, prefixes, m):
        self.calls.append(list(prefixes))
        return [NEXT[p][:m] for p in prefixes]


def test_beam_search_with_a_step_verifier_finds_the_right_path():
    stub = Stub()
    out = ps.prm_beam_search([PROMPT], stub, gold_step_scores, beam_width=1, expand=2)
    assert out[0]["completions"] == ["7+5=12", "12*3=36", "36+2=38", "Answer: 38"]
    assert out[0]["score"] == 1.0 and out[0]["finished"]
    assert out[0]["text"] == "7+5=12\n12*3=36\n36+2=38\nAnswer: 38\n"
    assert len(stub.calls) == 5 and all(len(c) == 1 for c in stub.calls)    # 4 steps, then the empty stop
    # an answer step ends the beam: one call fewer
    stub = Stub()
    out = ps.prm_beam_search([PROMPT], stub, gold_step_scores, beam_width=1, expand=2,
                             is_final=lambda s: s.startswith("Answer:"))
    assert out[0]["completions"][-1] == "Answer: 38" and len(stub.calls) == 4
    # the policy's first choice alone (expand 1) follows the wrong steps: the PRM cannot rescue what is not sampled
    out = ps.prm_beam_search([PROMPT], Stub(), gold_step_scores, beam_width=1, expand=1, max_steps=2)
    assert out[0]["completions"] == ["7+5=13", "13*3=39"] and out[0]["score"] == 0.0


def test_beam_search_keeps_several_beams_and_takes_a_scorer_object():
    class Scorer:
        """A PRM stand-in: the step_scores of alignloop.scoring.ProcessScorer (texts in, one float per step)."""
        def step_scores(self, prompts, texts):
            from alignloop.data import split_steps
            return gold_step_scores(prompts, [split_steps(t) for t in texts])

    stub = Stub()
    out = ps.prm_beam_search([PROMPT, PROMPT], stub, Scorer(), beam_width=2, expand=2, max_steps=3)
    # after 3 steps nothing is finished: the best kept beam, 3 right steps
    assert [o["completions"] for o in out] == [["7+5=12", "12*3=36", "36+2=38"]] * 2
    assert not out[0]["finished"]
    # both prompts' beams go in one call per step; width 2 keeps the right and a wrong beam after step 1
    assert [len(c) for c in stub.calls] == [2, 4, 4]
    # alignloop.scoring.ProcessScorer around the rule-based step verifier: the same search
    from alignloop.scoring import ProcessScorer
    out = ps.prm_beam_search([PROMPT], Stub(), ProcessScorer(gold_step_scores), beam_width=2, expand=2)
    assert out[0]["completions"] == ["7+5=12", "12*3=36", "36+2=38", "Answer: 38"] and out[0]["score"] == 1.0
    with pytest.raises(ValueError):
        ps.prm_beam_search([PROMPT], stub, Scorer(), beam_width=0)


def test_majority_rate_subsets_are_uniform():
    """The random subsets cover each candidate equally often (no bias toward the pool's first ones)."""
    idx = ps.random_subsets(10, 3, 20000, np.random.default_rng(0))
    counts = np.bincount(idx.ravel(), minlength=10) / idx.size
    assert np.allclose(counts, 0.1, atol=0.01) and all(len(set(r)) == 3 for r in idx[:100].tolist())


def test_beam_search_with_another_separator():
    """Steps split and joined with " | ": the continuer sees the prefix so joined and the result's text too."""
    seen = []

    def continuer(prefixes, m):
        seen.extend(prefixes)
        return [["s1 | s2 | "] * m if p == "Q:" else ["END"] * m for p in prefixes]

    (best,) = ps.prm_beam_search(["Q:"], continuer, lambda prompts, lists: [[1.0] * len(x) for x in lists],
                                 beam_width=1, expand=1, max_steps=3, separator=" | ")
    assert seen == ["Q:", "Q:s1 | "] and best["completions"] == ["s1", "END"] and best["text"] == "s1 | END | "
