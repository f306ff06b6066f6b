"""`alignloop demo --quick --ai-feedback` end to end: the base model, pretrained on critique and comparison
documents, labels round 1 as an AI labeler beside the simulated people; SL-CAI and RL-CAI are trained, evaluated
and reported next to the human-feedback policies."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


@pytest.mark.slow
def test_reduced_demo_with_ai_feedback(tmp_path):
    from alignloop.cli.demo import demo

    out = tmp_path / "demo"
    res = CliRunner().invoke(demo, ["--quick", "--ai-feedback", "--output-dir", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    assert (out / "data" / "constitution.yaml").exists()
    judged = json.loads((out / "round-1" / "judge" / "STAGE_DONE.json").read_text())
    q = json.loads((out / "round-1" / "label" / "quality.json").read_text())
    name = judged["labeler"]
    assert judged["pairs"] == q["ai"]["people"]["ai"][name]["n"] > 100
    by_order = q["ai"]["by_order"][name]
    print(judged, by_order)
    # the model learned to judge from its pretraining documents: better than chance against the hidden gold scorer
    # (measured at this size: 0.65 with both orders, 0.56 from the first order alone, which picks the first shown
    # 20% of the time); both orders beat one
    assert by_order["gold/both_orders"] > 0.58, by_order
    assert by_order["gold/both_orders"] > by_order["gold/single_order"], by_order
    # debiasing: the final picks are not tied to the position shown first
    assert abs(judged["position_bias_after"] - 0.5) < 0.1
    # the people's loop trained on people only; RL-CAI on the AI labels alone
    assert q["labelers_trained_on"] == "human"
    s = json.loads((out / "eval" / "results.json").read_text())["summary"]
    assert {"SL-CAI", "RL-CAI", "PPO"} <= set(s) and all("ai/win_rate" in v for v in s.values())
    assert s["RL-CAI"]["gold/mean"] > s["SFT"]["gold/mean"], s
    report = (out / "report.md").read_text()
    assert "## AI feedback (round 1)" in report and "Critique → revision" in report
    # a run folder of the other kind is refused (its base model saw other documents)
    res = CliRunner().invoke(demo, ["--quick", "--output-dir", str(out)])
    assert res.exit_code != 0 and "--ai-feedback" in str(res.exception or res.output)
