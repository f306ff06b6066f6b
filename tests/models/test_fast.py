"""alignloop.models.fast: speed-ups that keep the function (fused GELU, fp32 attention under CPU bf16 autocast) and
`disable_dropout`."""
from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM
from transformers.activations import NewGELUActivation

from alignloop.models import RewardModel, tiny
from alignloop.models.fast import CPU_SDPA, disable_dropout, fp32_cpu_attention, fuse_gelu, speed_up

SHAPE = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 250, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on one row: the mask path must be the same as SDPA's
    return ids, mask


def test_speed_up_keeps_the_function_in_float32(tok):
    model = tiny.tiny_causal_lm(tok, seed=0, **SHAPE).eval()
    ids, mask = _inputs()
    before = model(input_ids=ids, attention_mask=mask).logits
    assert sum(isinstance(m, NewGELUActivation) for m in model.modules()) == SHAPE["n_layer"]
    assert fuse_gelu(model) == SHAPE["n_layer"]
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert fp32_cpu_attention(model) == 1 and model.config._attn_implementation == CPU_SDPA
    after = model(input_ids=ids, attention_mask=mask).logits
    assert (after - before).abs().max() < 1e-5  # tanh-GELU kernel vs six ops: ~1e-7 apart


def test_fp32_attention_under_bf16_autocast_is_closer_to_float32(tok):
    """Under CPU bf16 autocast the attention runs in fp32: outputs stay bf16-typed, are at least as close to the
    float32 model as plain SDPA's, and gradients flow to every parameter."""
    plain = tiny.tiny_causal_lm(tok, seed=0, **SHAPE).eval()
    fast = tiny.tiny_causal_lm(tok, seed=0, **SHAPE).eval()
    fp32_cpu_attention(fast)
    ids, mask = _inputs(1)
    exact = plain(input_ids=ids, attention_mask=mask).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = plain(input_ids=ids, attention_mask=mask).logits
        b = fast(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    err_plain = (a.float() - exact)[real].abs().max()
    err_fast = (b.float() - exact)[real].abs().max()
    assert err_fast <= err_plain * 1.05 and err_fast < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters() if p.requires_grad)


def test_saved_checkpoint_loads_in_plain_transformers(tok, tmp_path):
    model = tiny.tiny_causal_lm(tok, seed=0, **SHAPE)
    speed_up(model)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert CPU_SDPA not in json.dumps(cfg)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_disable_dropout_makes_training_mode_deterministic(tok, tmp_path):
    path = tiny.build_tiny_checkpoint(tmp_path / "rm", tokenizer=tok, kind="reward", seed=1, dropout=0.3, **SHAPE)
    rm = RewardModel.from_pretrained(path).train()
    ids, mask = _inputs(2)
    assert not torch.equal(rm(ids, mask), rm(ids, mask))  # dropout on: two draws differ
    n = disable_dropout(rm)
    assert n >= 3 * SHAPE["n_layer"]  # attention, residual and MLP dropout per block, at least
    assert torch.equal(rm(ids, mask), rm(ids, mask))
    assert disable_dropout(rm) == 0  # idempotent
