"""Property tests: rankings -> pairs and truncation invariants."""
import logging
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.data import load_preferences, rankings_to_pairs, truncate


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=6))
def test_rankings_to_pairs_invariants(ranking):
    k = len(ranking)
    comps = [f"c{i}" for i in range(k)]
    rank_of = dict(zip(comps, ranking, strict=True))
    ties = sum(ranking[i] == ranking[j] for i in range(k) for j in range(i + 1, k))
    pairs = rankings_to_pairs(comps, ranking)
    assert len(pairs) == math.comb(k, 2) - ties
    assert all(rank_of[p.chosen] < rank_of[p.rejected] and not p.tie for p in pairs)
    all_pairs = rankings_to_pairs(comps, ranking, include_ties=True)
    assert len(all_pairs) == math.comb(k, 2)
    assert sum(p.tie for p in all_pairs) == ties
    assert all(p.margin == 0.0 for p in all_pairs if p.tie)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 30), st.lists(st.integers(1, 30), min_size=1, max_size=2), st.integers(2, 40),
       st.sampled_from(["keep_end", "keep_start", "drop"]))
def test_truncate_invariants(n_prompt, n_completions, max_length, policy):
    prompt = list(range(n_prompt))
    comps = [list(range(1000, 1000 + n)) for n in n_completions]
    out = truncate(prompt, comps, max_length, policy)
    fits = n_prompt + max(n_completions) <= max_length
    if out is None:
        assert not fits
        return
    p, cs, cut = out
    assert cut == (not fits)
    assert all(len(p) + len(c) <= max_length and c for c in cs)
    assert all(c == orig[:len(c)] for c, orig in zip(cs, comps, strict=True))  # completions keep their start
    if policy == "keep_end":
        assert p == prompt[len(prompt) - len(p):]  # the prompt keeps its end
    else:
        assert p == prompt[:len(p)]


def test_skipped_bad_rows_are_logged(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p"}\n')
    with caplog.at_level(logging.WARNING, logger="alignloop.data"):
        _, stats = load_preferences(path, skip_bad_rows=True)
    assert stats.bad_rows == 1
    assert "skipped 1 bad rows" in caplog.text and "p.jsonl line 2" in caplog.text
    assert "bad_rows=1" in stats.summary()


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab \n", max_size=12), st.text(alphabet="ab \n", max_size=12))
def test_implicit_text_prompt_invariants(chosen, rejected):
    from alignloop.data import implicit_text_prompt

    if chosen == rejected:
        return
    prompt, c, r = implicit_text_prompt(chosen, rejected)
    assert prompt + c == chosen and prompt + r == rejected
    assert (c or not chosen) and (r or not rejected)  # never an empty completion unless the text is empty
    if prompt:
        assert c[0].isspace() and r[0].isspace()  # cut just before a whitespace
