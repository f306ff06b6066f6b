"""People's demonstrations before SFT (the pipeline's `demonstrations:` section): the run stops with a demonstration
project of the training prompts; people write (here through the store calls the app makes); the same command again
trains SFT on exactly what they wrote, plus the sft section's own rows, and the run goes on."""
from __future__ import annotations

import json

import pytest

from alignloop.data import read_rows
from alignloop.demo import domain
from alignloop.models.tiny import build_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_demonstrations")
    corpus = [r["text"] for r in domain.pretraining_corpus(300)]
    build_tiny_checkpoint(root / "policy", corpus, vocab_size=400, n_layer=1, n_embd=32, n_head=2)
    train, held = domain.prompt_split(n_train=24, n_eval=4)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train))
    (root / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held))
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Review of film {i}:", "chosen": " A great film.",
                                         "rejected": " Bad."}) + "\n" for i in range(6)))
    return root


def config(tiny, tmp_path, **over) -> dict:
    sft = {"max_steps": 2, "per_device_batch_size": 4, "progress": False, "tensorboard": False,
           "train_rows": [{"prompt": "Review of the own row:", "completion": " An own row."}]}
    return {
        "output_dir": str(tmp_path / "run"), "policy": str(tiny / "policy"), "prompts": str(tiny / "prompts.jsonl"),
        "eval_prompts": str(tiny / "eval_prompts.jsonl"), "preferences": str(tiny / "prefs.jsonl"),
        "demonstrations": {"num_prompts": 3, "min_chars": 5, "edit": True},
        "feedback": {"max_new_tokens": 6},
        "sft": sft,
        "rm": {"max_steps": 1, "per_device_batch_size": 4, "progress": False, "tensorboard": False},
        "ppo": None, "dpo": None, "rejection_sampling": None,
        "eval": {"num_prompts": 2, "max_new_tokens": 4, "best_of_n": []},
        **over,
    }


def write_demonstrations(db: str, name: str = "ann") -> dict[str, str]:
    """A person writes a demonstration for every item of the demonstration project, through the store's submit
    (the app's path). Returns {prompt: text}."""
    from alignloop.feedback.store import Store

    store = Store(db)
    try:
        p = store.get_project("demonstrations")
        assert p.task_type == "demonstration"
        lab = store.add_labeler(name, "a long password")
        written = {}
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            view = store.item_view(a.item, a.shown_order)
            prompt = view["messages"][-1]["content"]
            text = f"My own review number {len(written)}: a fine film."
            store.submit(a.id, lab.id, {"text": text}, idempotency_key=f"demo-{name}-{a.id}")
            written[prompt] = text
        return written
    finally:
        store.dispose()


def test_demonstrations_stop_then_sft_trains_on_exactly_them(tiny, tmp_path):
    from alignloop.pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig.from_dict(config(tiny, tmp_path))
    run = tmp_path / "run"
    out = Pipeline(cfg, echo=lambda _: None).run_all()
    assert out == {"stopped": "human", "db": str(run / "feedback.db"), "project": "demonstrations",
                   "task": "demonstration"}
    assert not (run / "sft").exists()   # nothing trained before people wrote
    made = json.loads((run / "demonstrations" / "STAGE_DONE.json").read_text())
    assert made["items"] == 3 and made["prompts"] == 3
    # edit: one answer sampled from the starting policy per prompt (people improve it); empty samples: from scratch
    to_edit = read_rows(run / "demonstrations" / "prompts.jsonl")
    assert len(to_edit) == 3 and made["to_edit"] == sum("completion" in r for r in to_edit)

    written = write_demonstrations(out["db"])
    assert len(written) == 3 and set(written) == {r["prompt"] for r in to_edit}

    res = Pipeline(PipelineConfig.from_dict(config(tiny, tmp_path)), echo=lambda _: None).run_all()
    assert "stopped" not in res and res["sft"] == str(run / "sft" / "final")
    sft = json.loads((run / "sft" / "STAGE_DONE.json").read_text())
    assert (sft["demonstrations"], sft["train_rows"], sft["steps"]) == (3, 4, 2)
    rows = read_rows(run / "sft" / "train_rows.jsonl")
    # people's demonstrations first (plain text as the prompts are, joined by a space), then the section's own row
    assert {r["prompt"]: r["completion"] for r in rows[:3]} == {p: " " + t for p, t in written.items()}
    assert rows[3] == {"prompt": "Review of the own row:", "completion": " An own row."}
    assert (run / "sft" / "final" / "config.json").exists() and (run / "eval" / "results.json").exists()
    report = (run / "report.md").read_text()
    assert "SFT trained on 3 demonstrations people wrote" in report


def test_resume_without_demonstrations_says_to_write_them(tiny, tmp_path):
    import yaml
    from click.testing import CliRunner

    from alignloop.cli.pipeline import pipeline
    from alignloop.errors import UserError
    from alignloop.pipeline import Pipeline, PipelineConfig

    over = {"demonstrations": {"num_prompts": 2}, "sft": None}   # no sft section: SFT's defaults on the demos
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config(tiny, tmp_path, **over)))
    res = CliRunner().invoke(pipeline, [str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    out = json.loads([x for x in res.output.splitlines() if x.startswith('{"stopped"')][-1])
    assert out["stopped"] == "human" and out["project"] == "demonstrations" and out["task"] == "demonstration"
    assert "write the response the assistant should give" in res.output and f"alignloop pipeline {path}" in res.output
    with pytest.raises(UserError, match="no demonstrations yet.*Write demonstrations in the app"):
        Pipeline(PipelineConfig.from_dict(config(tiny, tmp_path, **over)), echo=lambda _: None).run_all()


@pytest.mark.parametrize(("section", "message"), [
    ({"review": "all"}, "demonstrations.review must be accepted or not_rejected"),
    ({"num_prompts": 0}, "demonstrations.num_prompts must be an integer >= 1"),
    ({"min_words": 3}, "demonstrations: unknown field"),
    # the app's bound, checked at load (review 17 F10: before, only at the demonstrations stage, after nothing ran
    # but a resumed run's earlier stages)
    ({"min_chars": 200000}, r"demonstrations\.min_chars: a whole number from 1 to 100000, got 200000"),
])
def test_demonstrations_section_is_checked(tiny, tmp_path, section, message):
    from alignloop.errors import ConfigError
    from alignloop.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=message):
        PipelineConfig.from_dict(config(tiny, tmp_path, demonstrations=section))


def test_an_sft_section_without_rows_is_fine_with_demonstrations(tiny, tmp_path):
    from alignloop.errors import ConfigError
    from alignloop.pipeline import PipelineConfig

    cfg = config(tiny, tmp_path, sft={"max_steps": 1})
    assert PipelineConfig.from_dict(cfg).demonstrations.num_prompts == 3
    with pytest.raises(ConfigError, match="sft.train_file is required"):
        PipelineConfig.from_dict({**cfg, "demonstrations": None})
