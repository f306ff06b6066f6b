"""The critic-free trainer (`alignloop.trainers.grpo`): its advantages and rewards against the estimators worked out
from the update's own numbers, KL in the reward vs in the loss, equal-reward groups, accumulation invariance, exact
resume, the baselines, verifiable and weighted rewards, the CLI. Learning and 2-process tests: test_grpo_slow.py."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from alignloop.cli import cli
from alignloop.errors import ConfigError
from alignloop.losses import kl_penalty
from alignloop.models.tiny import build_tiny_checkpoint
from alignloop.trainers.grpo import GRPOConfig, GRPOTrainer, RLOOConfig

from .conftest import GroupSeededSampler, make_target_reward, small_lm


def _cfg(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "total_updates": 1, "rollout_batch_size": 4, "num_generations": 4,
            "max_new_tokens": 6, "learning_rate": 1e-3, "lr_scheduler": "constant", "progress": False,
            "save_final": False, "tensorboard": False, "sample_every": 0, "seed": 0}
    base.update(kw)
    return GRPOConfig(**base)


def _run(tmp_path, tok, prompts, reward=None, model=None, ref_model=None, **kw):
    torch.manual_seed(0)
    seen = []
    model = model if model is not None else small_lm(tok)
    tr = GRPOTrainer(model=model, reward=reward or make_target_reward(tok), args=_cfg(tmp_path, **kw),
                     train_dataset=prompts, tokenizer=tok, callbacks=[seen.append],
                     sampler=GroupSeededSampler(model, tok), ref_model=ref_model)
    return tr, tr.train(), seen


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_config_defaults_follow_each_paper_and_bad_values_are_config_errors():
    g, d, r = GRPOConfig(), GRPOConfig(estimator="dr_grpo"), RLOOConfig()
    assert (g.kl_placement, g.aggregation, g.std_scaling) == ("loss", "seq-mean-token-mean", True)
    assert (d.kl_placement, d.aggregation, d.std_scaling) == ("loss", "seq-mean-token-sum-norm", False)
    assert (r.estimator, r.kl_placement, r.aggregation) == ("rloo", "reward", "seq-mean-token-sum")
    assert GRPOConfig(estimator="reinforce", num_generations=1).num_generations == 1
    for bad in ({"estimator": "ppo"}, {"estimator": "rloo", "num_generations": 1}, {"kl_in": "both"},
                {"loss_aggregation": "sum"}, {"baseline_decay": 1.0}, {"num_iterations": 0}):
        with pytest.raises(ConfigError):
            GRPOConfig(**bad)


def test_rloo_advantage_is_leave_one_out_of_the_kl_penalised_reward(tmp_path, tok, prompts):
    """Each completion's advantage is R_i minus the mean of the other K-1 rewards of its prompt, with
    R = score − β·Σ_t KL_t (k1, policy before the update vs reference): recomputed here from the update's tensors."""
    _tr, _, seen = _run(tmp_path, tok, prompts, estimator="rloo", kl_coef=0.5)
    exp = seen[0]
    kl = kl_penalty(exp.old_logprobs, exp.ref_logprobs, "k1") * exp.response_mask
    R = exp.scores - 0.5 * kl.sum(1)
    assert torch.allclose(exp.sequence_rewards, R, atol=1e-6)
    g = R.view(-1, 4)
    others = (g.sum(1, keepdim=True) - g) / 3
    assert torch.allclose(exp.advantages, (g - others).flatten(), atol=1e-6)
    wrong = (g - g.mean(1, keepdim=True)).flatten()    # a baseline that includes the sample itself
    assert not torch.allclose(exp.advantages, wrong, atol=1e-4)


def test_grpo_advantage_is_group_normalised_and_kl_stays_out_of_the_reward(tmp_path, tok, prompts):
    _tr, h, seen = _run(tmp_path, tok, prompts, estimator="grpo", kl_coef=0.5)
    exp = seen[0]
    assert torch.equal(exp.sequence_rewards, exp.scores)      # KL is a loss term
    g = exp.scores.view(-1, 4)
    expected = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(exp.advantages, expected.flatten(), atol=1e-5)
    # step 1: the policy is the reference, so k3 = 0 and the ratio is exactly 1
    assert h[0]["loss/kl"] == 0.0 and h[0]["policy/ratio_mean"] == 1.0 and h[0]["policy/clipfrac"] == 0.0


def test_dr_grpo_advantage_has_no_std_division(tmp_path, tok, prompts):
    _, _, seen = _run(tmp_path, tok, prompts, estimator="dr_grpo")
    g = seen[0].scores.view(-1, 4)
    assert torch.allclose(seen[0].advantages, (g - g.mean(1, keepdim=True)).flatten(), atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo"])
def test_equal_rewards_give_zero_advantage_no_nan_and_no_step(tmp_path, tok, prompts, estimator):
    """A constant reward: every group has all-equal rewards -> advantages exactly 0 (no NaN from std 0), and with the
    policy still the reference the KL term has no gradient either: Adam moves nothing in two updates."""
    model = small_lm(tok)
    before = _flat(model)
    _, h, seen = _run(tmp_path, tok, prompts, reward=lambda p, r: [0.7] * len(r), model=model, estimator=estimator,
                      kl_coef=0.0 if estimator == "rloo" else 0.1, total_updates=2)
    for exp in seen:
        assert torch.equal(exp.advantages, torch.zeros_like(exp.advantages))
    assert all(m["group/zero_std_share"] == 1.0 for m in h)
    assert not any(torch.isnan(torch.tensor(list(m.values()))).any() for m in h)
    assert torch.equal(_flat(model), before)


def _exact_kl(tok, prompts, policy, ref) -> float:
    """KL(π ‖ π_ref) summed over the vocabulary, averaged over the positions of 16 fixed prompts."""
    ids = tok(prompts[:16], return_tensors="pt", padding=True)
    with torch.no_grad():
        lp = torch.log_softmax(policy(**ids).logits, -1)
        lr = torch.log_softmax(ref(**ids).logits, -1)
    kl = (lp.exp() * (lp - lr)).sum(-1)
    return ((kl * ids["attention_mask"]).sum() / ids["attention_mask"].sum()).item()


@pytest.mark.slow
@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_kl_in_loss_or_in_reward_pulls_the_policy_back_to_its_reference(tmp_path, tok, prompts, kl_in):
    """A policy that starts away from its reference (its LM head perturbed), a constant reward: the only signal is
    the KL. In the loss it is the k3 term's gradient (advantages all 0); in the reward the completions that drifted
    more get lower R and negative advantages. Both lower the exact KL to the reference on fixed prompts (seen:
    0.262 -> 0.210 in the loss, -> 0.226 in the reward); with β = 0 nothing moves at all."""
    def perturbed():
        model = small_lm(tok, seed=1)
        with torch.no_grad():
            w = model.lm_head.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
        return model

    ref = small_lm(tok, seed=1)
    kls = {}
    for beta in (1.0, 0.0):
        policy = perturbed()
        start = _exact_kl(tok, prompts, policy, ref)
        _, h, seen = _run(tmp_path / str(beta), tok, prompts, reward=lambda p, r: [0.0] * len(r), model=policy,
                          estimator="grpo", kl_in=kl_in, kl_coef=beta, total_updates=6, learning_rate=3e-3,
                          ref_model=ref)
        kls[beta] = (start, _exact_kl(tok, prompts, policy, ref))
        if beta and kl_in == "loss":
            assert all(torch.equal(e.advantages, torch.zeros_like(e.advantages)) for e in seen)
            assert h[0]["loss/kl"] > 0
        elif beta:
            assert "loss/kl" not in h[0] and seen[0].advantages.abs().sum() > 0
    print(kl_in, kls)
    assert kls[1.0][1] < 0.9 * kls[1.0][0]
    assert kls[0.0][1] == kls[0.0][0]


def test_batch_8_equals_batch_4_times_2_accumulation(tmp_path, tok, prompts):
    """Same completions, one update: one micro-batch of 8 completions vs 2 micro-batches of 4 (whose old log-probs
    come from a separate pass): the weights agree to float32 accuracy (sums in another order; Adam's first step is
    ~lr·g/(|g|+eps), so a relative gradient error δ moves weights by at most ~lr·δ)."""
    results = []
    for acc in (1, 2):
        model = small_lm(tok)
        _run(tmp_path / str(acc), tok, prompts, model=model, rollout_batch_size=2, gradient_accumulation_steps=acc,
             estimator="grpo", kl_coef=0.1, total_updates=2)
        results.append(_flat(model))
    assert (results[0] - results[1]).abs().max().item() < 1e-6


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo"])
def test_aggregations_and_accumulation_across_estimators(tmp_path, tok, prompts, estimator):
    results = []
    for acc in (1, 4):
        model = small_lm(tok)
        _run(tmp_path / str(acc), tok, prompts, model=model, rollout_batch_size=2, gradient_accumulation_steps=acc,
             estimator=estimator, kl_coef=0.1)
        results.append(_flat(model))
    assert (results[0] - results[1]).abs().max().item() < 1e-6


def test_several_inner_steps_clip_the_ratio(tmp_path, tok, prompts):
    """num_iterations 4 at a large learning rate: later passes see ratios away from 1 and clip some tokens."""
    _, h, _ = _run(tmp_path, tok, prompts, num_iterations=4, num_mini_batches=2, learning_rate=3e-2,
                   cliprange=0.1, total_updates=2)
    assert h[-1]["policy/clipfrac"] > 0 and h[-1]["policy/ratio_mean"] != 1.0


def test_moving_average_baseline_uses_past_batches_only(tmp_path, tok, prompts):
    _, _h, seen = _run(tmp_path, tok, prompts, estimator="reinforce", num_generations=2, baseline_decay=0.5,
                      total_updates=3, kl_coef=0.0)
    b = [e.baselines[0].item() for e in seen]
    m = [e.sequence_rewards.mean().item() for e in seen]
    assert b[0] == 0.0                                         # nothing seen yet
    assert b[1] == pytest.approx(m[0], abs=1e-6)               # the first batch's mean
    assert b[2] == pytest.approx(0.5 * m[0] + 0.5 * m[1], abs=1e-6)
    assert torch.allclose(seen[2].advantages, seen[2].sequence_rewards - b[2], atol=1e-6)


@pytest.mark.slow
def test_learned_baseline_regresses_on_the_reward(tmp_path, tok, prompts):
    """The value head at the last prompt token starts at 0 (zero init) and is pulled towards the mean reward."""
    _, h, seen = _run(tmp_path, tok, prompts, estimator="reinforce", baseline="learned", num_generations=2,
                      reward=lambda p, r: [1.0] * len(r), total_updates=8, learning_rate=1e-2, vf_coef=1.0,
                      kl_coef=0.0)
    first, last = seen[0].baselines, seen[-1].baselines
    assert torch.equal(first, torch.zeros_like(first))
    assert 0.3 < last.mean().item() < 1.7
    assert h[-1]["loss/baseline"] < h[0]["loss/baseline"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tok, prompts):
    kw = {"total_updates": 4, "save_steps": 2, "save_total_limit": None, "estimator": "rloo",
          "reward_normalization": "running", "num_mini_batches": 2}

    def trainer(out, **extra):
        torch.manual_seed(0)
        return GRPOTrainer(model=small_lm(tok), reward=make_target_reward(tok), args=_cfg(out, **{**kw, **extra}),
                           train_dataset=prompts, tokenizer=tok)

    full = trainer(tmp_path / "full")
    full.train()
    first = trainer(tmp_path / "part")
    first.args.total_updates = 2
    first.train()
    torch.manual_seed(999)    # a resumed trainer must not depend on the ambient RNG
    second = trainer(tmp_path / "part", resume_from="latest")
    assert len(second.train().history) == 2
    assert torch.equal(_flat(full.model), _flat(second.model))
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_verifiable_and_weighted_rewards_are_logged_by_name(tmp_path, tok, prompts, monkeypatch):
    """`module:function` rewards (an exact-match check and a length penalty) as SPEC=WEIGHT: each logged as
    reward/<name>, their weighted sum the raw reward."""
    (tmp_path / "myrewards.py").write_text(
        "def exact(prompts, completions):\n"
        "    return [1.0 if c.strip().startswith('the') else 0.0 for c in completions]\n"
        "def short(prompts, completions):\n"
        "    return [-len(c) / 10 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, h, seen = _run(tmp_path / "out", tok, prompts, reward=["myrewards:exact=1.0", "myrewards:short=0.5"])
    exp, m = seen[0], h[0]
    assert set(exp.reward_parts) == {"exact", "short"}
    expected_exact = [1.0 if c.strip().startswith("the") else 0.0 for c in exp.responses]
    assert exp.reward_parts["exact"].tolist() == expected_exact
    assert torch.allclose(exp.raw_scores, exp.reward_parts["exact"] + 0.5 * exp.reward_parts["short"])
    assert m["reward/exact"] == pytest.approx(sum(expected_exact) / len(expected_exact))
    assert m["reward/short"] == pytest.approx(exp.reward_parts["short"].mean().item())


def test_cli_grpo_and_rloo(tmp_path):
    from alignloop.models.tiny import train_tokenizer
    tok = train_tokenizer(vocab_size=300)
    policy = build_tiny_checkpoint(tmp_path / "policy", tokenizer=tok, n_layer=1, n_embd=32)
    reward = build_tiny_checkpoint(tmp_path / "reward", tokenizer=tok, kind="classifier", n_layer=1, n_embd=32)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie", "a plot", "good", "it was"] * 4))
    cfg = tmp_path / "rloo.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(policy), "reward_model": str(reward), "train_file": str(data),
                                   "output_dir": str(tmp_path / "out"), "rollout_batch_size": 2,
                                   "max_new_tokens": 5, "progress": False, "tensorboard": False}))
    res = CliRunner().invoke(cli, ["rloo", "--config", str(cfg), "--total-updates", "2", "--kl-coef", "0.2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.rindex('{"estimator"'):].splitlines()[0])
    assert out["estimator"] == "rloo" and out["updates"] == 2
    assert (tmp_path / "out" / "final" / "config.json").exists()
    res = CliRunner().invoke(cli, ["grpo", "--config", str(cfg), "--total-updates", "1", "--estimator", "dr_grpo",
                                   "--output-dir", str(tmp_path / "out2")])
    assert res.exit_code == 0, res.output
    assert '"estimator": "dr_grpo"' in res.output
    p = subprocess.run([sys.executable, "-m", "alignloop.cli", "grpo", "--total-updates", "2"], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "error: alignloop grpo needs --model" in p.stderr and "Traceback" not in p.stderr
    assert CliRunner().invoke(cli, ["grpo", "--estimator", "ppo"]).exit_code == 2
    assert "--num-generations" in CliRunner().invoke(cli, ["rloo", "--help"]).output


def test_every_minibatch_steps_when_rows_do_not_divide(tmp_path, tok, prompts):
    """6 completions per update in 4 minibatches: 4 optimizer steps (sizes 2, 2, 1, 1), not the 3 that
    `Tensor.chunk` would give."""
    model = small_lm(tok)
    torch.manual_seed(0)
    tr = GRPOTrainer(model=model, reward=make_target_reward(tok),
                     args=_cfg(tmp_path, rollout_batch_size=3, num_generations=2, num_mini_batches=4),
                     train_dataset=prompts, tokenizer=tok)
    steps = []
    step = tr.optimizer.step
    tr.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    tr.train()
    assert len(steps) == 4


def test_settings_that_would_be_ignored_are_config_errors():
    for bad in ({"estimator": "rloo", "baseline": "learned"}, {"estimator": "rloo", "scale_rewards": True},
                {"cliprange": 0.0}, {"cliprange_high": -0.1}, {"vf_coef": -1.0}):
        with pytest.raises(ConfigError):
            GRPOConfig(**bad)
