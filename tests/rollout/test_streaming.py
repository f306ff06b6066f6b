"""The optional streaming hook of sampling: the same samples with and without it, the streamed text is the text."""
from __future__ import annotations

import torch

from alignloop.rollout import HFSampler, SamplingParams, encode_prompts, sample_completions


def test_on_step_sees_every_token_and_changes_nothing(lm, tok):
    prompts = encode_prompts(tok, ["good movie", "the plot was"])
    params = SamplingParams(max_new_tokens=12, temperature=0.9)
    torch.manual_seed(5)
    plain = HFSampler(lm, tok).generate(prompts, params)
    steps = []
    torch.manual_seed(5)
    streamed = HFSampler(lm, tok).generate(prompts, params, on_step=lambda t, a: steps.append((t.clone(), a.clone())))
    assert torch.equal(plain.response_ids, streamed.response_ids)
    assert torch.equal(plain.response_mask, streamed.response_mask)
    assert len(steps) == plain.response_ids.shape[1]
    assert torch.equal(torch.stack([t for t, _ in steps], 1), streamed.response_ids)
    assert torch.equal(torch.stack([a for _, a in steps], 1), streamed.response_mask)


def test_sample_completions_stream_is_the_text_so_far(lm, tok):
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    prompts = ["good movie", "boring"]
    plain = sample_completions(lm, tok, prompts, 2, params, seed=3, batch_size=3)
    seen: dict[int, list[str]] = {}
    streamed = sample_completions(lm, tok, prompts, 2, params, seed=3, batch_size=3,
                                  stream=lambda k, text: seen.setdefault(k, []).append(text))
    assert [[c.text for c in g] for g in plain] == [[c.text for c in g] for g in streamed]
    flat = [c for g in streamed for c in g]
    assert sorted(seen) == [0, 1, 2, 3]             # rows of both batches, numbered prompt * n + sample
    for k, c in enumerate(flat):
        assert len(seen[k]) == c.length             # one call per generated token
        assert seen[k][-1] == c.text
        assert all(c.text.startswith(t) for t in seen[k][:-1]) or any("\ufffd" in t for t in seen[k])


def test_stream_every_s_streams_less_often(lm, tok):
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    calls = []
    out = sample_completions(lm, tok, ["good movie"], 1, params, seed=3, stream=lambda k, t: calls.append(t),
                             stream_every_s=3600.0)
    assert calls and len(calls) == 1 and out[0][0].text.startswith(calls[0])     # the first step only
