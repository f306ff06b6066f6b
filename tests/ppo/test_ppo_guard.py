"""The reward-hacking guard end to end in the real PPOTrainer.

A hackable proxy (the share of target tokens in the response, which PPO drives up quickly) and a gold scorer that
disagrees with it (minus that share: the policy never trains on it). The guard must warn while the proxy rises and the
gold score falls, stop the run with `guard_action="stop"`, and fire its KL alarm when KL passes `kl_budget`.
Tiny models, one torch thread: each run takes a few seconds.
"""
import json
import warnings

import pytest
import torch

from alignloop.trainers.ppo import PPOConfig, PPOTrainer
from alignloop.training.guard import RewardHackingGuard, RewardHackingWarning, _slope

from .conftest import make_target_reward, small_lm

WINDOW = 8


def _cfg(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "total_updates": 24, "rollout_batch_size": 32, "max_new_tokens": 8,
            "learning_rate": 2e-3, "lr_scheduler": "constant", "kl_coef": 0.01, "progress": False,
            "save_final": False, "tensorboard": False, "sample_every": 0, "seed": 0, "cpu_threads": 1,
            "generation_threads": 1, "guard_window": WINDOW, "reward_normalization": "running"}
    base.update(kw)
    return PPOConfig(**base)


def _run(tmp_path, tok, prompts, gold=True, record=True, **kw):
    proxy = make_target_reward(tok)
    gold_fn = (lambda p, r: [-x for x in proxy(p, r)]) if gold else None
    torch.manual_seed(0)
    tr = PPOTrainer(model=small_lm(tok), reward=proxy, gold_reward=gold_fn, args=_cfg(tmp_path, **kw),
                    train_dataset=prompts, tokenizer=tok)
    if not record:
        return tr, tr.train(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = tr.train()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RewardHackingWarning)]
    return tr, h, msgs


def _mean(h, key, sl):
    xs = [m[key] for m in h[sl]]
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def warn_run(tmp_path_factory, tok, prompts):
    return _run(tmp_path_factory.mktemp("guard_warn"), tok, prompts)


def test_noise_alone_does_not_fire_the_divergence_alarm():
    # the first 6 proxy means of a real run (flat, batch noise) with a gold score that mirrors them: the bare sign
    # test (min_t=0, the old rule) called this reward hacking at update 6; the t-test does not
    proxy = [0.024, 0.022, 0.011, 0.035, 0.015, 0.025]
    old, new = RewardHackingGuard(window=5, action="stop", min_t=0), RewardHackingGuard(window=5, action="stop")
    for i, p in enumerate(proxy, 1):
        old.update(i, proxy=p, kl=0.0, gold=-p)
        new.update(i, proxy=p, kl=0.0, gold=-p)
    assert [s for s, _ in old.alerts] == [6] and old.should_stop
    assert new.alerts == [] and not new.should_stop and new.min_t == pytest.approx(2.353)
    # a sustained rise over the window does fire, noise and all
    g = RewardHackingGuard(window=5)
    for i, p in enumerate([0.02, 0.035, 0.041, 0.06, 0.07], 1):
        g.update(i, proxy=p, kl=0.0, gold=-p + 0.003 * (-1) ** i)
    assert len(g.alerts) == 1 and "possible reward hacking" in g.alerts[0][1]


def test_guard_warns_while_proxy_rises_and_gold_falls(warn_run):
    tr, h, msgs = warn_run
    proxy = [m["reward/raw_mean"] for m in h]
    gold = [m["reward/gold_mean"] for m in h]
    print("proxy", [round(x, 3) for x in proxy], "\ngold", [round(x, 3) for x in gold], "\nalerts", tr.guard.alerts)
    assert len(h) == 24 and tr.state["stop_reason"] is None          # warn only: the run used its whole budget
    # the proxy was hacked and the gold score fell (seen: proxy 0.02 -> ~0.8, gold -0.02 -> ~-0.8)
    assert _mean(h, "reward/raw_mean", slice(0, 4)) < 0.05
    assert _mean(h, "reward/raw_mean", slice(-4, None)) > 0.3
    assert _mean(h, "reward/gold_mean", slice(-4, None)) < _mean(h, "reward/gold_mean", slice(0, 4)) - 0.25
    # the guard warned, with RewardHackingWarning, once per alarm, and only once the window had filled
    div = [m for m in msgs if "possible reward hacking" in m]
    assert div and len(div) == len(tr.guard.alerts)
    first = tr.guard.alerts[0][0]
    assert WINDOW <= first < 20
    assert _slope(proxy[first - WINDOW:first]) > 0 > _slope(gold[first - WINDOW:first])
    # it watched the raw proxy score (the reward model's own output), not the running-normalised one
    assert list(tr.guard.proxy) == pytest.approx(proxy[-WINDOW:])
    assert list(tr.guard.gold) == pytest.approx(gold[-WINDOW:])
    assert not any("budget" in m for m in msgs)                      # no kl_budget given: no KL alarm


def test_guard_stop_ends_the_run_at_the_first_alarm(tmp_path, tok, prompts, warn_run):
    tr, h, msgs = _run(tmp_path, tok, prompts, guard_action="stop", total_updates=40)
    first_alarm = warn_run[0].guard.alerts[0][0]
    print("stopped after", len(h), "updates:", tr.state["stop_reason"])
    assert len(h) == first_alarm < 40                                # same seed: the warn run's first alarm
    assert tr.state["stop_reason"].startswith("reward-hacking guard: ")
    assert "possible reward hacking" in tr.state["stop_reason"] and len(msgs) == 1
    proxy = [m["reward/raw_mean"] for m in h]
    gold = [m["reward/gold_mean"] for m in h]
    assert proxy[-1] > 1.5 * proxy[0] and gold[-1] < gold[0]        # seen: 0.024 -> 0.054
    assert _slope(proxy[-WINDOW:]) > 0 > _slope(gold[-WINDOW:])


def test_kl_budget_warns_and_stops(tmp_path, tok, prompts):
    budget = 0.1
    kw = {"gold": False, "kl_budget": budget, "total_updates": 8, "rollout_batch_size": 16}
    tr, h, msgs = _run(tmp_path / "warn", tok, prompts, **kw)
    kls = [m["objective/kl"] for m in h]
    print("kl", [round(x, 3) for x in kls])
    over = [i + 1 for i, k in enumerate(kls) if k > budget]
    assert kls[0] == 0.0 and over and len(h) == 8                      # policy == reference at update 1
    assert [s for s, _ in tr.guard.alerts] == over                     # one KL alarm per update over budget
    assert len(msgs) == len(over) and all("passed its budget 0.100" in m for m in msgs)
    assert tr.state["stop_reason"] is None

    with pytest.warns(RewardHackingWarning, match="KL to the reference .* passed its budget"):
        tr2, h2, _ = _run(tmp_path / "stop", tok, prompts, guard_action="stop", record=False, **kw)
    assert len(h2) == over[0] < 8                                      # stopped at the first update over budget
    assert h2[-1]["objective/kl"] > budget >= max(m["objective/kl"] for m in h2[:-1])
    assert tr2.state["stop_reason"].startswith("reward-hacking guard: ") and "KL" in tr2.state["stop_reason"]
    # readable without TensorBoard: every alarm and the stop reason are in events.jsonl
    events = [json.loads(line) for line in (tmp_path / "stop" / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["tag"]) for e in events] == [(over[0], "guard"), (over[0], "stop")]
    assert events[1]["text"] == tr2.state["stop_reason"]
