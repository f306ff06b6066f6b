"""Online DPO (slow: `pytest -m slow tests/online_dpo`): it learns the tiny target-token reward, and 2 processes
take the same steps as 1."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from ppo.conftest import make_target_reward, small_lm

from alignloop.models.tiny import default_corpus, train_tokenizer
from alignloop.rollout import Rollout
from alignloop.rollout.sampler import left_pad
from alignloop.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def prompts():
    return [" ".join(s.split()[: 1 + i % 6]) for i, s in enumerate(default_corpus(64, seed=1))]


def _avg(h, key, sl):
    xs = [m[key] for m in h[sl]]
    return sum(xs) / len(xs)


def test_online_dpo_raises_the_reward(tmp_path, tok, prompts):
    """The share of target tokens (8 of 300) in 8-token responses, from ~0.02 for the random policy."""
    cfg = OnlineDPOConfig(output_dir=str(tmp_path), total_updates=40, rollout_batch_size=32, max_new_tokens=8,
                          learning_rate=5e-3, lr_scheduler="constant", beta=0.1, progress=False, save_final=False,
                          tensorboard=False, sample_every=0, seed=0)
    torch.manual_seed(0)
    h = OnlineDPOTrainer(model=small_lm(tok), reward=make_target_reward(tok), args=cfg, train_dataset=prompts,
                         tokenizer=tok).train().history
    start, end = _avg(h, "reward/raw_mean", slice(0, 3)), _avg(h, "reward/raw_mean", slice(-3, None))
    print("reward", [round(m["reward/raw_mean"], 3) for m in h])
    print("kl", [round(m["objective/kl"], 2) for m in h], "accuracies",
          [round(m["rewards/accuracies"], 2) for m in h[-5:]], "ties", [m["objective/tie_share"] for m in h[:3]])
    # (seen: 0.021 -> 0.78, KL ~23 nats per response at the end, accuracies ~0.9)
    assert start < 0.05
    assert end >= 0.4 and end > 10 * start
    assert _avg(h, "objective/kl", slice(-3, None)) > 1.0                 # it moved away from the reference
    assert _avg(h, "rewards/accuracies", slice(-5, None)) > 0.6          # and its implicit reward ranks the pairs
    assert _avg(h, "objective/tie_share", slice(0, 3)) > 0.3             # ties were common at the start


class FixedSampler:
    """Completions that depend only on the prompt, which of its two copies (row parity) and the update: the same
    batch of pairs on 1 or 2 processes, so that their steps can be compared (the policy does not sample here)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def generate(self, prompts_token_ids, params) -> Rollout:
        self.calls += 1
        prompt_ids, prompt_mask = left_pad(prompts_token_ids, self.tok.pad_token_id)
        responses, stopped = [], []
        for row, ids in enumerate(prompts_token_ids):
            g = torch.Generator().manual_seed(zlib.crc32(bytes(str((list(ids), row % 2, self.calls)), "utf8")))
            n = int(torch.randint(1, params.max_new_tokens + 1, (1,), generator=g))
            toks = torch.randint(3, 300, (n,), generator=g).tolist()
            stop = bool(torch.rand(1, generator=g) < 0.5)
            if stop:
                toks[-1] = self.tok.eos_token_id
            responses.append(toks)
            stopped.append(stop)
        R = max(len(r) for r in responses)
        response_ids = torch.full((len(responses), R), self.tok.pad_token_id)
        response_mask = torch.zeros(len(responses), R, dtype=torch.bool)
        for i, r in enumerate(responses):
            response_ids[i, :len(r)] = torch.tensor(r)
            response_mask[i, :len(r)] = True
        zeros = torch.zeros(len(responses), R)
        return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, zeros, zeros.clone(),
                       torch.tensor(stopped), self.tok.pad_token_id)


SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {tests!r})
    from alignloop.models.tiny import default_corpus, train_tokenizer
    from alignloop.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    from ppo.conftest import make_target_reward, small_lm
    from online_dpo.test_online_dpo_slow import FixedSampler
    tok = train_tokenizer(vocab_size=300)
    prompts = [" ".join(s.split()[: 1 + i % 6]) for i, s in enumerate(default_corpus(64, seed=1))]
    cfg = OnlineDPOConfig(output_dir={out!r}, total_updates=2, rollout_batch_size=8, max_new_tokens=6, beta=0.5,
                          gradient_accumulation_steps=2, learning_rate=1e-3, progress=False, tensorboard=False,
                          sample_every=0, save_final=True)
    torch.manual_seed(0)
    tr = OnlineDPOTrainer(model=small_lm(tok), reward=make_target_reward(tok), args=cfg, train_dataset=prompts,
                          tokenizer=tok, sampler=FixedSampler(tok))
    grads, step = [], tr.optimizer.step
    def record(*a, **k):
        grads.append(torch.cat([p.grad.detach().flatten() for p in tr.model.parameters()]))
        return step(*a, **k)
    tr.optimizer.step = record
    h = tr.train().history
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    gathered = tr.acc.gather(flat[None])
    if tr.acc.is_main_process:
        torch.save({{"world": tr.acc.num_processes, "same": bool((gathered - gathered[0]).abs().max() == 0),
                    "weights": flat, "grads": grads, "history": h}}, {res!r})
    if tr.acc.num_processes > 1:
        torch.distributed.destroy_process_group()
''')


def _launch(tmp_path: Path, nproc: int, port: int) -> dict:
    script, res = tmp_path / f"run{nproc}.py", tmp_path / f"res{nproc}.pt"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), out=str(tmp_path / f"out{nproc}"),
                                    res=str(res)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torchrun sets the env (RANK, WORLD_SIZE, ...) that accelerate's Accelerator reads: gloo DDP on CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(script)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(res, weights_only=False)


def test_two_processes_take_the_same_steps_as_one(tmp_path):
    """The same 8 pairs per update on 1 process or split over 2 (gloo, CPU), 2 micro-batches each: the pairs are
    weighted by the global count of trained pairs and the loss × world size undoes DDP's average, so the gradients,
    the metrics and the weights are the same."""
    one, two = _launch(tmp_path, 1, 29541), _launch(tmp_path, 2, 29543)
    assert (one["world"], two["world"], two["same"]) == (1, 2, True)
    h1, h2 = one["history"], two["history"]
    print([(m["loss/dpo"], m["objective/trained_pairs"], m["objective/kl"]) for m in h1])
    assert len(h1) == len(h2) == 2 and len(one["grads"]) == len(two["grads"]) == 2
    assert 0 < h1[0]["objective/trained_pairs"] < 8        # ties dropped: the global count matters
    for a, b in zip(h1, h2, strict=True):
        for key in ("loss/dpo", "rewards/chosen", "rewards/margins", "rewards/accuracies", "objective/kl",
                    "objective/tie_share", "objective/trained_pairs", "objective/scores_margin", "reward/mean"):
            # float32 sums in another order: a few ulps of the values compared (~1)
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    worst_g = 0.0
    for g1, g2 in zip(one["grads"], two["grads"], strict=True):
        scale = g1.abs().max().item()
        worst = (g1 - g2).abs().max().item()
        # float32 sums in another order (gloo's all-reduce of two halves): a few ulps of the largest gradient; a
        # process averaging over its own pairs, or a missing × world size, is off by tens of percent
        assert scale > 1e-3 and worst <= 1e-5 * scale, (worst, scale)
        worst_g = max(worst_g, worst)
    # each Adam step moves a weight by at most lr/eps per unit of gradient difference (|d step/d g| <= lr/eps)
    w_worst = (one["weights"] - two["weights"]).abs().max().item()
    assert w_worst <= 2 * 1e-3 / 1e-5 * worst_g + 4 * torch.finfo(torch.float32).eps, w_worst
    assert (tmp_path / "out2" / "final" / "config.json").exists()
