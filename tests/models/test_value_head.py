from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignloop.models import VALUE_HEAD_FILE, CausalLMWithValueHead, ValueHead, load_causal_lm, model_forward


def _batch(pad_batch):
    return pad_batch([[5, 9, 12, 7, 30], [8, 3, 44]], 1, "left")


def test_zero_init_gives_zero_values_and_lm_logits(lm_dir, pad_batch):
    ids, mask = _batch(pad_batch)
    model = CausalLMWithValueHead.from_pretrained(lm_dir).eval()
    base = load_causal_lm(lm_dir).eval()
    with torch.no_grad():
        out = model(ids, mask)
        assert out.values.shape == ids.shape and out.values.dtype == torch.float32
        assert torch.equal(out.values, torch.zeros_like(out.values))
        torch.testing.assert_close(out.logits, model_forward(base, ids, mask))
        torch.testing.assert_close(model_forward(model, ids, mask), out.logits)
    assert torch.equal(model.v_head.summary.weight, torch.zeros(1, 32))


def test_values_from_last_hidden_state_and_gradients(lm_dir, pad_batch):
    ids, mask = _batch(pad_batch)
    model = CausalLMWithValueHead.from_pretrained(lm_dir)
    with torch.no_grad():
        model.v_head.summary.weight.normal_()
        model.v_head.summary.bias.fill_(0.5)
    model.eval()
    logits, values = model(ids, mask)
    _, hidden = model_forward(model.lm, ids, mask, return_hidden=True)
    torch.testing.assert_close(values, hidden @ model.v_head.summary.weight[0] + 0.5)
    # left padding: values of real tokens equal those of the sequence alone
    alone = model(torch.tensor([[8, 3, 44]]), torch.ones(1, 3, dtype=torch.long)).values
    torch.testing.assert_close(values[1, -3:], alone[0], atol=1e-5, rtol=1e-5)
    (values.sum() + logits.mean()).backward()
    assert model.v_head.summary.weight.grad.abs().sum() > 0
    assert model.lm.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0


def test_save_load_round_trip(lm_dir, pad_batch, tmp_path, tok):
    ids, mask = _batch(pad_batch)
    model = CausalLMWithValueHead.from_pretrained(lm_dir)
    with torch.no_grad():
        model.v_head.summary.weight.normal_()
        model.v_head.summary.bias.fill_(-0.25)
        model.lm.transformer.h[0].mlp.c_fc.weight.add_(0.1)  # differs from lm_dir now
    model.eval()
    model.save_pretrained(tmp_path / "ppo", tokenizer=tok)
    assert {"config.json", "model.safetensors", VALUE_HEAD_FILE, "tokenizer.json"} <= {
        p.name for p in (tmp_path / "ppo").iterdir()}
    head = load_file(str(tmp_path / "ppo" / VALUE_HEAD_FILE))
    assert head["weight"].shape == (1, 32) and head["bias"].item() == -0.25
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo").eval()
    again = CausalLMWithValueHead.from_pretrained(tmp_path / "ppo").eval()
    with torch.no_grad():
        logits, values = model(ids, mask)
        torch.testing.assert_close(model_forward(plain, ids, mask), logits, atol=0, rtol=0)
        l2, v2 = again(ids, mask)
    torch.testing.assert_close(l2, logits, atol=0, rtol=0)
    torch.testing.assert_close(v2, values, atol=0, rtol=0)


def test_value_head_init_options_and_bf16_trunk(lm_dir, pad_batch):
    head = ValueHead(100, init="reward")
    assert head.summary.bias.abs().sum() == 0
    assert 0.5 / 101 ** 0.5 < head.summary.weight.std().item() < 1.5 / 101 ** 0.5
    with pytest.raises(ValueError):
        ValueHead(8, init="xavier")
    ids, mask = _batch(pad_batch)
    model = CausalLMWithValueHead.from_pretrained(lm_dir, dtype="bfloat16").eval()
    with torch.no_grad():
        out = model(ids, mask)
    assert out.logits.dtype == torch.bfloat16 and out.values.dtype == torch.float32


def test_generate_delegates_to_lm(lm_dir):
    model = CausalLMWithValueHead.from_pretrained(lm_dir).eval()
    out = model.generate(torch.tensor([[5, 9]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                         max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 5)
