"""Rankings -> pairs (hand-worked K=3 and K=4), ties, weights, strengths -> margins, implicit prompts, flattening."""
import json
import math

import pytest

from alignloop.data import (
    Pair,
    PreferenceGroup,
    groups_to_rows,
    groups_to_unpaired,
    implicit_messages_prompt,
    implicit_text_prompt,
    load_preferences,
    ranking_pair_weight,
    rankings_to_pairs,
    strength_to_margin,
)


def test_k3_ranking_hand_worked():
    # a is 2nd, b is best, c is worst: b > a, a > c, b > c
    pairs = rankings_to_pairs(["a", "b", "c"], [2, 1, 3])
    assert pairs == [Pair("b", "a"), Pair("a", "c"), Pair("b", "c")]
    assert len(pairs) == 3 * 2 // 2
    assert ranking_pair_weight(3) == pytest.approx(1 / 3)


def test_k4_ranking_hand_worked_with_a_tie():
    # ranks: a 1, b 2, c 2 (tie with b), d 4 -> C(4,2) = 6 pairs, one of them the b/c tie
    comps, ranks = ["a", "b", "c", "d"], [1, 2, 2, 4]
    assert rankings_to_pairs(comps, ranks) == [Pair("a", "b"), Pair("a", "c"), Pair("a", "d"), Pair("b", "d"),
                                               Pair("c", "d")]
    with_ties = rankings_to_pairs(comps, ranks, include_ties=True)
    assert len(with_ties) == 6
    assert with_ties[3] == Pair("b", "c", 0.0, True)
    assert [p.tie for p in with_ties] == [False, False, False, True, False, False]
    assert ranking_pair_weight(4) == pytest.approx(1 / 6)


def test_k4_strict_ranking_gives_all_pairs_reversed_order():
    comps = ["w", "x", "y", "z"]
    pairs = rankings_to_pairs(comps, [4, 3, 2, 1])  # z best ... w worst
    assert len(pairs) == math.comb(4, 2)
    assert pairs == [Pair("x", "w"), Pair("y", "w"), Pair("z", "w"), Pair("y", "x"), Pair("z", "x"), Pair("z", "y")]


def test_ranking_file_groups_weights_and_tie_counts(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completions": ["a", "b", "c", "d"], "ranking": [1, 2, 2, 4]}) + "\n"
                    + json.dumps({"prompt": "q", "completions": ["e", "f", "g"], "ranking": [3, 1, 2]}) + "\n")
    groups, stats = load_preferences(path)
    assert [len(g.pairs) for g in groups] == [5, 3]
    assert [g.pair_weight for g in groups] == pytest.approx([1 / 6, 1 / 3])
    assert stats.pairs == 8 and stats.ties_skipped == 1 and stats.records == 2
    assert groups[1].pairs == [Pair("f", "e"), Pair("g", "e"), Pair("f", "g")]
    groups, stats = load_preferences(path, include_ties=True)
    assert [len(g.pairs) for g in groups] == [6, 3] and stats.ties_skipped == 0
    # the weights of a full ranking sum to 1 per prompt
    assert sum(groups[0].pair_weight for _ in groups[0].pairs) == pytest.approx(1.0)


def test_strength_to_margin_llama2_table():
    assert strength_to_margin("significantly_better") == 1.0
    assert strength_to_margin("better") == pytest.approx(2 / 3)
    assert strength_to_margin("slightly_better") == pytest.approx(1 / 3)
    assert strength_to_margin("negligibly_better") == 0.0
    assert strength_to_margin("unsure") == 0.0
    assert strength_to_margin("Significantly Better", "large") == 3.0
    assert [strength_to_margin(s, "large") for s in ("better", "slightly-better", "unsure")] == [2.0, 1.0, 0.0]
    assert strength_to_margin("better", {"better": 0.5, "much_better": 2}) == 0.5
    with pytest.raises(ValueError, match="unknown preference strength 'hugely'"):
        strength_to_margin("hugely")


def test_strength_column_custom_mapping_and_bad_strength(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "strength": "better"}\n'
                    '{"prompt": "p", "chosen": "a", "rejected": "b", "strength": "better", "margin": 5}\n'
                    '{"prompt": "p", "chosen": "a", "rejected": "b", "strength": "hugely"}\n')
    groups, stats = load_preferences(path, margins="large", skip_bad_rows=True)
    assert [g.pairs[0].margin for g in groups] == [2.0, 5.0]  # an explicit margin wins
    assert stats.bad_rows == 1 and "line 3, field 'strength': unknown preference strength 'hugely'" in stats.errors[0]


def test_implicit_text_prompt_cuts_before_whitespace():
    assert implicit_text_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5") == ("Q: 2+2? A:", " 4", " 5")
    # the common prefix ends inside a word: cut back to the previous boundary
    assert implicit_text_prompt("the movie was great", "the movie was good") == ("the movie was", " great", " good")
    # one text is a prefix of the other: the prompt never swallows a whole completion
    assert implicit_text_prompt("hello world", "hello world and more") == ("hello", " world", " world and more")
    # nothing shared at a boundary: empty prompt
    assert implicit_text_prompt("abc", "abd") == ("", "abc", "abd")
    with pytest.raises(ValueError, match="identical"):
        implicit_text_prompt("same", "same")


def test_implicit_messages_prompt():
    u, a, b = {"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}, {"role": "assistant",
                                                                                        "content": "y"}
    assert implicit_messages_prompt([u, a], [u, b]) == ([u], [a], [b])
    with pytest.raises(ValueError, match="share every message"):
        implicit_messages_prompt([u, a], [{"role": "user", "content": "other"}, b])
    with pytest.raises(ValueError, match="must end with an assistant"):
        implicit_messages_prompt([u, a], [b, u])


def test_groups_to_rows_and_back(tmp_path):
    from alignloop.data import write_rows

    groups = [PreferenceGroup("p", rankings_to_pairs(["a", "b", "c"], [1, 2, 2], include_ties=True), 1 / 3),
              PreferenceGroup("q", [Pair("x", "y", 1.0)])]
    rows = groups_to_rows(groups, with_ties=True)
    assert rows[0] == {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.0, "pair_weight": 1 / 3, "group": 0,
                       "tie": False}
    assert rows[2]["tie"] is True and rows[3]["group"] == 1 and len(rows) == 4
    for suffix in (".jsonl", ".csv", ".parquet"):
        path = write_rows(rows, tmp_path / f"pairs{suffix}")
        back, stats = load_preferences(path)  # tie rows are skipped unless include_ties
        assert [len(g.pairs) for g in back] == [2, 1] and stats.ties_skipped == 1, suffix
        back, stats = load_preferences(path, include_ties=True)
        assert [len(g.pairs) for g in back] == [3, 1], suffix
        assert [g.pair_weight for g in back] == pytest.approx([1 / 3, 1.0])
        assert [p.tie for p in back[0].pairs] == [False, False, True]


def test_groups_to_unpaired():
    ranked = PreferenceGroup("p", rankings_to_pairs(["a", "b", "c"], [2, 1, 3]), 1 / 3, ["a", "b", "c"], [2, 1, 3])
    plain = PreferenceGroup("q", [Pair("x", "y")])
    assert groups_to_unpaired([ranked, plain]) == [
        {"prompt": "p", "completion": "b", "label": True}, {"prompt": "p", "completion": "c", "label": False},
        {"prompt": "q", "completion": "x", "label": True}, {"prompt": "q", "completion": "y", "label": False}]
