"""Our helpers see through DDP (single-process gloo group), so trainers can pass accelerate-prepared models."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from alignloop.models import (
    CausalLMWithValueHead,
    LoraOptions,
    RewardModel,
    has_adapter,
    load_causal_lm,
    model_forward,
    reference_mode,
    score_sequences,
)


@pytest.fixture
def process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_helpers_see_through_ddp(process_group, lm_dir, reward_dir, pad_batch):
    ids, mask = pad_batch([[5, 9, 12, 7], [8, 3]], 1, "left")
    base = load_causal_lm(lm_dir).eval()
    policy = CausalLMWithValueHead.from_pretrained(lm_dir, lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ddp = DDP(policy, find_unused_parameters=True)
    assert has_adapter(ddp)
    ddp.eval()
    with torch.no_grad():
        logits = model_forward(ddp, ids, mask)
        torch.testing.assert_close(logits, policy(ids, mask).logits)
        base_logits = model_forward(base, ids, mask)
    assert (logits - base_logits).abs().max() > 1e-3
    with reference_mode(ddp):
        torch.testing.assert_close(model_forward(ddp, ids, mask), base_logits, atol=1e-6, rtol=1e-6)
    ddp.train()
    out = ddp(ids, mask)
    (out.values.sum() + out.logits.mean()).backward()
    assert policy.v_head.summary.weight.grad is not None

    rm = RewardModel.from_pretrained(reward_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(score_sequences(DDP(rm), ids, mask), rm(ids, mask))
