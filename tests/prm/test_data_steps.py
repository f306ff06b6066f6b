"""The step format: reading (PRM800K ints, TRL booleans, soft labels, unlabelled rows, chat prompts), bad rows
named by file, line and field, the separator convention, the PRM's tokenisation and truncation, the outcome view,
and kind detection (a steps row is not a ranking)."""
from __future__ import annotations

import json

import pytest

from alignloop.data import (
    STEP_SEPARATOR,
    DataError,
    DataStats,
    detect_kind,
    join_steps,
    load_preferences,
    load_records,
    outcome_rows,
    prompt_string,
    read_steps,
    split_steps,
    tokenize_step_records,
    tokenize_steps,
    write_rows,
)
from alignloop.models.tiny import SIMPLE_CHAT_TEMPLATE, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    corpus = [f"{a} + {b} = {a + b}\nso the answer is {a + b}\n" for a in range(30) for b in range(10)]
    return train_tokenizer(corpus, vocab_size=300, chat_template=SIMPLE_CHAT_TEMPLATE)


def _jsonl(tmp_path, rows, name="steps.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "2 + 3 * 4 =", "completions": ["3 * 4 = 12", "2 + 12 = 14"], "labels": [1, -1]}


# ------------------------------------------------------------------------------------------------ separator
def test_separator_convention():
    assert STEP_SEPARATOR == "\n"
    assert join_steps(["a", "b"]) == "a\nb\n"
    assert split_steps("a\nb\n") == ["a", "b"]
    assert split_steps("a\n\n  \nb") == ["a", "b"]        # empty and whitespace-only pieces dropped
    assert split_steps("") == [] and split_steps("\n\n") == []
    assert split_steps("x = 1; y = 2") == ["x = 1; y = 2"]  # no separator: one step
    assert split_steps(" a \nb") == [" a ", "b"]             # a step keeps its own spaces
    steps = ["first step", "  indented second", "third."]
    assert split_steps(join_steps(steps)) == steps
    assert split_steps(join_steps(["a", "b"], " | "), " | ") == ["a", "b"]


def test_join_refuses_a_step_with_the_separator():
    with pytest.raises(DataError, match=r"step 1: expected a non-empty string without the separator"):
        join_steps(["a", "b\nc"])
    with pytest.raises(DataError, match="step 0"):
        join_steps(["  "])


# ------------------------------------------------------------------------------------------------ reading
def test_read_prm800k_ints_and_trl_booleans(tmp_path):
    path = _jsonl(tmp_path, [GOOD, {"prompt": "p", "completions": ["a", "b", "c"], "labels": [True, False, True]},
                             {"prompt": "q", "completions": ["a", "b"], "labels": [0, 1], "id": 7}])
    records = read_steps(path)
    assert [r["labels"] for r in records] == [[1, -1], [1, -1, 1], [0, 1]]
    assert records[0]["completions"] == GOOD["completions"] and records[0]["prompt"] == GOOD["prompt"]
    assert records[2]["id"] == 7                   # extra columns are kept
    assert records[1].where == f"{path} line 2"


def test_read_rows_in_memory_csv_and_parquet(tmp_path):
    # (write_rows' Parquet takes its columns from the first row: soft_labels must be there, null)
    rows = [{**GOOD, "soft_labels": None}, {"prompt": "q", "completions": ["a"], "labels": [1], "soft_labels": [0.25]}]
    for suffix in (".csv", ".parquet", ".json"):
        path = write_rows(rows, tmp_path / f"steps{suffix}")
        records = read_steps(path)
        assert [r["labels"] for r in records] == [[1, -1], [1]], suffix
        assert records[1]["soft_labels"] == [0.25], suffix
    assert read_steps(rows)[0]["labels"] == [1, -1]


def test_soft_labels_alone_give_hard_labels_and_null_labels_are_unlabelled(tmp_path):
    (r,) = read_steps([{"prompt": "p", "completions": ["a", "b", "c"], "soft_labels": [1.0, 0.5, 0.0]}])
    assert r["soft_labels"] == [1.0, 0.5, 0.0]
    assert r["labels"] == [1, 1, -1]               # Math-Shepherd's hard estimation: > 0 is good
    (r,) = read_steps([{"prompt": "p", "completions": ["a", "b", "c"], "labels": [1, -1, None]}])
    assert r["labels"] == [1, -1, None]            # the step after the first error left unlabelled
    # null hard labels beside soft ones (a Parquet round trip writes nulls): the soft ones fill them in
    (r,) = read_steps([{"prompt": "p", "completions": ["a", "b"], "labels": [None, None], "soft_labels": [0.5, 0.0]}])
    assert r["labels"] == [1, -1]
    (r,) = read_steps([{"prompt": "p", "completions": ["a", "b"], "labels": [-1, None], "soft_labels": [0.5, 0.0]}])
    assert r["labels"] == [-1, -1]                 # a given hard label wins


def test_unlabelled_rows_only_when_allowed(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "p", "completions": ["a", "b"]}])
    with pytest.raises(DataError, match=r"steps.jsonl line 1, field 'labels': missing"):
        read_steps(path)
    (r,) = read_steps(path, require_labels=False)
    assert r["labels"] is None and r["completions"] == ["a", "b"]


def test_chat_prompt_rendered_with_a_tokenizer(tok):
    msgs = [{"role": "user", "content": "2 + 3 ="}]
    (r,) = read_steps([{"prompt": msgs, "completions": ["2 + 3 = 5"], "labels": [1]}])
    assert r["prompt"] == msgs
    (r,) = read_steps([{"prompt": msgs, "completions": ["2 + 3 = 5"], "labels": [1]}], tokenizer=tok)
    assert r["prompt"] == "<|user|>2 + 3 =\n<|assistant|>"


BAD_ROWS = [
    ({"prompt": "p", "completions": ["a", "b"], "labels": [1, 2]},
     r"line 1, field 'labels\[1\]': expected \+1 \(good\), 0 \(neutral\), -1 \(bad\), true/false or null, got 2"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [1, 0.5]}, r"field 'labels\[1\]'.*fractions go in soft"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [1]},
     r"line 1, field 'labels': expected a list of 2 labels \(one per step in 'completions'\), got a list of 1"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": "good"}, r"field 'labels': expected a list of 2"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True, -1]}, r"field 'labels': expected all booleans"),
    ({"prompt": "p", "completions": ["a\nb", "c"], "labels": [1, 1]},
     r"field 'completions\[0\]': a step must not contain the step separator '\\n'"),
    ({"prompt": "p", "completions": [], "labels": []}, r"field 'completions': expected a non-empty list of steps"),
    ({"prompt": "p", "completions": "a\nb", "labels": [1, 1]}, r"field 'completions': expected a non-empty list"),
    ({"prompt": "p", "completions": ["a", " "], "labels": [1, 1]}, r"field 'completions\[1\]': expected a non-empty"),
    ({"prompt": "p", "completions": ["a", 3], "labels": [1, 1]}, r"field 'completions\[1\]'.*got a number"),
    ({"prompt": 5, "completions": ["a"], "labels": [1]}, r"field 'prompt': expected a string or a non-empty list"),
    ({"completions": ["a"], "labels": [1]}, r"field 'prompt': missing"),
    ({"prompt": "p", "labels": [1]}, r"field 'completions': missing"),
    ({"prompt": "p", "completions": ["a"], "labels": [1], "soft_labels": [1.5]},
     r"field 'soft_labels\[0\]': expected a number in 0..1 or null, got 1.5"),
    ({"prompt": "p", "completions": ["a"], "labels": [1], "soft_labels": [0.5, 0.5]},
     r"field 'soft_labels': expected a list of 1 numbers"),
    ({"prompt": "p", "completions": ["a"], "labels": [1], "outcome": "yes"}, r"field 'outcome': expected true/false"),
    ({"prompt": "p", "completions": ["a"], "labels": [None]}, r"field 'labels': missing"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = _jsonl(tmp_path, [row])
    with pytest.raises(DataError, match=message) as e:
        read_steps(path)
    assert str(e.value).startswith(f"{path} line 1, field")


def test_bad_row_on_a_later_line_and_skipping(tmp_path):
    path = _jsonl(tmp_path, [GOOD, "{not json", {"prompt": "p", "completions": ["a"], "labels": [7]}])
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        read_steps(path)
    stats = DataStats()
    records = read_steps(path, skip_bad_rows=True, stats=stats)
    assert len(records) == 1 and stats.bad_rows == 2
    assert "line 3, field 'labels[0]'" in stats.errors[1]


# ------------------------------------------------------------------------------------------------ kinds
def test_steps_rows_are_their_own_kind_not_rankings(tmp_path):
    assert detect_kind(["prompt", "completions", "labels"]) == "steps"
    assert detect_kind(["prompt", "completions", "soft_labels"]) == "steps"
    assert detect_kind(["prompt", "completions", "ranking"]) == "ranking"
    assert detect_kind(["prompt", "completions", "best"]) == "ranking"
    path = _jsonl(tmp_path, [GOOD])
    records, stats = load_records(path)
    assert stats.kind == "steps" and records[0]["labels"] == [1, -1]
    with pytest.raises(DataError, match=r"expected preference or ranking data, but these are step-level labels"
                                        r".*alignloop prm"):
        load_preferences(path)


# ------------------------------------------------------------------------------------------------ tokenisation
def test_tokenize_steps_by_hand(tok):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    prompt, steps = "1 + 2 =", ["1 + 2 = 3", "so the answer is 3"]
    ids, ends = tokenize_steps(tok, prompt, steps)
    p, s1, s2, sep = enc(prompt), enc(steps[0]), enc(steps[1]), enc("\n")
    assert ids == p + s1 + sep + s2 + sep
    assert ends == [len(p) + len(s1) + len(sep) - 1, len(ids) - 1]
    assert [ids[e] for e in ends] == [sep[-1]] * 2
    # a newline inside the prompt is not a step end
    _ids2, ends2 = tokenize_steps(tok, "question\n", steps)
    assert len(ends2) == 2 and ends2[0] == len(enc("question\n")) + len(s1) + len(sep) - 1
    ids3, _ = tokenize_steps(tok, prompt, steps, add_bos=True)
    assert ids3 == [tok.bos_token_id] + ids


def test_tokenize_steps_truncation_keeps_whole_steps(tok):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    prompt, steps = "1 + 2 =", ["1 + 2 = 3", "so the answer is 3", "done"]
    full, ends = tokenize_steps(tok, prompt, steps)
    room = ends[1] + 1                                    # exactly the prompt and two steps
    stats = DataStats()
    ids, kept = tokenize_steps(tok, prompt, steps, max_length=room + 1, stats=stats)
    assert ids == full[:room] and kept == ends[:2]        # the third step dropped: 3 - 2 = 1
    assert stats.truncated == 1 and stats.dropped == 0
    assert tokenize_steps(tok, prompt, steps, max_length=len(full)) == (full, ends)
    assert tokenize_steps(tok, prompt, steps, max_length=3, stats=stats) == ([], [])   # not even one step
    assert stats.dropped == 1
    assert tokenize_steps(tok, prompt, steps, max_length=room, truncation="drop") == ([], [])
    with pytest.raises(DataError, match=rf"a solution of {len(full)} tokens .* longer than max_length {room}"):
        tokenize_steps(tok, prompt, steps, max_length=room, truncation="error")
    # keep_end: the prompt's start is cut first (down to max_prompt_length)
    p = enc(prompt)
    body = full[len(p):]
    ids, kept = tokenize_steps(tok, prompt, steps, max_length=len(body) + 1, truncation="keep_end",
                               max_prompt_length=1)
    assert ids == p[-1:] + body and len(kept) == 3
    # with BOS: it stays first whatever is cut, in one token of the budget
    bos = tok.bos_token_id
    ids, kept = tokenize_steps(tok, prompt, steps, max_length=len(body) + 2, truncation="keep_end",
                               max_prompt_length=1, add_bos=True)
    assert ids == [bos] + p[-1:] + body and kept == [k - len(p) + 2 for k in ends]


def test_tokenize_step_records_and_chat_prompts(tok):
    records = read_steps([GOOD, {"prompt": [{"role": "user", "content": "1 + 1"}], "completions": ["1 + 1 = 2"],
                                 "labels": [1], "soft_labels": [0.75]}])
    examples, _stats = tokenize_step_records(records, tok)
    assert [e["labels"] for e in examples] == [[1, -1], [1]]
    assert examples[1]["soft_labels"] == [0.75] and examples[0]["soft_labels"] == [None, None]
    ids, ends = tokenize_steps(tok, "<|user|>1 + 1\n<|assistant|>", ["1 + 1 = 2"])
    assert examples[1]["input_ids"] == ids and examples[1]["step_ends"] == ends
    with pytest.raises(DataError, match="list of messages; give a tokenizer"):
        prompt_string(records[1])
    assert prompt_string(records[0]) == GOOD["prompt"]


# ------------------------------------------------------------------------------------------------ outcome view
def test_outcome_rows_label_only_the_final_step():
    rows = read_steps([GOOD, {"prompt": "p", "completions": ["a", "b", "c"], "labels": [1, 0, 1]},
                       {"prompt": "p", "completions": ["a", "b"], "labels": [-1, 1], "outcome": True},
                       {"prompt": "p", "completions": ["a"], "labels": [0], "soft_labels": [0.3]}])
    out = outcome_rows(rows)
    assert [r["labels"] for r in out] == [[None, -1], [None, None, 1], [None, 1], [1]]
    assert [r["completions"] for r in out] == [r["completions"] for r in rows]   # same steps, same tokens
    assert out[3]["soft_labels"] == [0.3]
    assert rows[0]["labels"] == [1, -1]                                          # the input is left alone
    with pytest.raises(DataError, match="no labels and no outcome"):
        outcome_rows(read_steps([{"prompt": "p", "completions": ["a"]}], require_labels=False))


def _llama_style_tokenizer():
    """A SentencePiece-style BPE as Llama 2's: a normalizer that prefixes "▁" and turns spaces into "▁", byte
    fallback; trained here on a few lines (no download)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{i:02X}>" for i in range(256)]
    t.train_from_iterator(["First step is here\nSecond step is here\n"] * 100, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", *alphabet], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def test_tokenize_steps_reads_the_text_as_the_model_does_with_a_prefix_space_tokenizer():
    """Encoded piece by piece, a Llama-style tokenizer puts "▁" before every step and every separator (the PRM would
    read "Q: First step is here \\n Second ..."): the whole text is tokenised once and each step ends at the token
    holding its separator's last character, here a token that also starts the next step ("...here\\nSe"), where the
    rollout finds the step end too."""
    from alignloop.rollout import step_end_positions

    tok = _llama_style_tokenizer()
    steps = ["First step is here", "Second step is here"]
    ids, ends = tokenize_steps(tok, "Q:", steps)
    natural = tok("Q:" + join_steps(steps), add_special_tokens=False)["input_ids"]
    assert ids == natural and tok.decode(ids) == "Q:First step is here\nSecond step is here\n"
    tokens = tok.convert_ids_to_tokens(ids)
    assert [tokens[e] for e in ends] == ["rst▁step▁is▁here\nSe", "cond▁step▁is▁here\n"]
    n_prompt = len(tok("Q:", add_special_tokens=False)["input_ids"])
    assert step_end_positions(ids[n_prompt:], tok) == [e - n_prompt for e in ends]
    # truncation still keeps whole steps: the first one alone
    assert tokenize_steps(tok, "Q:", steps, max_length=ends[0] + 1) == (ids[:ends[0] + 1], ends[:1])


def test_a_separator_split_into_byte_tokens_ends_at_its_last_byte():
    """A separator character with no token of its own ("ки", Math-Shepherd's step tag, in a byte-level BPE trained
    on English) is several byte tokens: the step ends at the last of them, where the rollout finds it, and every
    byte is in the input."""
    from alignloop.rollout import step_end_positions

    tok = train_tokenizer(["First step is here. Second step is here."] * 50, vocab_size=280)
    steps = ["First step is here", "Second step is here"]
    ids, ends = tokenize_steps(tok, "", steps, separator="ки")
    assert ids == tok("".join(s + "ки" for s in steps), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[:ends[0] + 1]).endswith("First step is hereки") and ends[-1] == len(ids) - 1
    assert step_end_positions(ids, tok, separator="ки") == ends
