"""Math-Shepherd automatic step labels (alignloop.recipes.math_shepherd) against a hand-worked case with a scripted,
deterministic stub policy; the `alignloop label-steps` command."""
from __future__ import annotations

import json

import pytest

from alignloop.data import read_rows, read_steps, write_rows
from alignloop.recipes.math_shepherd import LabelStepsConfig, math_shepherd_labels, run_label_steps

PROMPT = "Q: 7+5*3+2\n"          # (7+5)*3+2 = 38
VERIFIER = "alignloop.demo.arithmetic:verify_answer"
WRONG = ["7+5=12", "12*3=35", "35+2=37", "Answer: 37"]
RIGHT = ["7+5=12", "12*3=36", "36+2=38", "Answer: 38"]
LUCKY = ["7+5=13", "13*3=39", "39+2=41", "Answer: 41"]

# M = 2 scripted continuations of each prefix (the prefix is the prompt + the steps so far, each ending in "\n")
SCRIPT = {
    PROMPT + "7+5=12\n": ["12*3=36\n36+2=38\nAnswer: 38\n", "12*3=35\n35+2=37\nAnswer: 37\n"],    # 1 of 2 right
    PROMPT + "7+5=12\n12*3=35\n": ["35+2=37\nAnswer: 37\n", "35+2=37\nAnswer: 37"],                # 0 of 2
    PROMPT + "7+5=12\n12*3=35\n35+2=37\n": ["Answer: 37\n", "Answer: 37\n"],                       # 0 of 2
    PROMPT + "7+5=12\n12*3=36\n": ["36+2=38\nAnswer: 38\n", "36+2=39\nAnswer: 39\n"],              # 1 of 2
    PROMPT + "7+5=12\n12*3=36\n36+2=38\n": ["Answer: 38", "Answer: 38\n"],                         # 2 of 2
    # the policy "recovers" from a wrong first step: Math-Shepherd's hard label calls the wrong step good
    PROMPT + "7+5=13\n": ["12*3=36\n36+2=38\nAnswer: 38\n", "13*3=39\n39+2=41\nAnswer: 41\n"],     # 1 of 2
    PROMPT + "7+5=13\n13*3=39\n": ["39+2=41\nAnswer: 41\n", "39+2=41\nAnswer: 41\n"],              # 0 of 2
    PROMPT + "7+5=13\n13*3=39\n39+2=41\n": ["Answer: 41\n", "Answer: 41\n"],                       # 0 of 2
}


class Stub:
    """A deterministic policy: the scripted continuations; records every call (prefixes, m)."""

    def __init__(self, script=SCRIPT):
        self.script = script
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, prefixes, m):
        self.calls.append((list(prefixes), m))
        return [list(self.script[p][:m]) for p in prefixes]


def rows():
    return [{"prompt": PROMPT, "completions": WRONG, "id": "w"}, {"prompt": PROMPT, "completions": RIGHT},
            {"prompt": PROMPT, "completions": LUCKY}]


def test_labels_equal_the_hand_worked_case():
    stub = Stub()
    out = math_shepherd_labels(rows(), VERIFIER, stub, rollouts=2)
    # WRONG: step 1 leads to 38 in 1 of 2 rollouts (+1, 0.5); 12*3=35 never recovers; the last step is the
    # solution's own verdict (37: wrong)
    assert out[0]["labels"] == [1, -1, -1, -1] and out[0]["soft_labels"] == [0.5, 0.0, 0.0, 0.0]
    assert out[0]["outcome"] == -1 and out[0]["id"] == "w"           # other fields kept
    # RIGHT: 1/2, 1/2, 2/2, then its own verdict (38: right)
    assert out[1]["labels"] == [1, 1, 1, 1] and out[1]["soft_labels"] == [0.5, 0.5, 1.0, 1.0]
    assert out[1]["outcome"] == 1
    # LUCKY's wrong first step is labeled good (+1, 0.5) because the policy recovered once
    assert out[2]["labels"] == [1, -1, -1, -1] and out[2]["soft_labels"] == [0.5, 0.0, 0.0, 0.0]
    # one batched call; 3 prefixes per solution (the last step needs none), the first prefix "7+5=12" of WRONG
    # and RIGHT rolled out once: 3 + 3 + 3 - 1 = 8
    assert len(stub.calls) == 1 and stub.calls[0][1] == 2 and len(stub.calls[0][0]) == 8
    assert len(set(stub.calls[0][0])) == 8
    # the rows read back in the step format
    back = read_steps(out)
    assert back[0]["labels"] == [1, -1, -1, -1] and back[1]["soft_labels"] == [0.5, 0.5, 1.0, 1.0]


def test_without_dedupe_and_with_a_callable_verifier():
    stub = Stub()
    seen = []

    def verifier(prompt, text):
        seen.append(text)
        return text.rstrip().endswith("38")

    out = math_shepherd_labels(rows()[:2], verifier, stub, rollouts=1, dedupe=False)
    assert len(stub.calls[0][0]) == 6                       # 3 + 3 prefixes, the shared one twice
    # M = 1: the first scripted continuation only. WRONG: 12*3=36 (right), 35+2=37, Answer: 37; then its verdict
    assert out[0]["labels"] == [1, -1, -1, -1] and out[0]["soft_labels"] == [1.0, 0.0, 0.0, 0.0]
    assert out[1]["labels"] == [1, 1, 1, 1]
    # the verifier sees the solution text: the steps so far (each with its separator), then the continuation
    assert "7+5=12\n12*3=36\n36+2=38\nAnswer: 38\n" in seen


def test_label_steps_from_prompts_with_a_stub(tmp_path):
    script = dict(SCRIPT)
    script[PROMPT] = ["7+5=12\n12*3=35\n35+2=37\nAnswer: 37\n", "7+5=12\n12*3=36\n36+2=38\nAnswer: 38",
                      "\n\n"]   # the third solution has no step: dropped
    write_rows([{"prompt": PROMPT}], tmp_path / "prompts.jsonl")
    cfg = LabelStepsConfig(input=str(tmp_path / "prompts.jsonl"), verifier=VERIFIER, rollouts=2,
                           samples_per_prompt=3, output=str(tmp_path / "steps.jsonl"))
    summary = run_label_steps(cfg, continuer=Stub(script))
    got = read_rows(tmp_path / "steps.jsonl")
    assert [r["completions"] for r in got] == [WRONG, RIGHT]
    assert [r["labels"] for r in got] == [[1, -1, -1, -1], [1, 1, 1, 1]]
    assert summary["solutions"] == 2 and summary["sampled"] == 2 and summary["steps"] == 8
    assert summary["good_steps"] == 5 / 8 and summary["solved"] == 0.5
    # the same rows as input (step rows): labeled again, identically
    cfg2 = LabelStepsConfig(input=str(tmp_path / "steps.jsonl"), verifier=VERIFIER, rollouts=2,
                            output=str(tmp_path / "again.csv"))
    run_label_steps(cfg2, continuer=Stub(script))
    assert [json.loads(r["soft_labels"]) for r in read_rows(tmp_path / "again.csv")] == \
        [[0.5, 0.0, 0.0, 0.0], [0.5, 0.5, 1.0, 1.0]]
    # unlabelled step rows, the usual input, from JSONL and from CSV (lists as JSON text): their own steps are
    # labelled, never replaced by new samples
    for name in ("unlabelled.jsonl", "unlabelled.csv"):
        write_rows([{"prompt": PROMPT, "completions": WRONG}, {"prompt": PROMPT, "completions": RIGHT}],
                   tmp_path / name)
        out = tmp_path / f"{name}.out.jsonl"
        summary = run_label_steps(LabelStepsConfig(input=str(tmp_path / name), verifier=VERIFIER, rollouts=2,
                                                   output=str(out)), continuer=Stub(script))
        got = read_rows(out)
        assert summary["sampled"] == 0 and [r["completions"] for r in got] == [WRONG, RIGHT], name
        assert [r["labels"] for r in got] == [[1, -1, -1, -1], [1, 1, 1, 1]], name


def test_cli_with_a_tiny_model(tmp_path):
    """`alignloop label-steps` end to end with a tiny random policy: the format, not the values."""
    from click.testing import CliRunner

    from alignloop.cli import cli
    from alignloop.models.tiny import build_tiny_checkpoint

    corpus = ["Q: 7+5*3+2\n7+5=12\n12*3=36\n36+2=38\nAnswer: 38\n"] * 20
    model = build_tiny_checkpoint(tmp_path / "m", corpus, vocab_size=280, n_layer=1, n_embd=32, n_head=2)
    write_rows([{"prompt": PROMPT}, {"prompt": "Q: 3*4-2\n"}], tmp_path / "p.jsonl")
    res = CliRunner().invoke(cli, ["label-steps", "--model", str(model), "--input", str(tmp_path / "p.jsonl"),
                                   "--verifier", VERIFIER, "--rollouts", "2", "--samples-per-prompt", "2",
                                   "--max-new-tokens", "12", "--output", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.rindex('{"output"'):].splitlines()[0])
    out = read_steps(tmp_path / "o.jsonl")
    assert summary["solutions"] == len(out)
    for r in out:
        assert len(r["labels"]) == len(r["soft_labels"]) == len(r["completions"])
        assert all(x in (1, -1) for x in r["labels"]) and all(0 <= x <= 1 for x in r["soft_labels"])


def test_errors(tmp_path):
    from alignloop.cli import main

    write_rows([{"prompt": PROMPT}], tmp_path / "p.jsonl")
    with pytest.raises(SystemExit) as e:
        main(["label-steps", "--input", str(tmp_path / "p.jsonl"), "--model", "x", "--output",
              str(tmp_path / "o.jsonl")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["label-steps", "--input", str(tmp_path / "p.jsonl"), "--model", "x", "--verifier", "nomodule:fn",
              "--output", str(tmp_path / "o.jsonl")])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="expected 2 each"):
        math_shepherd_labels(rows()[:1], VERIFIER, lambda p, m: [["x"]] * len(p), rollouts=2)


def test_another_separator():
    """With separator " | " the prefixes rolled out and the texts the verifier reads join the steps with it."""
    seen = []

    def continuer(prefixes, m):
        seen.extend(prefixes)
        return [["ANS | "] * m for _ in prefixes]

    (row,) = math_shepherd_labels([{"prompt": "Q:", "completions": ["a", "b"]}], lambda p, t: t.endswith("ANS | "),
                                  continuer, rollouts=2, separator=" | ")
    assert seen == ["Q:a | "] and row["soft_labels"] == [1.0, 0.0] and row["labels"] == [1, -1]
