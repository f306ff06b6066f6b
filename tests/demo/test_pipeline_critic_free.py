"""The pipeline's `rloo:`, `grpo:` and `online_dpo:` sections: the online trainers without a critic as stages next to
PPO (from the SFT model, against the last round's reward model, the gold scorer only watched), evaluated as "RLOO",
"GRPO" and "Online DPO", in the report's table and on its reward–KL frontier, resumable."""
from __future__ import annotations

import json

import pytest
import yaml

from alignloop.demo import domain
from alignloop.models.tiny import build_tiny_checkpoint

GOLD = "alignloop.demo.domain:gold_scores"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_critic_free")
    corpus = [r["text"] for r in domain.pretraining_corpus(300)]
    build_tiny_checkpoint(root / "policy", corpus, vocab_size=400, n_layer=1, n_embd=32, n_head=2)
    train, held = domain.prompt_split(n_train=24, n_eval=4)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train))
    (root / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held))
    # existing preferences: round 1 trains the reward model on them (no collection: the test stays fast)
    (root / "prefs.jsonl").write_text("".join(
        json.dumps({"prompt": p, "chosen": " great fun . superb acting .", "rejected": " dull . awful ."}) + "\n"
        for p in train[:8]))
    return root


def _config(tiny, tmp_path, **over) -> dict:
    rl = {"total_updates": 2, "rollout_batch_size": 2, "num_generations": 2, "max_new_tokens": 6,
          "progress": False, "tensorboard": False, "sample_every": 0}
    return {
        "output_dir": str(tmp_path / "run"),
        "policy": str(tiny / "policy"),
        "prompts": str(tiny / "prompts.jsonl"),
        "eval_prompts": str(tiny / "eval_prompts.jsonl"),
        "preferences": str(tiny / "prefs.jsonl"),
        "rm": {"max_steps": 1, "per_device_batch_size": 4, "progress": False, "tensorboard": False},
        "ppo": {"total_updates": 1, "rollout_batch_size": 2, "max_new_tokens": 6, "num_ppo_epochs": 1,
                "progress": False, "tensorboard": False},
        "rloo": dict(rl),
        "grpo": {**rl, "learning_rate": 1e-4},
        "online_dpo": {k: v for k, v in rl.items() if k != "num_generations"},
        "dpo": None,
        "rejection_sampling": None,
        "eval": {"num_prompts": 4, "max_new_tokens": 6, "gold": GOLD, "best_of_n": [1, 2]},
        **over,
    }


def test_pipeline_config_takes_rloo_grpo_and_online_dpo_sections(tiny, tmp_path):
    """Off by default (existing pipelines unchanged); a section is a mapping of the trainer's config fields, checked
    by the stage as every trainer section is; RLOO's section builds an RLOOConfig (estimator rloo), GRPO's a
    GRPOConfig (estimator grpo), online DPO's an OnlineDPOConfig."""
    from alignloop.errors import ConfigError
    from alignloop.pipeline.config import PipelineConfig
    from alignloop.pipeline.stages import ONLINE, trainer_config

    plain = PipelineConfig.from_dict({"policy": "p", "prompts": ["a"]})
    assert plain.rloo is None and plain.grpo is None and plain.online_dpo is None
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(_config(tiny, tmp_path)))
    cfg = PipelineConfig.from_yaml(path)
    assert cfg.rloo["num_generations"] == 2 and cfg.grpo["learning_rate"] == 1e-4
    rloo = trainer_config(ONLINE["rloo"][0], cfg.rloo, output_dir="x")
    grpo = trainer_config(ONLINE["grpo"][0], cfg.grpo, output_dir="x")
    assert (rloo.estimator, rloo.kl_placement, rloo.aggregation) == ("rloo", "reward", "seq-mean-token-sum")
    assert (grpo.estimator, grpo.kl_placement, grpo.total_updates) == ("grpo", "loss", 2)
    odpo = trainer_config(ONLINE["online_dpo"][0], cfg.online_dpo, output_dir="x")
    assert (type(odpo).__name__, odpo.beta, odpo.total_updates) == ("OnlineDPOConfig", 0.1, 2)
    with pytest.raises(ConfigError, match="unknown field"):
        trainer_config(ONLINE["rloo"][0], {"num_generation": 4})
    with pytest.raises(ConfigError, match="rloo must be a mapping"):
        PipelineConfig.from_dict({"policy": "p", "prompts": ["a"], "rloo": 3})
    # the demo turns both on
    from alignloop.demo.demo import DemoSize, demo_config

    demo = demo_config(tmp_path / "demo", DemoSize.quick())
    assert demo.rloo["num_generations"] == 4 and demo.grpo["total_updates"] == DemoSize.quick().rl_updates
    assert demo.online_dpo is not None


def test_pipeline_trains_and_reports_rloo_grpo_and_online_dpo(tiny, tmp_path, monkeypatch):
    """The three stages run from the SFT model against round 1's reward model, are evaluated and reported (table rows,
    frontier points and training curves, stage times), and a second run skips them."""
    import matplotlib.axes

    from alignloop.pipeline.config import PipelineConfig
    from alignloop.pipeline.runner import Pipeline

    drawn: list[str] = []   # the labels of the frontier's points and curves
    for method in ("errorbar", "plot"):
        orig = getattr(matplotlib.axes.Axes, method)

        def spy(self, *a, _orig=orig, **k):
            drawn.append(k.get("label") or "")
            return _orig(self, *a, **k)

        monkeypatch.setattr(matplotlib.axes.Axes, method, spy)

    cfg = PipelineConfig.from_dict(_config(tiny, tmp_path))
    log: list[str] = []
    out = Pipeline(cfg, echo=log.append).run_all()
    run = tmp_path / "run"
    assert list(out["policies"]) == ["SFT", "PPO", "RLOO", "GRPO", "Online DPO"]
    for name, estimator in (("rloo", "rloo"), ("grpo", "grpo"), ("online_dpo", "online_dpo")):
        info = json.loads((run / name / "STAGE_DONE.json").read_text())
        assert info["estimator"] == estimator and info["updates"] == 2 and info["model"].endswith(f"{name}/final")
        assert (run / name / "final" / "config.json").exists()
        m = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
        # against the reward model, the gold scorer watched, KL to the SFT model (which they start from: 0 at first)
        assert {"reward/raw_mean", "reward/gold_mean", "objective/kl"} <= set(m[0])
        assert m[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {"RLOO", "GRPO", "Online DPO"} <= set(results["summary"])
    assert results["policies"]["RLOO"].endswith("rloo/final")
    assert results["policies"]["Online DPO"].endswith("online_dpo/final")
    for name in ("RLOO", "GRPO", "Online DPO"):
        assert {"gold/mean", "gold/win_rate", "rm/mean", "kl", "length"} <= set(results["summary"][name])

    md = (run / "report.md").read_text()
    for row in ("| RLOO |", "| GRPO |", "| Online DPO |", "| rloo |", "| grpo |", "| online_dpo |"):
        assert row in md, row   # the results table's rows, the stage times
    assert "plots/critic_free_training.png" in md and "plots/frontier.png" in md
    assert (run / "plots" / "critic_free_training.png").stat().st_size > 10_000
    for name in ("PPO", "RLOO", "GRPO", "Online DPO"):   # each a point on the frontier, with its training curve
        assert f"{name} (held-out prompts)" in drawn, (name, drawn)
        assert any(x.startswith(f"{name} during training") for x in drawn), (name, drawn)
    times = json.loads((run / "stages.json").read_text())
    assert {"rloo", "grpo", "online_dpo"} <= set(times)

    # resume: the finished stages are skipped
    log.clear()
    Pipeline(cfg, echo=log.append).run_all()
    for stage in ("rloo", "grpo", "online_dpo"):
        assert f"[{stage}] done already" in " ".join(log), stage
