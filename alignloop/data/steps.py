"""Step-level data for process reward models (PRMs): the step format, its reader, the separator convention and the
PRM's tokenisation.

The step format (one row per solution; any file type `read_rows` reads; in CSV the lists are JSON text):

    {"prompt": str | [messages], "completions": [step_1, step_2, ...], "labels": [l_1, l_2, ...]}

- `labels`: +1 good / 0 neutral / -1 bad (PRM800K), or booleans (TRL's former "stepwise" format: true -> +1,
  false -> -1); one per step. A `null` label leaves that step unlabelled (it is scored but neither trained nor
  evaluated: e.g. the steps after PRM800K's first error, or every step but the last in the outcome view).
  Integers and booleans are not mixed within a row. A whole-number float (1.0, from pandas) reads as that integer.
- `soft_labels` (optional): floats in 0..1, one per step (or null): Math-Shepherd's share of the rollouts from the
  step that reach a correct answer. A step with a soft label and no hard one (no `labels`, or a null label) gets
  its hard label from it (Math-Shepherd's "hard estimation": > 0 -> +1, 0 -> -1).
- `outcome` (optional): whether the final answer is right (true/false or +1/-1), for the outcome (ORM) view.
- Rows with no `labels` (and no `soft_labels`) are allowed with `require_labels=False` (to import into the labeling
  app); their `labels` is None. Extra columns are kept.

The separator convention: `STEP_SEPARATOR = "\\n"`. A solution's text is `"".join(step + "\\n" for step in steps)`:
each step ends with the separator (`join_steps`); `split_steps(text)` inverts it (splits on the separator and drops
empty and whitespace-only pieces). So a step never contains the separator, nor is it empty or whitespace only.

PRM input tokens (`tokenize_steps`): the prompt's tokens, then for each step tokens(step) + tokens(separator), all
without special tokens (BOS first with add_bos=True). A step's score is read at the LAST token of its separator: its
"step-end position".

The outcome (ORM) view (`outcome_rows`): the same rows, same steps and same tokens, with every step's label null but
the last one's, which becomes the solution's outcome. An ORM trained on them reads its score at the final step end
only, so the PRM and the ORM share their architecture, tokenisation and data; only the supervision differs.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from alignloop.data.chat import check_chat_template, render_prompt
from alignloop.data.errors import DataError, DataStats, raise_or_skip
from alignloop.data.readers import Row, read_raw_rows, type_name

STEP_SEPARATOR = "\n"
STEP_LABELS = (1, 0, -1)
STEP_TRUNCATIONS = ("keep_start", "keep_end", "drop", "error")
STEPS_HELP = ("prompt (a string or a list of messages) + completions (a list of steps) + labels (one +1/0/-1 or "
              "true/false per step) [+ soft_labels (floats 0..1)]")


class StepRowError(ValueError):
    """A step row failed validation (the message names the field, not the location)."""


# ------------------------------------------------------------------------------------------------ text <-> steps
def split_steps(text: str, separator: str = STEP_SEPARATOR) -> list[str]:
    """The steps of a solution's text: the pieces between separators, empty and whitespace-only pieces dropped.
    `split_steps("a\\nb\\n") == ["a", "b"]`; `split_steps("a\\n\\n  \\nb") == ["a", "b"]`; `split_steps("") == []`."""
    return [piece for piece in text.split(separator) if piece.strip()]


def join_steps(steps: Sequence[str], separator: str = STEP_SEPARATOR) -> str:
    """A solution's text: every step followed by the separator (`join_steps(["a", "b"]) == "a\\nb\\n"`). A step
    holding the separator, or empty, is a DataError (`split_steps` would not give it back)."""
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip() or separator in step:
            raise DataError(f"step {i}: expected a non-empty string without the separator {separator!r}, got "
                            f"{json.dumps(step)[:80] if isinstance(step, str) else type_name(step)}")
    return "".join(step + separator for step in steps)


# ------------------------------------------------------------------------------------------------ validation
def _json_cell(row: Row, value: Any) -> Any:
    """CSV cells are text: decode JSON lists; an empty cell is a missing value."""
    if getattr(row, "from_text", False) and isinstance(value, str) and not value.strip():
        return None
    if getattr(row, "from_text", False) and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _prompt(row: Row) -> str | list[dict]:
    if "prompt" not in row:
        raise StepRowError("field 'prompt': missing (expected a string or a list of messages)")
    value = _json_cell(row, row["prompt"])
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise StepRowError(f"field 'prompt': message {i} should be {{\"role\": string, \"content\": "
                                   f"string}}, got {type_name(m)}")
        return [{k: v for k, v in m.items() if v is not None} for m in value]
    raise StepRowError(f"field 'prompt': expected a string or a non-empty list of messages, got {type_name(value)}")


def _steps(row: Row, separator: str) -> list[str]:
    if "completions" not in row:
        raise StepRowError("field 'completions': missing (expected a list of steps)")
    steps = _json_cell(row, row["completions"])
    if not isinstance(steps, (list, tuple)) or not steps:
        raise StepRowError(f"field 'completions': expected a non-empty list of steps (strings), got "
                           f"{type_name(steps)}")
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise StepRowError(f"field 'completions[{i}]': expected a non-empty step (a string), got "
                               f"{type_name(step)}")
        if separator in step:
            raise StepRowError(f"field 'completions[{i}]': a step must not contain the step separator "
                               f"{separator!r} (split it into several steps)")
    return list(steps)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _label(value: Any, i: int) -> int | bool | None:
    if not _present(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and value in STEP_LABELS:
        return value
    shown = repr(value) if isinstance(value, (int, float, str)) else type_name(value)
    raise StepRowError(f"field 'labels[{i}]': expected +1 (good), 0 (neutral), -1 (bad), true/false or null, got "
                       f"{shown}" + ("; fractions go in soft_labels" if isinstance(value, float) else ""))


def _labels(row: Row, n: int) -> list[int | None] | None:
    value = _json_cell(row, row.get("labels"))
    if not _present(value):
        return None
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise StepRowError(f"field 'labels': expected a list of {n} labels (one per step in 'completions'), got "
                           f"{type_name(value)}")
    labels = [_label(v, i) for i, v in enumerate(value)]
    kinds = {isinstance(v, bool) for v in labels if v is not None}
    if len(kinds) > 1:
        raise StepRowError("field 'labels': expected all booleans (true/false) or all integers (+1/0/-1), not a mix")
    return [None if v is None else (1 if v else -1) if isinstance(v, bool) else v for v in labels]


def _soft_labels(row: Row, n: int) -> list[float | None] | None:
    value = _json_cell(row, row.get("soft_labels"))
    if not _present(value):
        return None
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise StepRowError(f"field 'soft_labels': expected a list of {n} numbers in 0..1 (one per step in "
                           f"'completions'), got {type_name(value)}")
    out: list[float | None] = []
    for i, v in enumerate(value):
        if not _present(v):
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise StepRowError(f"field 'soft_labels[{i}]': expected a number in 0..1 or null, got "
                               f"{repr(v) if isinstance(v, (int, float, str)) else type_name(v)}")
        out.append(float(v))
    return out


def _outcome(row: Row) -> int | None:
    value = _json_cell(row, row.get("outcome"))
    if not _present(value):
        return None
    if getattr(row, "from_text", False) and isinstance(value, str):
        value = {"true": True, "false": False, "1": 1, "-1": -1}.get(value.strip().lower(), value)
    if isinstance(value, bool):
        return 1 if value else -1
    if isinstance(value, (int, float)) and value in (1, -1):
        return int(value)
    raise StepRowError(f"field 'outcome': expected true/false or +1/-1, got {type_name(value)}")


def parse_step_row(row: Row, separator: str = STEP_SEPARATOR, require_labels: bool = True) -> dict:
    """One validated step record {"prompt", "completions", "labels" (ints +1/0/-1 or None per step; None for an
    unlabelled row), ["soft_labels"], ["outcome"], extra columns}; a bad row raises StepRowError."""
    prompt = _prompt(row)
    steps = _steps(row, separator)
    labels = _labels(row, len(steps))
    soft = _soft_labels(row, len(steps))
    if soft is not None:   # Math-Shepherd's hard estimation from the soft labels, where no hard label is given
        hard = [None if s is None else (1 if s > 0 else -1) for s in soft]
        labels = hard if labels is None else [h if v is None else v for v, h in zip(labels, hard, strict=True)]
    if require_labels and (labels is None or all(v is None for v in labels)):
        raise StepRowError("field 'labels': missing (expected one label per step: +1/0/-1 or true/false)")
    record = Row({**row, "prompt": prompt, "completions": steps, "labels": labels}, row.where,
                 getattr(row, "from_text", False))
    record.pop("soft_labels", None)
    if soft is not None:
        record["soft_labels"] = soft
    outcome = _outcome(row)
    if outcome is not None:
        record["outcome"] = outcome
    return record


def read_steps(path_or_rows: str | os.PathLike | Sequence[dict], *, require_labels: bool = True,
               separator: str = STEP_SEPARATOR, tokenizer=None, split: str = "train", skip_bad_rows: bool = False,
               stats: DataStats | None = None) -> list[dict]:
    """Validated step records from a file (any type `read_rows` reads), a hub id, or rows in memory. Each record:
    {"prompt", "completions", "labels" ([+1/0/-1 or None per step], or None for an unlabelled row with
    require_labels=False), ["soft_labels"], ["outcome"], extra columns}. With a tokenizer, a prompt given as chat
    messages is rendered with its chat template (generation prompt added). Bad rows: a DataError naming the file,
    line (or row) and field, unless skip_bad_rows (then counted in `stats`)."""
    stats = stats if stats is not None else DataStats()
    stats.kind = "steps"
    records = []
    for row in read_raw_rows(path_or_rows, split, stats):
        if row.error is not None:
            stats.add_error(row.error)
            continue
        try:
            record = parse_step_row(row, separator, require_labels)
        except StepRowError as e:
            stats.add_error(f"{row.where}, {e}")
            continue
        if tokenizer is not None and isinstance(record["prompt"], list):
            check_chat_template(tokenizer, row.where)
            record["prompt"] = render_prompt(record["prompt"], tokenizer)
        records.append(record)
    raise_or_skip(stats, skip_bad_rows)
    stats.records += len(records)
    return records


# ------------------------------------------------------------------------------------------------ outcome view
def outcome_label(record: dict) -> int:
    """The solution's outcome: its `outcome` column when given; else -1 when any step is labelled -1, else +1
    (a neutral step does not make a solution wrong)."""
    if record.get("outcome") is not None:
        return int(record["outcome"])
    labels = record.get("labels")
    if not labels or all(v is None for v in labels):
        raise DataError(f"{getattr(record, 'where', 'a row')}: no labels and no outcome: the outcome view needs one")
    return -1 if -1 in labels else 1


def outcome_rows(rows: Sequence[dict]) -> list[dict]:
    """The outcome (ORM) view of step records: the same prompt and steps, every label null but the last step's,
    which is the solution's outcome (`outcome_label`); soft labels likewise keep only the last step's. Trained on
    these, the model learns to score a whole solution at its final step end (read it with aggregation "last")."""
    out = []
    for r in rows:
        n = len(r["completions"])
        row = Row({**r, "labels": [None] * (n - 1) + [outcome_label(r)]}, getattr(r, "where", "row"))
        if r.get("soft_labels") is not None:
            row["soft_labels"] = [None] * (n - 1) + [r["soft_labels"][-1]]
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ tokenisation
def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _pieces_of_text(tokenizer, prompt_text: str, steps: Sequence[str],
                    separator: str) -> tuple[list[int], list[list[int]]] | None:
    """(prompt tokens, each step's tokens up to and with the token that ends its separator) from the whole text
    tokenised once, as the model reads it (a SentencePiece tokenizer encoding each piece alone would put a prefix
    space before every step and separator). Step ends found through the fast tokenizer's character offsets, as
    `rollout.step_end_positions` finds them in a sampled response. None when offsets are not available or a token
    ends two steps."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    text = prompt_text + join_steps(steps, separator)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    ends_char, pos = [], len(prompt_text)
    for st in steps:
        pos += len(st) + len(separator)
        ends_char.append(pos - 1)           # the separator's last character
    # cuts[0]: the prompt's tokens (a token reaching into the first step goes with the step); cuts[k + 1]: the
    # tokens up to the one that holds step k's last separator character
    cuts = [next((t for t, (a, b) in enumerate(offsets) if b > len(prompt_text) and b > a), len(ids))]
    for c in ends_char:
        # the LAST token over that character: one split into byte tokens ("ки", "。") ends with its last byte
        t = max((t for t, (a, b) in enumerate(offsets) if a <= c < b), default=None)
        if t is None or t + 1 <= cuts[-1]:
            return None
        cuts.append(t + 1)
    pieces = [ids[cuts[k]:cuts[k + 1]] for k in range(len(steps))]
    return ids[:cuts[0]], pieces


def _fit(prompt: list[int], steps: list[list[int]], max_length: int, truncation: str,
         max_prompt_length: int | None) -> tuple[list[int], int]:
    """(the prompt kept, how many leading steps fit) under max_length."""
    total = len(prompt) + sum(len(s) for s in steps)
    if total <= max_length:
        return prompt, len(steps)
    if truncation == "error":
        raise DataError(f"a solution of {total} tokens (prompt {len(prompt)}, {len(steps)} steps) is longer than "
                        f"max_length {max_length}")
    if truncation == "drop":
        return prompt, 0
    if truncation == "keep_end":   # the prompt's start goes first (down to max_prompt_length), then the last steps
        floor = min(len(prompt), max_length // 2 if max_prompt_length is None else max_prompt_length)
        keep = min(len(prompt), max(max_length - sum(len(s) for s in steps), floor))
        prompt = prompt[len(prompt) - keep:]
    used, n = len(prompt), 0
    while n < len(steps) and used + len(steps[n]) <= max_length:
        used += len(steps[n])
        n += 1
    return prompt, n


def tokenize_steps(tokenizer, prompt_text: str, steps: Sequence[str], separator: str = STEP_SEPARATOR,
                   max_length: int | None = None, *, truncation: str = "keep_start",
                   max_prompt_length: int | None = None, add_bos: bool = False,
                   stats: DataStats | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, step_end_positions) of one solution, without special tokens (BOS first with add_bos): the text
    `prompt_text + join_steps(steps)` tokenised once, as the model reads it, each step ending at the token that holds
    its separator's last character (a fast tokenizer's offsets; a token reaching from the prompt into the first step
    counts with the step); without offsets, the prompt's tokens then tokens(step) + tokens(separator) per step.

    Longer than max_length: whole steps are kept from the start while they fit, so a solution may come back with
    fewer step ends than steps: `len(steps) - len(step_end_positions)` steps were dropped (counted in
    `stats.truncated`; a solution left with none in `stats.dropped`, and returned as ([], [])).
    truncation: "keep_start" (the prompt whole), "keep_end" (the prompt first cut from the left, down to
    max_prompt_length, default max_length // 2, then trailing steps dropped), "drop" (the whole solution), "error"
    (a DataError)."""
    if truncation not in STEP_TRUNCATIONS:
        raise DataError(f"truncation must be one of {', '.join(STEP_TRUNCATIONS)}, got {truncation!r}")
    whole = _pieces_of_text(tokenizer, prompt_text, steps, separator)
    if whole is not None:
        prompt, pieces = whole
    else:
        encoded = _encode(tokenizer, [prompt_text, separator, *steps])
        prompt, sep, step_ids = encoded[0], encoded[1], encoded[2:]
        if not sep:
            raise DataError(f"the tokenizer gives no token for the step separator {separator!r}")
        pieces = [s + sep for s in step_ids]
    bos = []
    if add_bos and tokenizer.bos_token_id is not None:
        bos = [tokenizer.bos_token_id]
        if prompt[:1] == bos:
            prompt = prompt[1:]
    if max_length is not None:   # BOS stays first whatever is cut: the rest fits in one token less
        prompt, n = _fit(prompt, pieces, max_length - len(bos), truncation, max_prompt_length)
        if stats is not None and n < len(pieces):
            stats.truncated += 1
            stats.dropped += n == 0
        if n == 0:
            return [], []
        pieces = pieces[:n]
    ids, ends = bos + list(prompt), []
    for piece in pieces:
        ids += piece
        ends.append(len(ids) - 1)
    return ids, ends


def tokenize_step_records(records: Sequence[dict], tokenizer, *, separator: str = STEP_SEPARATOR,
                          max_length: int | None = None, truncation: str = "keep_start",
                          max_prompt_length: int | None = None, add_bos: bool = False,
                          stats: DataStats | None = None) -> tuple[list[dict], DataStats]:
    """Step records -> PRM examples {"input_ids": [T], "step_ends": [S] (positions), "labels": [S] (+1/0/-1 or
    None), "soft_labels": [S] (floats or None)}, one per record with at least one step left (see
    `tokenize_steps` for truncation; dropped solutions are counted in stats.dropped)."""
    stats = stats if stats is not None else DataStats(kind="steps")
    examples = []
    for record in records:
        ids, ends = tokenize_steps(tokenizer, prompt_string(record, tokenizer), record["completions"], separator,
                                   max_length, truncation=truncation, max_prompt_length=max_prompt_length,
                                   add_bos=add_bos, stats=stats)
        if not ends:
            continue
        n = len(ends)
        labels = record.get("labels") or [None] * len(record["completions"])
        soft = record.get("soft_labels") or [None] * len(record["completions"])
        examples.append({"input_ids": ids, "step_ends": ends, "labels": list(labels[:n]),
                         "soft_labels": list(soft[:n])})
    return examples, stats


def prompt_string(record: dict, tokenizer=None) -> str:
    """A step record's prompt as text: a string as is; chat messages through the tokenizer's chat template."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt
    if tokenizer is None:
        raise DataError(f"{getattr(record, 'where', 'a row')}: the prompt is a list of messages; give a tokenizer "
                        f"with a chat template to render it")
    check_chat_template(tokenizer, getattr(record, "where", "a row"))
    return render_prompt(prompt, tokenizer)
