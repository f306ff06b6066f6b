"""`alignloop cai` (the supervised stage of Constitutional AI): a tiny end-to-end run (SFT data, chains, summary,
optional SFT), the cut at a blank line and empty revisions (scripted generations), the principle draws, the config's
checks and the command line."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from alignloop.ai_feedback import cai as cai_module
from alignloop.ai_feedback.cai import CAIConfig, ConstitutionalAI, as_completion, cut_at_blank_line
from alignloop.ai_feedback.constitution import DEFAULT_CONSTITUTION, load_constitution
from alignloop.cli import cli, main
from alignloop.data import load_records, read_rows
from alignloop.errors import ConfigError
from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, tiny_causal_lm, train_tokenizer
from alignloop.rollout import Completion

NAMES = {p["name"] for p in DEFAULT_CONSTITUTION["principles"]}
SMALL = {"max_new_tokens": 6, "critique_max_new_tokens": 6, "revision_max_new_tokens": 6, "batch_size": 4}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tests share 2 cores; tiny models do not gain from more


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(300), vocab_size=300)


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tok):
    # the default constitution's requests are long in a 300-token vocabulary: room for two rounds of them
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("policy"), tokenizer=tok, n_layer=1, n_embd=32,
                                     n_head=2, n_positions=1024))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts = [" ".join(s.split()[:3]) + ":" for s in default_corpus(5, seed=3)]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ end to end
def test_tiny_run_writes_sft_data_chains_and_summary_and_fine_tunes(tmp_path, policy, prompts_file):
    out = tmp_path / "cai"
    result = ConstitutionalAI(model=policy, train_dataset=str(prompts_file), args=CAIConfig(
        output_dir=str(out), rounds=2, seed=1, sft=True, progress=False,
        sft_args={"tensorboard": False, "per_device_batch_size": 4, "learning_rate": 1e-4}, **SMALL)).run()
    prompts = [r["prompt"] for r in read_rows(prompts_file)]

    rows = _jsonl(out / "revisions.jsonl")
    assert [r["prompt"] for r in rows] == prompts                     # one row per prompt, in order
    assert all(isinstance(r["completion"], str) and r["completion"].strip() for r in rows)
    assert all(r["completion"].startswith(" ") for r in rows)        # prompt + completion reads on ("...: text")
    records, stats = load_records(out / "revisions.jsonl")
    assert stats.kind == "sft" and len(records) == len(prompts)

    chains = _jsonl(out / "chains.jsonl")
    assert [c["prompt"] for c in chains] == prompts
    for c, r in zip(chains, rows, strict=True):
        assert set(c) == {"prompt", "initial", "chain", "final"} and c["final"] == r["completion"]
        assert [s["round"] for s in c["chain"]] == [0, 1]
        assert all(s["principle"] in NAMES and set(s) == {"round", "principle", "critique", "revision"}
                   for s in c["chain"])
        assert all("\n\n" not in s["critique"] and "\n\n" not in s["revision"] for s in c["chain"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == summary["written"] == len(prompts) and summary["rounds"] == 2
    assert summary["critic"] == "policy" and len(summary["per_round"]) == 2
    assert {"empty_revisions", "empty_critiques", "mean_chars/final", "time/critique", "seconds"} <= set(summary)
    assert (out / "config.yaml").exists()
    assert result.written == len(prompts) and result.revisions_file == str(out / "revisions.jsonl")

    # sft: the policy fine-tuned on the revisions, saved as a plain transformers folder
    assert result.sft_model == str(out / "sft" / "final") == summary["sft_model"]
    assert (out / "sft" / "final" / "config.json").exists()
    assert not list(out.glob(".*.tmp*"))                              # written aside and renamed into place


# ------------------------------------------------------------------------------------------------ scripted
def _scripted(script):
    """A stand-in for sample_completions: each prompt's text from `script(prompt)`, recorded in `calls`."""
    calls: list[list[str]] = []

    def sample(model, tokenizer, prompts, n, params, **kw):
        calls.append(list(prompts))
        assert params.stop_strings == ("\n\n",)   # a plain-text model stops at a blank line
        return [[Completion(script(p), True, 3)] for p in prompts]

    return sample, calls


def _stub(tmp_path, tok, prompts, **cfg):
    return ConstitutionalAI(model=tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2), tokenizer=tok,
                            train_dataset=prompts, args=CAIConfig(output_dir=str(tmp_path), **cfg))


def test_critiques_and_revisions_are_cut_at_the_first_blank_line(tmp_path, tok, monkeypatch):
    def script(p):
        if p.endswith("Critique:"):
            return "crit\n\nrest"
        if p.endswith("Revision:"):
            return " better answer\n\nHuman: and more"
        return " first answer\n\nHuman: next"

    sample, calls = _scripted(script)
    monkeypatch.setattr(cai_module, "sample_completions", sample)
    result = _stub(tmp_path, tok, ["Q1:", "Q2:", "Q3:"], rounds=2).run()
    chains = _jsonl(result.chains_file)
    assert chains[0]["initial"] == " first answer"
    assert [s["critique"] for s in chains[0]["chain"]] == ["crit", "crit"]
    assert [s["revision"] for s in chains[0]["chain"]] == [" better answer", " better answer"]
    assert _jsonl(result.revisions_file)[0] == {"prompt": "Q1:", "completion": " better answer", "add_eos": True}
    # batched: one call per step for all examples; the revision of round 0 is what round 1 critiques
    assert len(calls) == 5 and all(len(c) == 3 for c in calls)
    assert calls[3][0].startswith("Q1: better answer\n\nCritique request: ")
    # the revision prompt carries the cut critique
    assert "Critique:crit\n\nRevision request: " in calls[2][0]


def test_an_empty_revision_keeps_the_previous_response_and_is_counted(tmp_path, tok, monkeypatch):
    def script(p):
        if p.endswith("Revision:"):
            return "\n\nnothing before the blank line" if p.startswith("Q1") else " revised"
        return " crit" if p.endswith("Critique:") else " first"

    monkeypatch.setattr(cai_module, "sample_completions", _scripted(script)[0])
    result = _stub(tmp_path, tok, ["Q1:", "Q2:"], rounds=1).run()
    assert result.empty_revisions == 1 and result.summary["unrevised"] == 1
    assert [r["completion"] for r in _jsonl(result.revisions_file)] == [" first", " revised"]
    assert _jsonl(result.chains_file)[0]["chain"][0]["revision"] == ""


def test_principles_are_drawn_per_example_deterministically(tmp_path, tok):
    prompts = [f"prompt {i}:" for i in range(200)]

    def draws(seed):
        c = _stub(tmp_path, tok, prompts, seed=seed)
        rng = random.Random(seed)
        return [p.name for p in c.draw_principles(rng)] + [p.name for p in c.draw_principles(rng)]

    first = draws(0)
    assert first == draws(0) and first != draws(1)
    assert set(first) == NAMES                                   # 400 draws use every principle of the default
    assert first[:200] != first[200:]                             # each round draws afresh


def test_the_same_seed_gives_the_same_chains(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(cai_module, "sample_completions", _scripted(lambda p: " x")[0])
    runs = [_jsonl(_stub(tmp_path / str(i), tok, [f"q{j}:" for j in range(20)], rounds=3, seed=5).run().chains_file)
            for i in range(2)]
    assert runs[0] == runs[1]
    assert len({s["principle"] for c in runs[0] for s in c["chain"]}) > 1


def test_helpers():
    assert cut_at_blank_line("crit\n\nrest\n\nmore") == "crit" and cut_at_blank_line("one line") == "one line"
    assert as_completion("Review:", "  text ", chat=False) == " text"
    assert as_completion("Review:\n", "text", chat=False) == "text"
    assert as_completion("<|assistant|>", " text", chat=True) == "text"
    assert as_completion("Review:", "  ", chat=False) == ""


# ------------------------------------------------------------------------------------------------ config, CLI
def test_config_refuses_mistakes_naming_the_field():
    for kw, field in [({"rounds": 0}, "rounds"), ({"critique_temperature": -1.0}, "critique_temperature"),
                      ({"batch_size": 0}, "batch_size"), ({"max_prompts": 0}, "max_prompts"),
                      ({"top_p": 0.0}, "top_p"), ({"sft_args": {"model": "x"}}, "sft_args"),
                      ({"sft_args": {"learning_rat": 1e-4}}, "learning_rate"), ({"sft_args": "[1, 2]"}, "sft_args")]:
        with pytest.raises(ConfigError, match=field):
            CAIConfig(**kw)
    cfg = CAIConfig(sft_args="{learning_rate: 0.001, num_epochs: 2}")   # a flag's text is a YAML mapping
    assert cfg.sft_config("o").learning_rate == 0.001 and cfg.sft_config("o").num_epochs == 2
    assert CAIConfig(critique_temperature=0.0).critique_temperature == 0.0           # greedy is allowed


def test_cli_runs_and_prints_its_files(tmp_path, policy, prompts_file):
    out = tmp_path / "cli"
    cfg = tmp_path / "cai.yaml"
    cfg.write_text(yaml.safe_dump({"rounds": 1, "critique_temperature": 0.0, **SMALL}))
    r = CliRunner().invoke(cli, ["cai", "--config", str(cfg), "--model", policy, "--train-file", str(prompts_file),
                                 "--output-dir", str(out), "--max-prompts", "3", "--seed", "2"])
    assert r.exit_code == 0, r.output
    line = json.loads(r.output[r.output.index('{"revisions"'):].splitlines()[0])
    assert line["examples"] == 3 and line["revisions"] == str(out / "revisions.jsonl") and line["sft_model"] is None
    assert len(_jsonl(out / "revisions.jsonl")) == line["written"]
    assert all(len(c["chain"]) == 1 for c in _jsonl(out / "chains.jsonl"))


def test_cli_user_mistakes_exit_2_naming_the_problem(tmp_path, policy, prompts_file, capsys):
    missing = tmp_path / "nope.jsonl"
    bad = tmp_path / "constitution.yaml"
    bad.write_text(yaml.safe_dump({"principles": [{"name": "x", "critique": "say what is wrong"}]}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [(["--train-file", str(missing)], str(missing)),
             (["--train-file", str(empty)], "no prompts"),
             (["--train-file", str(prompts_file), "--constitution", str(bad)], "'revision' is required"),
             (["--train-file", str(prompts_file), "--rounds", "0"], "rounds must be >= 1")]
    for args, expected in cases:
        with pytest.raises(SystemExit) as e:
            main(["cai", "--model", policy, "--output-dir", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and expected in err and "Traceback" not in err, (args, err)
    with pytest.raises(ConfigError, match="principles"):
        load_constitution({"principles": []})
