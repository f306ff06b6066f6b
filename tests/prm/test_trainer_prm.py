"""`alignloop prm`: the metrics by hand (first error, the steps that are trained), a PRM that learns a step marker
on a synthetic task (> 0.9 step accuracy) and scores through load_scorer, the outcome (ORM) view with 3 classes, and
the command line (YAML + flags; a bad data file exits 2 without a traceback)."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForTokenClassification

from alignloop.cli import main
from alignloop.errors import ConfigError
from alignloop.models import batch_steps, prm_info
from alignloop.models.tiny import build_tiny_checkpoint, train_tokenizer
from alignloop.scoring import ProcessScorer, load_scorer
from alignloop.trainers.prm import (
    PRMConfig,
    PRMTrainer,
    count_trained,
    first_error,
    first_error_hits,
    neutral_target,
    step_losses,
    trained_mask,
)

WORDS = "add the two numbers then carry one so we get a total of".split()


def solutions(n: int, seed: int) -> list[dict]:
    """1-4 steps of filler words; a step holding the marker "oops" is bad, and (as in PRM800K) the steps after the
    first bad one are left unlabelled."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        steps, labels = [], []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            bad = rng.random() < 0.4
            if bad:
                words.insert(rng.randrange(len(words) + 1), "oops")
            steps.append(" ".join(words))
            labels.append(None if -1 in labels else -1 if bad else 1)
        rows.append({"prompt": "solve:", "completions": steps, "labels": labels})
    return rows


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    tok = train_tokenizer([" ".join(r["completions"]) for r in solutions(300, 9)] + ["solve:\n"], vocab_size=200)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("prm") / "lm", tokenizer=tok, n_layer=2, n_embd=32,
                                 n_head=2, n_positions=128)


def quick(tmp_path, **kw) -> PRMConfig:
    return PRMConfig(**{"output_dir": str(tmp_path / "out"), "learning_rate": 1e-2, "num_epochs": 3,
                        "per_device_batch_size": 16, "max_length": 128, "progress": False, "tensorboard": False,
                        **kw})


# ------------------------------------------------------------------------------------------------ by hand
def test_first_error_by_hand():
    assert first_error([False, True, True]) == 1 and first_error([False, False]) is None and first_error([]) is None
    # two solutions, steps at positions 1, 2, 3 (labels +1, -1, None) and 1, 2 (labels +1, +1)
    examples = [{"input_ids": [5] * 4, "step_ends": [1, 2, 3], "labels": [1, -1, None], "soft_labels": [None] * 3},
                {"input_ids": [5] * 4, "step_ends": [1, 2], "labels": [1, 1], "soft_labels": [None, None]},
                {"input_ids": [5] * 4, "step_ends": [1], "labels": [None], "soft_labels": [None]}]
    b = batch_steps(examples, 0)
    probs = torch.zeros(3, 4)
    probs[0, [1, 2, 3]] = torch.tensor([0.9, 0.2, 0.9])   # first predicted error: step 1 = the labelled one
    probs[1, [1, 2]] = torch.tensor([0.9, 0.6])           # no error predicted, none labelled: right
    assert first_error_hits(probs, b) == (2, 2)           # the unlabelled solution is left out
    probs[0, 1] = 0.4                                     # now step 0 predicted bad: wrong
    probs[1, 2] = 0.3                                     # an error predicted where there is none: wrong
    assert first_error_hits(probs, b) == (0, 2)
    # the unlabelled step after the error is not read: predicting it bad changes nothing
    probs = torch.zeros(3, 4)
    probs[0, [1, 2, 3]] = torch.tensor([0.9, 0.2, 0.1])
    assert first_error_hits(probs, b)[0] >= 1


def test_which_steps_are_trained():
    e = {"labels": [1, 0, -1, None], "soft_labels": [None, None, None, 0.5]}
    assert count_trained(e, 1.0, False) == 3 and count_trained(e, None, False) == 2
    assert count_trained(e, None, True) == 3
    assert neutral_target("good") == 1.0 and neutral_target("bad") == 0.0 and neutral_target("ignore") is None
    assert neutral_target("0.25") == 0.25
    with pytest.raises(ConfigError, match="neutral: expected good, bad, ignore or a number in 0..1"):
        neutral_target("maybe")
    with pytest.raises(ConfigError, match="soft targets need loss bce"):
        PRMConfig(loss="ce", target="soft")
    # the losses of one solution: steps at 1 (+1), 2 (0), 3 (-1), 4 (unlabelled, soft 0.5); logits 0 everywhere
    b = batch_steps([{"input_ids": [5] * 6, "step_ends": [1, 2, 3, 4], **e}], 0)
    logits = torch.zeros(1, 6, 1)
    log2 = torch.log(torch.tensor(2.0)).item()
    assert step_losses(logits, b, "bce", 1.0, False)[0].tolist() == pytest.approx([0, log2, log2, log2, 0, 0])
    assert trained_mask(b, None, False)[0].tolist() == [False, True, False, True, False, False]
    assert trained_mask(b, None, True)[0].tolist() == [False, True, False, True, True, False]
    log3 = torch.log(torch.tensor(3.0)).item()
    assert step_losses(torch.zeros(1, 6, 3), b, "ce", 1.0, False)[0].tolist() == pytest.approx(
        [0, log3, log3, log3, 0, 0])
    soft = step_losses(torch.full((1, 6, 1), 2.0), b, "bce", 1.0, True)[0]
    # at position 4 the soft target 0.5: -(0.5 log σ(2) + 0.5 log σ(-2)) = 1 + log(1 + e^-2)... by formula:
    z = torch.tensor(2.0)
    assert soft[4].item() == pytest.approx(-(0.5 * torch.nn.functional.logsigmoid(z) +
                                             0.5 * torch.nn.functional.logsigmoid(-z)).item())


# ------------------------------------------------------------------------------------------------ learning
def test_prm_learns_a_step_marker(tmp_path, lm_dir):
    result = PRMTrainer(lm_dir, quick(tmp_path), solutions(300, 1), solutions(100, 2)).train()
    m = result.metrics
    assert m["eval/step_accuracy"] > 0.9 and m["eval/first_error_accuracy"] > 0.9, m
    assert m["eval/loss"] < 0.3, m     # log 2 = 0.69 at chance
    assert m["eval/solutions"] == 100 and any("loss/prm" in h for h in result.history)
    assert prm_info(result.output_dir) == {"loss": "bce", "separator": "\n", "aggregate": "min", "view": "process"}
    scorer = load_scorer(result.output_dir)
    assert isinstance(scorer, ProcessScorer) and scorer.aggregate == "min"
    good, bad = scorer.step_scores(["solve:"] * 2, ["add the two\nthen carry one\n", "add the two\nthen oops one\n"])
    assert min(good) > 0.5 and bad[0] > 0.5 and bad[1] < 0.5
    assert scorer(["solve:"] * 2, ["add the two\nthen carry one\n", "add the two\nthen oops one\n"]).tolist() == \
        pytest.approx([min(good), min(bad)], abs=1e-6)


def test_outcome_view_with_three_classes(tmp_path, lm_dir):
    """The ORM on the same rows: only the final step labelled (bad when any step is), 3-class cross-entropy, saved
    to be read at the last step."""
    result = PRMTrainer(lm_dir, quick(tmp_path, loss="ce", outcome=True, num_epochs=2), solutions(240, 1),
                        solutions(100, 2)).train()
    m = result.metrics
    assert m["eval/steps"] == 100 and m["eval/solutions"] == 100       # one graded step per solution
    assert m["eval/step_accuracy"] > 0.8, m
    assert prm_info(result.output_dir)["aggregate"] == "last"
    scorer = load_scorer(result.output_dir)
    assert scorer.aggregate == "last" and scorer.model.config.num_labels == 3


# ------------------------------------------------------------------------------------------------ CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "alignloop.cli", "prm", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_yaml_and_flags(tmp_path, lm_dir):
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in solutions(20, 3)))
    cfg = tmp_path / "prm.yaml"
    cfg.write_text(f"model: {lm_dir}\ntrain_file: {data}\nlearning_rate: 0.5\nmax_steps: 2\nloss: ce\n"
                   f"neutral: ignore\noutput_dir: {tmp_path / 'cli'}\nprogress: false\ntensorboard: false\n")
    out = _cli("--config", str(cfg), "--learning-rate", "0.001", "--per-device-batch-size", "4", "--eval-fraction",
               "0.25")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["steps"] == 2 and Path(report["model"]).is_dir() and "eval/first_error_accuracy" in report
    saved = (tmp_path / "cli" / "config.yaml").read_text()
    assert "learning_rate: 0.001" in saved and "loss: ce" in saved and "neutral: ignore" in saved


def test_cli_bad_data_file_exits_2(tmp_path, lm_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(solutions(1, 3)[0]) + "\n" +
                    json.dumps({"prompt": "p", "completions": ["a", "b"], "labels": [1, 3]}) + "\n")
    out = _cli("--model", str(lm_dir), "--train-file", str(data), "--output-dir", str(tmp_path / "o"))
    assert out.returncode == 2, out.stderr[-3000:]
    assert "bad.jsonl line 2, field 'labels[1]': expected +1 (good), 0 (neutral), -1 (bad)" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_bad_option_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prm", "--model", "m", "--train-file", "x.jsonl", "--neutral", "sometimes"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "neutral: expected good, bad, ignore" in err and "Traceback" not in err


def test_resume_gives_same_weights(tmp_path, lm_dir):
    """A run resumed from its step-3 checkpoint ends on the same weights as the run that was not interrupted (the
    optimizer moments, the schedule and the data position restored)."""
    common = dict(learning_rate=1e-3, max_steps=6, per_device_batch_size=8, save_steps=3, save_total_limit=None,
                  lr_scheduler="cosine", warmup_steps=1, max_length=128, progress=False, tensorboard=False, seed=1,
                  logging_steps=1)
    data = solutions(40, 5)
    full = PRMTrainer(lm_dir, PRMConfig(output_dir=str(tmp_path / "full"), **common), data).train()
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000003",
                    tmp_path / "resumed" / "checkpoints" / "step-000003")
    resumed = PRMTrainer(lm_dir, PRMConfig(output_dir=str(tmp_path / "resumed"), resume_from="latest", **common),
                         data).train()
    assert resumed.steps == full.steps == 6
    assert [h["step"] for h in resumed.history if "loss/prm" in h] == [4, 5, 6]   # it did start at step 3
    a = AutoModelForTokenClassification.from_pretrained(full.output_dir).state_dict()
    b = AutoModelForTokenClassification.from_pretrained(resumed.output_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_soft_targets_train(tmp_path, lm_dir):
    """Math-Shepherd rows (soft labels only: hard labels from them) train with target soft."""
    rows = [{"prompt": r["prompt"], "completions": r["completions"],
             "soft_labels": [None if v is None else (0.75 if v > 0 else 0.0) for v in r["labels"]]}
            for r in solutions(24, 6)]
    result = PRMTrainer(lm_dir, quick(tmp_path, target="soft", max_steps=2, eval_fraction=0.25), rows).train()
    assert result.steps == 2 and result.metrics["eval/steps"] > 0


TWO_PROC = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from prm.test_trainer_prm import solutions
from alignloop.trainers.prm import PRMConfig, PRMTrainer
args = PRMConfig(output_dir={out!r}, learning_rate=1e-3, max_steps=3, per_device_batch_size={per_device},
                 max_length=128, seed=1, progress=False, tensorboard=False, logging_steps=1, eval_fraction=0.25)
tr = PRMTrainer({lm!r}, args, solutions(40, 5))
res = tr.train()
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, lm_dir):
    """1 process x batch 8 == 2 processes (gloo on CPU) x batch 4: the loss is normalised by the trained steps of
    the whole global batch and the evaluation is gathered, so the weights and the logged losses and eval metrics
    agree."""
    import os

    tests = str(Path(__file__).resolve().parents[1])
    out = {}
    for name, nproc, per_device in (("one", 1, 8), ("two", 2, 4)):
        script = tmp_path / f"{name}.py"
        script.write_text(TWO_PROC.format(tests=tests, out=str(tmp_path / name), per_device=per_device,
                                          lm=str(lm_dir)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29540 + nproc), str(script)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    a = AutoModelForTokenClassification.from_pretrained(tmp_path / "one" / "final").state_dict()
    b = AutoModelForTokenClassification.from_pretrained(tmp_path / "two" / "final").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    losses = {n: [h["loss/prm"] for h in m if "loss/prm" in h] for n, m in out.items()}
    assert len(losses["one"]) == 3 and losses["one"] == pytest.approx(losses["two"], rel=1e-5)
    evals = {n: [h for h in m if "eval/step_accuracy" in h][-1] for n, m in out.items()}
    for k in ("eval/loss", "eval/step_accuracy", "eval/first_error_accuracy", "eval/steps", "eval/solutions"):
        assert evals["one"][k] == pytest.approx(evals["two"][k], rel=1e-5), k
