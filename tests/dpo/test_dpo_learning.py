"""Slow DPO tests: learning on a synthetic task, and a 2-process run equal to 1 process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignloop.models import tiny
from alignloop.trainers.dpo import DPOConfig, DPOTrainer

from .conftest import SHAPE, synthetic_pairs


@pytest.mark.slow
def test_dpo_raises_heldout_accuracy_and_margin(tok, tmp_path):
    train, held = synthetic_pairs(64, seed=1), synthetic_pairs(32, seed=2)
    args = DPOConfig(output_dir=str(tmp_path / "out"), beta=0.1, learning_rate=5e-4, num_epochs=3,
                     per_device_batch_size=8, ref_cache_dir=str(tmp_path / "cache"), progress=False,
                     tensorboard=False, save_final=False, logging_steps=1)
    tr = DPOTrainer(model=tiny.tiny_causal_lm(tok, seed=0, **SHAPE), tokenizer=tok, args=args, train_dataset=train,
                    eval_dataset=held)
    before = tr.evaluate()
    after = tr.train().metrics
    print("held-out before:", {k: round(v, 4) for k, v in before.items()})
    print("held-out after: ", {k: round(v, 4) for k, v in after.items() if k.startswith("eval/")})
    # policy == reference at the start: implicit rewards 0, loss log 2
    assert before["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert before["eval/loss/dpo"] == pytest.approx(0.6931, abs=1e-3)
    assert after["eval/rewards/accuracies"] >= 0.9
    assert after["eval/rewards/margins"] > 1.0
    assert after["eval/loss/dpo"] < 0.4


DIST_SCRIPT = r'''
import json, sys, torch
sys.path.insert(0, {root!r})
from alignloop.models import tiny
from alignloop.trainers.dpo import DPOConfig, DPOTrainer
from tests.dpo.conftest import SHAPE, synthetic_pairs
tok = tiny.train_tokenizer(tiny.default_corpus(300), vocab_size=300)
args = DPOConfig(output_dir={out!r}, learning_rate=1e-3, per_device_batch_size={per_device},
                 gradient_accumulation_steps={accum}, num_epochs=2,
                 ref_cache_dir="none", progress=False, tensorboard=False, save_final=False, logging_steps=1, seed=3,
                 eval_batch_size=1)
tr = DPOTrainer(model=tiny.tiny_causal_lm(tok, seed=0, **SHAPE), tokenizer=tok, args=args,
                train_dataset=synthetic_pairs({n}, seed=0), eval_dataset={eval_set})
tr.train()
from torch.distributed.tensor import DTensor
print(f"world={{tr.world}} sharded={{sum(isinstance(p, DTensor) for p in tr.policy.parameters())}}")
state = {{k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tr.model.state_dict().items()}}
if tr.accelerator.is_main_process:
    torch.save(state, {out!r} + "/weights.pt")
if torch.distributed.is_initialized():  # an orderly gloo shutdown (a rank once aborted at exit without it)
    torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("n, one, two, fsdp", [(16, (8, 1), (4, 1), False), (13, (4, 2), (2, 2), False),
                                               (13, (4, 2), (2, 2), True)], ids=["even", "short-last", "fsdp2"])
def test_two_processes_equal_one(tmp_path, n, one, two, fsdp):
    """1 process == 2 processes (DDP over gloo; fsdp2: accelerate's FSDP2 with examples/accelerate/fsdp2.yaml,
    parameters sharded) with the same global batch of 8. short-last: 13 pairs, the last batch of each epoch 5 pairs,
    with 2 micro-batches of 2: process 0 takes 3 pairs (2 micro-batches), process 1 takes 2 (1 micro-batch, plus one
    of weight 0 so that both take part in the gradient reduction); 3 held-out pairs evaluated one by one (2 / 1)."""
    root = str(Path(__file__).resolve().parents[2])
    results = {}
    for name, nproc, (per_device, accum) in (("one", 1, one), ("two", 2, two)):
        out = tmp_path / name
        out.mkdir()
        script = tmp_path / f"{name}.py"
        script.write_text(DIST_SCRIPT.format(root=root, out=str(out), per_device=per_device, accum=accum, n=n,
                                             eval_set="synthetic_pairs(3, seed=5)" if n == 13 else None))
        # torchrun + ACCELERATE_USE_CPU: accelerate's MULTI_CPU (gloo). (`accelerate launch --cpu --num_processes 2`
        # starts a single process with this accelerate version.)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, "ACCELERATE_USE_CPU": "true"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script)]
        if fsdp and nproc > 1:
            env.pop("ACCELERATE_USE_CPU")
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   root + "/examples/accelerate/fsdp2.yaml", "--num_processes", str(nproc), str(script)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"world={nproc}" in proc.stdout, proc.stdout
        if fsdp and nproc > 1:
            assert "sharded=0" not in proc.stdout, proc.stdout
        results[name] = torch.load(out / "weights.pt")
        norms = [r["train/grad_norm"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if "train/grad_norm" in r]
        results[name + "_norms"] = norms
        results[name + "_eval"] = [r["eval/loss/dpo"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                   .splitlines()) if "eval/loss/dpo" in r]
    assert len(results["one_norms"]) == 4
    assert results["one_norms"] == pytest.approx(results["two_norms"], rel=1e-5)
    assert results["one_eval"] == pytest.approx(results["two_eval"], rel=1e-5)
    assert len(results["one_eval"]) == (2 if n == 13 else 0)
    # 4 AdamW steps at lr 1e-3 (weights move <= 4e-3); the 2-process all-reduce sums the gradient in another order
    # (~1e-7 relative), which Adam's normalisation turns into ~2e-6 here, ~1e-5 in a simulation with 3x that noise
    # -> atol 2e-4 = 5% of lr x steps (a 0.1% gradient error moves weights ~2e-3)
    for k, v in results["one"].items():
        torch.testing.assert_close(v, results["two"][k], rtol=0, atol=2e-4)
