"""alignloop.rollout.completions, the one home of "N completions per prompt": grouping, seeding, prompt encoding, and
the per-sequence KL to a reference."""
from __future__ import annotations

import pytest

from alignloop.models.tiny import tiny_causal_lm
from alignloop.rollout import SamplingParams, encode_prompts, sample_completions


def test_n_completions_per_prompt_in_prompt_order(lm, tok):
    prompts = ["the movie", "a plot", "good", "the actor was"]
    params = SamplingParams(max_new_tokens=7)
    groups = sample_completions(lm, tok, prompts, 3, params, batch_size=2, seed=5)
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    for g in groups:
        for c in g:
            assert 1 <= c.length <= 7 and c.kl is None
            assert c.stopped or c.length == 7          # a completion that did not stop ran to max_new_tokens
    # the same seed gives the same completions, whatever the batching; another seed other ones
    again = sample_completions(lm, tok, prompts, 3, params, batch_size=2, seed=5)
    assert [[c.text for c in g] for g in again] == [[c.text for c in g] for g in groups]
    other = sample_completions(lm, tok, prompts, 3, params, batch_size=2, seed=6)
    assert [[c.text for c in g] for g in other] != [[c.text for c in g] for g in groups]


def test_kl_to_itself_is_zero_and_to_another_model_positive(lm, tok):
    prompts = ["the movie", "a plot"]
    params = SamplingParams(max_new_tokens=6, temperature=0.8)
    same = sample_completions(lm, tok, prompts, 2, params, seed=0, ref_model=lm)
    # a sum of <= 6 differences of log-probs |lp| <~ 8 (ulp 9.5e-7), cached decoding vs a full forward: a few ulps
    # each -> abs 5e-5 (seen 1.4e-6); another model, or dropout in the reference, gives a KL >= 1e-2
    assert all(c.kl == pytest.approx(0.0, abs=5e-5) for g in same for c in g)
    other = tiny_causal_lm(tok, n_layer=2, n_embd=64, seed=2)
    far = sample_completions(lm, tok, prompts, 8, params, seed=0, ref_model=other)
    kls = [c.kl for g in far for c in g]
    assert sum(kls) / len(kls) > 0.1


def test_encode_prompts_keeps_the_end_and_fills_empty_prompts(tok):
    ids = encode_prompts(tok, ["the movie was good", ""], max_prompt_length=2)
    full = tok("the movie was good", add_special_tokens=False)["input_ids"]
    assert ids[0] == full[-2:]
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert ids[1] == [start]
    assert encode_prompts(tok, []) == []


def test_reference_forward_runs_in_eval_mode(lm, tok):
    """Dropout in the reference would make the KL noisy: it is scored in eval mode, and its mode restored."""
    ref = tiny_causal_lm(tok, n_layer=2, n_embd=64, seed=1, dropout=0.5)
    ref.train()
    groups = sample_completions(lm, tok, ["the movie"], 3, SamplingParams(max_new_tokens=5), seed=0, ref_model=ref)
    # same weights as lm: KL 0 without dropout, up to float32 rounding (abs 5e-5: see the test above)
    assert all(c.kl == pytest.approx(0.0, abs=5e-5) for c in groups[0])
    assert ref.training
