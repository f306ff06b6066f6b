"""The pipeline with AI feedback on tiny random local models: the AI labeler judges each round beside the people
(kind "ai"), its labels train the loop (labelers: ai, ai+simulated) or the RL-CAI arm, SL-CAI fine-tunes on the
model's own revisions, and the evaluation and report carry the AI figures."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from alignloop.data import read_rows
from alignloop.demo import domain
from alignloop.errors import ConfigError
from alignloop.feedback.store import Store
from alignloop.models.tiny import build_tiny_checkpoint
from alignloop.pipeline import PipelineConfig

GOLD = "alignloop.demo.domain:gold_scores"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    corpus = [r["text"] for r in domain.pretraining_corpus(300)]
    build_tiny_checkpoint(root / "policy", corpus, vocab_size=400, n_layer=1, n_embd=32, n_head=2, n_positions=256)
    train, held = domain.prompt_split(n_train=40, n_eval=8)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train))
    (root / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held))
    return root


def _config(tiny, tmp_path, labelers: str, ai: dict | None) -> dict:
    return {
        "output_dir": str(tmp_path / "run"), "policy": str(tiny / "policy"),
        "prompts": str(tiny / "prompts.jsonl"), "eval_prompts": str(tiny / "eval_prompts.jsonl"),
        "feedback": {"num_prompts": 6, "completions_per_prompt": 3, "max_new_tokens": 8, "labelers": labelers,
                     "gold": GOLD, "n_careful": 3, "thresholds": {"min_agreement": 0.0}},
        "ai_feedback": ai,
        "rm": {"max_steps": 3, "per_device_batch_size": 4, "progress": False, "tensorboard": False,
               "learning_rate": 1e-3},
        "ppo": {"total_updates": 2, "rollout_batch_size": 4, "max_new_tokens": 8, "num_ppo_epochs": 1,
                "progress": False, "tensorboard": False},
        "dpo": None, "rejection_sampling": None,
        "eval": {"num_prompts": 4, "max_new_tokens": 8, "gold": GOLD, "best_of_n": [1, 2]},
    }


def _run(cfg: dict, tmp_path) -> dict:
    from alignloop.cli.pipeline import pipeline

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(pipeline, [str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    line = [x for x in res.output.splitlines() if '{"' in x][-1]
    return json.loads(line[line.index('{"'):])


def _records(run):
    store = Store(str(run / "feedback.db"), create=False)
    try:
        return store.current_judgements(store.get_project("round-1").id)
    finally:
        store.dispose()


def test_ai_beside_simulated_people_with_sl_cai_and_rl_cai(tiny, tmp_path):
    ai = {"cai": {"rounds": 1, "max_prompts": 4, "max_new_tokens": 8, "critique_max_new_tokens": 6,
                  "revision_max_new_tokens": 8, "sft_args": {"max_steps": 2, "per_device_batch_size": 2,
                                                             "progress": False, "tensorboard": False}},
          "rl": "ppo", "batch_size": 4}
    out = _run(_config(tiny, tmp_path, "simulated", ai), tmp_path)
    run = tmp_path / "run"
    for stage in ("round-1/judge", "round-1/label", "sl_cai", "rl_cai/rm", "rl_cai/policy", "eval"):
        assert (run / stage / "STAGE_DONE.json").exists(), stage
    records = _records(run)
    ai_recs = [r for r in records if r["labeler_kind"] == "ai"]
    people = [r for r in records if r["labeler_kind"] == "human"]
    judged = json.loads((run / "round-1" / "judge" / "STAGE_DONE.json").read_text())
    assert len(ai_recs) == judged["items"] == judged["pairs"] > 0 and people
    assert ai_recs[0]["labeler"] == judged["labeler"] and ai_recs[0]["labeler_model"] == str(tiny / "policy")
    assert all(len(r["details"]["p_orders"]) == 2 for r in ai_recs)
    # the loop trains on people only (labelers: simulated); the AI's pairs alone go to RL-CAI
    q = json.loads((run / "round-1" / "label" / "quality.json").read_text())
    assert q["labelers_trained_on"] == "human" and judged["labeler"] not in q["stats"]
    prefs, ai_prefs = read_rows(run / "round-1/label/preferences.jsonl"), read_rows(q["preferences_ai"])
    decisive = sum(r["choice"] in ("a", "b") for r in ai_recs)
    assert len(ai_prefs) > 0 and len(ai_prefs) == decisive
    rm_ai = json.loads((run / "rl_cai/rm/STAGE_DONE.json").read_text())
    assert rm_ai["pairs"] + rm_ai["heldout_pairs"] == len(ai_prefs) and len(prefs) != len(ai_prefs)
    # the AI labeler measured against people and gold
    stats = q["ai"]["people"]["ai"][judged["labeler"]]
    assert stats["n"] == len(ai_recs) and 0.0 <= stats["human_agreement"] <= 1.0
    by_order = q["ai"]["by_order"][judged["labeler"]]
    assert 0 < by_order["people/pairs"] <= len(ai_recs) and 0.0 <= by_order["people/single_order"] <= 1.0
    assert by_order.get("gold/pairs", 0) <= len(ai_recs)         # gibberish: the gold scorer ties on many pairs
    # SL-CAI and RL-CAI evaluated, with AI-judged win rates for every policy
    assert out["policies"]["SL-CAI"].endswith("sl_cai/sft/final") and out["policies"]["RL-CAI"].endswith(
        "rl_cai/policy/final")
    summary = json.loads((run / "eval" / "results.json").read_text())["summary"]
    assert {"SFT", "PPO", "SL-CAI", "RL-CAI"} <= set(summary)
    assert all(0.0 <= s["ai/win_rate"] <= 1.0 and s["ai/pairs"] == 4 for s in summary.values())
    chains = read_rows(run / "sl_cai" / "chains.jsonl")
    assert len(chains) == 4 and all(len(c["chain"]) == 1 for c in chains)
    report = (run / "report.md").read_text()
    assert "## AI feedback (round 1)" in report and "Critique → revision" in report and "| RL-CAI |" in report


def test_ai_labels_alone_train_the_loop(tiny, tmp_path):
    _run(_config(tiny, tmp_path, "ai", None) | {"ppo": None}, tmp_path)
    run = tmp_path / "run"
    records = _records(run)
    assert records and all(r["labeler_kind"] == "ai" for r in records)     # no simulated labeler ran
    q = json.loads((run / "round-1" / "label" / "quality.json").read_text())
    assert q["labelers_trained_on"] == "ai"
    decisive = sum(r["choice"] in ("a", "b") for r in records)
    assert len(read_rows(run / "round-1/label/preferences.jsonl")) == decisive
    assert (run / "round-1" / "rm" / "final").exists()


def test_ai_and_people_stop_for_people_after_the_ai_judged(tiny, tmp_path):
    cfg = _config(tiny, tmp_path, "ai+human", None) | {"ppo": None}
    out = _run(cfg, tmp_path)
    assert out["stopped"] == "human"          # the AI's judgements do not count as people's
    run = tmp_path / "run"
    assert (run / "round-1" / "judge" / "STAGE_DONE.json").exists()
    assert not (run / "round-1" / "label").exists()


@pytest.mark.parametrize("change, message", [
    ({"feedback": {"labelers": "robots"}}, "feedback.labelers must be one of"),
    ({"ai_feedback": {"rl": "dpo"}}, "ai_feedback.rl must be ppo, rloo, grpo or null"),
    ({"ai_feedback": {"rl": "ppo", "rl_from": "sl_cai"}}, "rl_from sl_cai needs an ai_feedback.cai section"),
    ({"ai_feedback": {"principles": "some"}}, "ai_feedback.principles must be sample or all"),
    ({"ai_feedback": {"judges": "x"}}, "ai_feedback: unknown field(s) judges"),
    ({"feedback": {"labelers": "ai", "task_type": "thumbs"}}, "the AI labeler judges pairs"),
])
def test_config_errors(change, message):
    d = {"policy": "p", "prompts": ["a"]}
    d.update(change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PipelineConfig.from_dict(d)


def test_eval_judge_gives_an_ai_win_rate(tiny):
    from alignloop.cli.evaluate import eval_cmd

    res = CliRunner().invoke(eval_cmd, ["--policy", str(tiny / "policy"), "--reference", str(tiny / "policy"),
                                        "--prompts", str(tiny / "eval_prompts.jsonl"), "--judge", str(tiny / "policy"),
                                        "--max-new-tokens", "8", "--max-prompts", "4"], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-2000:]
    line = [x for x in res.output.splitlines() if '{"' in x][-1]
    s = json.loads(line[line.index('{"'):])
    assert s["ai/pairs"] == 4 and 0.0 <= s["ai/win_rate"] <= 1.0 and s["ai/judge"] == str(tiny / "policy")
    assert "gold/mean" not in s                                     # the AI judge alone is enough
