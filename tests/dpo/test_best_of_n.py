"""Best-of-N: the mean reward of the kept sample rises with N on a fixed reward; the analytic KL; the CLI writes
every candidate with its score."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from alignloop.models import tiny
from alignloop.rollout import SamplingParams
from alignloop.trainers.best_of_n import best_of_n, best_of_n_kl

from .conftest import SHAPE


def vowel_share(prompts, completions):
    return [sum(ch in "aeiou" for ch in c) / (len(c) + 1) for c in completions]


def test_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert best_of_n_kl(16) == pytest.approx(2.7725887 - 0.9375, abs=1e-6)


def test_mean_reward_rises_with_n(tok):
    policy = tiny.tiny_causal_lm(tok, seed=0, **SHAPE).eval()
    tok.padding_side = "left"
    prompts = [f"the movie {w}" for w in "good bad plot actor scene story music fun".split()] * 3
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    means = {}
    for n in (1, 4, 16):
        torch.manual_seed(0)
        rows, summary = best_of_n(policy, tok, prompts, n, vowel_share, params, batch_size=8)
        assert len(rows) == len(prompts) and all(len(r["candidates"]) == n for r in rows)
        for r in rows:
            assert r["best_score"] == max(c["score"] for c in r["candidates"])
            assert r["candidates"][r["best_index"]]["completion"] == r["best_completion"]
        means[n] = summary["mean_best_score"]
        assert summary["kl_best_of_n"] == pytest.approx(best_of_n_kl(n))
    assert means[1] < means[4] < means[16], means
    assert means[16] - means[1] > 0.05, means


def test_cli_generate_with_reward_model(tmp_path, tok):
    policy = tiny.build_tiny_checkpoint(tmp_path / "policy", tokenizer=tok, **SHAPE)
    rm = tiny.build_tiny_checkpoint(tmp_path / "rm", tokenizer=tok, kind="reward", seed=1, **SHAPE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie", "a good film", "plot"]))
    out = tmp_path / "gen.jsonl"
    from alignloop.cli import cli

    res = CliRunner().invoke(cli, ["generate", "--model", str(policy), "--prompts-file", str(prompts), "--best-of", "4",
                                   "--reward-model", str(rm), "--output-file", str(out), "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.rindex('{"n"'):].strip())
    assert summary["kl_best_of_n"] == pytest.approx(math.log(4) - 0.75)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert len(r["candidates"]) == 4 and all(isinstance(c["score"], float) for c in r["candidates"])
        assert r["best_score"] == max(c["score"] for c in r["candidates"])
    res = CliRunner().invoke(cli, ["generate", "--model", str(policy), "--prompts-file", str(prompts), "--best-of", "4"])
    assert res.exit_code != 0
