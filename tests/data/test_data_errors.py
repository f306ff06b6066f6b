"""Bad rows: messages name file, line/index and field; skip_bad_rows counts them."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignloop.data import DataError, DataStats, load_preferences, load_records, load_sft, read_rows
from alignloop.errors import UserError

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


def test_data_error_is_a_user_error():
    assert issubclass(DataError, UserError)


def test_jsonl_bad_row_names_file_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(GOOD)] * 6 + [json.dumps({"prompt": "p", "chosen": None, "rejected": "b"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_preferences(path)
    assert str(e.value).startswith(f"{path} line 7, field 'chosen': expected a string or a list of messages, "
                                   f"got null")
    assert "1 bad rows in all" in str(e.value)


def test_invalid_json_and_non_objects_are_bad_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n[1, 2]\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl line 2: invalid JSON .*\(2 bad rows in all"):
        read_rows(path)
    stats = DataStats()
    rows = read_rows(path, skip_bad_rows=True, stats=stats)
    assert len(rows) == 2 and stats.rows == 4 and stats.bad_rows == 2
    assert "pairs.jsonl line 3: expected an object (a row of named fields), got a list of 2" in stats.errors[1]


def test_skip_bad_rows_counts_every_kind_of_bad_row_in_order(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [GOOD, {"prompt": "p", "chosen": 3, "rejected": "b"}, {"prompt": "p", "rejected": "b"}, GOOD,
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
            {"chosen": "same", "rejected": "same"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "oops\n")
    groups, stats = load_preferences(path, skip_bad_rows=True)
    assert len(groups) == 2 and stats.bad_rows == 6 and stats.rows == 8 and stats.records == 2
    assert [m.split(path.name + " ")[1] for m in stats.errors] == [
        "line 2, field 'chosen': expected a string or a list of messages, got a number (3)",
        "line 3, field 'chosen': missing (expected a string or a list of messages)",
        "line 5, field 'margin': expected a number, got a string",
        "line 6, field 'chosen': expected a list of messages like 'prompt' (do not mix plain text and "
        "conversational fields in a row)",
        "line 7, field 'chosen': chosen and rejected are identical, so there is no completion to compare",
        "line 8: invalid JSON (Expecting value at column 1)",
    ]


def test_ranking_bad_rows(tmp_path):
    path = tmp_path / "rank.json"
    path.write_text(json.dumps([
        {"prompt": "p", "completions": ["a", "b"], "ranking": [1, 2]},
        {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [1, 2]},
        {"prompt": "p", "completions": ["a"], "ranking": [1]},
        {"prompt": "p", "completions": ["a", None], "ranking": [1, 2]},
        {"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1.5]},
    ]))
    _, stats = load_preferences(path, skip_bad_rows=True)
    assert stats.bad_rows == 4 and stats.records == 1
    assert stats.errors[0].endswith("rank.json index 1, field 'ranking': expected a list of 3 integer ranks >= 1 "
                                    "(one per completion, 1 = best, equal ranks = ties), got [1, 2]")
    assert "index 2, field 'completions': expected a list of at least 2 completions" in stats.errors[1]
    assert "index 3, field 'completions[1]': expected a string or a list of messages, got null" in stats.errors[2]
    assert "index 4, field 'ranking'" in stats.errors[3]


def test_best_of_k_bad_rows(tmp_path):
    path = tmp_path / "best.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "p", "completions": ["a", "b", "c"], "best": 2},
        {"prompt": "p", "completions": ["a", "b", "c"], "best": 3},
        {"prompt": "p", "completions": ["a", "b"], "best": "a"},
        {"prompt": "p", "completions": ["a", "b"], "best": True},
    ]))
    groups, stats = load_preferences(path, skip_bad_rows=True)
    assert stats.bad_rows == 3 and groups[0].ranking == [2, 2, 1]
    assert stats.errors[0].endswith("best.jsonl line 2, field 'best': expected the index of the best completion, an "
                                    "integer 0..2, got 3")
    assert "line 3, field 'best'" in stats.errors[1] and "got \"a\"" in stats.errors[1]
    assert "line 4, field 'best'" in stats.errors[2]


def test_csv_bad_rows_name_the_line(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text('prompt,completion,label\nP,a,true\nP,b,maybe\n"multi\nline",c,false\nP,d\n')
    _, stats = load_records(path, skip_bad_rows=True)
    assert stats.bad_rows == 2 and stats.records == 2
    assert stats.errors[0] == f"{path} line 3, field 'label': expected true or false, got a string"
    assert stats.errors[1] == f"{path} line 6: expected 3 cells (columns prompt, completion, label), got 2"


def test_parquet_bad_rows_name_the_index(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}]),
                   path)
    with pytest.raises(DataError, match=r"s.parquet index 1, field 'completion': expected a string or a list of "
                                        r"messages, got null"):
        load_sft(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        read_rows(tmp_path / "x.txt")
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r'expected a JSON list of objects or \{"data": \[...\]\}'):
        read_rows(tmp_path / "bad.json")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk folder"):
        read_rows(tmp_path / "folder")
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="latin.jsonl: not UTF-8 text"):
        read_rows(tmp_path / "latin.jsonl")
    with pytest.raises(DataError, match="unknown data kind 'pairs'"):
        load_records([GOOD], "pairs")
