import math

import pytest
import torch

from alignloop.losses import AdaptiveKLController, entropy_from_logits, gae, kl_penalty
from alignloop.models import model_forward
from alignloop.models.tiny import tiny_causal_lm, tiny_sequence_classifier
from alignloop.rollout import HFSampler, SamplingParams
from alignloop.scoring import ModelScorer, RewardTransform
from alignloop.trainers.ppo import PPOConfig, PPOTrainer
from alignloop.training.guard import RewardHackingGuard, SampleTable

from .conftest import make_target_reward, small_lm


def _cfg(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "total_updates": 1, "rollout_batch_size": 8, "max_new_tokens": 10,
            "temperature": 0.7, "learning_rate": 1e-3, "progress": False, "save_final": False, "tensorboard": False,
            "sample_every": 0}
    base.update(kw)
    return PPOConfig(**base)


@pytest.mark.parametrize("mb,ga", [(1, 1), (2, 2)])
def test_first_minibatch_ratio_is_one(tmp_path, tok, prompts, mb, ga):
    """The decisive check: first minibatch of the first epoch has ratio = 1, approx-KL 0, clipfrac 0."""
    torch.manual_seed(0)
    tr = PPOTrainer(model=tiny_causal_lm(tok, n_layer=2, n_embd=64, dropout=0.1), reward=make_target_reward(tok),
                    args=_cfg(tmp_path, num_mini_batches=mb, gradient_accumulation_steps=ga), train_dataset=prompts,
                    tokenizer=tok)
    m = tr.train()[0]
    assert m["policy/max_abs_ratio_minus_1_first"] == 0.0
    assert m["policy/approxkl_first"] == 0.0
    assert m["policy/clipfrac_first"] == 0.0
    assert m["policy/approxkl"] > 0  # later minibatches/epochs did move the policy
    assert m["objective/kl"] == 0.0  # policy == reference before the first step


def test_score_at_last_real_token_left_padding_and_pad_eq_eos(tok_pad_eos):
    tok = tok_pad_eos
    assert tok.pad_token_id == tok.eos_token_id
    lm = tiny_causal_lm(tok, n_layer=1, n_embd=32, seed=3)
    rm = tiny_sequence_classifier(tok, n_layer=1, n_embd=32, seed=4).eval()
    prompts = [tok(t)["input_ids"] for t in ["good", "the movie was very boring and", "a plot"]]
    with torch.no_grad():  # make EOS likely, so that responses end with EOS == pad
        lm.transformer.ln_f.bias.copy_(lm.transformer.wte.weight[tok.eos_token_id] * 300)
    torch.manual_seed(0)
    r = HFSampler(lm, tok).generate(prompts * 4, SamplingParams(max_new_tokens=12))
    scores = ModelScorer(rm).score_rollout(r, None, None)
    for b in range(len(r)):
        seq = torch.cat([r.prompt_ids[b][r.prompt_mask[b]], r.response_ids[b][r.response_mask[b]]])
        with torch.no_grad():  # the unpadded sequence alone, as transformers scores it (the last token != pad)
            expected = rm(input_ids=seq[None]).logits[0, 0]
            h = rm.transformer(input_ids=seq[None]).last_hidden_state
            last_non_eos = max(i for i, t in enumerate(seq.tolist()) if t != tok.eos_token_id)
            assert torch.allclose(expected, rm.score(h[0, last_non_eos])[0], atol=1e-6)
        assert abs(scores[b].item() - expected.item()) < 1e-5
    # responses ending with EOS (== pad) were scored before it, as transformers does, and some rows are padded
    eos_rows = [b for b in range(len(r)) if r.response_ids[b][r.response_mask[b]][-1] == tok.eos_token_id]
    assert eos_rows and (~r.response_mask).any() and r.prompt_mask[:, 0].logical_not().any()


def test_entropy_is_masked(tmp_path, tok, prompts):
    torch.manual_seed(0)
    seen = []
    tr = PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok), args=_cfg(tmp_path, max_new_tokens=12,
                                                                              stop_token_ids=list(range(100, 140))),
                    train_dataset=prompts, tokenizer=tok, callbacks=[seen.append])
    torch.manual_seed(1)
    m = tr.train()[0]
    # recompute per sequence, unpadded: mean over real response tokens only
    r = seen[-1].rollout
    ents = []
    for b in range(len(r)):
        p = r.prompt_ids[b][r.prompt_mask[b]]
        resp = r.response_ids[b][r.response_mask[b]]
        ids = torch.cat([p, resp])[None]
        with torch.no_grad():
            logits = model_forward(tr.ref_model, ids, torch.ones_like(ids))  # ref == policy before the step
        ents.append(entropy_from_logits(logits[0, len(p) - 1:-1], 0.7))
    expected = torch.cat(ents).mean().item()
    assert abs(m["objective/entropy"] - expected) < 1e-4
    assert (~r.response_mask).any()  # there was padding to leave out
    assert 0 < m["objective/entropy"] <= math.log(len(tok))


def test_adaptive_kl_moves_the_right_way(tmp_path, tok, prompts):
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(5.0, 10) > 0.1
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(0.1, 10) < 0.1
    for target, up in [(1e-4, True), (1e4, False)]:
        torch.manual_seed(0)
        tr = PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok),
                        args=_cfg(tmp_path / str(target), total_updates=3, adaptive_kl=True, kl_coef=0.1,
                                  kl_target=target, kl_horizon=16, kl_estimator="k3"),
                        train_dataset=prompts, tokenizer=tok)
        h = tr.train()
        coefs = [m["objective/kl_coef"] for m in h] + [tr.kl_ctl.value]
        assert (coefs[-1] > coefs[1]) == up, coefs


def test_rewards_score_on_last_token_and_kl_penalty(tmp_path, tok, prompts):
    """With gamma = lam = 1 and whitening off, the return at the first response token is score - beta * sum KL."""
    torch.manual_seed(0)
    seen = []
    tr = PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok),
                    args=_cfg(tmp_path, total_updates=2, gamma=1.0, lam=1.0, whiten_advantages=False, kl_coef=0.5),
                    train_dataset=prompts, tokenizer=tok, callbacks=[seen.append])
    h = tr.train()
    d = seen[-1]
    expected = d["scores"] - 0.5 * d["kl"].sum(1)
    assert torch.allclose(d["returns"][:, 0], expected, atol=1e-5)
    assert abs(h[1]["objective/non_score_reward"] + 0.5 * h[1]["objective/kl"]) < 1e-5


def test_gae_against_loop_and_kl_estimators():
    torch.manual_seed(0)
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5]).bool()
    adv, ret = gae(r, v, mask, 0.9, 0.8)
    for b in range(3):
        n = int(mask[b].sum())
        a, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            nv = v[b, t + 1].item() if t + 1 < n else 0.0
            delta = r[b, t].item() + 0.9 * nv - v[b, t].item()
            last = delta + 0.9 * 0.8 * last
            a[t] = last
        assert torch.allclose(adv[b, :n], torch.tensor(a), atol=1e-5)
        assert torch.allclose(ret[b, :n], adv[b, :n] + v[b, :n], atol=1e-5)
    lp, ref = torch.randn(4, 5), torch.randn(4, 5)
    l = ref - lp  # noqa: E741 - the log-ratio ℓ of the docstrings
    assert torch.allclose(kl_penalty(lp, ref, "k1"), -l)
    assert torch.allclose(kl_penalty(lp, ref, "k2"), 0.5 * l ** 2)
    # exp(l) - 1 - l cancels to ~l^2/2 for small l: its float32 error is a few ulps of 1, not of the result -> atol 1e-6
    assert torch.allclose(kl_penalty(lp, ref, "k3"), torch.exp(l) - 1 - l, atol=1e-6)


def test_reward_transform():
    raw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    stopped = torch.tensor([True, False, True, True])
    t = RewardTransform("fit")
    t.fit(raw)
    s = t(raw, torch.ones(4, dtype=torch.bool))
    assert abs(s.mean().item()) < 1e-6 and abs(s.std(unbiased=False).item() - 1) < 1e-6
    assert RewardTransform(missing_eos_penalty=-1.0, missing_eos_mode="replace")(raw, stopped).tolist() == \
        [1.0, -1.0, 3.0, 4.0]
    assert RewardTransform(missing_eos_penalty=1.0, missing_eos_mode="subtract")(raw, stopped).tolist() == \
        [1.0, 1.0, 3.0, 4.0]
    assert RewardTransform(clip=2.5)(raw, stopped).tolist() == [1.0, 2.0, 2.5, 2.5]
    run = RewardTransform("running")
    out = run(raw, stopped)
    assert abs(out.mean().item()) < 1e-6


def test_guard_and_sample_table(tmp_path):
    g = RewardHackingGuard(kl_budget=5.0, window=3, action="stop")
    assert g.update(1, proxy=0.1, kl=1.0, gold=1.0) == []
    g.update(2, proxy=0.2, kl=1.0, gold=0.9)
    msgs = g.update(3, proxy=0.3, kl=1.0, gold=0.8)
    assert any("reward hacking" in m for m in msgs) and g.should_stop
    g2 = RewardHackingGuard(kl_budget=5.0, window=3)
    assert any("budget" in m for m in g2.update(1, 0.0, 6.0)) and not g2.should_stop
    text = SampleTable(tmp_path, max_rows=2).write(1, ["p1", "p2", "p3"], ["r|1", "r2", "r3"], [1, 2, 3], [1, 2, 3])
    assert "r\\|1" in text and (tmp_path / "samples.jsonl").read_text().count("\n") == 2


def test_metrics_and_outputs(tmp_path, tok, prompts):
    torch.manual_seed(0)

    def gold(p, r):
        return [0.0] * len(r)

    tr = PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok), gold_reward=gold,
                    args=_cfg(tmp_path, total_updates=2, sample_every=1, tensorboard=True, save_final=True,
                              ent_coef=0.01),
                    train_dataset=prompts, tokenizer=tok)
    h = tr.train()
    for k in ["objective/kl", "objective/entropy", "reward/mean", "reward/std", "objective/non_score_reward",
              "policy/clipfrac", "policy/approxkl", "loss/policy", "loss/value", "val/clipfrac",
              "val/explained_variance", "response/length_mean", "response/eos_share", "objective/kl_coef",
              "perf/tokens_per_sec", "time/generate", "time/score", "time/train", "reward/gold_mean", "loss/entropy"]:
        assert k in h[-1], k
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "samples.jsonl").exists() and (tmp_path / "tensorboard").is_dir()
    assert (tmp_path / "final" / "config.json").exists() and (tmp_path / "final" / "value_head.safetensors").exists()


def test_lora_reference_is_base_with_adapter_disabled(tmp_path, tok, prompts):
    torch.manual_seed(0)
    tr = PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok),
                    args=_cfg(tmp_path, total_updates=2, lora_r=4, learning_rate=1e-2,
                              save_final=True), train_dataset=prompts, tokenizer=tok)
    assert tr.ref_model is None and tr.lora
    h = tr.train()
    assert h[0]["objective/kl"] == 0.0 and h[0]["policy/max_abs_ratio_minus_1_first"] == 0.0
    assert h[1]["objective/kl"] != 0.0  # the adapter moved the policy away from the (adapter-off) reference
    assert (tmp_path / "final" / "config.json").exists()  # merged HF model + value head
    assert (tmp_path / "final" / "value_head.safetensors").exists()


def test_separate_critic_from_reward_model(tmp_path, tok, prompts):
    torch.manual_seed(0)
    rm = tiny_sequence_classifier(tok, n_layer=1, n_embd=32, seed=7)
    tr = PPOTrainer(model=small_lm(tok), reward=rm, args=_cfg(tmp_path, value_model="reward", save_final=True,
                                                              total_updates=2),
                    train_dataset=prompts, tokenizer=tok)
    assert tr.model.critic is not None
    before = rm.score.weight.detach().clone()
    h = tr.train()
    assert h[0]["policy/max_abs_ratio_minus_1_first"] == 0.0
    assert h[0]["val/mean"] != 0.0  # the critic starts from the reward head, not from zero
    assert torch.equal(rm.score.weight, before)  # training the critic leaves the reward model alone
    assert (tmp_path / "final" / "critic" / "config.json").exists()


def test_reward_tokenizer_differs_and_fit_normalisation(tmp_path, tok, prompts):
    from alignloop.models.tiny import train_tokenizer
    rtok = train_tokenizer(vocab_size=400)
    rm = tiny_sequence_classifier(rtok, n_layer=1, n_embd=32, seed=7).eval()
    torch.manual_seed(0)
    seen = []
    tr = PPOTrainer(model=small_lm(tok), reward=rm, reward_tokenizer=rtok,
                    args=_cfg(tmp_path, reward_normalization="fit", normalization_samples=16),
                    train_dataset=prompts, tokenizer=tok, callbacks=[seen.append])
    assert tr.scorer.retokenize
    tr.train()
    assert tr.transform.fitted and tr.transform.gain != 1.0
    r = seen[-1].rollout
    # re-tokenised as the RM trainer does: prompt and response apart, the reward tokenizer's EOS appended where the
    # policy stopped (at EOS), none after a truncated response
    r.stopped = torch.tensor([i % 2 == 0 for i in range(len(r.stopped))])
    texts_p = ["the movie", "a plot"] * (len(r.stopped) // 2)
    texts_r = [" was good", " and music"] * (len(r.stopped) // 2)
    got = tr.scorer.score_rollout(r, texts_p, texts_r)
    for b in range(2):
        ids = rtok(texts_p[b], add_special_tokens=False)["input_ids"] + \
            rtok(texts_r[b], add_special_tokens=False)["input_ids"] + ([rtok.eos_token_id] if b == 0 else [])
        with torch.no_grad():
            h = rm.transformer(input_ids=torch.tensor([ids])).last_hidden_state
            expected = rm.score(h[0, -1])[0].item()
        assert abs(got[b].item() - expected) < 1e-4


def test_config_errors(tmp_path, tok, prompts):
    from alignloop.errors import ConfigError
    with pytest.raises(ConfigError):
        PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok),
                   args=_cfg(tmp_path, rollout_batch_size=4, num_mini_batches=4, gradient_accumulation_steps=2),
                   train_dataset=prompts, tokenizer=tok)
    with pytest.raises(ConfigError):
        PPOConfig(temperature=0.0)


def _trained_adapter_policy(tok):
    """A LoRA policy whose adapter is not the identity (LoRA B drawn at random), as one loaded from a folder."""
    from alignloop.models import LoraOptions, apply_lora

    model = apply_lora(small_lm(tok), LoraOptions(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_ppo_from_an_adapter_has_zero_kl_at_the_first_update(tmp_path, tok, prompts):
    """Starting from a trained adapter, the reference is the starting policy (adapter on, frozen), so the KL to it
    is 0 at the first update (it was the KL to the base with the adapter off); later the adapter moves away."""
    torch.manual_seed(0)
    tr = PPOTrainer(model=_trained_adapter_policy(tok), reward=make_target_reward(tok),
                    args=_cfg(tmp_path, total_updates=2, learning_rate=1e-2), train_dataset=prompts, tokenizer=tok)
    assert tr.lora and tr.ref_model is None
    h = tr.train()
    assert h[0]["objective/kl"] == 0.0 and h[0]["policy/max_abs_ratio_minus_1_first"] == 0.0
    assert h[1]["objective/kl"] != 0.0


def test_ppo_ref_model_is_used_with_lora(tmp_path, tok, prompts):
    """A reference model handed over is the reference, LoRA or not (with LoRA it was silently ignored)."""
    ref = small_lm(tok, seed=1)
    tr = PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok), args=_cfg(tmp_path, lora_r=4),
                    train_dataset=prompts, tokenizer=tok, ref_model=ref)
    assert tr.lora and tr.ref_model is ref
    assert tr.train()[0]["objective/kl"] != 0.0   # the policy starts from another model than the reference


def test_ppo_lora_saves_final_and_adapter(tmp_path, tok, prompts):
    """final/ is the merged policy (plain transformers, + value head), adapter/ the peft adapter with the tokenizer:
    on the base (PeftModel.from_pretrained) it computes the trained policy's logits, as final/ does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tr = PPOTrainer(model=small_lm(tok), reward=make_target_reward(tok),
                    args=_cfg(tmp_path, total_updates=1, lora_r=4, learning_rate=1e-1, save_final=True),
                    train_dataset=prompts, tokenizer=tok)
    tr.train()
    for name in ("adapter/adapter_config.json", "adapter/tokenizer.json", "final/value_head.safetensors"):
        assert (tmp_path / name).is_file(), name
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model_forward(tr.model.lm.eval(), ids, mask)
        merged = model_forward(AutoModelForCausalLM.from_pretrained(tmp_path / "final"), ids, mask)
        adapter = model_forward(PeftModel.from_pretrained(small_lm(tok), tmp_path / "adapter").eval(), ids, mask)
        base = model_forward(small_lm(tok).eval(), ids, mask)
    # float32 merge of W + s·BA, O(1) logits: a few ulps (see tests/trainers/test_lora_save.py)
    torch.testing.assert_close(merged, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter, want, rtol=0, atol=1e-5)
    assert (base - want).abs().max() > 1e-3  # the adapter was trained
