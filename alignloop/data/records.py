"""Format detection and row validation: rows -> normalised records, and the `load_*` functions.

Normalised records (before chat templating a text may also be a list of messages; after it, all are strings):
  sft:        {"prompt": str, "completion": str}  (a `text` row is {"prompt": "", "completion": text}; a
              `messages` row is split before its last assistant message; "add_eos": False when the row says so;
              after chat templating, "assistant_spans": the earlier assistant turns' character spans in the prompt)
  preference: `PreferenceGroup(prompt, pairs=[Pair(chosen, rejected, margin, tie)], pair_weight, ...)`
  unpaired:   {"prompt": str, "completion": str, "label": bool}
  prompt:     {"prompt": str} (+ "user": str when the row names its user, for user-tagged prompts)
Labeler context (`META_COLUMNS`, all optional): validated by `parse_meta`, kept in `PreferenceGroup.meta` and as
extra keys of sft and unpaired records; an absent column (or a null, or an empty CSV cell) stays absent.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

from alignloop.data.chat import assistant_spans, check_chat_template, render_completion, render_prompt
from alignloop.data.conversions import (
    Pair,
    PreferenceGroup,
    implicit_messages_prompt,
    implicit_text_prompt,
    ranking_pair_weight,
    rankings_to_pairs,
    strength_to_margin,
)
from alignloop.data.errors import DataError, DataStats, raise_or_skip
from alignloop.data.readers import Row, read_raw_rows, type_name
from alignloop.data.steps import STEPS_HELP, StepRowError, parse_step_row
from alignloop.data.users import check_user, tag_prompt

KINDS = ("sft", "preference", "ranking", "unpaired", "steps", "prompt")
# Required columns of each format, for detection (first match wins) and for error messages.
FORMATS: list[tuple[str, tuple[str, ...]]] = [
    ("preference", ("chosen", "rejected")),
    ("ranking", ("prompt", "completions", "ranking")),
    ("ranking", ("prompt", "completions", "best")),
    ("unpaired", ("prompt", "completion", "label")),
    ("steps", ("prompt", "completions", "labels")),
    ("steps", ("prompt", "completions", "soft_labels")),
    ("sft", ("messages",)),
    ("sft", ("text",)),
    ("sft", ("prompt", "completion")),
    ("prompt", ("prompt",)),
]
FORMAT_HELP = ("text | messages | prompt+completion (sft); prompt+chosen+rejected [+margin|strength] or "
               "chosen+rejected (preference); prompt+completions+ranking or prompt+completions+best (ranking); "
               "prompt+completion+label "
               "(unpaired); prompt+completions+labels (steps: one label per step); prompt (prompt)")


# The labeler context a judgement row may carry (the data contract of personalization and multi-criteria reward
# models; `feedback` export writes them): column -> what it must be. Consensus rows (one row from several labelers)
# carry `labelers` and `comments` instead of `labeler` and `comment`, and `flags` as the union.
META_COLUMNS: dict[str, str] = {
    "labeler": "string",              # a pseudonymous labeler id
    "labeler_attributes": "object",   # {str: str} set by an admin, e.g. {"group": "warm", "locale": "en-GB"}
    "comment": "string",
    "flags": "string list",
    "time_spent_ms": "integer",       # >= 0
    "criterion": "string",            # which question of a multi-question item (e.g. "helpful"); non-empty
    "labelers": "string list",
    "comments": "string list",
}


class BadRow(Exception):
    """Internal: a row failed validation (message without the location)."""


def detect_kind(columns) -> str | None:
    """The format whose required columns are all in `columns` (None if none fits). Order: preference, ranking,
    unpaired, steps (prompt+completions+labels or soft_labels: step-level labels, not a ranking), sft (messages,
    text, prompt+completion), prompt."""
    cols = set(columns)
    for kind, required in FORMATS:
        if set(required) <= cols:
            return kind
    return None


# ---------------------------------------------------------------- field validation

def _missing(row: Row, field: str, expected: str):
    if field not in row:
        raise BadRow(f"field '{field}': missing (expected {expected})")
    return row[field]


def _maybe_json(row: Row, value: Any) -> Any:
    """CSV cells are text: decode JSON lists (messages, completions, ranks)."""
    if row.from_text and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _messages(field: str, value: list) -> list[dict]:
    if not value:
        raise BadRow(f"field '{field}': expected a non-empty list of messages, got an empty list")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow(f"field '{field}': message {i} should be {{\"role\": string, \"content\": string}}, "
                         f"got {json.dumps(m)[:80] if isinstance(m, (dict, list, str)) else type_name(m)}")
    # keep extra keys (name, ...) a template may use, but not the nulls that Parquet/Arrow structs add
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _text_or_messages(row: Row, field: str, value: Any = ..., allow_empty: bool = True):
    expected = "a string or a list of messages"
    value = _missing(row, field, expected) if value is ... else value
    value = _maybe_json(row, value)
    if isinstance(value, str):
        if not value and not allow_empty:
            raise BadRow(f"field '{field}': expected a non-empty string or a list of messages, got an empty string")
        return value
    if isinstance(value, (list, tuple)):
        return _messages(field, list(value))
    raise BadRow(f"field '{field}': expected {expected}, got {type_name(value)}")


def _same_style(fields: dict[str, Any]) -> None:
    """All texts of a row must be strings, or all lists of messages."""
    styles = {name: isinstance(v, list) for name, v in fields.items() if v is not None}
    if len(set(styles.values())) > 1:
        first = next(iter(styles))
        for name, conv in styles.items():
            if conv != styles[first]:
                want = "a list of messages" if styles[first] else "a string"
                raise BadRow(f"field '{name}': expected {want} like '{first}' (do not mix plain text and "
                             f"conversational fields in a row)")


def _number(row: Row, field: str) -> float | None:
    value = row.get(field)
    if value is None or (isinstance(value, float) and math.isnan(value)) or (row.from_text and value == ""):
        return None
    if row.from_text and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
        raise BadRow(f"field '{field}': expected a number, got {type_name(value)}")
    return float(value)


def _label(row: Row) -> bool:
    return _bool(row, "label", _missing(row, "label", "true or false"))


def _bool(row: Row, field: str, value: Any) -> bool:
    if isinstance(value, str) and row.from_text:
        low = value.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadRow(f"field '{field}': expected true or false, got {type_name(value)}")


def _absent(row: Row, value: Any) -> bool:
    """A missing value: null (Parquet/Arrow fill absent cells with it), NaN (pandas), an empty CSV cell."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (row.from_text and value == "")


def _meta_value(row: Row, name: str, value: Any) -> Any:
    kind = META_COLUMNS[name]
    if kind == "string":
        if not isinstance(value, str) or (name == "criterion" and not value):
            raise BadRow(f"field '{name}': expected a{' non-empty' if name == 'criterion' else ''} string, "
                         f"got {type_name(value)}")
        return value
    if kind == "string list":
        value = _maybe_json(row, value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise BadRow(f"field '{name}': expected a list of strings, got {type_name(value)}")
        return list(value)
    if kind == "integer":
        if row.from_text and isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():  # JSON/pandas may write 1200.0
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRow(f"field '{name}': expected an integer >= 0, got {type_name(value)}")
        return value
    if row.from_text and isinstance(value, str) and value.lstrip().startswith("{"):  # CSV: JSON text
        with contextlib.suppress(json.JSONDecodeError):  # not JSON: the type error below names it
            value = json.loads(value)
    if not isinstance(value, dict):
        raise BadRow(f"field '{name}': expected an object of strings (e.g. {{\"group\": \"warm\"}}), "
                     f"got {type_name(value)}")
    # Parquet stores an object column as a struct of every row's keys: a key this row lacks reads back as null
    value = {k: v for k, v in value.items() if v is not None}
    bad = next((k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, str)), None)
    if bad is not None:
        raise BadRow(f"field '{name}': expected an object of strings, but key {bad!r} holds {type_name(value[bad])}")
    return value


def parse_meta(row: Row) -> dict[str, Any]:
    """The row's labeler context: the `META_COLUMNS` it holds (absent ones left out), each checked (a wrong type is
    a BadRow naming the field)."""
    return {name: _meta_value(row, name, row[name]) for name in META_COLUMNS
            if name in row and not _absent(row, row[name])}


# ---------------------------------------------------------------- per-format parsers

def _split_messages(msgs: list[dict]) -> tuple[list, list]:
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise BadRow("field 'messages': expected at least one message with role 'assistant'")
    return msgs[:last], msgs[last:]


def parse_sft(row: Row, **_) -> dict:
    """An SFT record; an optional `add_eos: false` column keeps EOS off that row's completion (text that does not end
    there, e.g. a sample cut at max_new_tokens). The row's labeler context (`parse_meta`) rides along as extra keys."""
    record = _sft_texts(row)
    if "add_eos" in row and row["add_eos"] is not None:
        record["add_eos"] = _bool(row, "add_eos", row["add_eos"])
    return record | parse_meta(row)


def _sft_texts(row: Row) -> dict:
    if "messages" in row:
        msgs = _maybe_json(row, row["messages"])
        if not isinstance(msgs, (list, tuple)):
            raise BadRow(f"field 'messages': expected a list of messages, got {type_name(msgs)}")
        prompt, completion = _split_messages(_messages("messages", list(msgs)))
        return {"prompt": prompt, "completion": completion}
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str) or not text:
            raise BadRow(f"field 'text': expected a non-empty string, got {type_name(text)}")
        return {"prompt": "", "completion": text}
    prompt = _text_or_messages(row, "prompt")
    completion = _text_or_messages(row, "completion")
    _same_style({"prompt": prompt, "completion": completion})
    return {"prompt": prompt, "completion": completion}


def parse_prompt(row: Row, **_) -> dict:
    """A prompt record; a `user` column (the prompt's user, for user-tagged prompts) is kept as "user"."""
    record = {"prompt": _text_or_messages(row, "prompt", allow_empty=False)}
    user = _user(row)
    return record if user is None else record | {"user": user}


def _user(row: Row) -> str | None:
    if "user" not in row or _absent(row, row["user"]):
        return None
    try:
        return check_user(row["user"])
    except DataError as e:
        raise BadRow(f"field 'user': {e}") from None


def parse_unpaired(row: Row, **_) -> dict:
    prompt = _text_or_messages(row, "prompt")
    completion = _text_or_messages(row, "completion")
    _same_style({"prompt": prompt, "completion": completion})
    return {"prompt": prompt, "completion": completion, "label": _label(row)} | parse_meta(row)


def _string_prompt_conversations(prompt: str, chosen: list, rejected: list) -> tuple[list, list, list]:
    """UltraFeedback-binarized's shape: a string `prompt` beside `chosen`/`rejected` conversations that hold it as
    their user turn. The prompt is the conversations' shared messages before the final assistant one (whose last
    user message must be the string prompt), or the string prompt as a user message when they hold only the answer."""
    try:
        shared, chosen, rejected = implicit_messages_prompt(chosen, rejected)
    except ValueError as e:
        raise BadRow(f"field 'chosen': {e}") from None
    if not shared:
        return [{"role": "user", "content": prompt}], chosen, rejected
    users = [m for m in shared if m.get("role") == "user"]
    if not users or str(users[-1].get("content", "")).strip() != prompt.strip():
        raise BadRow("field 'prompt': a string prompt beside conversations must be their last user message "
                     "(UltraFeedback's shape); it is not")
    return shared, chosen, rejected


def parse_preference(row: Row, margins="small", include_ties: bool = False, stats: DataStats | None = None,
                     **_) -> PreferenceGroup | None:
    chosen = _text_or_messages(row, "chosen")
    rejected = _text_or_messages(row, "rejected")
    implicit = "prompt" not in row
    prompt = None if implicit else _text_or_messages(row, "prompt")
    if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _string_prompt_conversations(prompt, chosen, rejected)
    _same_style({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if implicit:
        try:
            if isinstance(chosen, list):
                prompt, chosen, rejected = implicit_messages_prompt(chosen, rejected)
            else:
                prompt, chosen, rejected = implicit_text_prompt(chosen, rejected)
        except ValueError as e:
            raise BadRow(f"field 'chosen': {e}") from None
    margin = _number(row, "margin")
    if margin is None and row.get("strength") not in (None, ""):
        try:
            margin = strength_to_margin(row["strength"], margins)
        except ValueError as e:
            raise BadRow(f"field 'strength': {e}") from None
    weight = _number(row, "pair_weight")
    tie = row.get("tie") in (True, "true", "True", "1", 1)
    if tie and not include_ties:  # a tie row (from groups_to_rows(with_ties=True)): skipped like ranking ties
        if stats is not None:
            stats.ties_skipped += 1
        return None
    return PreferenceGroup(prompt, [Pair(chosen, rejected, 0.0 if margin is None else margin, tie)],
                           1.0 if weight is None else weight, where=row.where, meta=parse_meta(row))


def parse_ranking(row: Row, include_ties: bool = False, stats: DataStats | None = None, **_) -> PreferenceGroup:
    prompt = _text_or_messages(row, "prompt")
    completions = _maybe_json(row, _missing(row, "completions", "a list of strings or of message lists"))
    if not isinstance(completions, (list, tuple)) or len(completions) < 2:
        raise BadRow(f"field 'completions': expected a list of at least 2 completions (strings or lists of "
                     f"messages), got {type_name(completions)}")
    completions = [_text_or_messages(row, f"completions[{i}]", c) for i, c in enumerate(completions)]
    _same_style({"prompt": prompt, **{f"completions[{i}]": c for i, c in enumerate(completions)}})
    k = len(completions)
    if "ranking" not in row and "best" in row:
        ranking = _best_as_ranking(row, k)
    else:
        ranking = _maybe_json(row, _missing(row, "ranking", "a list of integer ranks"))
    if (not isinstance(ranking, (list, tuple)) or len(ranking) != k
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranking)):
        raise BadRow(f"field 'ranking': expected a list of {k} integer ranks >= 1 (one per completion, 1 = best, "
                     f"equal ranks = ties), got "
                     f"{json.dumps(ranking, default=str) if isinstance(ranking, list) else type_name(ranking)}")
    ranking = list(ranking)
    pairs = rankings_to_pairs(completions, ranking, include_ties)
    if stats is not None:
        n_ties = sum(ranking[i] == ranking[j] for i in range(k) for j in range(i + 1, k))
        stats.ties_skipped += 0 if include_ties else n_ties
    return PreferenceGroup(prompt, pairs, ranking_pair_weight(k), completions, ranking, where=row.where,
                           meta=parse_meta(row))


def _best_as_ranking(row: Row, k: int) -> list[int]:
    """A best-of-K row (Ziegler et al. 2019: the labeler picked one of K): `best`, the 0-based index of the picked
    completion, is the ranking [2, ..., 1, ..., 2]: the pick first, the others tied below it (no order among them)."""
    best = row["best"]
    if row.from_text and isinstance(best, str) and best.strip().isascii() and best.strip().isdigit():
        best = int(best)
    if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < k:
        raise BadRow(f"field 'best': expected the index of the best completion, an integer 0..{k - 1}, got "
                     f"{json.dumps(best) if isinstance(best, (int, str)) else type_name(best)}")
    return [1 if i == best else 2 for i in range(k)]


def parse_steps(row: Row, **_) -> dict:
    """A step record (see `alignloop.data.steps`): prompt, completions (the steps), labels per step."""
    try:
        return parse_step_row(row)
    except StepRowError as e:
        raise BadRow(str(e)) from None


PARSERS: dict[str, Callable[..., Any]] = {"sft": parse_sft, "prompt": parse_prompt, "unpaired": parse_unpaired,
                                          "preference": parse_preference, "ranking": parse_ranking,
                                          "steps": parse_steps}


def prompt_of(record: Any) -> Any:
    return record.prompt if isinstance(record, PreferenceGroup) else record["prompt"]


# ---------------------------------------------------------------- chat templating

def render_record(record: Any, tokenizer) -> Any:
    """Apply the chat template to a record whose texts are lists of messages; plain-text records pass through.
    Raises ValueError when the template cannot separate the completion (see `chat.render_completion`)."""
    prompt = prompt_of(record)
    conv = isinstance(prompt, list) or (isinstance(record, dict) and isinstance(record.get("completion"), list)) \
        or (isinstance(record, PreferenceGroup) and record.pairs and isinstance(record.pairs[0].chosen, list))
    if not conv:
        return record
    prompt = prompt or []
    p = render_prompt(prompt, tokenizer)
    cache: dict[str, str] = {}

    def completion(msgs: list) -> str:
        key = json.dumps(msgs)
        if key not in cache:
            cache[key] = render_completion(prompt, msgs, tokenizer, p)
        return cache[key]

    if isinstance(record, PreferenceGroup):
        return PreferenceGroup(p, [Pair(completion(x.chosen), completion(x.rejected), x.margin, x.tie)
                                   for x in record.pairs], record.pair_weight,
                               None if record.completions is None else [completion(c) for c in record.completions],
                               record.ranking, record.where, record.meta)
    out = dict(record, prompt=p)
    if "completion" in record:
        out["completion"] = completion(record["completion"])
        # where the earlier assistant turns lie in the rendered prompt: SFT can train on every turn
        spans = assistant_spans(prompt, tokenizer, p)
        if spans:
            out["assistant_spans"] = spans
    return out


def is_conversational(record: Any) -> bool:
    p = prompt_of(record)
    if isinstance(p, list) and p:
        return True
    if isinstance(record, PreferenceGroup):
        return bool(record.pairs) and isinstance(record.pairs[0].chosen, list)
    return isinstance(record.get("completion"), list)


# ---------------------------------------------------------------- loading

def parse_rows(rows: list[Row] | list[dict], kind: str | None = None, *, tokenizer=None, include_ties: bool = False,
               margins: str | dict = "small", stats: DataStats | None = None) -> list:
    """Validate rows and turn them into normalised records of `kind` (detected from the first row's columns when
    None). Bad rows are recorded in `stats` (not raised). With a tokenizer, conversational records are chat-templated
    (an error if the tokenizer has no chat template)."""
    stats = stats if stats is not None else DataStats()
    rows = [r if isinstance(r, Row) else Row(r, f"row {i}") for i, r in enumerate(rows)]
    first = next((r for r in rows if r.error is None), None)
    if kind is None:
        kind = detect_kind(first) if first is not None else None
        if kind is None and first is not None:
            raise DataError(f"{first.where}: the columns ({', '.join(first) or 'none'}) fit no known format; "
                            f"expected {FORMAT_HELP}")
    elif kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    stats.kind = kind
    parse = PARSERS[kind] if kind else None
    records: list = []
    group_ids: list = []
    template_checked = False
    for row in rows:
        if row.error is not None:
            stats.add_error(row.error)
            continue
        try:
            rec = parse(row, include_ties=include_ties, margins=margins, stats=stats)
        except BadRow as e:
            stats.add_error(f"{row.where}, {e}")
            continue
        if rec is None:
            continue
        if tokenizer is not None and is_conversational(rec):
            if not template_checked:
                check_chat_template(tokenizer, row.where)
                template_checked = True
            try:
                rec = render_record(rec, tokenizer)
            except ValueError as e:
                stats.add_error(f"{row.where}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - a template may raise anything (jinja errors, raise_exception)
                stats.add_error(f"{row.where}: the chat template failed on this row: {type(e).__name__}: {e}")
                continue
        group = row.get("group") if kind == "preference" else None
        # flat rows of one group (see groups_to_rows): merge them back, but only rows with the same labeler context:
        # a group's meta says who judged all of its pairs under which criterion (a reward model head trains on it)
        if (group is not None and records and group_ids[-1] == group and records[-1].prompt == rec.prompt
                and records[-1].meta == rec.meta):
            records[-1].pairs.extend(rec.pairs)
            continue
        records.append(rec)
        group_ids.append(group)
    if kind in ("preference", "ranking"):
        stats.pairs += sum(len(g.pairs) for g in records)
    stats.records += len(records)
    return records


def load_records(path_or_id: str | os.PathLike, kind: str | None = None, *, split: str = "train", tokenizer=None,
                 include_ties: bool = False, margins: str | dict = "small", skip_bad_rows: bool = False,
                 stats: DataStats | None = None) -> tuple[list, DataStats]:
    """Read and validate a file of any supported format. Returns (records, stats); see `parse_rows`."""
    stats = stats if stats is not None else DataStats()
    rows = read_raw_rows(path_or_id, split, stats)
    records = parse_rows(rows, kind, tokenizer=tokenizer, include_ties=include_ties, margins=margins, stats=stats)
    raise_or_skip(stats, skip_bad_rows)
    return records, stats


def _check_kind(stats: DataStats, allowed: tuple[str, ...], what: str, source) -> None:
    if stats.kind == "steps" and "steps" not in allowed:
        raise DataError(f"{source}: expected {what} data, but these are step-level labels ({STEPS_HELP}): train a "
                        f"process reward model on them with `alignloop prm`")
    if stats.kind is not None and stats.kind not in allowed:
        raise DataError(f"{source}: expected {what} data, but the columns are those of {stats.kind} data "
                        f"(formats: {FORMAT_HELP})")


def load_sft(path_or_id, *, kind: str | None = None, split: str = "train", tokenizer=None,
             skip_bad_rows: bool = False) -> tuple[list[dict], DataStats]:
    """SFT records {"prompt", "completion"} from text / messages / prompt+completion data."""
    records, stats = load_records(path_or_id, kind, split=split, tokenizer=tokenizer, skip_bad_rows=skip_bad_rows)
    _check_kind(stats, ("sft",), "SFT", path_or_id)
    return records, stats


def load_preferences(path_or_id, *, kind: str | None = None, split: str = "train", tokenizer=None,
                     include_ties: bool = False, margins: str | dict = "small",
                     skip_bad_rows: bool = False) -> tuple[list[PreferenceGroup], DataStats]:
    """Preference groups from pairwise (flat pairs: groups of one) or ranking data."""
    records, stats = load_records(path_or_id, kind, split=split, tokenizer=tokenizer, include_ties=include_ties,
                                  margins=margins, skip_bad_rows=skip_bad_rows)
    _check_kind(stats, ("preference", "ranking"), "preference or ranking", path_or_id)
    return records, stats


def load_unpaired(path_or_id, *, kind: str | None = None, split: str = "train", tokenizer=None,
                  skip_bad_rows: bool = False) -> tuple[list[dict], DataStats]:
    """Unpaired (KTO-style) records {"prompt", "completion", "label"}."""
    records, stats = load_records(path_or_id, kind, split=split, tokenizer=tokenizer, skip_bad_rows=skip_bad_rows)
    _check_kind(stats, ("unpaired",), "unpaired (prompt, completion, label)", path_or_id)
    return records, stats


def load_prompts(path_or_id, *, kind: str | None = None, split: str = "train", tokenizer=None,
                 skip_bad_rows: bool = False) -> tuple[list[dict], DataStats]:
    """Prompt records {"prompt"} from prompt-only data, or the prompts of any other format that has them
    (sft prompt+completion or messages, preference, ranking, unpaired). Duplicate prompts are kept. Prompt rows
    keep their "user"."""
    records, stats = load_records(path_or_id, kind, split=split, tokenizer=tokenizer, skip_bad_rows=skip_bad_rows)
    prompts = [{"prompt": prompt_of(r)} | ({"user": r["user"]} if isinstance(r, dict) and "user" in r else {})
               for r in records]
    if stats.kind == "sft" and prompts and all(p["prompt"] in ("", []) for p in prompts):
        raise DataError(f"{path_or_id}: SFT `text` rows have no prompt; give prompt-only data (a `prompt` column)")
    return prompts, stats


def prompt_texts(source, *, tokenizer=None, max_prompts: int | None = None, split: str = "train",
                 user_tag: str | None = None) -> list[str]:
    """The prompt strings of `source`, ready to tokenise: a list of strings as is; rows (a path of any supported
    format, a hub id, a list of dicts or a `datasets.Dataset`) through `load_prompts` (conversational prompts
    chat-templated with `tokenizer`). Only the first `max_prompts` are kept. An empty prompt or an empty source is a
    DataError naming where it came from. With `user_tag` (a template such as `users.USER_TAG`), each row with a
    `user` field gets its user's tag in front of the (rendered) prompt, where `split_user_tag` finds it again."""
    if isinstance(source, (list, tuple)) and all(isinstance(p, str) for p in source):
        texts = list(source)
        where = [f"prompt {i}" for i in range(len(texts))]
    else:
        records, _ = load_prompts(source, tokenizer=tokenizer, split=split)
        texts = [r["prompt"] for r in records]
        where = [getattr(r, "where", None) or f"row {i}" for i, r in enumerate(records)]
        for w, t in zip(where, texts, strict=True):
            if isinstance(t, list):
                raise DataError(f"{w}: the prompt is a list of messages; pass the policy's tokenizer to render it "
                                f"with its chat template")
        if user_tag is not None:
            texts = [tag_prompt(t, r.get("user"), user_tag) for t, r in zip(texts, records, strict=True)]
    name = source if isinstance(source, (str, os.PathLike)) else "prompts"
    for w, t in zip(where, texts, strict=True):
        if not t:
            raise DataError(f"{name}: {w}: expected a non-empty prompt")
    texts = texts[:max_prompts] if max_prompts is not None else texts
    if not texts:
        raise DataError(f"{name}: no prompts" + (f" (max_prompts = {max_prompts})" if max_prompts is not None else ""))
    return texts
