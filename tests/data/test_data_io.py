"""The data I/O every caller shares: prompts from any source (`prompt_texts`) and files written whole or not at all
(`write_rows`)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignloop.data import DataError, prompt_texts, read_rows, write_rows


def test_prompt_texts_from_strings_files_and_rows(tmp_path):
    assert prompt_texts(["a", "b", "c"], max_prompts=2) == ["a", "b"]
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "x"}, {"prompt": "y", "other": 1}]))
    assert prompt_texts(str(f)) == ["x", "y"]
    assert prompt_texts([{"prompt": "p", "chosen": "a", "rejected": "b"}]) == ["p"]   # any format with prompts


def test_prompt_texts_errors_name_the_source(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "x"}\n{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2"):
        prompt_texts(str(f))
    with pytest.raises(DataError, match="no prompts"):
        prompt_texts([])
    with pytest.raises(DataError, match="prompt 1: expected a non-empty prompt"):
        prompt_texts(["a", ""])
    msgs = [{"prompt": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError, match="chat template"):
        prompt_texts(msgs)                       # messages need the policy's tokenizer to become text
    with pytest.raises(DataError, match="no such file"):
        prompt_texts(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_write_rows_is_all_or_nothing(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    write_rows([{"a": 1}, {"a": 2}], path)
    before = path.read_bytes()
    def interrupted():
        yield {"a": 3}
        raise RuntimeError("interrupted half-way through")

    with pytest.raises(RuntimeError):
        write_rows(interrupted(), path)
    assert path.read_bytes() == before                     # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # and nothing half-written is left beside it
    assert [str(r["a"]) for r in read_rows(path)] == ["1", "2"]


def test_prompt_texts_with_max_prompts_zero_is_a_clear_error():
    with pytest.raises(DataError, match="no prompts .max_prompts = 0"):
        prompt_texts(["a", "b"], max_prompts=0)


def test_reading_and_writing_data_does_not_import_torch(tmp_path):
    """The feedback server and `alignloop data` read and write through alignloop.data without loading torch (seconds
    of start-up and hundreds of MB): only the collators need it, loaded on first use."""
    code = (
        "import sys\n"
        "from alignloop.data import read_rows, write_rows\n"
        "from alignloop.feedback.models import STRENGTHS\n"
        f"write_rows([{{'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}}], {str(tmp_path / 'p.jsonl')!r})\n"
        f"assert read_rows({str(tmp_path / 'p.jsonl')!r})[0]['chosen'] == 'a'\n"
        "print('torch' in sys.modules)\n"
        "import alignloop.data as d\n"
        "d.pad_batch\n"
        "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]


def test_parquet_keeps_the_columns_of_every_row(tmp_path):
    """Rows with different keys (an optional `soft_labels` only on some) keep every column: pyarrow's from_pylist
    would take the schema from the first row and drop `b` and `c` silently."""
    from alignloop.data import read_rows, write_rows

    rows = [{"a": 1}, {"a": 2, "b": [1, 2]}, {"c": "x"}]
    back = read_rows(write_rows(rows, tmp_path / "r.parquet"))
    assert back == [{"a": 1, "b": None, "c": None}, {"a": 2, "b": [1, 2], "c": None},
                    {"a": None, "b": None, "c": "x"}]
