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


def test_demo_config_offers_conversations_and_demonstrations(tmp_path):
    """`--feedback-mode conversation` / `--demonstrations`: people converse with the SFT model each round (which
    learns the chat format the app serves it in) / write demonstrations before SFT."""
    from alignloop.data import read_rows, write_rows
    from alignloop.demo.demo import DemoSize, chat_demos, demo_config
    from alignloop.pipeline.config import check_people

    size = DemoSize.quick()
    cfg = demo_config(tmp_path, size, human=True, feedback_mode="conversation", demonstrations=True)
    check_people(cfg)
    assert (cfg.feedback.mode, cfg.feedback.labelers, cfg.feedback.max_turns) == ("conversation", "human", 4)
    assert cfg.feedback.num_prompts == size.conversation_openings and cfg.sft["train_file"].endswith("chat_demos.jsonl")
    assert cfg.demonstrations.num_prompts == size.demonstration_prompts and cfg.demonstrations.edit
    plain = demo_config(tmp_path, size)
    assert plain.feedback.mode == "pairs" and plain.demonstrations is None
    assert plain.sft["train_file"].endswith("/demos.jsonl")
    write_rows([{"prompt": "Review of X:", "completion": " A fine film."}], tmp_path / "demos.jsonl")
    assert read_rows(chat_demos(tmp_path)) == [{"prompt": [{"role": "user", "content": "Review of X:"}],
                                                "completion": [{"role": "assistant", "content": "A fine film."}]}]


@pytest.mark.parametrize("flag", [["--feedback-mode", "conversation"], ["--demonstrations"]])
def test_people_modes_need_human(tmp_path, capsys, flag):
    from alignloop.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--quick", "--output-dir", str(tmp_path / "demo"), *flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "add --human" in err and "Traceback" not in err
    assert not (tmp_path / "demo" / "data").exists()


@pytest.mark.slow
def test_demo_human_conversation_stops_with_the_conversation_project(tmp_path):
    from alignloop.cli.demo import demo
    from alignloop.feedback.store import Store

    out = tmp_path / "demo"
    res = CliRunner().invoke(demo, ["--quick", "--human", "--feedback-mode", "conversation", "--no-serve",
                                    "--output-dir", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    stop = json.loads(next(line for line in res.output.splitlines() if line.startswith('{"stopped"')))
    assert stop == {"stopped": "human", "db": str(out / "feedback.db"), "project": "round-1", "task": "conversation"}
    assert "talk with the model" in res.output and "alignloop demo --resume" in res.output
    assert (out / "sft" / "STAGE_DONE.json").exists() and (out / "round-1" / "sample" / "STAGE_DONE.json").exists()
    assert not (out / "round-1" / "label").exists() and not (out / "round-1" / "rm").exists()
    store = Store(stop["db"])
    try:
        p = store.get_project("round-1")
        assert p.task_type == "conversation" and p.settings["models"] == [str((out / "sft" / "final").resolve())]
    finally:
        store.dispose()
    assert json.loads((out / "demo.json").read_text())["feedback_mode"] == "conversation"
