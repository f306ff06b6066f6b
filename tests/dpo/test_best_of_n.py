"""Best-of-N: the mean reward of the kept sample rises with N on a fixed reward; the analytic KL; the CLI writes
every candidate with its score."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from alignloop.data import reward_input_ids
from alignloop.evaluation import best_of_n_kl
from alignloop.models import RewardModel, tiny
from alignloop.recipes.best_of_n import best_of_n
from alignloop.rollout import SamplingParams
from alignloop.scoring import ModelScorer

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
    res = CliRunner().invoke(cli, ["generate", "--model", str(policy), "--prompts-file", str(prompts),
                                   "--best-of", "4"])
    assert res.exit_code != 0


# --- scoring must match reward-model training: prompt + completion + EOS -----------------------------------------

def rm_training_ids(tok, prompt: str, completion: str, add_eos: bool = True) -> list[int]:
    """The token ids the reward-model trainer trains on for (prompt, completion) (alignloop.trainers.rm tokenises
    with tokenize_preferences, add_eos=True by default)."""
    from alignloop.data import tokenize_preferences
    from alignloop.data.conversions import Pair, PreferenceGroup

    groups, _ = tokenize_preferences([PreferenceGroup(prompt=prompt, pairs=[Pair(completion, " x")])], tok,
                                     max_length=512, add_eos=add_eos)
    return groups[0]["pairs"][0]["chosen_input_ids"]


class SpyRM(RewardModel):
    """The same reward model, recording every sequence it scores (its real tokens)."""

    def __init__(self, rm):
        super().__init__(rm.model)
        self.seen = []

    def forward(self, input_ids, attention_mask):
        self.seen += [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask, strict=True)]
        return super().forward(input_ids, attention_mask)


def _rm_score(rm, ids: list[int]) -> float:
    with torch.no_grad():
        return float(rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0])


@pytest.fixture(scope="module")
def tiny_rm(tok):
    return RewardModel(tiny.tiny_reward_model(tok, seed=1, **SHAPE)).eval()


def test_reward_fn_scores_prompt_completion_eos_like_rm_training(tok, tiny_rm):
    eos = tok.eos_token_id
    prompts = ["the movie", "a good film", "plot", "the actor"]
    completions = [" was fun", " great story and music", " bad" + tok.eos_token, ""]  # one already ends with EOS
    got = ModelScorer(tiny_rm, tok)(prompts, completions).tolist()
    want = [_rm_score(tiny_rm, rm_training_ids(tok, p, c)) for p, c in zip(prompts, completions, strict=True)]
    no_eos = [_rm_score(tiny_rm, rm_training_ids(tok, p, c, add_eos=False) or [eos])
              for p, c in zip(prompts, completions, strict=True)]
    print("with EOS", want, "without", no_eos, "got", got)
    assert got == pytest.approx(want, abs=1e-5)
    # the old behaviour (prompt + completion, no EOS) gives other scores on the completions without EOS
    assert all(abs(g - n) > 1e-3 for g, n in zip(got[:2], no_eos[:2], strict=True))
    assert got[2] == pytest.approx(no_eos[2], abs=1e-5)   # its EOS is the text's own: not doubled
    # every scored sequence ends with exactly one EOS, token for token what the RM trainer builds
    seqs = reward_input_ids(tok, prompts, completions)
    assert all(s[-1] == eos and s[-2] != eos for s in seqs)
    assert seqs == [rm_training_ids(tok, p, c) for p, c in zip(prompts, completions, strict=True)]
    # add_eos=False mirrors a reward model trained with rm's add_eos=False
    off = ModelScorer(tiny_rm, tok, add_eos=False)(prompts, completions).tolist()
    assert off[:3] == pytest.approx(no_eos[:3], abs=1e-5)


def test_best_of_n_candidates_scored_with_one_eos(tok, tiny_rm):
    policy = tiny.tiny_causal_lm(tok, seed=0, **SHAPE).eval()
    tok.padding_side = "left"
    prompts = ["the movie", "a good film", "plot"]
    spy = SpyRM(tiny_rm)
    torch.manual_seed(0)
    rows, _ = best_of_n(policy, tok, prompts, 4, ModelScorer(spy, tok),
                        SamplingParams(max_new_tokens=6, temperature=1.0), batch_size=2)
    eos = tok.eos_token_id
    assert len(spy.seen) == 12 and all(s[-1] == eos and s[-2] != eos for s in spy.seen)
    for r in rows:
        for c in r["candidates"]:
            assert c["score"] == pytest.approx(_rm_score(tiny_rm, rm_training_ids(tok, r["prompt"], c["completion"])),
                                               abs=1e-5)
        assert r["best_score"] == max(c["score"] for c in r["candidates"])
