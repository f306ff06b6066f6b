import inspect
import types
import warnings

import pytest
import torch

from alignloop.models import position_ids_from_attention_mask as position_ids_from_mask
from alignloop.models.tiny import tiny_causal_lm
from alignloop.rollout import HFSampler, SamplingParams, filter_logits, left_pad


def _prompts(tok):
    texts = ["good", "the movie was really very", "a plot", "boring fun music and the ending"]
    return [tok(t)["input_ids"] for t in texts]


def _recompute(lm, r, temperature):
    ids, mask = r.input_ids, r.attention_mask.long()
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    P = r.prompt_ids.shape[1]
    logits = logits[:, P - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, r.response_ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_logprobs_match_training_forward(lm, tok, temperature):
    torch.manual_seed(0)
    r = HFSampler(lm, tok).generate(_prompts(tok), SamplingParams(max_new_tokens=20, temperature=temperature))
    assert r.prompt_mask[0, 0].item() is False  # left padding happened
    lp = _recompute(lm, r, temperature)
    m = r.response_mask
    assert m.sum() > 20
    diff = (lp - r.logprobs)[m].abs().max().item()
    assert diff < 1e-4, diff
    assert torch.equal(r.logprobs, r.policy_logprobs)


def test_topk_topp_logprobs_are_of_truncated_distribution(lm, tok):
    torch.manual_seed(0)
    p = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9)
    r = HFSampler(lm, tok).generate(_prompts(tok), p)
    m = r.response_mask
    # policy_logprobs = full distribution, recomputable by a training forward
    assert (_recompute(lm, r, 0.8) - r.policy_logprobs)[m].abs().max() < 1e-4
    # the truncated distribution renormalises: each sampled token is at least as likely there
    assert (r.logprobs[m] >= r.policy_logprobs[m] - 1e-6).all()


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]


def test_stop_at_eos_and_truncation(lm, tok):
    eos = tok.eos_token_id
    torch.manual_seed(0)
    p = SamplingParams(max_new_tokens=30, temperature=1.0, stop_token_ids=[tok.convert_tokens_to_ids("Ġthe")])
    r = HFSampler(lm, tok).generate(_prompts(tok) * 4, p)
    the = tok.convert_tokens_to_ids("Ġthe")
    for b in range(len(r)):
        n = int(r.response_mask[b].sum())
        assert r.response_mask[b, :n].all() and not r.response_mask[b, n:].any()  # contiguous
        toks = r.response_ids[b, :n].tolist()
        stops = [i for i, t in enumerate(toks) if t in (eos, the)]
        if r.stopped[b]:
            assert stops == [n - 1]
        else:
            assert stops == [] and n == 30
        assert (r.response_ids[b, n:] == r.pad_token_id).all()
        assert (r.logprobs[b, n:] == 0).all()
    assert r.stopped.any()


def test_stop_strings(lm, tok):
    torch.manual_seed(0)
    p = SamplingParams(max_new_tokens=30, stop_strings=["movie"])
    r = HFSampler(lm, tok).generate(_prompts(tok) * 4, p)
    assert r.stopped.any()
    for b in range(len(r)):
        n = int(r.response_mask[b].sum())
        text = tok.decode(r.response_ids[b, :n].tolist())
        if r.stopped[b] and "movie" in text:
            assert "movie" not in tok.decode(r.response_ids[b, :n - 1].tolist())


def test_left_pad_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_sampling_threads_auto_by_width_and_restored(tok, monkeypatch):
    """cpu_threads=0 (auto): one thread for a narrow model, every thread for a wide one; the caller's setting is
    restored afterwards; an explicit count wins."""
    seen = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    params = SamplingParams(max_new_tokens=2)
    narrow, wide = tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2), tiny_causal_lm(tok, n_layer=1, n_embd=256,
                                                                                      n_head=4)
    HFSampler(narrow, tok).generate(_prompts(tok), params)
    HFSampler(wide, tok).generate(_prompts(tok), params)
    HFSampler(wide, tok, cpu_threads=1).generate(_prompts(tok), params)
    HFSampler(wide, tok, cpu_threads=None).generate(_prompts(tok), params)
    monkeypatch.setattr(torch, "set_num_threads", real_set)
    assert seen == [1, 2, 2, 2, 1, 2]  # (set, restore) per call; None touches nothing


class _OldCacheApi(torch.nn.Module):
    """A causal LM written to the older API: the KV cache goes in and comes out as `past_key_values`."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.new_name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache, **{self.new_name: past_key_values})
        return types.SimpleNamespace(logits=out.logits, past_key_values=getattr(out, self.new_name))


def test_kv_cache_named_as_the_model_names_it(lm, tok):
    """transformers 5.2x renamed the cache `past_key_values` -> `cache` (the old name warns and goes away): the
    sampler passes it under the name the model's forward takes, so a current model samples without the deprecation
    warning and a module written to the old name samples the same tokens."""
    params = SamplingParams(max_new_tokens=12, temperature=0.9)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        new = HFSampler(lm, tok).generate(_prompts(tok), params)
    torch.manual_seed(3)
    old = HFSampler(_OldCacheApi(lm), tok).generate(_prompts(tok), params)
    assert new.response_mask.sum() > 12
    assert torch.equal(new.response_ids, old.response_ids)
    torch.testing.assert_close(new.logprobs, old.logprobs, rtol=0, atol=0)
