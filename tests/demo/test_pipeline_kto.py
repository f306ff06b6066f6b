"""The pipeline on thumbs feedback: a thumbs project per round, simulated thumbs, the unpaired export, a KTO stage
(no reward model, PPO, DPO or rejection sampling: they need pairs); and a `kto` section in a pairwise run."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from alignloop.demo import domain
from alignloop.models.tiny import build_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_kto")
    corpus = [r["text"] for r in domain.pretraining_corpus(300)]
    build_tiny_checkpoint(root / "policy", corpus, vocab_size=400, n_layer=1, n_embd=32, n_head=2)
    train, held = domain.prompt_split(n_train=24, n_eval=4)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train))
    (root / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held))
    return root


def _config(tiny, tmp_path, **over) -> str:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "policy": str(tiny / "policy"),
        "prompts": str(tiny / "prompts.jsonl"),
        "eval_prompts": str(tiny / "eval_prompts.jsonl"),
        "feedback": {"task_type": "thumbs", "num_prompts": 6, "completions_per_prompt": 2, "max_new_tokens": 8,
                     "gold": "alignloop.demo.domain:gold_scores", "n_careful": 3,
                     "thresholds": {"min_agreement": 0.0}},
        "kto": {"max_steps": 2, "per_device_batch_size": 4, "progress": False, "tensorboard": False,
                "learning_rate": 1e-3},
        "eval": {"num_prompts": 2, "max_new_tokens": 6, "gold": "alignloop.demo.domain:gold_scores",
                 "best_of_n": []},
        "rounds": 1,
        **over,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _json(output: str) -> dict:
    line = [x for x in output.splitlines() if '{"' in x][-1]
    return json.loads(line[line.index('{"'):])


def test_thumbs_pipeline_trains_kto_on_the_thumbs(tiny, tmp_path):
    from alignloop.cli.pipeline import pipeline
    from alignloop.data import load_unpaired
    from alignloop.feedback.store import Store

    res = CliRunner().invoke(pipeline, [_config(tiny, tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    run = tmp_path / "run"
    out = _json(res.output)
    assert set(out["policies"]) == {"SFT", "KTO"} and out["reward_model"] is None
    assert out["policies"]["KTO"].endswith("kto/final") and (run / "kto" / "final" / "config.json").exists()
    assert not (run / "round-1" / "rm").exists() and not (run / "dpo").exists()
    # the round's project is a thumbs project: one item per completion, judged up or down by the simulated judges
    store = Store(str(run / "feedback.db"))
    try:
        p = store.get_project("round-1")
        assert p.task_type == "thumbs"
        judged = store.current_judgements(p.id)
        assert judged and {r["thumbs"] for r in judged} <= {1, -1} and all(len(r["completion_ids"]) == 1
                                                                             for r in judged)
    finally:
        store.dispose()
    # the export is unpaired rows, every one read back; KTO trained on exactly them
    rows, stats = load_unpaired(str(run / "round-1" / "label" / "preferences.jsonl"))
    assert stats.kind == "unpaired" and rows and {r["label"] for r in rows} <= {True, False}
    q = json.loads((run / "round-1" / "label" / "quality.json").read_text())
    assert q["task_type"] == "thumbs" and q["thumbs_threshold"] is not None and set(q["gold_agreement"]) >= {"judge1"}
    kto = json.loads((run / "kto" / "STAGE_DONE.json").read_text())
    assert kto["desirable"] + kto["undesirable"] == len(rows) and kto["steps"] == 2 and "loss/kto" in kto
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["summary"]) == {"SFT", "KTO"}
    assert (run / "report.md").exists()


def test_kto_section_in_a_pairwise_run_trains_on_the_preferences_unpaired(tiny, tmp_path):
    """`preferences:` pairs and a `kto` section: KTO on them unpaired (chosen up, rejected down)."""
    from alignloop.pipeline.config import PipelineConfig
    from alignloop.pipeline.runner import Pipeline
    from alignloop.pipeline.stages import unpaired_rows

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": " good", "rejected": " bad"}) + "\n"
                             for i in range(4)))
    rows = unpaired_rows([str(prefs)])
    assert [r["label"] for r in rows] == [True, False] * 4 and rows[1]["completion"] == " bad"
    with open(_config(tiny, tmp_path, preferences=str(prefs), ppo=None, dpo=None, rejection_sampling=None)) as f:
        cfg = yaml.safe_load(f)
    cfg["feedback"]["task_type"] = "pairwise"
    cfg["rm"] = {"max_steps": 1, "per_device_batch_size": 4, "progress": False, "tensorboard": False}
    out = Pipeline(PipelineConfig.from_dict(cfg), echo=lambda _: None).run_all()
    assert set(out["policies"]) == {"SFT", "KTO"}
    kto = json.loads((tmp_path / "run" / "kto" / "STAGE_DONE.json").read_text())
    assert (kto["desirable"], kto["undesirable"]) == (4, 4)


def test_task_type_is_checked(tiny, tmp_path):
    from alignloop.errors import ConfigError
    from alignloop.pipeline.config import PipelineConfig

    with open(_config(tiny, tmp_path)) as f:
        cfg = yaml.safe_load(f)
    cfg["feedback"]["task_type"] = "likert"
    with pytest.raises(ConfigError, match="task_type must be pairwise or thumbs"):
        PipelineConfig.from_dict(cfg)
