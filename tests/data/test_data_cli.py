"""`alignloop data validate` and `alignloop data convert`, run standalone with CliRunner."""
import csv
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from alignloop.cli.data import data


def run(*args):
    return CliRunner().invoke(data, [str(a) for a in args])


def _jsonl(path, rows, extra=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


RANK = {"prompt": "p", "completions": ["a", "b", "c", "d"], "ranking": [1, 2, 2, 4]}


def test_validate_good_file(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", [RANK, RANK])
    res = run("validate", path)
    assert res.exit_code == 0, res.output
    assert "format: ranking (detected)" in res.output
    assert "rows: 2" in res.output and "pairs: 10" in res.output and "ties skipped: 2" in res.output
    assert "bad rows: 0" in res.output


def test_validate_lists_bad_rows_and_exits_2(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                             {"prompt": "p", "chosen": None, "rejected": "b"}], "not json\n")
    res = run("validate", path)
    assert res.exit_code == 2
    assert "bad rows: 2" in res.output and "valid rows: 1" in res.output
    assert f"{path} line 2, field 'chosen': expected a string or a list of messages, got null" in res.output
    assert f"{path} line 3: invalid JSON" in res.output
    assert "error: 2 bad rows" in res.output and "Traceback" not in res.output
    res = run("validate", path, "--skip-bad-rows")
    assert res.exit_code == 0 and "bad rows: 2" in res.output


def test_validate_with_kind_and_user_errors(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}])
    res = run("validate", path, "--kind", "prompt")
    assert res.exit_code == 0 and "format: prompt (given)" in res.output
    res = run("validate", tmp_path / "nope.jsonl")
    assert res.exit_code == 2 and "error: " in res.output and "no such file" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    q = _jsonl(tmp_path / "q.jsonl", [{"question": "a"}])
    res = run("validate", q)
    assert res.exit_code == 2 and "fit no known format" in res.output
    res = run("validate", path, "--kind", "pairs")
    assert res.exit_code == 2 and "Invalid value for '--kind'" in res.output


def test_convert_ranking_to_pairs_csv_and_back(tmp_path):
    src = _jsonl(tmp_path / "r.jsonl", [RANK])
    out = tmp_path / "pairs.csv"
    res = run("convert", src, out, "--to", "pairs")
    assert res.exit_code == 0, res.output
    assert "wrote 5 rows" in res.output and "ties skipped: 1" in res.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]
    assert all(float(r["pair_weight"]) == pytest.approx(1 / 6) and r["group"] == "0" for r in rows)
    # and the flat pairs read back as one group
    res = run("validate", out)
    assert res.exit_code == 0 and "groups: 1" in res.output and "pairs: 5" in res.output


def test_convert_with_ties_to_parquet(tmp_path):
    src = _jsonl(tmp_path / "r.jsonl", [RANK])
    out = tmp_path / "pairs.parquet"
    res = run("convert", src, out, "--to", "pairs", "--include-ties")
    assert res.exit_code == 0, res.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6 and [r["tie"] for r in rows] == [False, False, False, True, False, False]
    assert rows[3]["margin"] == 0.0


def test_convert_auto_normalises_any_format(tmp_path):
    src = tmp_path / "s.json"
    src.write_text(json.dumps({"data": [{"text": "hello"}, {"messages": [{"role": "user", "content": "q"},
                                                                        {"role": "assistant", "content": "a"}]}]}))
    out = tmp_path / "s.jsonl"
    assert run("convert", src, out).exit_code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [{"prompt": "", "completion": "hello"},
                    {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant",
                                                                                  "content": "a"}]}]
    # plain pairs keep plain columns; strength becomes margin
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "strength": "better"}])
    assert run("convert", src, tmp_path / "p.json", "--margins", "large").exit_code == 0
    assert json.loads((tmp_path / "p.json").read_text()) == [{"prompt": "p", "chosen": "a", "rejected": "b",
                                                               "margin": 2.0}]


def test_convert_other_targets(tmp_path):
    src = _jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 1, 3]}])
    assert run("convert", src, tmp_path / "u.jsonl", "--to", "unpaired").exit_code == 0
    assert [json.loads(x) for x in (tmp_path / "u.jsonl").read_text().splitlines()] == [
        {"prompt": "p", "completion": "b", "label": True}, {"prompt": "p", "completion": "c", "label": False}]
    assert run("convert", src, tmp_path / "s.jsonl", "--to", "sft").exit_code == 0
    assert json.loads((tmp_path / "s.jsonl").read_text()) == {"prompt": "p", "completion": "b"}
    assert run("convert", src, tmp_path / "q.jsonl", "--to", "prompt").exit_code == 0
    assert json.loads((tmp_path / "q.jsonl").read_text()) == {"prompt": "p"}
    sft = _jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    res = run("convert", sft, tmp_path / "o.jsonl", "--to", "pairs")
    assert res.exit_code == 2 and "error: cannot convert sft data to preference pairs" in res.output


def test_convert_bad_rows_and_bad_suffix(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}], "{bad\n")
    out = tmp_path / "o.jsonl"
    res = run("convert", src, out)
    assert res.exit_code == 2 and "line 2: invalid JSON" in res.output and not out.exists()
    res = run("convert", src, out, "--skip-bad-rows")
    assert res.exit_code == 0 and "bad rows skipped: 1" in res.output and len(out.read_text().splitlines()) == 1
    res = run("convert", src, tmp_path / "o.txt", "--skip-bad-rows")
    assert res.exit_code == 2 and "cannot infer the output format" in res.output


def test_every_option_has_help():
    for name, cmd in data.commands.items():
        for p in cmd.params:
            if p.param_type_name == "option":
                assert p.help, f"{name} {p.name} has no help"


def test_validate_and_convert_with_a_tokenizer(tmp_path, chat_tok, plain_tok):
    chat_tok.save_pretrained(tmp_path / "chat_tok")
    plain_tok.save_pretrained(tmp_path / "plain_tok")
    u, a, b = ({"role": "user", "content": "is the movie good"}, {"role": "assistant", "content": "yes"},
               {"role": "assistant", "content": " ".join(["no"] * 30)})
    src = _jsonl(tmp_path / "c.jsonl", [{"prompt": [u], "chosen": [a], "rejected": [b]},
                                        {"prompt": [u], "chosen": [a], "rejected": [{"role": "assistant",
                                                                                    "content": "no"}]}])
    from alignloop.data import load_preferences, tokenize_preferences

    tokenized, _ = tokenize_preferences(load_preferences(src, tokenizer=chat_tok)[0], chat_tok)
    short = max(len(tokenized[1]["pairs"][0][k]) for k in ("chosen_input_ids", "rejected_input_ids"))
    longest = max(len(tokenized[0]["pairs"][0][k]) for k in ("chosen_input_ids", "rejected_input_ids"))
    assert longest > short
    res = run("validate", src, "--tokenizer", tmp_path / "chat_tok", "--max-length", short)
    assert res.exit_code == 0, res.output
    assert f"tokens per sequence: max {longest}" in res.output
    assert f"truncated pairs (max length {short}, keep_end): 1" in res.output and "dropped pairs: 0" in res.output
    res = run("validate", src, "--tokenizer", tmp_path / "chat_tok", "--max-length", short, "--truncation", "drop")
    assert "dropped pairs: 1" in res.output
    res = run("validate", src, "--tokenizer", tmp_path / "plain_tok")
    assert res.exit_code == 2 and "no chat template" in res.output and "Traceback" not in res.output
    out = tmp_path / "rendered.jsonl"
    assert run("convert", src, out, "--tokenizer", tmp_path / "chat_tok").exit_code == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert first["prompt"] == "<|user|>is the movie good\n<|assistant|>" and first["chosen"] == "yes\n"


STEP_ROWS = [{"prompt": "Q: 2+3*4", "completions": ["3*4=12", "2+12=14", "Answer: 14"], "labels": [1, 1, 1]},
             {"prompt": "Q: 2+3", "completions": ["2+3=6", "Answer: 6"], "labels": [1, -1]},
             {"prompt": "Q: 1+1", "completions": ["1+1=2", "Answer: 2"], "labels": [0, 1]},
             {"prompt": "Q: 4-1", "completions": ["4-1=3", "Answer: 3"], "labels": [True, True]}]


def test_convert_steps_to_sft_and_unpaired(tmp_path):
    """Step rows become rejection-sampling SFT data (solutions with no bad step; a neutral step is not bad, as in
    PRM800K) and KTO rows (label = no bad step); the steps are joined with the separator, each step ending in it."""
    src = _jsonl(tmp_path / "steps.jsonl", STEP_ROWS)
    res = run("convert", src, tmp_path / "sft.jsonl", "--to", "sft")
    assert res.exit_code == 0, res.output
    assert [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()] == [
        {"prompt": "Q: 2+3*4", "completion": "3*4=12\n2+12=14\nAnswer: 14\n"},
        {"prompt": "Q: 1+1", "completion": "1+1=2\nAnswer: 2\n"},
        {"prompt": "Q: 4-1", "completion": "4-1=3\nAnswer: 3\n"}]
    res = run("convert", src, tmp_path / "kto.jsonl", "--to", "unpaired")
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["label"] for x in (tmp_path / "kto.jsonl").read_text().splitlines()] == [
        True, False, True, True]
    res = run("convert", src, tmp_path / "pairs.jsonl", "--to", "pairs")
    assert res.exit_code == 2 and "cannot convert steps data to preference pairs" in res.output
    # a right answer after a wrong step (label-steps writes `outcome`) is still a bad solution; a wrong outcome
    # without a labelled bad step is one too
    lucky = [{"prompt": "Q: 7+5", "completions": ["7+5=13", "Answer: 12"], "labels": [-1, 1], "outcome": True},
             {"prompt": "Q: 1+1", "completions": ["1+1=2", "Answer: 3"], "labels": [1, None], "outcome": False}]
    src = _jsonl(tmp_path / "lucky.jsonl", lucky)
    assert run("convert", src, tmp_path / "l.jsonl", "--to", "sft").exit_code == 0
    assert (tmp_path / "l.jsonl").read_text() == ""
    assert run("convert", src, tmp_path / "lu.jsonl", "--to", "unpaired").exit_code == 0
    assert [json.loads(x)["label"] for x in (tmp_path / "lu.jsonl").read_text().splitlines()] == [False, False]
