"""Reward-model heads per criterion / labeler group / labeler: each pair trains its own head (+ the population head),
a head's parameters get gradient only from its own pairs, and on a task where two groups want opposite things a
per-group-head model is right for both where a single reward model cannot be."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignloop.data import DataError, RankingCollator, load_preferences, tokenize_rankings
from alignloop.errors import ConfigError
from alignloop.models import RewardModel, heads_info, load_tokenizer
from alignloop.trainers.rm import RewardConfig, RewardTrainer, group_losses, head_mask

from .personal_rows import two_group_rows, write_jsonl

QUIET = dict(progress=False, tensorboard=False, logging_steps=1)
def _batch(tok, rows, heads, population=None):
    groups = [g for r in rows for g in load_preferences([r])[0]]   # pairs and rankings: each row its own format
    examples, _ = tokenize_rankings(groups, tok)
    batch = RankingCollator(tok.pad_token_id)(examples)
    batch["group_head"] = torch.tensor([heads.index(e["meta"]["labeler_attributes"]["group"]) for e in examples])
    batch["head_mask"] = head_mask(batch["group_head"], len(heads), population)
    return batch


@pytest.mark.parametrize("loss", ["bradley_terry", "plackett_luce"])
def test_a_head_gets_gradient_only_from_its_own_pairs(base_model, tiny_tok, loss):
    heads = {"by": "group", "names": ["cool", "population", "warm"], "population": "population"}
    rm = RewardModel.from_pretrained(base_model, heads=heads)
    rows = two_group_rows(3, 0, "warm") + [{"prompt": "Q", "completions": [" good", " bad", " fun"],
                                            "ranking": [1, 3, 2], "labeler_attributes": {"group": "warm"}}]
    batch = _batch(tiny_tok, rows, heads["names"], population=1)
    scores = rm(batch["input_ids"], batch["attention_mask"], all_heads=True)
    losses, stats = group_losses(scores, batch, loss, use_margin=True)
    losses.sum().backward()
    grad = rm.model.score.weight.grad                   # [H, d]: row h is head h
    assert torch.count_nonzero(grad[0]) == 0            # "cool": no pair of its group in the batch, exact zeros
    assert grad[1].abs().min() > 0 and grad[2].abs().min() > 0     # population and warm: every pair
    assert stats["pair_heads"][:, 0].sum() == 0 and stats["pair_heads"][:, 1:].all()
    # the loss is the sum of each group's two heads' one-head losses, head by head
    for h in (1, 2):
        one, _ = group_losses(scores[:, h].detach(), batch, loss, use_margin=True)
        if h == 1:
            total = one
        else:
            total = total + one
    assert torch.allclose(losses.detach(), total, atol=1e-6)


def test_training_leaves_other_heads_untouched(tmp_path, base_model, tiny_tok):
    """Through the trainer (AdamW, no weight decay): a head with no pairs keeps its initial weights bit for bit while
    the trained head and the backbone move."""
    train = write_jsonl(tmp_path / "warm.jsonl", two_group_rows(32, 1, "warm"))
    start = RewardModel.from_pretrained(base_model, heads={"by": "group", "names": ["cool", "warm"],
                                                           "population": None})
    before = start.model.score.weight.detach().clone()
    cfg = RewardConfig(output_dir=str(tmp_path / "rm"), learning_rate=1e-3, num_epochs=1, per_device_batch_size=8,
                       max_length=32, weight_decay=0.0, heads_by="group", heads=["cool", "warm"],
                       **QUIET)
    result = RewardTrainer(model=start, tokenizer=tiny_tok, args=cfg, train_dataset=train).train()
    after = RewardModel.from_pretrained(result.output_dir)
    w = after.model.score.weight.detach()
    assert torch.equal(w[0], before[0])                       # cool: never a pair
    assert not torch.equal(w[1], before[1])                   # warm: trained
    assert heads_info(result.output_dir) == {"by": "group", "names": ["cool", "warm"], "population": None}


def _accuracy(model_dir, rows, head=None):
    """Share of held-out pairs whose chosen completion scores higher (on `head` for a multi-head model)."""
    tok = load_tokenizer(model_dir)
    rm = RewardModel.from_pretrained(model_dir).eval()
    groups, _ = load_preferences(rows)
    examples, _ = tokenize_rankings(groups, tok)
    batch = RankingCollator(tok.pad_token_id)(examples)
    with torch.no_grad():
        s = rm(batch["input_ids"], batch["attention_mask"], head=head)
    return (s[batch["chosen_index"]] > s[batch["rejected_index"]]).float().mean().item()


def test_group_heads_fit_opposite_groups_where_one_head_cannot(tmp_path, base_model):
    """Two labeler groups with opposite tastes (warm wants 'great', cool does not): the per-group-head model is
    right for both groups' held-out pairs; one reward model trained on the same pairs is near chance on at least
    one group (it cannot want and not want 'great')."""
    train = write_jsonl(tmp_path / "train.jsonl", [r for pair in zip(two_group_rows(160, 10, "warm"),
                                                                      two_group_rows(160, 11, "cool"), strict=True)
                                                   for r in pair])
    held = {g: two_group_rows(60, 20 + i, g) for i, g in enumerate(("warm", "cool"))}
    eval_file = write_jsonl(tmp_path / "eval.jsonl", held["warm"] + held["cool"])
    common = dict(learning_rate=2e-3, num_epochs=3, per_device_batch_size=16, max_length=32, seed=0, **QUIET)
    heads = RewardTrainer(model=base_model, train_dataset=train, eval_dataset=eval_file, args=RewardConfig(
        output_dir=str(tmp_path / "heads"), heads_by="group", population_head=True, **common)).train()
    single = RewardTrainer(model=base_model, train_dataset=train, args=RewardConfig(
        output_dir=str(tmp_path / "single"), **common)).train()
    per_group = {g: _accuracy(heads.output_dir, held[g], head=g) for g in held}
    one = {g: _accuracy(single.output_dir, held[g]) for g in held}
    assert min(per_group.values()) > 0.9, (per_group, one)
    assert min(one.values()) < 0.65, (per_group, one)
    # the trainer's own per-head metrics say the same
    assert heads.metrics["eval/accuracy/warm"] == pytest.approx(per_group["warm"])
    assert heads.metrics["eval/accuracy/cool"] == pytest.approx(per_group["cool"])
    # the population head, trained on both groups, is the single model's kind: it cannot serve both
    population = {g: _accuracy(heads.output_dir, held[g], head="population") for g in held}
    assert min(population.values()) < 0.65, population


def test_rows_must_name_their_head(tmp_path, base_model):
    rows = two_group_rows(8, 2, "warm")
    rows[3] = {k: v for k, v in rows[3].items() if k != "labeler_attributes"}
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = dict(output_dir=str(tmp_path / "rm"), max_steps=1, per_device_batch_size=8, max_length=32,
               **QUIET)
    with pytest.raises(DataError, match=r"t\.jsonl line 4: heads_by=group needs `labeler_attributes` with a \"group\""):
        RewardTrainer(model=base_model, train_dataset=train, args=RewardConfig(heads_by="group", **cfg)).train()
    # with a population head such a pair trains the population head alone
    RewardTrainer(model=base_model, train_dataset=train, args=RewardConfig(
        heads_by="group", population_head=True, **cfg)).train()
    with pytest.raises(DataError, match="is not one of the heads"):
        RewardTrainer(model=base_model, train_dataset=train, args=RewardConfig(
            heads_by="labeler", heads=["Lwarm0", "Lwarm1"], **cfg | {"output_dir": str(tmp_path / "x")})).train()
    with pytest.raises(ConfigError, match="set heads_by"):
        RewardTrainer(model=base_model, train_dataset=train, args=RewardConfig(population_head=True, **cfg)).train()


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _max_diff(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def _mixed_file(tmp_path):
    rows = [r for pair in zip(two_group_rows(24, 3, "warm"), two_group_rows(24, 4, "cool"), strict=True) for r in pair]
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


def test_heads_batch8_equals_batch4_x2_accumulation(tmp_path, base_model):
    train = _mixed_file(tmp_path)
    common = dict(learning_rate=1e-3, max_steps=3, max_length=32, seed=3, heads_by="group", population_head=True,
                  **QUIET)
    run = lambda out, **kw: RewardTrainer(model=base_model, train_dataset=train, args=RewardConfig(
        output_dir=str(tmp_path / out), **common, **kw)).train().output_dir
    a = run("b8", per_device_batch_size=8)
    b = run("b4x2", per_device_batch_size=4, gradient_accumulation_steps=2)
    c = run("b4", per_device_batch_size=4)
    # the tolerance of tests/trainers' accumulation test: 5% of lr x steps; another global batch moves ~1e-3
    assert _max_diff(a, b) <= 1.5e-4
    assert _max_diff(a, c) > 1.5e-4


@pytest.mark.slow
def test_heads_two_processes_equal_one_through_the_cli(tmp_path, base_model):
    """`accelerate launch` of `alignloop rm --heads-by group --population-head`: 2 CPU processes (gloo) x batch 4
    == 1 process x batch 8 (the head mask and per-head metrics are per pair, so the split does not matter)."""
    train = _mixed_file(tmp_path)
    for n, b in [(1, 8), (2, 4)]:
        launcher = ["--multi_gpu"] if n > 1 else ["--cpu"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "alignloop.cli", "rm",
               "--model", base_model, "--train-file", train, "--output-dir", str(tmp_path / f"out{n}"),
               "--max-steps", "3", "--per-device-batch-size", str(b), "--max-length", "32", "--learning-rate", "1e-3",
               "--seed", "3", "--heads-by", "group", "--population-head", "--eval-fraction", "0.25", "--no-progress",
               "--no-tensorboard"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        assert {"eval/accuracy/warm", "eval/accuracy/cool", "eval/accuracy/population"} <= result.keys()
    assert _max_diff(tmp_path / "out1" / "final", tmp_path / "out2" / "final") <= 1.5e-4
    assert heads_info(tmp_path / "out2" / "final")["names"] == ["cool", "warm", "population"]
