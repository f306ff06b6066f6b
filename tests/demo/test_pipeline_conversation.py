"""Conversation rounds (`feedback.mode: conversation`): the run stops with a conversation project served with the
round's policy; people converse (here a script drives the store functions the app calls: start, the generation's
result, the 8-point choice, the next message, the end with a rating); the same command again trains the reward model
on one pair per chosen turn (the strength's margin) and goes on to PPO, the evaluation and the report."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from alignloop.data import read_rows, strength_to_margin
from alignloop.demo import domain
from alignloop.models.tiny import build_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_conversation")
    corpus = [r["text"] for r in domain.pretraining_corpus(300)]
    build_tiny_checkpoint(root / "policy", corpus, vocab_size=400, n_layer=1, n_embd=32, n_head=2)
    train, held = domain.prompt_split(n_train=24, n_eval=4)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train))
    (root / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held))
    return root


def config(tiny, tmp_path, **over) -> dict:
    return {
        "output_dir": str(tmp_path / "run"), "policy": str(tiny / "policy"), "prompts": str(tiny / "prompts.jsonl"),
        "eval_prompts": str(tiny / "eval_prompts.jsonl"),
        "feedback": {"mode": "conversation", "labelers": "human", "num_prompts": 3, "max_turns": 3,
                     "max_new_tokens": 6, "overlap_k": 1},
        "sft": {"max_steps": 1, "per_device_batch_size": 4, "progress": False, "tensorboard": False,
                "train_rows": [{"prompt": f"Review of film {i}:", "completion": " A fine film."} for i in range(4)]},
        "rm": {"max_steps": 2, "per_device_batch_size": 2, "progress": False, "tensorboard": False},
        "ppo": {"total_updates": 1, "rollout_batch_size": 2, "max_new_tokens": 4, "num_ppo_epochs": 1,
                "progress": False, "tensorboard": False},
        "dpo": None, "rejection_sampling": None,
        "eval": {"num_prompts": 2, "max_new_tokens": 4, "best_of_n": []},
        **over,
    }


def write_config(tmp_path, cfg: dict) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _json(output: str) -> dict:
    line = [x for x in output.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def converse(db: str, project: str, plan: list[tuple[list[int], int]]) -> list[dict]:
    """A person converses through the store functions the app calls: per conversation of `plan` (its choices, its
    rating), each turn's two candidates stored as the generation worker would (`turn_generated`), the 8-point choice,
    the next message, and the end. The first turn's candidates come from the served model itself
    (`generate_candidates` with the project's settings), the others are distinct stand-in texts. Returns each chosen
    turn as {choice, chosen, rejected} in the order of the export."""
    from alignloop.feedback import conversations as conv
    from alignloop.feedback.generation import generate_candidates
    from alignloop.feedback.store import Store

    store = Store(db, seed=0)
    try:
        p = store.get_project(project)
        settings = p.settings
        lab = store.add_labeler("ann", "a long password")
        chosen = []
        for n, (choices, rating) in enumerate(plan):
            c = conv.start_conversation(store, p.id, lab.id)
            for idx, choice in enumerate(choices):
                turn = conv.get_turn(store, c.id, lab.id, idx)
                if n == 0 and idx == 0:
                    cands = generate_candidates(settings["models"], turn.context, settings["generation"], seed=0)
                    assert len(cands) == 2 and all(isinstance(x["text"], str) for x in cands)
                    if cands[0]["text"] == cands[1]["text"]:   # identical samples make no pair: keep the test exact
                        cands[1] = {**cands[1], "text": cands[1]["text"] + " (again)"}
                else:
                    cands = [{"text": f"reply {n}.{idx} first", "model": "m"},
                             {"text": f"reply {n}.{idx} second", "model": "m"}]
                assert conv.turn_generated(store, turn.id, cands, 5)
                rev = conv.conversation_state(store, c.id, lab.id)["revision"]
                t = conv.choose(store, c.id, lab.id, idx, choice, rev)
                chosen.append({"choice": choice, "chosen": cands[t.chosen]["text"],
                               "rejected": cands[1 - t.chosen]["text"], "context": turn.context})
                rev = conv.conversation_state(store, c.id, lab.id)["revision"]
                if idx + 1 < len(choices):
                    conv.add_message(store, c.id, lab.id, f"and what about the acting? ({n}.{idx})", rev)
            conv.end_conversation(store, c.id, lab.id, rating, "", rev)
        return chosen
    finally:
        store.dispose()


def test_conversation_round_stops_with_the_project_served_by_the_policy(tiny, tmp_path):
    from alignloop.cli.pipeline import pipeline
    from alignloop.data.chat import PLAIN_CHAT_TEMPLATE
    from alignloop.feedback.store import Store
    from alignloop.models import load_tokenizer

    res = CliRunner().invoke(pipeline, [write_config(tmp_path, config(tiny, tmp_path))], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    run = tmp_path / "run"
    stop = _json(res.output)
    assert stop == {"stopped": "human", "db": str(run / "feedback.db"), "project": "round-1", "task": "conversation"}
    assert "talk with the model" in res.output and "8-point scale" in res.output
    assert f"alignloop pipeline {tmp_path / 'pipeline.yaml'}" in res.output
    assert not (run / "round-1" / "label").exists() and not (run / "round-1" / "rm").exists()
    store = Store(stop["db"])
    try:
        p = store.get_project("round-1")
        assert p.task_type == "conversation" and p.overlap_k == 1
        # the round's policy (the SFT model, an absolute path) is what the app serves
        assert p.settings["models"] == [str((run / "sft" / "final").resolve())]
        assert p.settings["max_turns"] == 3 and p.settings["generation"]["max_new_tokens"] == 6
        openings = [r["prompt"] for r in read_rows(run / "round-1" / "sample" / "samples.jsonl")]
        assert len(openings) == 3 and len(store.current_judgements(p.id)) == 0
    finally:
        store.dispose()
    # the SFT model carries the plain chat template the app renders with (the policy had none)
    assert load_tokenizer(run / "sft" / "final").chat_template == PLAIN_CHAT_TEMPLATE
    # run again before anyone conversed: it stops again, nothing trained
    res = CliRunner().invoke(pipeline, [write_config(tmp_path, config(tiny, tmp_path))], catch_exceptions=False)
    assert res.exit_code == 0 and _json(res.output)["stopped"] == "human"
    assert not (run / "round-1" / "rm").exists()


def test_conversations_train_the_reward_model_and_the_run_reaches_the_report(tiny, tmp_path):
    from alignloop.feedback.models import SCALE_STRENGTHS
    from alignloop.pipeline import Pipeline, PipelineConfig

    cfg = config(tiny, tmp_path)
    out = Pipeline(PipelineConfig.from_dict(cfg), echo=lambda _: None).run_all()
    assert out["stopped"] == "human" and out["task"] == "conversation"
    plan = [([1, 8, 3], 6), ([6, 4], 3), ([5], 5)]   # several points of the scale; 3 + 2 + 1 chosen turns
    chosen = converse(out["db"], out["project"], plan)

    res = Pipeline(PipelineConfig.from_dict(cfg), echo=lambda _: None).run_all()
    run = tmp_path / "run"
    pairs = read_rows(run / "round-1" / "label" / "preferences.jsonl")
    assert len(pairs) == len(chosen) == 6
    for row, want in zip(pairs, chosen, strict=True):   # one pair per chosen turn, its strength the margin
        assert row["prompt"] == want["context"]
        assert row["chosen"] == [{"role": "assistant", "content": want["chosen"]}]
        assert row["rejected"] == [{"role": "assistant", "content": want["rejected"]}]
        assert row["strength"] == SCALE_STRENGTHS[want["choice"]]
        assert row["margin"] == strength_to_margin(SCALE_STRENGTHS[want["choice"]])
    rm = json.loads((run / "round-1" / "rm" / "STAGE_DONE.json").read_text())
    assert rm["pairs"] + rm["heldout_pairs"] == 6 and rm["steps"] == 2
    q = json.loads((run / "round-1" / "label" / "quality.json").read_text())
    assert (q["task_type"], q["pairs"], q["conversations"], q["ended"]) == ("conversation", 6, 3, 3)
    assert q["mean_rating"] == pytest.approx((6 + 3 + 5) / 3) and q["ratings"] == {"3": 1, "5": 1, "6": 1}
    # PPO and the evaluation sample from the prompts in the chat format the conversations were in
    assert set(res["policies"]) == {"SFT", "PPO"} and res["reward_model"].endswith("round-1/rm/final")
    samples = read_rows(run / "eval" / "samples_SFT.jsonl")
    assert samples and all(r["prompt"].startswith("User: ") and r["prompt"].endswith("Assistant:") for r in samples)
    report = (run / "report.md").read_text()
    assert "## Conversations" in report and "| 1 | 3 | 6 | 6 | 3 | 4.67 |" in report


@pytest.mark.parametrize(("feedback", "message"), [
    ({"mode": "conversation", "labelers": "simulated", "gold": "alignloop.demo.domain:gold_scores"},
     "feedback.mode conversation needs people"),
    ({"mode": "conversation", "labelers": "ai+human"}, "feedback.mode conversation needs people"),
    ({"mode": "chat", "labelers": "human"}, "feedback.mode must be pairs or conversation, got 'chat'"),
    ({"mode": "conversation", "labelers": "human", "task_type": "thumbs"}, "feedback.task_type must be pairwise"),
    ({"mode": "conversation", "labelers": "human", "max_turns": 0}, "feedback.max_turns must be 1..100"),
    # the app's generation settings, checked at load (review 17 F10: before, only after SFT had run)
    ({"mode": "conversation", "labelers": "human", "max_new_tokens": 5000},
     "feedback.max_new_tokens: a whole number from 1 to 4096, got 5000"),
    ({"mode": "conversation", "labelers": "human", "temperature": 9.0},
     "feedback.temperature: a number from 0 to 5, got 9.0"),
])
def test_feedback_mode_errors_are_clear(tiny, tmp_path, capsys, feedback, message):
    from alignloop.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pipeline", write_config(tmp_path, config(tiny, tmp_path, feedback=feedback))])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_human_flag_makes_people_the_labelers_of_a_conversation_file(tiny, tmp_path):
    from alignloop.pipeline import PipelineConfig

    path = write_config(tmp_path, config(tiny, tmp_path, feedback={"mode": "conversation"}))
    cfg = PipelineConfig.from_yaml(path, human=True)
    assert (cfg.feedback.mode, cfg.feedback.labelers, cfg.human_stop) == ("conversation", "human", True)


def test_the_example_file_reads():
    from pathlib import Path

    from alignloop.pipeline import PipelineConfig

    cfg = PipelineConfig.from_yaml(Path(__file__).parents[2] / "examples" / "pipeline_conversation.yaml")
    assert (cfg.feedback.mode, cfg.feedback.labelers, cfg.feedback.max_turns) == ("conversation", "human", 6)
    assert cfg.demonstrations.edit and cfg.demonstrations.num_prompts == 32 and cfg.sft["max_steps"] == 200


def test_the_reward_models_held_out_split_is_by_conversation(tiny, tmp_path, monkeypatch):
    """Review 17 F9: turn k's context contains turn k-1's, so a split by the whole context trained on a conversation's
    first turns and held out its later ones; in conversation mode all the turns of a conversation (its opening) fall
    on the same side of the split."""
    from alignloop.data import write_rows
    from alignloop.pipeline import PipelineConfig, stages

    seen = {}

    class FakeTrainer:
        def __init__(self, model, args, train_dataset, eval_dataset, tokenizer):
            seen["train"], seen["eval"] = train_dataset, eval_dataset

        def train(self):
            return type("R", (), {"output_dir": "rm", "steps": 0, "metrics": {}})()

    monkeypatch.setattr(stages, "RewardTrainer", FakeTrainer)
    rows = []
    for c in range(12):
        context = [{"role": "user", "content": f"opening {c}"}]
        for k in range(3):
            rows.append({"prompt": [dict(m) for m in context], "chosen": [{"role": "assistant", "content": f"yes {k}"}],
                         "rejected": [{"role": "assistant", "content": f"no {k}"}], "margin": 1.0,
                         "conversation": c})
            context += [{"role": "assistant", "content": f"yes {k}"}, {"role": "user", "content": f"more {k}"}]
    pref = write_rows(rows, tmp_path / "pref.jsonl")
    cfg = PipelineConfig.from_dict(config(tiny, tmp_path, rm={"eval_fraction": 0.25, "seed": 3}))
    (tmp_path / "rm").mkdir()
    res = stages.stage_rm(tmp_path / "rm", cfg, str(tiny / "policy"), [str(pref)])
    train = {r["conversation"] for r in seen["train"]}
    held = {r["conversation"] for r in seen["eval"]}
    assert train and held and not train & held, (train, held)
    assert len(held) == 3 and res["heldout_pairs"] == 9 and res["pairs"] == 27


def test_exported_conversation_sets_train_in_a_pairs_run_as_they_are(tiny, tmp_path):
    """The app's conversation exports given to a plain (pairs-mode) run as they are: `preferences` = conversational
    pairs (prompt = the messages so far, chosen / rejected = assistant messages, margin) and SFT rows = `messages`,
    with a policy whose tokenizer has no chat template: the run renders them in the app's plain template (before, the
    RM stage stopped: "the tokenizer has no chat template") and trains SFT on the 3 conversations and the RM on the
    6 pairs (5 train + 1 held out)."""
    from alignloop.data import write_rows
    from alignloop.pipeline import Pipeline, PipelineConfig

    talk = [{"role": "user", "content": "Tell me about a film."}]
    prefs = [{"prompt": talk + [{"role": "assistant", "content": f"It was fine {i}."},
                                {"role": "user", "content": "Why?"}][: 1 + 2 * (i % 2)] if i % 2 else talk,
              "chosen": [{"role": "assistant", "content": f"A warm, lovely film {i}."}],
              "rejected": [{"role": "assistant", "content": f"Dull {i}."}], "margin": 1 / 3} for i in range(6)]
    write_rows(prefs, tmp_path / "conv_prefs.jsonl")
    sft_rows = [{"messages": talk + [{"role": "assistant", "content": f"A fine film {i}."}]} for i in range(3)]
    cfg = config(tiny, tmp_path, preferences=str(tmp_path / "conv_prefs.jsonl"), ppo=None,
                 feedback={"num_prompts": 3, "overlap_k": 1})
    cfg["sft"]["train_rows"] = sft_rows
    cfg["rm"]["eval_fraction"] = 0.2
    res = Pipeline(PipelineConfig.from_dict(cfg), echo=lambda _: None).run_all()
    run = tmp_path / "run"
    sft = json.loads((run / "sft" / "STAGE_DONE.json").read_text())
    rm = json.loads((run / "round-1" / "rm" / "STAGE_DONE.json").read_text())
    assert sft["steps"] == 1 and rm["pairs"] + rm["heldout_pairs"] == 6
    assert res["reward_model"].endswith("round-1/rm/final")
