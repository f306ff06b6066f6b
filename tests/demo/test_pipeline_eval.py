"""`alignloop eval` and `alignloop pipeline` on tiny random local models (no downloads): outputs, errors, resume."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from alignloop.demo import domain
from alignloop.models.tiny import build_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    corpus = [r["text"] for r in domain.pretraining_corpus(300)]
    build_tiny_checkpoint(root / "policy", corpus, vocab_size=400, n_layer=1, n_embd=32, n_head=2)
    build_tiny_checkpoint(root / "other", corpus, vocab_size=400, n_layer=1, n_embd=32, n_head=2, seed=1)
    build_tiny_checkpoint(root / "rm", corpus, kind="reward", vocab_size=400, n_layer=1, n_embd=32, n_head=2)
    train, held = domain.prompt_split(n_train=40, n_eval=8)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train))
    (root / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held))
    return root


def _invoke(cmd, args):
    res = CliRunner().invoke(cmd, args, catch_exceptions=False)
    return res


def _json(output: str) -> dict:
    line = [x for x in output.splitlines() if '{"' in x][-1]      # progress bars may share the line
    return json.loads(line[line.index('{"'):])


def test_eval_policy_against_itself_and_another(tiny, tmp_path):
    from alignloop.cli.evaluate import eval_cmd

    out = tmp_path / "samples.jsonl"
    res = _invoke(eval_cmd, ["--policy", str(tiny / "policy"), "--reference", str(tiny / "policy"),
                             "--prompts", str(tiny / "eval_prompts.jsonl"), "--reward-model", str(tiny / "rm"),
                             "--gold", "alignloop.demo.domain:gold_scores", "--max-new-tokens", "8", "-n", "2",
                             "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = _json(res.output)
    assert s["n"] == 16
    # KL of a policy to itself on its own samples is exactly 0 (same model, same tokens)
    assert s["kl"] == pytest.approx(0.0, abs=1e-5)
    for k in ("gold/mean", "gold/win_rate", "rm/mean", "rm/win_rate", "length", "reference/gold/mean"):
        assert k in s
    assert 0.0 <= s["gold/win_rate"] <= 1.0 and 1 <= s["length"] <= 8
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 16 and {"response", "reference_response", "gold", "rm", "kl"} <= set(rows[0])
    assert json.loads(out.with_suffix(".json").read_text())["n"] == 16

    res = _invoke(eval_cmd, ["--policy", str(tiny / "other"), "--reference", str(tiny / "policy"),
                             "--prompts", str(tiny / "eval_prompts.jsonl"), "--gold",
                             "alignloop.demo.domain:gold_scores", "--max-new-tokens", "8", "--max-prompts", "4"])
    s = _json(res.output)
    assert s["n"] == 4 and s["kl"] > 0.1 and "rm/mean" not in s    # a different random model is far away


def test_eval_errors_are_user_errors(tiny):
    from alignloop.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--policy", str(tiny / "policy"), "--reference", str(tiny / "policy"), "--prompts",
              str(tiny / "eval_prompts.jsonl")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["eval", "--policy", str(tiny / "policy"), "--reference", str(tiny / "policy"), "--prompts",
              str(tiny / "eval_prompts.jsonl"), "--gold", "no_such_module_xyz:f"])
    assert e.value.code == 2


def _pipeline_yaml(tiny, tmp_path) -> str:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "policy": str(tiny / "policy"),
        "prompts": str(tiny / "prompts.jsonl"),
        "eval_prompts": str(tiny / "eval_prompts.jsonl"),
        "feedback": {"num_prompts": 8, "completions_per_prompt": 3, "max_new_tokens": 8, "labelers": "simulated",
                     "gold": "alignloop.demo.domain:gold_scores", "n_careful": 3,
                     # random tiny models write gibberish the gold scorer mostly ties on: judges agree by chance
                     "thresholds": {"min_agreement": 0.0}},
        "rm": {"max_steps": 3, "per_device_batch_size": 4, "progress": False, "tensorboard": False,
               "learning_rate": 1e-3},
        "ppo": {"total_updates": 2, "rollout_batch_size": 4, "max_new_tokens": 8, "num_ppo_epochs": 1,
                "progress_bar": False, "tensorboard": False},
        "dpo": None,
        "rejection_sampling": None,
        "eval": {"num_prompts": 4, "max_new_tokens": 8, "gold": "alignloop.demo.domain:gold_scores",
                 "best_of_n": [1, 2]},
        "rounds": 2,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_pipeline_runs_rounds_and_resumes(tiny, tmp_path):
    from alignloop.cli.pipeline import pipeline

    config = _pipeline_yaml(tiny, tmp_path)
    res = _invoke(pipeline, [config])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    out = _json(res.output)
    assert out["reward_model"].endswith("round-2/rm/final") and out["policies"]["PPO"].endswith("round-2/ppo/final")
    for stage in ("round-1/sample", "round-1/label", "round-1/rm", "round-1/ppo", "round-2/sample", "round-2/label",
                  "round-2/rm", "round-2/ppo", "eval"):
        assert (run / stage / "STAGE_DONE.json").exists(), stage
    times = json.loads((run / "stages.json").read_text())
    assert set(times) >= {"round-1/rm", "round-2/ppo", "eval"} and all(v >= 0 for v in times.values())
    # round 2 samples from round 1's PPO policy; its reward model trains on both rounds' preferences
    r2 = json.loads((run / "round-2" / "sample" / "STAGE_DONE.json").read_text())
    assert r2["policy"].endswith("round-1/ppo/final")
    rm1 = json.loads((run / "round-1" / "rm" / "STAGE_DONE.json").read_text())["pairs"]
    rm2 = json.loads((run / "round-2" / "rm" / "STAGE_DONE.json").read_text())["pairs"]
    assert rm2 > rm1
    assert (run / "report.md").exists() and (run / "report.html").exists()
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["summary"]) == {"SFT", "best-of-2", "PPO"}

    # resume: everything finished is skipped
    mtime = (run / "round-2" / "ppo" / "STAGE_DONE.json").stat().st_mtime
    res = _invoke(pipeline, [config])
    assert res.exit_code == 0
    assert res.output.count("skipped") == 9
    assert (run / "round-2" / "ppo" / "STAGE_DONE.json").stat().st_mtime == mtime

    # an interrupted stage (no marker) and the ones after it run again; the earlier ones do not
    (run / "round-2" / "ppo" / "STAGE_DONE.json").unlink()
    (run / "eval" / "STAGE_DONE.json").unlink()
    res = _invoke(pipeline, [config])
    assert res.exit_code == 0
    assert "[round-2/ppo] finished" in res.output and "[eval] finished" in res.output
    assert "[round-2/rm] done already" in res.output


def test_pipeline_config_errors(tmp_path):
    from alignloop.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"policy": "x", "prompts": ["a"], "bogus": 1}))
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(bad)])
    assert e.value.code == 2
    bad.write_text(yaml.safe_dump({"prompts": ["a"]}))
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(bad)])
    assert e.value.code == 2


def test_pipeline_human_labeling_stops_then_resumes(tiny, tmp_path, label_like_people):
    """labelers: human -> the run stops after sampling; people label in the app (here: through the same store
    calls the app makes); running the command again trains on their judgements."""
    from alignloop.cli.pipeline import pipeline

    with open(_pipeline_yaml(tiny, tmp_path)) as f:
        cfg = yaml.safe_load(f)
    cfg.update(rounds=1, ppo=None)
    cfg["feedback"].update(labelers="human", thresholds={"min_median_seconds": 0})
    cfg["eval"]["best_of_n"] = [1]
    config = tmp_path / "human.yaml"
    config.write_text(yaml.safe_dump(cfg))
    res = _invoke(pipeline, [str(config)])
    assert res.exit_code == 0
    stop = _json(res.output)
    assert stop["stopped"] == "human" and stop["project"] == "round-1"
    run = tmp_path / "run"
    assert (run / "round-1" / "sample" / "STAGE_DONE.json").exists()
    assert not (run / "round-1" / "label").exists()

    assert label_like_people(stop["db"], "round-1") > 0

    res = _invoke(pipeline, [str(config)])
    assert res.exit_code == 0, res.output[-2000:]
    q = json.loads((run / "round-1" / "label" / "quality.json").read_text())
    assert q["per_labeler"] is None and set(q["stats"]) == {"ann", "bob"} and q["judgements"] > 0
    assert q["flagged"] == [] and q["pairwise_percent_agreement"] == 1.0
    assert (run / "round-1" / "rm" / "final").exists() and (run / "report.md").exists()


def test_eval_for_people_imports_pairs_into_the_app(tiny, tmp_path):
    from alignloop.cli.evaluate import eval_cmd
    from alignloop.feedback.store import Store

    db = tmp_path / "eval.db"
    res = _invoke(eval_cmd, ["--policy", str(tiny / "other"), "--reference", str(tiny / "policy"),
                             "--prompts", str(tiny / "eval_prompts.jsonl"), "--max-new-tokens", "6",
                             "--max-prompts", "3", "--human-db", str(db)])
    assert res.exit_code == 0, res.output
    s = _json(res.output)
    assert s["human"]["project"] == "eval" and 1 <= s["human"]["items"] <= 3
    store = Store(str(db))
    p = store.get_project("eval")
    assert store.project_summary(p.id)["items"] == s["human"]["items"]
    # a person who always prefers the policy's completion -> win rate 1
    lab = store.add_labeler("ann", "a long password")
    while (a := store.next_assignment(p.id, lab.id)) is not None:
        shown = [a.item.completion_ids[i] for i in a.shown_order]
        _, comps = store.prompts_and_completions(p.id)
        left_is_policy = comps[shown[0]].params["eval_role"] == "policy"
        store.submit(a.id, lab.id, {"choice": "left" if left_is_policy else "right", "strength": "better"},
                     idempotency_key=f"key-ann-{a.id:06d}")
    store.dispose()
    res = _invoke(eval_cmd, ["--tally", "--human-db", str(db)])
    t = _json(res.output)
    assert t["people/win_rate"] == 1.0 and t["people/judgements"] == s["human"]["items"] and t["people/labelers"] == 1


def test_pipeline_reads_the_users_preferences_strictly(tiny, tmp_path, capsys):
    """`preferences:` is the user's file: a missing file or a bad line stops the run naming it (nothing skipped)."""
    from alignloop.cli import main

    with open(_pipeline_yaml(tiny, tmp_path)) as f:
        cfg = yaml.safe_load(f)
    bad = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops\n'
    for name, text, says in (("missing.jsonl", None, "missing.jsonl: no such file"),
                             ("bad.jsonl", bad, "bad.jsonl line 2: invalid JSON")):
        if text is not None:
            (tmp_path / name).write_text(text)
        cfg.update(preferences=str(tmp_path / name), rounds=1, ppo=None, output_dir=str(tmp_path / f"run-{name}"))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(SystemExit) as e:
            main(["pipeline", str(path)])
        assert e.value.code == 2 and says in capsys.readouterr().err
