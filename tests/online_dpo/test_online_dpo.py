"""Online DPO (fast tests): the pairs, the first update's loss against dpo_loss computed by hand, gradient
accumulation, ties, exact resume and the CLI. Learning and 2-process tests: test_online_dpo_slow.py."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from ppo.conftest import make_target_reward, small_lm

from alignloop.cli import cli
from alignloop.data import position_ids_from_attention_mask
from alignloop.errors import ConfigError
from alignloop.losses import dpo_loss
from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, train_tokenizer
from alignloop.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer, preference_pairs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def prompts():
    # mixed lengths -> left padding in every batch
    return [" ".join(s.split()[: 1 + i % 6]) for i, s in enumerate(default_corpus(64, seed=1))]


def _cfg(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "total_updates": 1, "rollout_batch_size": 8, "max_new_tokens": 8,
            "learning_rate": 1e-3, "progress": False, "save_final": False, "tensorboard": False, "sample_every": 0,
            "seed": 0,
            # one token in 7 stops a response: lengths differ, so micro-batches hold different token counts
            "stop_token_ids": list(range(3, 300, 7))}
    base.update(kw)
    return OnlineDPOConfig(**base)


def _trainer(tmp_path, tok, prompts, reward=None, callbacks=(), ref_model=None, **kw):
    torch.manual_seed(0)
    return OnlineDPOTrainer(model=small_lm(tok), reward=reward or make_target_reward(tok), args=_cfg(tmp_path, **kw),
                            train_dataset=prompts, tokenizer=tok, ref_model=ref_model, callbacks=list(callbacks))


def _seq_logps(model, rollout, temperature=1.0) -> torch.Tensor:
    """Sum of the response tokens' log-probs [B], computed here with the plain transformers forward of the whole
    padded rollout (no trimming, no alignloop helper)."""
    ids, am = rollout.input_ids, rollout.attention_mask
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_attention_mask(am)).logits
    P, R = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    logp = F.log_softmax(logits[:, P - 1:P + R - 1].float() / temperature, dim=-1)
    tok_logp = logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    return (tok_logp * rollout.response_mask.float()).sum(1)


# ------------------------------------------------------------------------------------------------ pairs, config
def test_preference_pairs_by_hand():
    chosen, rejected, tied = preference_pairs(torch.tensor([0.2, 0.9, 0.5, 0.5, 3.0, -1.0]))
    assert chosen.tolist() == [1, 2, 4]         # 0.9 over 0.2; the tie keeps the first; 3.0 over -1.0
    assert rejected.tolist() == [0, 3, 5]
    assert tied.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="adjacent pairs"):
        preference_pairs(torch.tensor([0.1, 0.2, 0.3]))


def test_config_refuses_mistakes():
    with pytest.raises(ConfigError, match="beta"):
        OnlineDPOConfig(kl_coef=0.1)
    with pytest.raises(ConfigError, match="label_smoothing"):
        OnlineDPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="beta must be > 0"):
        OnlineDPOConfig(beta=0.0)
    with pytest.raises(ConfigError, match="ties"):
        OnlineDPOConfig(ties="random")
    cfg = OnlineDPOConfig()
    assert (cfg.output_dir, cfg.beta, cfg.loss_type, cfg.ties, cfg.missing_eos_penalty_mode) == (
        "online-dpo-output", 0.1, "sigmoid", "drop", "subtract")


# ------------------------------------------------------------------------------------------------ the first update
def test_first_update_against_its_own_start_is_log_2(tmp_path, tok, prompts):
    """Policy == reference at step 0: every pair's h is exactly 0, so the sigmoid loss is log 2 and the implicit
    rewards and the KL are 0; the trained pairs are the untied ones."""
    seen = []
    h = _trainer(tmp_path, tok, prompts, callbacks=[seen.append], rollout_batch_size=16).train()
    m, exp = h[0], seen[0]
    print({k: m[k] for k in ("loss/dpo", "objective/tie_share", "objective/trained_pairs", "objective/kl")})
    assert 0 < m["objective/trained_pairs"] < 16 and m["objective/tie_share"] > 0       # both kinds present
    assert m["objective/trained_pairs"] == 16 - exp.tied.sum().item() == exp.trained.sum().item()
    assert m["objective/tie_share"] == exp.tied.float().mean().item()
    assert abs(m["loss/dpo"] - math.log(2)) < 1e-6
    assert m["rewards/chosen"] == m["rewards/rejected"] == m["rewards/margins"] == 0.0
    assert m["rewards/accuracies"] == 0.0 and m["objective/kl"] == 0.0
    # chosen scores >= rejected, and the margin is what the metric says
    assert (exp.scores[exp.chosen] >= exp.scores[exp.rejected]).all()
    margin = (exp.scores[exp.chosen] - exp.scores[exp.rejected]).mean().item()
    assert m["objective/scores_margin"] == pytest.approx(margin, abs=1e-7) and margin > 0


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.1), ("ipo", 0.0)])
def test_first_update_loss_is_dpo_loss_by_hand(tmp_path, tok, prompts, loss_type, label_smoothing):
    """Against another reference: loss/dpo = mean over the untied pairs of dpo_loss on sequence log-prob sums at
    temperature 1 (not the sampling temperature 0.7), log-probs computed here independently."""
    seen = []
    ref = small_lm(tok, seed=1)
    beta = 0.5
    h = _trainer(tmp_path, tok, prompts, callbacks=[seen.append], ref_model=ref, temperature=0.7, beta=beta,
                 loss_type=loss_type, label_smoothing=label_smoothing, rollout_batch_size=16).train()
    exp, m = seen[0], h[0]
    s = exp.scores.tolist()
    chosen = [2 * i if s[2 * i] >= s[2 * i + 1] else 2 * i + 1 for i in range(16)]
    rejected = [2 * i + 1 if c == 2 * i else 2 * i for i, c in enumerate(chosen)]
    keep = torch.tensor([s[2 * i] != s[2 * i + 1] for i in range(16)])
    assert keep.sum() >= 4
    start = small_lm(tok)              # the trainer's starting weights (same seed)

    def loss_at(temperature):
        pol, rf = _seq_logps(start, exp.rollout, temperature), _seq_logps(ref, exp.rollout, temperature)
        losses, cr, rr = dpo_loss(pol[chosen], pol[rejected], rf[chosen], rf[rejected], beta,
                                  label_smoothing=label_smoothing, loss_type=loss_type)
        return losses[keep].mean().item(), cr[keep].mean().item(), (cr - rr)[keep]

    expected, chosen_reward, margins = loss_at(1.0)
    wrong, wrong_reward, _ = loss_at(0.7)
    # float32: sequence sums of <= 8 log-probs of size ~log(300), computed here with other padding: a few ulps of
    # ~50, ~1e-6 per sum; the loss moves by |dloss/dh| <= beta (sigmoid) or 2|h - 1/(2 beta)| ~ 2 (ipo) times that
    # (seen: equal bit for bit for sigmoid, 7e-7 for ipo)
    tol = 1e-5
    print(loss_type, m["loss/dpo"], expected, "at T=0.7:", wrong, "rewards/chosen", m["rewards/chosen"], chosen_reward,
          wrong_reward)
    assert abs(m["loss/dpo"] - expected) < tol
    assert m["rewards/chosen"] == pytest.approx(chosen_reward, abs=tol)
    # the temperature matters, so this test can tell (seen: loss 2.6e-3 (sigmoid) / 0.10 (ipo) apart, rewards 0.018)
    assert abs(wrong - expected) > 100 * tol and abs(wrong_reward - chosen_reward) > 100 * tol
    assert m["rewards/accuracies"] == pytest.approx((margins > 0).float().mean().item())
    assert m["objective/kl"] != 0.0


# ------------------------------------------------------------------------------------------------ accumulation
def _first_step(tr: OnlineDPOTrainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run `tr` (one update); (every parameter's gradient as the optimizer step saw it, the weights after)."""
    grads: dict[str, torch.Tensor] = {}
    step = tr.optimizer.step

    def record(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in tr.model.named_parameters()})
        return step(*args, **kwargs)

    tr.optimizer.step = record
    tr.train()
    assert grads
    return grads, {n: p.detach().clone() for n, p in tr.model.named_parameters()}


@pytest.mark.parametrize("ties", ["drop", "first"])
def test_gradient_accumulation_gives_the_same_step(tmp_path, tok, prompts, ties):
    """Batch 8 in one micro-batch vs 4 pairs × 2 accumulation: the loss is a mean over the update's trained pairs,
    so the gradient and the step are the same."""
    seen = []
    kw = {"max_grad_norm": 0.0, "ties": ties, "beta": 0.5}
    g1, w1 = _first_step(_trainer(tmp_path / "one", tok, prompts, callbacks=[seen.append], **kw))
    g2, w2 = _first_step(_trainer(tmp_path / "acc", tok, prompts, gradient_accumulation_steps=2, **kw))
    exp = seen[0]
    assert len(set(exp.response_mask.sum(1).tolist())) > 2          # responses of several lengths
    assert 0 < exp.trained.sum() < 8 if ties == "drop" else exp.trained.all()
    scale = max(g.abs().max().item() for g in g1.values())
    worst = max((g1[k] - g2[k]).abs().max().item() for k in g1)
    # float32 sums in another order: a few ulps of the largest gradient; a micro-batch averaged over its own pairs
    # instead of the update's is off by tens of percent
    assert scale > 1e-3
    assert worst <= 1e-5 * scale, (worst, scale)
    # Adam's first step is lr·g/(|g| + eps): |d step / d g| <= lr/eps, so the weights differ by at most
    # lr/eps · worst, plus an ulp of the weights
    lr, eps = 1e-3, 1e-5
    w_worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    w_scale = max(w.abs().max().item() for w in w1.values())
    assert w_worst <= lr / eps * worst + 2 * torch.finfo(torch.float32).eps * w_scale, w_worst


# ------------------------------------------------------------------------------------------------ ties
def test_all_ties_take_no_step_unless_ties_first(tmp_path, tok, prompts):
    def constant(prompts, responses):   # a reward that ties every pair
        return [0.5] * len(responses)

    tr = _trainer(tmp_path / "drop", tok, prompts, reward=constant, total_updates=2)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    h = tr.train()
    assert [m["objective/tie_share"] for m in h] == [1.0, 1.0]
    assert [m["optim/skipped_steps"] for m in h] == [1.0, 1.0]
    assert [m["loss/dpo"] for m in h] == [0.0, 0.0] and h[0]["objective/trained_pairs"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    tr = _trainer(tmp_path / "first", tok, prompts, reward=constant, ties="first")
    h = tr.train()
    assert h[0]["objective/tie_share"] == 1.0 and h[0]["objective/trained_pairs"] == 8.0
    assert abs(h[0]["loss/dpo"] - math.log(2)) < 1e-6 and h[0]["optim/skipped_steps"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


# ------------------------------------------------------------------------------------------------ resume
def test_resume_gives_the_same_weights(tmp_path, tok, prompts):
    """4 updates in one go vs 2, then a fresh trainer resuming for 2 more: the same weights, bit for bit."""
    kw = {"total_updates": 4, "save_steps": 2, "save_total_limit": None, "num_mini_batches": 2,
          "reward_normalization": "running", "missing_eos_penalty": 0.1}
    full = _trainer(tmp_path / "full", tok, prompts, **kw)
    h_full = full.train()
    first = _trainer(tmp_path / "part", tok, prompts, **kw)
    first.args.total_updates = 2
    first.train()
    torch.manual_seed(999)   # a fresh trainer must not depend on ambient RNG state
    second = OnlineDPOTrainer(model=small_lm(tok), reward=make_target_reward(tok),
                              args=_cfg(tmp_path / "part", **{**kw, "resume_from": "latest"}), train_dataset=prompts,
                              tokenizer=tok)
    h2 = second.train()
    assert len(h2) == 2
    sa, sb = full.model.state_dict(), second.model.state_dict()
    assert any(not torch.equal(sa[k], small_lm(tok).state_dict()[k]) for k in sa)   # it did train
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [m["loss/dpo"] for m in h2] == [m["loss/dpo"] for m in h_full[2:]]
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_help_and_missing_reward_model(tmp_path):
    res = CliRunner().invoke(cli, ["online-dpo", "--help"])
    assert res.exit_code == 0 and "--beta" in res.output and "--loss-type" in res.output
    p = subprocess.run([sys.executable, "-m", "alignloop.cli", "online-dpo", "--model", "m", "--train-file", "p"],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "error: alignloop online-dpo needs --reward-model" in p.stderr and "Traceback" not in p.stderr
    assert CliRunner().invoke(cli, ["online-dpo", "--loss-type", "hinge"]).exit_code == 2


def test_cli_runs_from_yaml(tmp_path):
    tok = train_tokenizer(vocab_size=300)
    policy = build_tiny_checkpoint(tmp_path / "policy", tokenizer=tok, n_layer=1, n_embd=32)
    reward = build_tiny_checkpoint(tmp_path / "reward", tokenizer=tok, kind="classifier", n_layer=1, n_embd=32)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie", "a plot", "good", "it was"] * 4))
    cfg = tmp_path / "online_dpo.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(policy), "reward_model": str(reward), "train_file": str(data),
                                   "output_dir": str(tmp_path / "out"), "total_updates": 3, "rollout_batch_size": 4,
                                   "max_new_tokens": 6, "progress": False}))
    res = CliRunner().invoke(cli, ["online-dpo", "--config", str(cfg), "--total-updates", "2", "--beta", "0.2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.rindex('{"updates"'):].splitlines()[0])
    assert out["updates"] == 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["objective/beta"] == 0.2
    assert abs(lines[0]["loss/dpo"] - math.log(2)) < 1e-6    # a classifier's scores never tie: every pair trains
    assert (tmp_path / "out" / "final" / "config.json").exists()
