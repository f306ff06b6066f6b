"""The labeler context of judgements (labeler, labeler_attributes, comment, flags, time_spent_ms, criterion; consensus
labelers/comments) survives reading and writing in every format, is validated, and keeps flat groups apart; prompt
rows keep `user`, and user tags go in and come out of prompts."""
from __future__ import annotations

import pytest

from alignloop.data import (
    USER_TAG,
    DataError,
    groups_to_rows,
    groups_to_unpaired,
    load_preferences,
    load_prompts,
    load_sft,
    load_unpaired,
    prompt_texts,
    split_user_tag,
    tag_prompt,
    write_rows,
)

META_A = {"labeler": "L3f9a2c", "labeler_attributes": {"group": "warm", "locale": "en-GB"},
          "comment": "too long, but kind", "flags": ["off_topic"], "time_spent_ms": 5200, "criterion": "helpful"}
META_B = {"labeler": "L77b0d1", "labeler_attributes": {"group": "cool", "expertise": "film"}, "flags": [],
          "time_spent_ms": 800, "criterion": "harmless"}
CONSENSUS = {"labelers": ["L1", "L2"], "comments": ["fine", "[sic] long"], "flags": ["unsure"], "criterion": "helpful"}

SUFFIXES = [".jsonl", ".json", ".parquet", ".csv"]


def _pref_rows():
    return [{"prompt": "Review:", "chosen": " lovely", "rejected": " dull", **META_A},
            {"prompt": "Review:", "chosen": " precise", "rejected": " gushing", **META_B},
            {"prompt": "Plain:", "chosen": " x", "rejected": " y"},                 # no context: meta {}
            {"prompt": "Both:", "chosen": " a", "rejected": " b", **CONSENSUS}]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_preference_meta_round_trip(tmp_path, suffix):
    path = write_rows(_pref_rows(), tmp_path / f"pairs{suffix}")
    groups, _ = load_preferences(str(path))
    assert [g.meta for g in groups] == [META_A, META_B, {}, CONSENSUS]
    # written back by groups_to_rows (after the contract's columns), read again: the same groups
    again = write_rows(groups_to_rows(groups), tmp_path / f"again{suffix}")
    groups2, _ = load_preferences(str(again))
    assert [(g.prompt, g.pairs, g.meta) for g in groups2] == [(g.prompt, g.pairs, g.meta) for g in groups]
    assert "labeler" not in groups_to_rows(groups)[2]          # absent columns stay absent


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_ranking_and_unpaired_meta_round_trip(tmp_path, suffix):
    rows = [{"prompt": "Q", "completions": [" a", " b", " c"], "ranking": [2, 1, 3], **META_A}]
    groups, _ = load_preferences(str(write_rows(rows, tmp_path / f"rank{suffix}")))
    assert groups[0].meta == META_A and groups[0].ranking == [2, 1, 3]
    flat = groups_to_rows(groups)
    assert len(flat) == 3 and all(r["criterion"] == "helpful" for r in flat)
    regrouped, _ = load_preferences(str(write_rows(flat, tmp_path / f"flat{suffix}")))
    assert len(regrouped) == 1 and regrouped[0].meta == META_A and len(regrouped[0].pairs) == 3
    unpaired = groups_to_unpaired(groups)
    assert [(r["completion"], r["label"]) for r in unpaired] == [(" b", True), (" c", False)]
    records, _ = load_unpaired(str(write_rows(unpaired, tmp_path / f"kto{suffix}")))
    assert records == [{"prompt": "Q", "completion": " b", "label": True, **META_A},
                       {"prompt": "Q", "completion": " c", "label": False, **META_A}]


def test_sft_records_keep_meta(tmp_path):
    records, _ = load_sft([{"prompt": "p", "completion": " c", "labeler": "L1", "criterion": "helpful"}])
    assert records == [{"prompt": "p", "completion": " c", "labeler": "L1", "criterion": "helpful"}]


def test_flat_rows_of_one_group_merge_only_with_equal_meta():
    base = {"prompt": "P", "group": 0, "pair_weight": 0.5}
    rows = [base | {"chosen": " a", "rejected": " b", "labeler": "L1"},
            base | {"chosen": " a", "rejected": " c", "labeler": "L1"},
            base | {"chosen": " b", "rejected": " c", "labeler": "L2"},    # another labeler: its own group
            base | {"chosen": " c", "rejected": " a", "labeler": "L2", "criterion": "harmless"}]
    groups, stats = load_preferences(rows)
    assert [(len(g.pairs), g.meta) for g in groups] == [
        (2, {"labeler": "L1"}), (1, {"labeler": "L2"}), (1, {"labeler": "L2", "criterion": "harmless"})]
    assert stats.pairs == 4 and all(g.pair_weight == 0.5 for g in groups)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("labeler", 3, r"field 'labeler': expected a string, got a number \(3\)"),
    ("labeler_attributes", {"group": 1}, r"field 'labeler_attributes': .*key 'group' holds a number"),
    ("labeler_attributes", "warm", r"field 'labeler_attributes': expected an object"),
    ("flags", "off_topic", r"field 'flags': expected a list of strings, got a string"),
    ("flags", ["a", 2], r"field 'flags': expected a list of strings"),
    ("time_spent_ms", -5, r"field 'time_spent_ms': expected an integer >= 0"),
    ("time_spent_ms", "5s", r"field 'time_spent_ms': expected an integer >= 0"),
    ("time_spent_ms", "²", r"field 'time_spent_ms': expected an integer >= 0"),
    ("criterion", "", r"field 'criterion': expected a non-empty string"),
    ("comments", [None], r"field 'comments': expected a list of strings"),
])
def test_bad_meta_names_row_and_field(tmp_path, field, value, message):
    rows = [{"prompt": "P", "chosen": " a", "rejected": " b"}, {"prompt": "P", "chosen": " a", "rejected": " b",
                                                                 field: value}]
    path = write_rows(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2, " + message):
        load_preferences(str(path))
    with pytest.raises(DataError, match=r"row 1, " + message):
        load_unpaired([{"prompt": "P", "completion": " a", "label": True},
                       {"prompt": "P", "completion": " a", "label": True, field: value}])


def test_csv_cells_are_read_as_their_types(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,chosen,rejected,time_spent_ms,flags,labeler_attributes,comment\n'
                    'P, a, b,1200,"[""x""]","{""group"": ""warm""}",[not json]\n'
                    'P, c, d,,,,\n')
    groups, _ = load_preferences(str(path))
    assert groups[0].meta == {"time_spent_ms": 1200, "flags": ["x"], "labeler_attributes": {"group": "warm"},
                              "comment": "[not json]"}
    assert groups[1].meta == {}          # empty cells: absent


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_prompt_rows_keep_user_and_get_tagged(tmp_path, suffix):
    path = write_rows([{"prompt": "Write a review.", "user": "ann"}, {"prompt": "Another."}], tmp_path / f"p{suffix}")
    records, _ = load_prompts(str(path))
    assert records == [{"prompt": "Write a review.", "user": "ann"}, {"prompt": "Another."}]
    assert prompt_texts(str(path)) == ["Write a review.", "Another."]
    assert prompt_texts(str(path), user_tag=USER_TAG) == ["<user:ann> Write a review.", "Another."]
    assert prompt_texts(str(path), user_tag="[{user}] ") == ["[ann] Write a review.", "Another."]


def test_user_tags():
    assert tag_prompt("Hi", "bob") == "<user:bob> Hi"
    assert tag_prompt("Hi", None) == "Hi"
    assert split_user_tag("<user:bob> Hi") == ("bob", "Hi")
    assert split_user_tag(tag_prompt("<user:x> nested", "a")) == ("a", "<user:x> nested")   # one tag only
    assert split_user_tag("Hi <user:bob> ") == (None, "Hi <user:bob> ")                   # not at the start
    assert split_user_tag("<user:two words> Hi") == (None, "<user:two words> Hi")          # not a name
    assert split_user_tag("[g1] Hi", "[{user}] ") == ("g1", "Hi")
    for bad in ("", "a b", "a>b", None):
        if bad is not None:
            with pytest.raises(DataError, match="user name"):
                tag_prompt("Hi", bad)
    for template in ("<user> ", "{user}", "{user}{user}> "):
        with pytest.raises(DataError, match="template"):
            tag_prompt("Hi", "bob", template)
    with pytest.raises(DataError, match=r"row 0, field 'user'"):
        load_prompts([{"prompt": "P", "user": "has space"}])


def test_a_name_cannot_hold_the_end_of_its_templates_tag():
    """With the template "[{user}] ", a name "a]b" would be written "[a]b] Hi", which a template
    ending "]]" or a prompt starting "] " would read back wrong: refused, whatever characters end the template's tag."""
    with pytest.raises(DataError, match=r"user name 'a\]b'.*'\]'"):
        tag_prompt("Hi", "a]b", "[{user}] ")
    assert split_user_tag(tag_prompt("Hi", "a>b", "[{user}] "), "[{user}] ") == ("a>b", "Hi")   # ">" ends no tag here


def test_a_csv_cell_of_non_ascii_digits_is_a_bad_row(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected,time_spent_ms\nP, a, b,²\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2.*field 'time_spent_ms': expected an integer >= 0"):
        load_preferences(str(path))
