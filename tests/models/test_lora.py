from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignloop.errors import UserError
from alignloop.models import (
    CausalLMWithValueHead,
    LoraOptions,
    has_adapter,
    keep_reference,
    load_causal_lm,
    model_forward,
    reference_mode,
)

LORA = LoraOptions(r=4, alpha=8, dropout=0.0)


def _batch(pad_batch):
    return pad_batch([[5, 9, 12, 7, 30], [8, 3, 44]], 1, "left")


def _perturb_adapter(model):
    with torch.no_grad():
        n = 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
                n += 1
    assert n > 0


def test_lora_attach_and_reference_mode(lm_dir, pad_batch):
    ids, mask = _batch(pad_batch)
    base = load_causal_lm(lm_dir).eval()
    policy = load_causal_lm(lm_dir, lora=LORA)
    assert has_adapter(policy) and not has_adapter(base)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: attention and MLP projections of every block, not the LM head
    assert any("c_attn" in n for n in trainable) and any("c_fc" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    with torch.no_grad():
        base_logits = model_forward(base, ids, mask)
        policy.eval()
        torch.testing.assert_close(model_forward(policy, ids, mask), base_logits)  # LoRA B = 0: identity at init
    _perturb_adapter(policy)
    policy.train()
    with torch.no_grad():
        adapted = model_forward(policy.eval(), ids, mask)
    policy.train()
    assert (adapted - base_logits).abs().max() > 1e-3
    with reference_mode(policy) as ref:
        assert ref is policy and not policy.training and not torch.is_grad_enabled()
        torch.testing.assert_close(model_forward(policy, ids, mask), base_logits, atol=1e-6, rtol=1e-6)
    assert policy.training and torch.is_grad_enabled()  # restored
    policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(model_forward(policy, ids, mask), adapted)  # adapter back on


def test_reference_mode_restores_adapter_after_an_exception(lm_dir, pad_batch):
    ids, mask = _batch(pad_batch)
    policy = load_causal_lm(lm_dir, lora=LORA).eval()
    _perturb_adapter(policy)
    with torch.no_grad():
        adapted = model_forward(policy, ids, mask)
    with pytest.raises(RuntimeError), reference_mode(policy):
        raise RuntimeError("boom")
    with torch.no_grad():
        torch.testing.assert_close(model_forward(policy, ids, mask), adapted)


def test_reference_mode_without_adapter_refuses(lm_dir):
    with pytest.raises(ValueError, match="adapter"), reference_mode(load_causal_lm(lm_dir)):
        pass


def test_keep_reference_makes_the_starting_adapter_the_reference(lm_dir, pad_batch):
    """A policy that starts from a trained adapter: after `keep_reference`, reference_mode computes that starting
    policy (adapter on), bit for bit, however the adapter moves later; the live values come back on exit; the
    state dict (checkpoints, saved adapters) is unchanged."""
    ids, mask = _batch(pad_batch)
    policy = load_causal_lm(lm_dir, lora=LORA)
    _perturb_adapter(policy)  # a trained adapter: its base is not the starting policy
    policy.eval()
    with torch.no_grad():
        start = model_forward(policy, ids, mask)
    keys = set(policy.state_dict())
    keep_reference(policy)
    assert set(policy.state_dict()) == keys
    _perturb_adapter(policy)  # training moves the adapter
    with torch.no_grad():
        moved = model_forward(policy, ids, mask)
    assert (moved - start).abs().max() > 1e-3
    with reference_mode(policy):
        torch.testing.assert_close(model_forward(policy, ids, mask), start, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model_forward(policy, ids, mask), moved, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter"):
        keep_reference(load_causal_lm(lm_dir))


def test_lora_gradients_reach_only_the_adapter(lm_dir, pad_batch):
    ids, mask = _batch(pad_batch)
    policy = load_causal_lm(lm_dir, lora=LORA, gradient_checkpointing=True)
    policy.train()
    model_forward(policy, ids, mask).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n or "lora_B" in n)


def test_value_head_policy_with_lora(lm_dir, pad_batch, tmp_path):
    ids, mask = _batch(pad_batch)
    base = load_causal_lm(lm_dir).eval()
    policy = CausalLMWithValueHead.from_pretrained(lm_dir, lora=LORA)
    assert has_adapter(policy)
    assert policy.v_head.summary.weight.requires_grad
    _perturb_adapter(policy)
    policy.eval()
    with torch.no_grad():
        logits, values = policy(ids, mask)
        base_logits = model_forward(base, ids, mask)
    assert (logits - base_logits).abs().max() > 1e-3
    with reference_mode(policy):
        torch.testing.assert_close(model_forward(policy, ids, mask), base_logits, atol=1e-6, rtol=1e-6)
    # merged save: plain transformers loads the adapted policy
    policy.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(model_forward(plain, ids, mask), logits, atol=1e-4, rtol=1e-4)
    # adapter-only save: loads back as base + adapter
    policy.save_pretrained(tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    again = CausalLMWithValueHead.from_pretrained(tmp_path / "adapter").eval()
    assert has_adapter(again)
    with torch.no_grad():
        l2, v2 = again(ids, mask)
    torch.testing.assert_close(l2, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v2, values)


def test_bad_lora_options():
    with pytest.raises(UserError, match="r must"):
        LoraOptions(r=0)
    with pytest.raises(UserError, match="dropout"):
        LoraOptions(dropout=1.5)
    with pytest.raises(UserError, match="bias"):
        LoraOptions(bias="some")
