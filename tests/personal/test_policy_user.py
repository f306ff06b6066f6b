"""Personalized policies: prompts tagged with their user (`user_tag`), the tag kept when a long prompt is truncated,
`alignloop generate --user` (tags that round-trip, the reward scoring the untagged prompt with that user's head
weights, each head in the output), rejection sampling and eval logging each head, and a short RLOO and PPO run
against a per-user multi-head reward: each head's metric and each user's mean reward logged, tagged prompts sampled,
untagged prompts scored."""
import json

import pytest
import torch
from click.testing import CliRunner

import alignloop.rollout.completions as completions
from alignloop.cli import cli
from alignloop.data import USER_TAG, split_user_tag, tag_prompt
from alignloop.errors import ConfigError
from alignloop.evaluation import Samples, score, summarize
from alignloop.models import load_causal_lm
from alignloop.models.tiny import build_tiny_checkpoint, tiny_causal_lm, train_tokenizer
from alignloop.recipes.best_of_n import best_of_n
from alignloop.recipes.rejection_sampling import RejectionSamplingTrainer, RSConfig
from alignloop.rollout import SamplingParams, encode_prompts
from alignloop.scoring import load_scorer
from alignloop.trainers.grpo import GRPOConfig, GRPOTrainer
from alignloop.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignloop.trainers.ppo import PPOConfig, PPOTrainer

from . import heads_fixtures
from .heads_fixtures import build_heads_model

PROFILES = {"heads": ["helpful", "harmless"], "population": {"helpful": 0.5, "harmless": 0.5},
            "users": {"alice": {"weights": {"helpful": 0.9, "harmless": 0.1}, "n": 8, "group": None}}}
RECORDER = "personal.heads_fixtures:recording_reward"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    t = train_tokenizer(vocab_size=300)
    t.padding_side = "left"
    return t


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tok):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("policy"), tokenizer=tok, n_layer=1, n_embd=16,
                                     n_head=2))


@pytest.fixture(scope="module")
def heads_rm(tmp_path_factory, tok):
    return build_heads_model(tmp_path_factory.mktemp("heads_rm"), tok, profiles=PROFILES)


@pytest.fixture(scope="module")
def prompt_rows():
    words = "the movie was a story this film is very good".split()
    return [{"prompt": " ".join(words[i:i + 3]), "user": ["alice", "harmless", "zed"][i % 3]} for i in range(6)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_truncated_prompt_keeps_its_tag(tok):
    long = tag_prompt("the movie was very good and the plot was fun " * 4, "alice")
    short = tag_prompt("a film", "bob")
    ids = encode_prompts(tok, [long, short, "untagged text here " * 4], 30, USER_TAG)
    tag_ids = encode_prompts(tok, ["<user:alice> "])[0]
    assert 0 < len(tag_ids) < 20 and len(ids[0]) == 30
    assert ids[0][:len(tag_ids)] == tag_ids
    assert ids[0][len(tag_ids):] == encode_prompts(tok, [long])[0][-(30 - len(tag_ids)):]
    assert ids[1] == encode_prompts(tok, [short], 30)[0]      # short enough: tokenised as one text
    assert ids[2] == encode_prompts(tok, ["untagged text here " * 4], 30)[0]


def test_generate_for_a_user_round_trips_the_tag_and_scores_untagged(tmp_path, policy, heads_rm, prompt_rows):
    prompts = _write(tmp_path / "prompts.jsonl", prompt_rows)
    out = tmp_path / "out.jsonl"
    heads_fixtures.SEEN_PROMPTS.clear()
    res = CliRunner().invoke(cli, ["generate", "--model", policy, "--prompts-file", prompts, "--best-of", "2",
                                   "--reward-model", heads_rm, "--reward-model", f"{RECORDER}=0",
                                   "--user", "alice", "--output-file", str(out), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads(res.output[res.output.rindex('{"n"'):].strip())
    assert {"reward/helpful", "reward/harmless"} <= set(summary)
    for row, src in zip(rows, prompt_rows, strict=True):
        assert row["user"] == "alice"                               # --user wins over the row's own user
        assert split_user_tag(row["prompt"]) == ("alice", src["prompt"])
        for c in row["candidates"]:
            parts = c["parts"]
            assert c["score"] == pytest.approx(0.9 * parts["helpful"] + 0.1 * parts["harmless"], abs=1e-5)
    assert [r["prompt"] for r in prompt_rows for _ in range(2)] == heads_fixtures.SEEN_PROMPTS   # untagged


def test_best_of_n_samples_a_long_prompt_with_its_tag(monkeypatch, tok, policy, heads_rm):
    """generate's sampling truncates like the RL trainers: a prompt longer than max_prompt_length keeps its tag's
    tokens first (left truncation alone would sample for nobody while the reward scores for alice)."""
    seen = []

    class Recording(completions.HFSampler):
        def generate(self, prompt_ids, params):
            seen.extend(prompt_ids)
            return super().generate(prompt_ids, params)

    monkeypatch.setattr(completions, "HFSampler", Recording)
    prompt = tag_prompt("the movie was very good and the plot was fun " * 4, "alice")
    best_of_n(load_causal_lm(policy), tok, [prompt], 2, heads_rm, SamplingParams(max_new_tokens=2),
              max_prompt_length=20, user_tag=USER_TAG)
    tag_ids = encode_prompts(tok, ["<user:alice> "])[0]
    assert len(seen) == 2 and all(len(x) == 20 and x[:len(tag_ids)] == tag_ids for x in seen)


def test_generate_with_user_tag_tags_the_rows_users(tmp_path, policy, heads_rm, prompt_rows):
    prompts = _write(tmp_path / "prompts.jsonl", prompt_rows)
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(cli, ["generate", "--model", policy, "--prompts-file", prompts, "--best-of", "2",
                                   "--reward-model", heads_rm, "--user-tag", "[{user}] ", "--output-file", str(out),
                                   "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = {"alice": (0.9, 0.1), "harmless": (0.0, 1.0), "zed": (0.5, 0.5)}   # profile, head name, cold start
    for row, src in zip(rows, prompt_rows, strict=True):
        assert row["prompt"] == f"[{src['user']}] {src['prompt']}" and row["user"] == src["user"]
        wh, wr = want[src["user"]]
        for c in row["candidates"]:
            assert c["score"] == pytest.approx(wh * c["parts"]["helpful"] + wr * c["parts"]["harmless"], abs=1e-5)
    bad = CliRunner().invoke(cli, ["generate", "--model", policy, "--prompts-file", prompts, "--user", "a b"])
    assert isinstance(bad.exception, ConfigError) and "a b" in str(bad.exception)


def _recording_callback(seen):
    def callback(exp):
        seen.append((list(exp.prompts), dict(exp.metrics)))
    return callback


def test_rloo_trains_a_user_conditioned_policy_on_the_per_user_reward(tmp_path, tok, heads_rm, prompt_rows):
    heads_fixtures.SEEN_PROMPTS.clear()
    seen = []
    cfg = GRPOConfig(estimator="rloo", output_dir=str(tmp_path), total_updates=2, rollout_batch_size=3,
                     num_generations=2, max_new_tokens=4, progress=False, save_final=False, tensorboard=False,
                     sample_every=0, user_tag=USER_TAG, reward_model=[heads_rm, f"{RECORDER}=0"])
    trainer = GRPOTrainer(model=tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2), args=cfg,
                          train_dataset=prompt_rows, tokenizer=tok, callbacks=[_recording_callback(seen)])
    result = trainer.train()
    assert result.steps == 2
    for metrics in result.history:
        assert {"reward/helpful", "reward/harmless", "reward/recording_reward"} <= set(metrics)
    sampled = [p for prompts, _ in seen for p in prompts]
    by_prompt = {r["prompt"]: r["user"] for r in prompt_rows}
    for p in sampled:   # the policy saw each prompt tagged with its row's user
        user, rest = split_user_tag(p)
        assert by_prompt[rest] == user
    assert [split_user_tag(p)[1] for p in sampled] == heads_fixtures.SEEN_PROMPTS   # the reward: untagged


def test_rloo_raw_reward_uses_each_rows_user_weights(tmp_path, tok, heads_rm, prompt_rows):
    """reward/raw_mean of an update equals the mean of Σ_h w_user(h)·head_h over its rows, recomputed with a fresh
    per-user scorer from the update's prompts and responses."""
    seen = []
    cfg = GRPOConfig(estimator="rloo", output_dir=str(tmp_path), total_updates=1, rollout_batch_size=3,
                     num_generations=2, max_new_tokens=4, progress=False, save_final=False, tensorboard=False,
                     sample_every=0, user_tag=USER_TAG, reward_model=heads_rm)
    trainer = GRPOTrainer(model=tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2), args=cfg,
                          train_dataset=prompt_rows, tokenizer=tok, callbacks=[seen.append])
    metrics = trainer.train().history[0]
    exp = seen[0]
    scorer = load_scorer(heads_rm, user_tag=USER_TAG)
    untagged = load_scorer(heads_rm).parts([split_user_tag(p)[1] for p in exp.prompts], exp.responses,
                                           exp.rollout.stopped.tolist())
    weights = {"alice": (0.9, 0.1), "harmless": (0.0, 1.0), "zed": (0.5, 0.5)}
    want = torch.tensor([weights[split_user_tag(p)[0]][0] * h + weights[split_user_tag(p)[0]][1] * r
                         for p, h, r in zip(exp.prompts, untagged["helpful"].tolist(), untagged["harmless"].tolist(),
                                            strict=True)])
    assert metrics["reward/raw_mean"] == pytest.approx(want.mean().item(), abs=1e-5)
    users = [split_user_tag(p)[0] for p in exp.prompts]
    assert {k for k in metrics if k.startswith("reward/user/")} == {f"reward/user/{u}" for u in users}
    for user in set(users):   # the mean raw reward of each user's rows
        mine = [w for u, w in zip(users, want.tolist(), strict=True) if u == user]
        assert metrics[f"reward/user/{user}"] == pytest.approx(sum(mine) / len(mine), abs=1e-5)
    got = scorer(exp.prompts, exp.responses, exp.rollout.stopped.tolist())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trainer", ["ppo", "online_dpo"])
def test_ppo_and_online_dpo_with_user_tags_log_each_head(tmp_path, tok, heads_rm, prompt_rows, trainer):
    common = {"output_dir": str(tmp_path), "total_updates": 1, "rollout_batch_size": 3, "max_new_tokens": 4,
              "progress": False, "save_final": False, "tensorboard": False, "sample_every": 0, "user_tag": USER_TAG,
              "reward_model": heads_rm}
    config, cls = (PPOConfig, PPOTrainer) if trainer == "ppo" else (OnlineDPOConfig, OnlineDPOTrainer)
    metrics = cls(model=tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2), args=config(**common),
                  train_dataset=prompt_rows, tokenizer=tok).train().history[0]
    assert {"reward/helpful", "reward/harmless"} <= set(metrics)
    assert any(k.startswith("reward/user/") for k in metrics)


def test_user_tag_is_checked():
    with pytest.raises(ConfigError, match="user_tag"):
        PPOConfig(user_tag="<user>")
    with pytest.raises(ConfigError, match="user_tag takes reward_granularity='outcome'"):
        GRPOConfig(user_tag=USER_TAG, reward_granularity="process")


def test_rejection_sampling_and_eval_log_each_head(tmp_path, policy, heads_rm, prompt_rows):
    args = RSConfig(output_dir=str(tmp_path), samples_per_prompt=2, max_new_tokens=4, eval_final=False,
                    progress=False, sft_batch_size=4)
    result = RejectionSamplingTrainer(model=policy, args=args, train_dataset=[r["prompt"] for r in prompt_rows],
                                      reward_model=f"{heads_rm}:helpful=0.25,harmless=0.75").train()
    metrics = result.history[0]
    samples = [json.loads(line) for line in (tmp_path / "round-0" / "samples.jsonl").read_text().splitlines()]
    cands = [c for row in samples for c in row["candidates"]]
    for head in ("helpful", "harmless"):
        assert metrics[f"reward/{head}"] == pytest.approx(sum(c["parts"][head] for c in cands) / len(cands))
    assert all(c["score"] == pytest.approx(0.25 * c["parts"]["helpful"] + 0.75 * c["parts"]["harmless"], abs=1e-5)
               for c in cands)

    s = score(Samples([c["prompt"] for c in prompt_rows], [" good"] * 6, [1] * 6), rm=load_scorer(heads_rm))
    assert set(s.scores) == {"rm", "rm/helpful", "rm/harmless"}
    summary = summarize(s)
    assert summary["rm/mean"] == pytest.approx((summary["rm/helpful/mean"] + summary["rm/harmless/mean"]) / 2)


def test_ppo_refuses_a_critic_from_a_multi_head_reward(tmp_path, tok, heads_rm, prompt_rows):
    """value_model='reward' copies the reward model's head into the critic: with two heads there is no one head to
    start from, so PPO refuses (at set-up, before any rollout) and names the heads."""
    args = PPOConfig(output_dir=str(tmp_path), total_updates=1, rollout_batch_size=3, max_new_tokens=4, progress=False,
                     save_final=False, tensorboard=False, sample_every=0, reward_model=heads_rm, value_model="reward")
    with pytest.raises(ConfigError, match=r"2 heads \(helpful, harmless\)"):
        PPOTrainer(model=tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2), args=args, train_dataset=prompt_rows,
                   tokenizer=tok).train()
