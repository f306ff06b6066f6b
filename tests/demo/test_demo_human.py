"""`alignloop demo --human`: the run stops after sampling with the labeling project ready and an admin account made
for the person; people judge (here through the same store calls the app makes); `alignloop demo --resume` trains on
their judgements and finishes the loop."""
from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner


@pytest.mark.slow
def test_demo_human_stops_then_resumes_on_peoples_labels(tmp_path, label_like_people):
    from alignloop.cli.demo import demo
    from alignloop.feedback.store import Store

    out = tmp_path / "demo"
    res = CliRunner().invoke(demo, ["--quick", "--human", "--no-serve", "--output-dir", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    stop = json.loads(next(line for line in res.output.splitlines() if line.startswith('{"stopped"')))
    assert stop["stopped"] == "human" and stop["project"] == "round-1"
    assert "alignloop demo --resume" in res.output and "user 'you'" in res.output
    assert (out / "round-1" / "sample" / "STAGE_DONE.json").exists()
    assert not (out / "round-1" / "label").exists() and not (out / "eval").exists()

    store = Store(stop["db"])
    assert {lab.username for lab in store.list_labelers()} == {"you"}  # the person's admin account
    store.dispose()
    judged = label_like_people(stop["db"], "round-1")
    assert judged > 50
    # people read: they took seconds per item (this loop took microseconds, which the quality check flags as
    # "too fast to be reading")
    with sqlite3.connect(stop["db"]) as con:
        con.execute("UPDATE judgements SET time_spent_ms = 3000")

    res = CliRunner().invoke(demo, ["--resume", "--output-dir", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    q = json.loads((out / "round-1" / "label" / "quality.json").read_text())
    assert set(q["stats"]) == {"ann", "bob"} and q["judgements"] == judged  # their labels, not simulated ones
    assert q["pairwise_percent_agreement"] == 1.0 and q["flagged"] == [], {
        k: q[k] for k in ("flagged", "stats", "pairwise_percent_agreement")}
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"SFT", "PPO", "DPO", "RS"} <= set(results["summary"])
    # the reward model learned these people's taste (longer is better): PPO and DPO write longer than SFT
    s = results["summary"]
    assert s["PPO"]["length"] > s["SFT"]["length"] and s["DPO"]["length"] > s["SFT"]["length"], s
    assert (out / "report.md").exists() and (out / "report.html").exists()
