"""Process scorers: step aggregation by hand (an empty solution scores 0), a step function and a PRM behind the
scorer protocol, and load_scorer / build_scorer recognising a PRM folder or model."""
from __future__ import annotations

import math

import pytest
import torch

from alignloop.errors import ConfigError, UserError
from alignloop.models import build_prm
from alignloop.models.tiny import build_tiny_checkpoint, train_tokenizer
from alignloop.scoring import (
    FunctionScorer,
    ModelScorer,
    ProcessScorer,
    WeightedScorer,
    aggregate_step_scores,
    build_scorer,
    load_scorer,
)
from prm.test_model_prm import separator_marking_prm

ON = 1 / (1 + math.exp(-math.sqrt(31)))


@pytest.fixture(scope="module")
def tok():
    corpus = [f"{a} + {b} = {a + b}\nso the answer is {a + b}\n" for a in range(30) for b in range(10)]
    return train_tokenizer(corpus, vocab_size=300)


def test_aggregation_by_hand():
    scores = [[0.9, 0.5, 0.8], [], [0.6]]
    assert aggregate_step_scores(scores, "min") == pytest.approx([0.5, 0.0, 0.6])
    assert aggregate_step_scores(scores, "prod") == pytest.approx([0.36, 0.0, 0.6])
    assert aggregate_step_scores(scores, "last") == pytest.approx([0.8, 0.0, 0.6])
    assert aggregate_step_scores(scores, "mean") == pytest.approx([2.2 / 3, 0.0, 0.6])
    assert aggregate_step_scores([], "min") == []
    with pytest.raises(ConfigError, match="min, prod, last, mean"):
        aggregate_step_scores(scores, "max")


def count_steps(prompts, step_lists):
    """A rule-based step verifier: a step is good unless it says 'wrong'."""
    return [[0.0 if "wrong" in s else 1.0 for s in steps] for steps in step_lists]


def test_step_function_scorer():
    scorer = ProcessScorer(count_steps, aggregate="min")
    completions = ["a\nb\n", "a\nwrong\nc", "", "\n\n"]
    assert scorer.step_scores(["p"] * 4, completions) == [[1.0, 1.0], [1.0, 0.0, 1.0], [], []]
    assert scorer(["p"] * 4, completions).tolist() == [1.0, 0.0, 0.0, 0.0]      # an empty solution scores 0
    assert ProcessScorer(count_steps, aggregate="mean")(["p"], ["a\nwrong\nc"]).item() == pytest.approx(2 / 3)
    assert list(scorer.parts(["p"], ["a"])) == ["count_steps"] and scorer.weights == {"count_steps": 1.0}
    spec = ProcessScorer("prm.test_scoring_prm:count_steps", aggregate="last")
    assert spec.name == "count_steps" and spec(["p"], ["wrong\nok"]).item() == 1.0
    bad = ProcessScorer(lambda p, s: [[1.0]] * len(s))
    with pytest.raises(UserError, match="one score per step"):
        bad.step_scores(["p"], ["a\nb"])
    with pytest.raises(ConfigError, match="step aggregation"):
        ProcessScorer(count_steps, aggregate="max")


def test_prm_scorer_and_weighted_sum(tok):
    model = separator_marking_prm(tok)
    scorer = build_scorer(model, tok, step_aggregation="prod")
    assert isinstance(scorer, ProcessScorer) and scorer.separator == "\n"
    prompts, completions = ["2 + 3 =", "1 + 1 ="], ["2 + 3 = 5\nso the answer is 5\n", "1 + 1 = 2"]
    assert scorer.step_scores(prompts, completions) == [pytest.approx([ON, ON], abs=1e-5),
                                                        pytest.approx([ON], abs=1e-5)]
    assert scorer(prompts, completions).tolist() == pytest.approx([ON * ON, ON], abs=1e-5)
    both = WeightedScorer([(scorer, 0.5), (FunctionScorer(lambda p, c: [len(x) for x in c], "length"), 1.0)])
    assert both(prompts, completions).tolist() == pytest.approx([0.5 * ON * ON + 29, 0.5 * ON + 9], abs=1e-5)
    # steps past the context: not in step_scores, 0 in the aggregate
    short = ProcessScorer(model, tok, max_length=len(tok("2 + 3 =2 + 3 = 5\n")["input_ids"]), aggregate="min")
    assert len(short.step_scores(prompts[:1], completions[:1])[0]) == 1
    assert short(prompts[:1], completions[:1]).item() == 0.0
    with pytest.raises(ConfigError, match="needs its tokenizer"):
        ProcessScorer(model)


def test_load_scorer_recognises_a_prm_folder(tmp_path, tok):
    lm = build_tiny_checkpoint(tmp_path / "lm", tokenizer=tok, n_layer=1, n_embd=16, n_head=2, n_positions=64)
    prm = build_prm(lm, "ce")
    prm.save_pretrained(tmp_path / "prm" / "final")
    tok.save_pretrained(tmp_path / "prm" / "final")
    scorer = load_scorer(str(tmp_path / "prm" / "final"), step_aggregation="last")
    assert isinstance(scorer, ProcessScorer) and scorer.name == "prm" and scorer.aggregate == "last"
    (scores,) = scorer.step_scores(["1 + 1 ="], ["1 + 1 = 2\nso the answer is 2"])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    assert scorer(["1 + 1 ="], ["1 + 1 = 2\nso the answer is 2"]).item() == pytest.approx(scores[-1])
    # a reward model folder still loads as a reward model; the weighted form works with a PRM in it
    rm = build_tiny_checkpoint(tmp_path / "rm", tokenizer=tok, kind="reward", n_layer=1, n_embd=16, n_head=2,
                               n_positions=64)
    assert isinstance(load_scorer(str(rm)), ModelScorer)
    mixed = load_scorer([f"{tmp_path / 'prm' / 'final'}=2", str(rm)])
    assert isinstance(mixed, WeightedScorer) and mixed.weights["prm"] == 2.0
    assert mixed(["1 + 1 ="], ["1 + 1 = 2"]).shape == torch.Size([1])


def test_generate_best_of_n_with_a_prm_and_its_step_aggregation(tmp_path, tok, monkeypatch):
    """`alignloop generate --best-of N --reward-model PRM --step-aggregation HOW`: every candidate's score is the
    PRM's step scores aggregated HOW (min and last differ on a solution of several steps); a bad HOW is a clear
    error before any work."""
    import json

    from alignloop.cli import main

    lm = build_tiny_checkpoint(tmp_path / "lm", tokenizer=tok, n_layer=1, n_embd=16, n_head=2, n_positions=64)
    torch.manual_seed(0)
    prm = build_prm(lm, "bce")
    prm.save_pretrained(tmp_path / "prm")
    tok.save_pretrained(tmp_path / "prm")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1 + 1 ="}) + "\n")
    scorer = load_scorer(str(tmp_path / "prm"))
    built = []

    def recording(*args, **kwargs):
        built.append(load_scorer(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr("alignloop.recipes.best_of_n.load_scorer", recording)
    got = {}
    for how in ("min", "last"):
        out = tmp_path / f"{how}.jsonl"
        main(["generate", "--model", str(lm), "--prompts-file", str(tmp_path / "p.jsonl"), "--best-of", "3",
              "--reward-model", str(tmp_path / "prm"), "--step-aggregation", how, "--max-new-tokens", "12",
              "--output-file", str(out)])
        (row,) = [json.loads(x) for x in out.read_text().splitlines()]
        got[how] = row
        for cand in row["candidates"]:
            steps = scorer.step_scores(["1 + 1 ="], [cand["completion"]])[0]
            want = aggregate_step_scores([steps], how)[0]
            assert cand["score"] == pytest.approx(want, abs=1e-5)
    # the same samples (same seed), scored two ways; the scorer generate built aggregates as asked
    pairs = [(a["score"], b["score"]) for a, b in zip(got["min"]["candidates"], got["last"]["candidates"],
                                                       strict=True)]
    assert all(m <= last + 1e-6 for m, last in pairs)
    assert [s.aggregate for s in built] == ["min", "last"]
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(lm), "--prompts-file", str(tmp_path / "p.jsonl"), "--best-of", "3",
              "--reward-model", str(tmp_path / "prm"), "--step-aggregation", "maximum"])
    assert e.value.code == 2
