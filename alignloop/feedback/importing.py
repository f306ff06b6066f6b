"""Importing completions: JSONL rows -> prompts, completions and items.

Rows are either one prompt with its completions or one completion per row (rows with the same prompt are grouped):

    {"prompt": "Explain RLHF", "completions": ["...", {"text": "...", "model": "sft-v2", "params": {...}}]}
    {"prompt": [{"role": "user", "content": "hi"}, ...], "completions": [...], "gold": {"choice": "a"}}
    {"prompt": "Explain RLHF", "completion": "...", "model": "base"}

A row with a `completions` list is one prompt group of its own, even when another row has the same prompt (its items
are never mixed with another row's completions); rows with one `completion` each are grouped by prompt (or by `id`).
Items per group: pairwise every pair of its completions, rank one item of all K (at most the project's
`max_rank_k`, default 9), thumbs and Likert one item per completion. A completion is non-empty text, and a group's
completions differ from each other.

Imports are idempotent: every group is written as one prompt row with a `source_key`, "id:<id>" when its rows carry
an `id` (a string or an integer) and a hash of its content otherwise; a group whose key is already stored is skipped
and counted in `ImportResult.already_present`. The same id with different content (in the file, or against what is
stored) is an error naming the line.

The import runs in two phases: `plan_import` reads and checks every row first (a bad row: nothing is written, the
error names the file, the line and the field), then `write_batch` writes each of the `batches` (about
IMPORT_BATCH_ROWS rows) in a short transaction of its own, so the database's write lock is held for milliseconds at
a time and labelers keep labeling during a big import. A crash half-way leaves whole batches: importing the file again
adds exactly what is missing.

A steps project takes rows of the step format (`alignloop.data`'s, one solution per row), each row one item:

    {"prompt": "2 + 3 * 4 = ?", "completions": ["3 * 4 = 12", "2 + 12 = 14"], "labels": [1, 1], "gold": true}
    {"prompt": "...", "completion": "3 * 4 = 12\n2 + 12 = 14\n"}      # a solution's text, split into steps

The steps are stored as the item's completions, in order (a step: a non-empty string without the step separator
"\n"; at most the project's `max_steps`, default 100). `labels` (+1 / 0 / -1 or true / false per step) are the gold
answer of a gold row (`"gold": true`, or `"gold": {"labels": [...]}`); a non-gold row's labels are not imported
(counted in a warning). Rows with the same prompt (or `id`) share one prompt row.

A demonstration or conversation project imports prompts (`parse_prompt_rows`), one item per row:

    {"prompt": "Write a haiku about rain"}                                 # demonstration: written from scratch
    {"prompt": [...messages...], "completion": "a sampled answer to edit"}  # demonstration: ONE original, edited
    {"prompt": "Plan a trip to Kyoto"}                                     # conversation: the opening message

A demonstration row may carry one sampled answer (`completion`, or `completions` with exactly one), which the labeler
edits (the original is kept: `completion_ids` = [original]); without one the labeler writes from scratch
(`completion_ids` = []). A conversation row is the opening only: a string (one user message) or messages ending with
a user message; completions there are an error naming the line (the served model answers).
"""
from __future__ import annotations

import codecs
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, func, insert, select
from sqlalchemy.orm import Session

from alignloop.data import STEP_SEPARATOR, DataStats, read_raw_rows, split_steps
from alignloop.errors import UserError

from .models import PAIRWISE_CHOICES, Completion, Item, Project, Prompt, utcnow
from .validation import competition_ranks, step_label

DEFAULT_MAX_RANK_K = 9
DEFAULT_MAX_STEPS = 100  # steps of one solution a steps item shows (project setting `max_steps`)
# rows (prompts + completions + items) written per transaction: ~10 ms of the write lock each (what a labeler's
# submission may wait for while an import runs)
IMPORT_BATCH_ROWS = 200
MAX_NESTING = 32  # levels of nesting allowed in a row's free-form fields (meta, params)
MAX_ID_CHARS = 90  # an `id` longer than this does not fit prompts.source_key (100 characters with "id:")


@dataclass
class ImportResult:
    prompts: int = 0          # prompt groups added (one per row with `completions`, or per grouped prompt / id)
    completions: int = 0
    items: int = 0
    gold_items: int = 0
    already_present: int = 0  # groups skipped: already stored (same id or same content), or repeated in the file
    warnings: list[str] = field(default_factory=list)

    @property
    def added(self) -> int:
        return self.prompts

    def add(self, other: ImportResult) -> None:
        self.prompts += other.prompts
        self.completions += other.completions
        self.items += other.items
        self.gold_items += other.gold_items
        self.already_present += other.already_present
        self.warnings += other.warnings

    def summary(self) -> str:
        return (f"{self.prompts} prompts, {self.completions} completions, {self.items} items ({self.gold_items} gold) "
                f"added; {self.already_present} already imported")


# -- reading a file -----------------------------------------------------------------------------------------------
def rows_from_bytes(data: bytes, name: str) -> Iterator[dict]:
    """The rows of a JSONL file's bytes (an upload, or a file read whole), each with `_where` ("name line n"), read
    lazily: as the import consumes them, so a paced import (the web server's, `Pacer`) paces the decoding too. UTF-8
    with or without a BOM; bytes that are not UTF-8, a line that is not a JSON object, and nesting deeper than
    Python's parser allows are UserErrors naming the line (and the byte offset); no rows at all is an error too.
    The errors come while the rows are read: an import reads them all before it writes anything."""
    offset = 0
    if data.startswith(codecs.BOM_UTF8):
        offset = len(codecs.BOM_UTF8)
    n = 0
    for lineno, line in enumerate(data[offset:].split(b"\n"), 1):
        where = f"{name} line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text (byte {offset + e.start} of the file, {e.reason}); save the "
                            "file as UTF-8") from None
        offset += len(line) + 1
        if text.strip():
            n += 1
            yield {**_json_object(text, where), "_where": where}
    if not n:
        raise UserError(f"{name}: no rows (the file is empty)")


def _json_object(text: str, where: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # Python's limit on integer digits (4300): a number no row needs
        raise UserError(f"{where}: a number too long to read ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not valid JSON or not a JSON object (a row is an object of named fields)")
    return obj


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of an import file (JSONL: `rows_from_bytes`; any other file type `alignloop.data` reads), each with
    `_where` ("file line n") for error messages; a row that is not valid JSON or not an object stops the import,
    naming its line, and a file without rows is an error."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read the file ({e.strerror})") from None
        return list(rows_from_bytes(data, str(path)))
    try:
        rows = read_raw_rows(path, "train", DataStats())
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    for row in rows:
        if row.error is not None:
            raise UserError(f"{row.where}: not valid JSON or not a JSON object ({row.error.split(': ', 1)[-1]})")
    if not rows:
        raise UserError(f"{path}: no rows (the file is empty)")
    return [{**row, "_where": row.where} for row in rows]


def normalise_prompt(prompt: Any, where: str) -> tuple[list[dict], bool]:
    """(messages, is_chat): a string becomes one user message (is_chat False); a list of {role, content} is kept."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: 'prompt' is empty")
        return [{"role": "user", "content": prompt}], False
    if isinstance(prompt, list) and prompt:
        msgs = []
        for j, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise UserError(f"{where}: prompt message {j} must be {{'role': str, 'content': str}}")
            msgs.append({"role": m["role"], "content": m["content"]})
        return msgs, True
    raise UserError(f"{where}: 'prompt' must be a string or a non-empty list of messages")


def _norm_completion(c: Any, where: str, default_model: str | None) -> dict:
    if isinstance(c, str):
        return {"text": c, "model": default_model, "params": {}}
    if isinstance(c, dict) and isinstance(c.get("text"), str):
        params = c.get("params") or {}
        if not isinstance(params, dict):
            raise UserError(f"{where}: completion 'params' must be an object")
        return {"text": c["text"], "model": c.get("model", default_model), "params": params}
    raise UserError(f"{where}: each completion must be a string or {{'text': str, 'model', 'params'}}")


def _row_completions(row: dict, where: str, model: str | None) -> list[dict]:
    if "completions" in row:
        cs = row["completions"]
        if not isinstance(cs, list) or not cs:
            raise UserError(f"{where}: 'completions' must be a non-empty list")
        return [_norm_completion(c, where, row.get("model", model)) for c in cs]
    if "completion" in row:
        c = row["completion"]
        if isinstance(c, str):
            c = {"text": c, "model": row.get("model", model), "params": row.get("params") or {}}
        return [_norm_completion(c, where, model)]
    raise UserError(f"{where}: needs 'completions' (a list) or 'completion' (one string)")


def _check_texts(completions: list[dict], where: str, first: int = 0) -> None:
    """Completions to compare: none empty, no two the same (a pair of equal answers has nothing to judge)."""
    seen: dict[str, int] = {}
    for i, c in enumerate(completions):
        if not c["text"].strip():
            raise UserError(f"{where}: completion {first + i} is empty")
        if c["text"] in seen:
            raise UserError(f"{where}: completion {first + i} is the same text as completion {seen[c['text']]}")
        seen[c["text"]] = first + i


def comparable_completions(rows: list[dict]) -> tuple[list[dict], int]:
    """Sampled rows made importable: each row's empty and repeated completions left out (`_check_texts` refuses
    them; a model may well sample an empty or the same text twice), rows left with none dropped. Returns (rows,
    how many completions were left out). For whoever imports samples: `feedback sample`, the pipeline, `eval`."""
    def text(c) -> str:
        return c["text"] if isinstance(c, dict) else c

    n = sum(len(r["completions"]) for r in rows)
    kept = [{**r, "completions": list({text(c): c for c in r["completions"] if text(c).strip()}.values())}
            for r in rows]
    kept = [r for r in kept if r["completions"]]
    return kept, n - sum(len(r["completions"]) for r in kept)


def _check_nesting(value: Any, where: str, name: str) -> None:
    """A free-form field (meta, params) nested at most MAX_NESTING deep (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_NESTING:
            raise UserError(f"{where}: '{name}' is nested more than {MAX_NESTING} levels deep")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def _row_id(row: dict, where: str) -> str | None:
    """The row's source key from its `id` ("id:<id>"), or None when it has none."""
    rid = row.get("id")
    if rid is None:
        return None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
        raise UserError(f"{where}: 'id' must be a non-empty string or an integer, got {rid!r}")
    if len(str(rid)) > MAX_ID_CHARS:
        raise UserError(f"{where}: 'id' is longer than {MAX_ID_CHARS} characters")
    return f"id:{rid}"


def check_gold(task_type: str, gold: Any, where: str) -> dict:
    """A row's `gold` answer in stored form (pairwise choice, competition ranks, thumbs ±1, Likert)."""
    if not isinstance(gold, dict):
        raise UserError(f"{where}: 'gold' must be an object")
    if task_type == "pairwise" and gold.get("choice") in PAIRWISE_CHOICES:
        return {"choice": gold["choice"]}
    if task_type == "rank" and isinstance(gold.get("ranking"), list) and all(
            isinstance(r, int) for r in gold["ranking"]):
        return {"ranking": competition_ranks(gold["ranking"])}
    if task_type == "thumbs" and gold.get("thumbs") in ("up", "down"):
        return {"thumbs": 1 if gold["thumbs"] == "up" else -1}
    if task_type == "likert" and isinstance(gold.get("likert"), int) and 1 <= gold["likert"] <= 7:
        return {"likert": gold["likert"]}
    expected = {"pairwise": '{"choice": "a"|"b"|"tie"|"both_bad"}', "rank": '{"ranking": [1, 2, ...]}',
                "thumbs": '{"thumbs": "up"|"down"}', "likert": '{"likert": 1..7}'}[task_type]
    raise UserError(f"{where}: 'gold' for a {task_type} project must be {expected}")


def _step_texts(row: dict, where: str, model: str | None) -> list[dict]:
    """A steps row's steps as completions: `completions` (a list of steps) or `completion` (a solution's text,
    split into steps with `alignloop.data.split_steps`; or {"text", "model", "params"})."""
    if "completions" in row:
        steps = _row_completions(row, where, model)
        for i, c in enumerate(steps):
            if not c["text"].strip() or STEP_SEPARATOR in c["text"]:
                raise UserError(f"{where}: step {i} ('completions[{i}]') must be a non-empty string without the step "
                                f"separator {STEP_SEPARATOR!r} (split it into several steps)")
        return steps
    (c,) = _row_completions(row, where, model)
    steps = split_steps(c["text"])
    if not steps:
        raise UserError(f"{where}: 'completion' has no steps (its text is empty or only separators)")
    return [{**c, "text": step} for step in steps]


def _step_gold(row: dict, n: int, where: str) -> list[int] | None:
    """A steps row's gold answer (a label per step) or None for a non-gold row."""
    gold = row.get("gold")
    if gold is None or gold is False:
        return None
    if isinstance(gold, dict) and "labels" in gold:
        labels = gold["labels"]
    elif gold is True:
        labels = row.get("labels")
    else:
        raise UserError(f"{where}: 'gold' for a steps project must be true (with 'labels') or {{\"labels\": [...]}}")
    checked = [step_label(v) for v in labels] if isinstance(labels, list) else []
    if len(checked) != n or None in checked or any(isinstance(v, str) for v in labels):
        raise UserError(f"{where}: a gold steps row needs 'labels': a label per step ({n} of them): +1 good, 0 "
                        "neutral, -1 bad (or true / false)")
    return checked


def _row_start(row: dict, i: int) -> tuple[str, list[dict], bool, str | None, dict]:
    """(where, prompt messages, is_chat, source key from the row's id or None, meta) of a row, checked."""
    where = row.get("_where", f"record {i + 1}")
    if "prompt" not in row:
        raise UserError(f"{where}: missing field 'prompt'")
    try:  # a lone surrogate ("\ud800": valid JSON, not text) cannot be stored as UTF-8
        json.dumps(row, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: a string holds a lone surrogate (like \"\\ud800\"), which is not text") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None
    msgs, is_chat = normalise_prompt(row["prompt"], where)
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    _check_nesting(meta, where, "meta")
    return where, msgs, is_chat, _row_id(row, where), meta


def _shared_group(groups: dict, row_key: str | None, msgs: list[dict], is_chat: bool, where: str, fresh: dict) -> dict:
    """The group of rows that share a prompt (or an id), created from `fresh` for its first row. An id already used
    by a row with another prompt, or by a row with a `completions` list of its own, is an error naming that line."""
    gkey = row_key or ("prompt", json.dumps(msgs, sort_keys=True))
    g = groups.get(gkey)
    if g is None:
        g = groups[gkey] = {"messages": msgs, "is_chat": is_chat, "key": row_key, "where": where, "meta": {},
                            "repeats": 0, **fresh}
    elif g.get("own") or g["messages"] != msgs:
        raise UserError(f"{where}: id {row_key[3:]!r} is already the id of {g['where']}, another prompt group")
    return g


def content_key(g: dict) -> str:
    """A group's content (prompt, completions with their model and params, gold answers, meta) as one hash: the
    source key of a row without `id`, and what a repeated id is compared by."""
    sols = g["solutions"] if "solutions" in g else [{"completions": g["completions"], "gold": g["gold"]}]
    content = [g["messages"], g["is_chat"], g["meta"],
               [[[[c["text"], c["model"], c["params"]] for c in sol["completions"]], sol["gold"]] for sol in sols]]
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _finish(groups: dict, pace: Callable[[], None] = lambda: None) -> list[dict]:
    """The groups with their source keys (a group without id: its content hash); a group repeating an earlier one's
    content (rows without id) is dropped and counted in that one's `repeats`."""
    out: dict[str, dict] = {}
    for g in groups.values():
        pace()
        g["key"] = g["key"] or content_key(g)
        first = out.get(g["key"])
        if first is None:
            out[g["key"]] = g
        else:
            first["repeats"] += 1 + g["repeats"]
    return list(out.values())


def parse_step_rows(rows: Iterable[dict], model: str | None = None,
                    pace: Callable[[], None] = lambda: None) -> list[dict]:
    """Check step-format rows (one solution each) and group them by prompt (or id): one group `{"messages",
    "is_chat", "solutions": [{"completions", "gold", "where"}], "meta", "where", "key", "unused_labels"}` per
    distinct prompt. `pace` is called once per row (see Pacer)."""
    groups: dict = {}
    for i, row in enumerate(rows):
        pace()
        where, msgs, is_chat, row_key, meta = _row_start(row, i)
        g = _shared_group(groups, row_key, msgs, is_chat, where, {"solutions": [], "unused_labels": 0})
        steps = _step_texts(row, where, model)
        for c in steps:
            _check_nesting(c["params"], where, "params")
        gold = _step_gold(row, len(steps), where)
        if gold is None and row.get("labels") is not None:
            g["unused_labels"] += 1
        g["solutions"].append({"completions": steps, "gold": None if gold is None else {"step_labels": gold},
                               "where": where})
        g["meta"].update(meta)
    return _finish(groups, pace)


PROMPT_TASKS = ("demonstration", "conversation")  # projects whose rows are prompts (an optional original answer)


def parse_prompt_rows(rows: Iterable[dict], task_type: str, model: str | None = None,
                      pace: Callable[[], None] = lambda: None) -> list[dict]:
    """Check demonstration / conversation rows (see the module docstring): one group per row, `completions` [] or
    [the original to edit]; rows repeating an earlier one (same id, or same content without id) are counted."""
    groups: dict = {}
    for i, row in enumerate(rows):
        pace()
        where, msgs, is_chat, row_key, meta = _row_start(row, i)
        if row.get("gold") is not None:
            raise UserError(f"{where}: 'gold' is not used by a {task_type} project (there is no known answer)")
        given = "completions" in row or "completion" in row
        if task_type == "conversation":
            if given:
                raise UserError(f"{where}: a conversation project imports prompts only (the opening of the "
                                "conversation); the served model writes the answers: remove 'completion(s)'")
            if msgs[-1]["role"] != "user":
                raise UserError(f"{where}: a conversation's opening must end with a user message (the model "
                                f"answers it), not a {msgs[-1]['role']!r} message")
            cs = []
        else:
            if msgs[-1]["role"] != "user":
                raise UserError(f"{where}: a demonstration prompt must end with a user message (the labeler "
                                f"writes the answer to it), not a {msgs[-1]['role']!r} message")
            cs = _row_completions(row, where, model) if given else []
            if len(cs) > 1:
                raise UserError(f"{where}: a demonstration row takes at most ONE sampled answer to edit "
                                f"('completion'), got {len(cs)}")
            for c in cs:
                _check_nesting(c["params"], where, "params")
            _check_texts(cs, where)
        g = {"messages": msgs, "is_chat": is_chat, "completions": cs, "gold": None, "meta": dict(meta),
             "where": where, "key": row_key, "own": True, "repeats": 0}
        _add_own(groups, row_key or ("row", i), g)
    return _finish(groups, pace)


def parse_rows(rows: Iterable[dict], task_type: str, model: str | None = None,
               pace: Callable[[], None] = lambda: None) -> list[dict]:
    """Check the rows and group them: one group `{"messages", "is_chat", "completions", "gold", "meta", "where",
    "key", "repeats"}` per row with a `completions` list, and per prompt (or id) of the one-completion
    rows, in order of first appearance. `model` names completions that name none. A steps project's rows:
    `parse_step_rows`. `pace` is called once per row (see Pacer)."""
    if task_type == "steps":
        return parse_step_rows(rows, model, pace)
    if task_type in PROMPT_TASKS:
        return parse_prompt_rows(rows, task_type, model, pace)
    groups: dict = {}
    for i, row in enumerate(rows):
        pace()
        where, msgs, is_chat, row_key, meta = _row_start(row, i)
        cs = _row_completions(row, where, model)
        for c in cs:
            _check_nesting(c["params"], where, "params")
        gold = check_gold(task_type, row["gold"], where) if row.get("gold") is not None else None
        if "completions" in row:  # a group of its own: never merged with another row's completions
            _check_texts(cs, where)
            g = {"messages": msgs, "is_chat": is_chat, "completions": cs, "gold": gold, "meta": dict(meta),
                 "where": where, "key": row_key, "own": True, "repeats": 0}
            _add_own(groups, row_key or ("row", i), g)
            continue
        g = _shared_group(groups, row_key, msgs, is_chat, where, {"completions": [], "gold": None})
        for c in cs:
            if c["text"] in (x["text"] for x in g["completions"]):
                raise UserError(f"{where}: the same completion as an earlier row of this prompt ({g['where']})")
        _check_texts(cs, where)
        g["completions"].extend(cs)
        g["gold"] = gold if gold is not None else g["gold"]
        g["meta"].update(meta)
    return _finish(groups, pace)


def _add_own(groups: dict, gkey: Any, g: dict) -> None:
    """A row with its own `completions`: a new group, or (the same id again) a repeat of an identical one."""
    first = groups.get(gkey)
    if first is None:
        groups[gkey] = g
    elif first.get("own") and content_key(first) == content_key(g):
        first["repeats"] += 1
    else:
        raise UserError(f"{g['where']}: id {gkey[3:]!r} is already the id of {first['where']}, with other content")


def _check_group(g: dict, p: Project) -> str | None:
    """A warning if the group is skipped (too few completions); UserError if it cannot be imported (its gold answer
    does not fit, too many completions for a rank item, too many steps)."""
    if p.task_type == "steps":
        max_steps = int(p.settings.get("max_steps", DEFAULT_MAX_STEPS))
        for sol in g["solutions"]:
            if len(sol["completions"]) > max_steps:
                raise UserError(f"{sol['where']}: {len(sol['completions'])} steps; a steps item shows at most "
                                f"{max_steps} (project setting max_steps)")
        return None
    task_type, n, gold = p.task_type, len(g["completions"]), g["gold"]
    if task_type in ("pairwise", "rank") and n < 2:
        return f"{g['where']}: fewer than 2 completions for a {task_type} project; skipped"
    item_completions(p, list(range(n)), g["where"])  # raises for too many completions of a rank item
    if gold is None:
        return None
    if task_type == "pairwise" and n != 2:
        raise UserError(f"{g['where']}: a pairwise gold item needs exactly 2 completions")
    if task_type == "rank" and len(gold["ranking"]) != n:
        raise UserError(f"{g['where']}: gold ranking has {len(gold['ranking'])} ranks for {n} completions")
    if task_type in ("thumbs", "likert") and n != 1:
        raise UserError(f"{g['where']}: a {task_type} gold item needs exactly 1 completion")
    return None


def item_completions(p: Project, ids: list[int], where: str) -> list[list[int]]:
    """The completion ids of each item made from one prompt's completions `ids`."""
    if p.task_type == "pairwise":
        return [[ids[a], ids[b]] for a in range(len(ids)) for b in range(a + 1, len(ids))]
    if p.task_type == "rank":
        max_k = int(p.settings.get("max_rank_k", DEFAULT_MAX_RANK_K))
        if len(ids) > max_k:
            raise UserError(f"{where}: {len(ids)} completions; a rank item shows at most {max_k}")
        return [ids]
    if p.task_type in PROMPT_TASKS:  # one item per prompt: its original answer (demonstration) or none
        return [list(ids)]
    return [[i] for i in ids]


# -- planning: everything checked, nothing written ----------------------------------------------------------------
def plan_import(s: Session, p: Project, rows: Iterable[dict], model: str | None = None,
                pace: Callable[[], None] = lambda: None) -> tuple[list[dict], ImportResult]:
    """(the groups to write, the result so far: warnings, groups already present). Checks every row, and every
    group whose id is already stored against what is stored (other content: an error naming the line)."""
    res = ImportResult()
    todo = []
    for g in parse_rows(rows, p.task_type, model, pace):
        res.already_present += g["repeats"]
        warning = _check_group(g, p)
        if warning:
            res.warnings.append(warning)
        else:
            todo.append(g)
    stored = _stored_keys(s, p.id, [g["key"] for g in todo], pace)
    contents = _stored_contents(s, p, [pid for key, pid in stored.items() if key.startswith("id:")], pace)
    for g in todo:
        pid = stored.get(g["key"])
        if pid is not None and g["key"].startswith("id:") and contents[pid] != content_key(g):
            raise UserError(f"{g['where']}: id {g['key'][3:]!r} is already imported with other content (change the "
                            "id to import it as a new prompt)")
    res.already_present += sum(g["key"] in stored for g in todo)
    unused = sum(g.get("unused_labels", 0) for g in todo)
    if unused:
        res.warnings.append(f"{unused} non-gold row(s) carry labels: not imported (labelers label them; mark a row "
                            '"gold": true to use its labels as the known answer)')
    return [g for g in todo if g["key"] not in stored], res


def _stored_keys(s: Session, project_id: int, keys: list[str],
                 pace: Callable[[], None] = lambda: None) -> dict[str, int]:
    """source key -> prompt id, of those of `keys` already stored in the project."""
    out: dict[str, int] = {}
    for i in range(0, len(keys), 500):
        pace()
        q = select(Prompt.source_key, Prompt.id).where(Prompt.project_id == project_id,
                                                      Prompt.source_key.in_(keys[i:i + 500]))
        out.update((key, pid) for key, pid in s.execute(q))
    return out


def _stored_contents(s: Session, p: Project, prompt_ids: list[int],
                     pace: Callable[[], None] = lambda: None) -> dict[int, str]:
    """prompt id -> `content_key` of what is stored (its completions, items' gold answers and meta)."""
    out = {}
    for i in range(0, len(prompt_ids), 500):
        pace()
        chunk = prompt_ids[i:i + 500]
        comps = {c.id: {"text": c.text, "model": c.model, "params": c.params or {}}
                 for c in s.scalars(select(Completion).where(Completion.prompt_id.in_(chunk)))}
        items: dict[int, list[Item]] = {}
        for it in s.scalars(select(Item).where(Item.prompt_id.in_(chunk)).order_by(Item.id)):
            items.setdefault(it.prompt_id, []).append(it)
        for pr in s.scalars(select(Prompt).where(Prompt.id.in_(chunk))):
            g = {"messages": pr.messages, "is_chat": pr.is_chat, "meta": pr.meta or {}}
            its = items.get(pr.id, [])
            if p.task_type == "steps":
                g["solutions"] = [{"completions": [comps[c] for c in it.completion_ids], "gold": it.gold_answer}
                                  for it in its]
            else:
                g["completions"] = [comps[c] for c in sorted(_prompt_completions(its))]
                g["gold"] = its[0].gold_answer if its else None
            out[pr.id] = content_key(g)
    return out


def _prompt_completions(items: list[Item]) -> set[int]:
    return {c for it in items for c in it.completion_ids}


# -- pacing: a big import inside the web server ------------------------------------------------------------------
class Pacer:
    """Spreads a long import's CPU work over time: after each `slice_s` of work it sleeps long enough that the work
    takes `duty` of the time. In the web server the import runs in a worker thread and shares the GIL with the event
    loop, whose every SQLite call releases the GIL and then waits up to the switch interval (5 ms) to get it back
    from a busy thread; the sleeps give the loop those stretches without a competitor. `duty` 1: no sleeps."""

    def __init__(self, duty: float = 1.0, slice_s: float = 0.002):
        self.duty, self.slice_s = duty, slice_s
        self._since = time.perf_counter()

    def __call__(self) -> None:
        if self.duty >= 1.0:
            return
        worked = time.perf_counter() - self._since
        if worked >= self.slice_s:
            time.sleep(worked * (1.0 / self.duty - 1.0))
            self._since = time.perf_counter()

    def pause(self, seconds: float) -> None:
        """Sleep at least `seconds` (between two write batches), counting as pacing."""
        time.sleep(max(seconds, (time.perf_counter() - self._since) * (1.0 / self.duty - 1.0)))
        self._since = time.perf_counter()


# -- writing, one batch per transaction ---------------------------------------------------------------------------
def batches(p: Project, groups: list[dict], max_rows: int = IMPORT_BATCH_ROWS) -> Iterator[list[dict]]:
    """The planned groups in batches of about `max_rows` rows written (a group is never split)."""
    batch, rows = [], 0
    for g in groups:
        sols = g.get("solutions") or [{"completions": g["completions"]}]
        n = sum(len(sol["completions"]) for sol in sols)
        rows += 1 + n + (len(sols) if p.task_type == "steps" else len(item_completions(p, list(range(n)), "")))
        batch.append(g)
        if rows >= max_rows:
            yield batch
            batch, rows = [], 0
    if batch:
        yield batch


def write_batch(s: Session, p: Project, groups: list[dict]) -> ImportResult:
    """Write planned groups into project `p` in the caller's transaction; a group whose source key was stored in the
    meantime (a concurrent import of the same rows) is skipped and counted as already present."""
    res = ImportResult()
    present = set(_stored_keys(s, p.id, [g["key"] for g in groups]))
    new = [g for g in groups if g["key"] not in present]
    res.already_present = len(groups) - len(new)
    if not new:
        return res
    prompt_ids = _insert(s, Prompt, [{"project_id": p.id, "messages": g["messages"], "is_chat": g["is_chat"],
                                      "meta": g["meta"], "source_key": g["key"]} for g in new])
    spans, comp_rows = [], []
    for g, pid in zip(new, prompt_ids, strict=True):
        for sol in g.get("solutions") or [{"completions": g["completions"], "gold": g["gold"]}]:
            spans.append((g, pid, sol, len(comp_rows)))
            comp_rows += [{"prompt_id": pid, "text": c["text"], "model": c["model"], "params": c["params"]}
                          for c in sol["completions"]]
    comp_ids = _insert(s, Completion, comp_rows)
    items, now = [], utcnow()
    for g, pid, sol, start in spans:
        ids = comp_ids[start:start + len(sol["completions"])]
        for cids in ([ids] if p.task_type == "steps" else item_completions(p, ids, g["where"])):
            items.append({"project_id": p.id, "prompt_id": pid, "completion_ids": cids, "is_gold": sol["gold"] is not
                          None, "gold_answer": sol["gold"], "n_active": 0, "n_done": 0, "created_at": now})
    _insert(s, Item, items)
    res.prompts, res.completions, res.items = len(new), len(comp_rows), len(items)
    res.gold_items = sum(it["is_gold"] for it in items)
    return res


def _insert(s: Session, model: type, rows: list[dict]) -> list[int]:
    """Insert `rows` into `model`'s table in the session's transaction; their new ids, in order. SQLite: ids taken
    after the largest one (the transaction holds the write lock, so no other writer takes them) and one executemany
    on the driver's connection with the values in the ORM's formats (`_sqlite_converters`): several times cheaper
    than SQLAlchemy's parameter processing, and the write lock is held that much shorter. Elsewhere INSERT ...
    RETURNING."""
    table = model.__table__
    conn = s.connection()
    if not rows:
        return []
    if conn.dialect.name != "sqlite":
        return list(conn.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows).scalars())
    start = conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one() + 1
    ids = list(range(start, start + len(rows)))
    cols = list(rows[0])
    conv = [_sqlite_converters(table.c[c].type) for c in cols]
    sql = f"INSERT INTO {table.name} (id, {', '.join(cols)}) VALUES (?{', ?' * len(cols)})"
    conn.connection.driver_connection.executemany(
        sql, [(i, *[f(r[c]) for f, c in zip(conv, cols, strict=True)]) for i, r in zip(ids, rows, strict=True)])
    return ids


def _sqlite_converters(col_type: Any):
    """How SQLAlchemy stores a value of this column type on SQLite (JSON: json.dumps text, None as 'null' like the
    ORM; Boolean: 0/1; DateTime: "YYYY-MM-DD HH:MM:SS.ffffff"); other values as they are."""
    if isinstance(col_type, JSON):
        return json.dumps
    if isinstance(col_type, Boolean):
        return int
    if isinstance(col_type, DateTime):
        return lambda d: d.strftime("%Y-%m-%d %H:%M:%S.%f")
    return lambda v: v
