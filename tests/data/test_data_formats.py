"""Every format from every file type: JSONL, JSON (list and {"data": ...}), Parquet, CSV, datasets save_to_disk."""
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignloop.data import (
    DataError,
    Pair,
    PreferenceGroup,
    detect_kind,
    load_preferences,
    load_prompts,
    load_records,
    load_sft,
    load_unpaired,
    read_rows,
)

U = {"role": "user", "content": "hi there"}
A1 = {"role": "assistant", "content": "hello"}
A2 = {"role": "assistant", "content": "go away"}

# kind -> (rows, expected normalised records)
CASES = {
    "sft_text": ([{"text": "the movie was good"}], "sft", [{"prompt": "", "completion": "the movie was good"}]),
    "sft_prompt_completion": ([{"prompt": "Q:", "completion": " yes", "id": 3}], "sft",
                              [{"prompt": "Q:", "completion": " yes"}]),
    "sft_messages": ([{"messages": [U, A1, U, A2]}], "sft", [{"prompt": [U, A1, U], "completion": [A2]}]),
    "sft_conv_prompt_completion": ([{"prompt": [U], "completion": [A1]}], "sft", [{"prompt": [U], "completion": [A1]}]),
    "preference": ([{"prompt": "P", "chosen": " a", "rejected": " b", "margin": 1.5}], "preference",
                   [PreferenceGroup("P", [Pair(" a", " b", 1.5)])]),
    "preference_strength": ([{"prompt": "P", "chosen": " a", "rejected": " b", "strength": "slightly better"}],
                            "preference", [PreferenceGroup("P", [Pair(" a", " b", 1 / 3)])]),
    "preference_conv": ([{"prompt": [U], "chosen": [A1], "rejected": [A2]}], "preference",
                        [PreferenceGroup([U], [Pair([A1], [A2], 0.0)])]),
    "preference_implicit_text": ([{"chosen": "Q: is it good? A: yes", "rejected": "Q: is it good? A: no"}],
                                 "preference", [PreferenceGroup("Q: is it good? A:", [Pair(" yes", " no")])]),
    "preference_implicit_conv": ([{"chosen": [U, A1], "rejected": [U, A2]}], "preference",
                                 [PreferenceGroup([U], [Pair([A1], [A2])])]),
    "ranking": ([{"prompt": "P", "completions": ["a", "b", "c"], "ranking": [2, 1, 3]}], "ranking",
                [PreferenceGroup("P", [Pair("b", "a"), Pair("a", "c"), Pair("b", "c")], 1 / 3, ["a", "b", "c"],
                                 [2, 1, 3])]),
    # best of K (Ziegler et al.): the pick first, the others tied below it
    "ranking_best": ([{"prompt": "P", "completions": ["a", "b", "c"], "best": 1}], "ranking",
                     [PreferenceGroup("P", [Pair("b", "a"), Pair("b", "c")], 1 / 3, ["a", "b", "c"], [2, 1, 2])]),
    "ranking_conv": ([{"prompt": [U], "completions": [[A1], [A2]], "ranking": [2, 1]}], "ranking",
                     [PreferenceGroup([U], [Pair([A2], [A1])], 1.0, [[A1], [A2]], [2, 1])]),
    "unpaired": ([{"prompt": "P", "completion": " a", "label": True}, {"prompt": "P", "completion": " b",
                                                                       "label": False}], "unpaired",
                 [{"prompt": "P", "completion": " a", "label": True}, {"prompt": "P", "completion": " b",
                                                                       "label": False}]),
    "prompt": ([{"prompt": "tell me"}], "prompt", [{"prompt": "tell me"}]),
    "prompt_conv": ([{"prompt": [U]}], "prompt", [{"prompt": [U]}]),
}


def write(rows, path):
    suffix = path.suffix if path.suffix else "hf"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".csv":
        cols = list(rows[0])
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:
                w.writerow([json.dumps(r[c]) if isinstance(r[c], (list, bool)) else r[c] for c in cols])
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ""])
@pytest.mark.parametrize("case", list(CASES))
def test_every_format_from_every_file_type(tmp_path, case, suffix):
    rows, kind, expected = CASES[case]
    path = write(rows, tmp_path / f"data{suffix}")
    records, stats = load_records(path)
    assert stats.kind == kind
    assert stats.rows == len(rows) and stats.bad_rows == 0
    if kind in ("preference", "ranking"):
        got = [(g.prompt, [tuple(p) for p in g.pairs], pytest.approx(g.pair_weight)) for g in records]
        want = [(g.prompt, [tuple(p) for p in g.pairs], g.pair_weight) for g in expected]
        assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want]
        assert [w for *_, w in got] == [w for *_, w in want]
        for g, e in zip(records, expected, strict=True):
            for p, q in zip(g.pairs, e.pairs, strict=True):
                assert p.margin == pytest.approx(q.margin)
            assert g.ranking == e.ranking and g.completions == e.completions
    else:
        assert records == expected


def test_json_data_key_and_explicit_kind(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"data": [{"prompt": "a", "completion": "b"}]}))
    records, stats = load_records(path)
    assert records == [{"prompt": "a", "completion": "b"}] and stats.kind == "sft"
    # the same columns read as prompt-only when asked
    records, stats = load_records(path, "prompt")
    assert records == [{"prompt": "a"}] and stats.kind == "prompt"


def test_hf_dataset_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}]),
                               "test": datasets.Dataset.from_list([{"prompt": "b"}, {"prompt": "c"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r["prompt"] for r in load_prompts(tmp_path / "dd", split="test")[0]] == ["b", "c"]
    with pytest.raises(DataError, match="no split 'validation'; it has train, test"):
        load_prompts(tmp_path / "dd", split="validation")


def test_in_memory_rows():
    records, _ = load_sft([{"text": "a b"}, {"prompt": "x", "completion": "y"}], kind="sft")
    assert records == [{"prompt": "", "completion": "a b"}, {"prompt": "x", "completion": "y"}]


def test_detect_kind():
    assert detect_kind(["prompt", "chosen", "rejected"]) == "preference"
    assert detect_kind(["chosen", "rejected"]) == "preference"
    assert detect_kind(["prompt", "completions", "ranking"]) == "ranking"
    assert detect_kind(["prompt", "completions", "best"]) == "ranking"
    assert detect_kind(["prompt", "completion", "label"]) == "unpaired"
    assert detect_kind(["messages"]) == "sft"
    assert detect_kind(["text", "id"]) == "sft"
    assert detect_kind(["prompt", "completion"]) == "sft"
    assert detect_kind(["prompt"]) == "prompt"
    assert detect_kind(["question", "answer"]) is None


def test_columns_fitting_no_format_is_a_clear_error(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert "q.jsonl line 1" in msg and "question, answer" in msg and "fit no known format" in msg
    assert "prompt+chosen+rejected" in msg


def test_loader_kind_mismatch(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="expected preference or ranking data, but the columns are those of sft"):
        load_preferences(path)
    with pytest.raises(DataError, match="have no prompt"):
        load_prompts(path)
    with pytest.raises(DataError, match="expected unpaired"):
        load_unpaired(path)


def test_prompts_from_preference_data(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "A", "chosen": "x", "rejected": "y"}\n{"chosen": "B c", "rejected": "B d"}\n')
    assert load_prompts(path)[0] == [{"prompt": "A"}, {"prompt": "B"}]


def test_read_rows_rows_carry_location(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    rows = read_rows(path)
    assert rows == [{"a": 1}, {"a": 2}]
    assert [r.where for r in rows] == [f"{path} line 1", f"{path} line 3"]


def test_csv_label_and_margin_coercion(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label\nP,a,true\nP,b,0\n")
    assert [r["label"] for r in load_unpaired(path)[0]] == [True, False]
    path = tmp_path / "m.csv"
    path.write_text("prompt,chosen,rejected,margin\nP,a,b,2.5\nP,a,b,\n")
    groups, _ = load_preferences(path)
    assert [g.pairs[0].margin for g in groups] == [2.5, 0.0]


def test_bom_tsv_and_json_lines_in_a_json_file(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes("\ufeffprompt,completion\nP,C\n".encode("utf-8"))
    assert load_sft(path)[0] == [{"prompt": "P", "completion": "C"}]
    path = tmp_path / "b.jsonl"
    path.write_bytes('\ufeff{"prompt": "P"}\n'.encode("utf-8"))
    assert load_prompts(path)[0] == [{"prompt": "P"}]
    path = tmp_path / "t.tsv"
    path.write_text("prompt\tcompletion\nP, with comma\tC\n")
    assert load_sft(path)[0] == [{"prompt": "P, with comma", "completion": "C"}]
    path = tmp_path / "lines.json"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    rows = read_rows(path)
    assert rows == [{"prompt": "a"}, {"prompt": "b"}] and rows[1].where == f"{path} line 2"
