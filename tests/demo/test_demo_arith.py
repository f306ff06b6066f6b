"""`alignloop demo --task arithmetic --quick` end to end: the files it writes and the sanity of its figures."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from click.testing import CliRunner

    from alignloop.cli import cli

    out = tmp_path_factory.mktemp("arith") / "run"
    res = CliRunner().invoke(cli, ["demo", "--task", "arithmetic", "--quick", "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_files(run):
    out, output = run
    for f in ("report.md", "results.json", "demo.json", "stages.json", "plots/solve_rate_vs_n.png",
              "eval/best_of_n.json", "eval/scored_pools.jsonl", "report/best_of_n.md", "labels/steps_auto.jsonl",
              "labels/steps_human.jsonl", "prm_auto/final/config.json", "prm_human/final/config.json",
              "orm/final/config.json", "rl/rloo_outcome/final/config.json", "rl/rloo_process/final/config.json",
              "rl/ppo_outcome/final/config.json", "rl/ppo_process/final/config.json"):
        assert (out / f).exists(), f
    assert (out / "plots/solve_rate_vs_n.png").stat().st_size > 5000
    assert json.loads((out / "demo.json").read_text())["task"] == "arithmetic"
    summary = json.loads(output[output.index('{"run"'):].splitlines()[0])
    assert summary["plot"].endswith("solve_rate_vs_n.png") and "N=16" in summary["verdict"]
    assert "| PRM auto (min) |" in output and "| majority voting |" in output      # the table, printed
    md = (out / "report.md").read_text()
    assert "## Best-of-N solve rate" in md and "| ORM |" in md and "PPO and RLOO with outcome vs process rewards" in md


def test_figures_are_sane(run):
    out, _ = run
    res = json.loads((out / "results.json").read_text())
    curves = res["best_of_n"]
    assert {"PRM auto (min)", "PRM labelers (min)", "ORM", "majority voting", "PRM-weighted voting",
            "oracle (pass@N)"} <= set(curves)
    for name, c in curves.items():
        assert list(c) == ["1", "2", "4", "8", "16"], name
        assert all(0.0 <= v <= 1.0 for v in c.values()), name
    # N = 1 is one random sample whatever the method: the base model's accuracy on the test pool, exactly
    base = res["samples"]["test_solved"]
    for name, c in curves.items():
        assert c["1"] == pytest.approx(base, abs=1e-9), name
    # pass@N never decreases; every method is at most the oracle
    oracle = [curves["oracle (pass@N)"][n] for n in ("1", "2", "4", "8", "16")]
    assert oracle == sorted(oracle) and oracle[-1] > oracle[0]
    for name, c in curves.items():
        assert all(v <= o + 1e-9 for v, o in zip(c.values(), oracle, strict=True)), name
    # the verifiers' accuracies and the RL figures are shares
    for v in res["verifiers"].values():
        assert all(0.0 <= x <= 1.0 for x in v.values())
    for name in ("base", "PPO outcome (ORM)", "PPO process (PRM)", "RLOO outcome (ORM)", "RLOO process (PRM)"):
        assert 0.0 <= res["rl"][name]["solve_rate"] <= 1.0
