"""The reduced demo end to end (`alignloop demo --quick`), asserting the directions the issue asks for:
PPO, RLOO, GRPO and DPO raise the gold reward over SFT, best-of-N rises with N, the careless labeler is flagged, the
reward model's held-out accuracy is near the simulated labelers' agreement. Then `--resume` skips every finished
stage."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


@pytest.mark.slow
def test_reduced_demo_directions(tmp_path):
    from alignloop.cli.demo import demo

    out = tmp_path / "demo"
    res = CliRunner().invoke(demo, ["--quick", "--output-dir", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]

    results = json.loads((out / "eval" / "results.json").read_text())
    s = results["summary"]
    sft = s["SFT"]["gold/mean"]
    # PPO and DPO each raise the gold reward (a scorer neither saw) over the SFT model, and win against it
    assert s["PPO"]["gold/mean"] > sft + 0.5, s
    assert s["DPO"]["gold/mean"] > sft + 0.5, s
    assert s["PPO"]["gold/win_rate"] > 0.6 and s["DPO"]["gold/win_rate"] > 0.6
    # ... at a cost in KL to the reference
    assert s["PPO"]["kl"] > 0.2 and s["DPO"]["kl"] > 0.2
    # best-of-N rises with N (gold and reward model)
    bon = results["best_of_n"]
    ns = sorted(bon, key=int)
    golds = [bon[n]["gold/mean"] for n in ns]
    assert golds == sorted(golds) and golds[-1] > golds[0] + 0.5, golds
    assert [bon[n]["rm/mean"] for n in ns] == sorted(bon[n]["rm/mean"] for n in ns)
    # the critic-free trainers (against the same reward model, from the same SFT model) raise it too
    print({m: (round(s[m]["gold/mean"], 3), round(s[m]["kl"], 3)) for m in ("SFT", "PPO", "RLOO", "GRPO", "Online DPO",
                                                                            "DPO")})
    assert s["RLOO"]["gold/mean"] > sft + 0.5 and s["GRPO"]["gold/mean"] > sft + 0.5, s
    assert s["RLOO"]["gold/win_rate"] > 0.6 and s["GRPO"]["gold/win_rate"] > 0.6
    # rejection sampling ran and did not make things worse by much
    assert "RS" in s and s["RS"]["gold/mean"] > sft - 0.5

    # labelers: the careless one (and only it) is flagged
    q = json.loads((out / "round-1" / "label" / "quality.json").read_text())
    assert q["flagged"] == ["careless"]
    assert all(q["gold_agreement"][f"judge{i}"] > 0.75 for i in range(1, 5))
    # the reward model's held-out accuracy is near the labelers' agreement
    rm = json.loads((out / "round-1" / "rm" / "STAGE_DONE.json").read_text())
    agree = q["pairwise_percent_agreement"]
    assert 0.6 < agree < 0.9
    assert abs(rm["eval/accuracy"] - agree) < 0.12, (rm["eval/accuracy"], agree)

    # report: both formats, every plot, wall time per stage
    md = (out / "report.md").read_text()
    for name in ("frontier", "best_of_n", "ppo_training", "critic_free_training", "dpo_training", "reward_model",
                 "labelers", "stage_times"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 10_000, name
        assert f"plots/{name}.png" in md
    assert "| PPO |" in md and "| DPO |" in md and "| careless |" in md and "| total |" in md
    assert "| RLOO |" in md and "| GRPO |" in md and "| rloo |" in md and "| grpo |" in md
    assert (out / "report.html").read_text().count("<img") == 8
    times = json.loads((out / "stages.json").read_text())
    assert {"base", "sft", "round-1/label", "round-1/rm", "round-1/ppo", "rloo", "grpo", "dpo", "rs", "eval"} <= set(
        times)

    # resume: nothing is recomputed
    res = CliRunner().invoke(demo, ["--resume", "--output-dir", str(out)], catch_exceptions=False)
    assert res.exit_code == 0
    assert res.output.count("skipped") == len(times)
