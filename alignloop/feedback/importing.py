"""Importing completions: JSONL rows -> prompts, completions and items.

Rows are either one prompt with its completions or one completion per row (rows with the same prompt are grouped):

    {"prompt": "Explain RLHF", "completions": ["...", {"text": "...", "model": "sft-v2", "params": {...}}]}
    {"prompt": [{"role": "user", "content": "hi"}, ...], "completions": [...], "gold": {"choice": "a"}}
    {"prompt": "Explain RLHF", "completion": "...", "model": "base"}

`parse_rows` checks and groups them (errors name the file and line, or the record), `insert_groups` writes the
groups in the caller's transaction. Items per prompt: pairwise every pair of its completions, rank one item of all
K (at most the project's `max_rank_k`, default 9), thumbs and Likert one item per completion.

A steps project takes rows of the step format (`alignloop.data`'s, one solution per row), each row one item:

    {"prompt": "2 + 3 * 4 = ?", "completions": ["3 * 4 = 12", "2 + 12 = 14"], "labels": [1, 1], "gold": true}
    {"prompt": "...", "completion": "3 * 4 = 12\n2 + 12 = 14\n"}      # a solution's text, split into steps

The steps are stored as the item's completions, in order (a step: a non-empty string without the step separator
"\n"; at most the project's `max_steps`, default 100). `labels` (+1 / 0 / -1 or true / false per step) are the gold
answer of a gold row (`"gold": true`, or `"gold": {"labels": [...]}`); a non-gold row's labels are not imported
(counted in a warning). Rows with the same prompt share one prompt row.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from alignloop.data import STEP_SEPARATOR, DataStats, read_raw_rows, split_steps
from alignloop.errors import UserError

from .models import PAIRWISE_CHOICES, Completion, Item, Project, Prompt
from .validation import competition_ranks, step_label

DEFAULT_MAX_RANK_K = 9
DEFAULT_MAX_STEPS = 100  # steps of one solution a steps item shows (project setting `max_steps`)


@dataclass
class ImportResult:
    prompts: int = 0
    completions: int = 0
    items: int = 0
    gold_items: int = 0
    warnings: list[str] = field(default_factory=list)


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of an import file (JSONL, or any file type `alignloop.data` reads), each with `_where` ("file line n")
    for error messages; a row that is not valid JSON or not an object stops the import, naming its line."""
    rows = read_raw_rows(path, "train", DataStats())
    for row in rows:
        if row.error is not None:
            raise UserError(f"{row.where}: not valid JSON or not a JSON object ({row.error.split(': ', 1)[-1]})")
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


def _group_of(groups: dict[str, dict], row: dict, i: int, fresh: dict) -> tuple[str, dict]:
    """(where the row is, its prompt's group in `groups`, created from `fresh` + messages, is_chat, where when the
    prompt is new); rows with the same prompt share a group, in order of first appearance."""
    where = row.get("_where", f"record {i + 1}")
    if "prompt" not in row:
        raise UserError(f"{where}: missing field 'prompt'")
    msgs, is_chat = normalise_prompt(row["prompt"], where)
    return where, groups.setdefault(json.dumps(msgs, sort_keys=True),
                                    {"messages": msgs, "is_chat": is_chat, **fresh, "where": where})


def parse_step_rows(rows: Iterable[dict], model: str | None = None) -> list[dict]:
    """Check step-format rows (one solution each) and group them by prompt: one group `{"messages", "is_chat",
    "solutions": [{"completions", "gold", "where"}], "meta", "where", "unused_labels"}` per distinct prompt."""
    groups: dict[str, dict] = {}
    for i, row in enumerate(rows):
        where, g = _group_of(groups, row, i, {"solutions": [], "meta": {}, "unused_labels": 0})
        steps = _step_texts(row, where, model)
        gold = _step_gold(row, len(steps), where)
        if gold is None and row.get("labels") is not None:
            g["unused_labels"] += 1
        g["solutions"].append({"completions": steps, "gold": None if gold is None else {"step_labels": gold},
                               "where": where})
        if isinstance(row.get("meta"), dict):
            g["meta"].update(row["meta"])
    return list(groups.values())


def parse_rows(rows: Iterable[dict], task_type: str, model: str | None = None) -> list[dict]:
    """Check the rows and group them by prompt: one group `{"messages", "is_chat", "completions", "gold", "meta",
    "where"}` per distinct prompt, in order of first appearance. `model` names completions that name none. A steps
    project's rows: `parse_step_rows`."""
    if task_type == "steps":
        return parse_step_rows(rows, model)
    groups: dict[str, dict] = {}
    for i, row in enumerate(rows):
        where, g = _group_of(groups, row, i, {"completions": [], "gold": None, "meta": {}})
        g["completions"].extend(_row_completions(row, where, model))
        if row.get("gold") is not None:
            g["gold"] = check_gold(task_type, row["gold"], where)
        if isinstance(row.get("meta"), dict):
            g["meta"].update(row["meta"])
    return list(groups.values())


def _check_group(g: dict, task_type: str) -> str | None:
    """A warning if the group is skipped (too few completions); UserError if its gold answer does not fit."""
    n, gold = len(g["completions"]), g["gold"]
    if task_type in ("pairwise", "rank") and n < 2:
        return f"{g['where']}: fewer than 2 completions for a {task_type} project; skipped"
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
    return [[i] for i in ids]


def _insert_step_groups(s: Session, p: Project, groups: list[dict]) -> ImportResult:
    """Steps: one item per solution, its steps the item's completions in order."""
    res = ImportResult()
    max_steps = int(p.settings.get("max_steps", DEFAULT_MAX_STEPS))
    for g in groups:
        for sol in g["solutions"]:
            if len(sol["completions"]) > max_steps:
                raise UserError(f"{sol['where']}: {len(sol['completions'])} steps; a steps item shows at most "
                                f"{max_steps} (project setting max_steps)")
        pr = Prompt(project_id=p.id, messages=g["messages"], is_chat=g["is_chat"], meta=g["meta"])
        s.add(pr)
        s.flush()
        res.prompts += 1
        for sol in g["solutions"]:
            comps = [Completion(prompt_id=pr.id, text=c["text"], model=c["model"], params=c["params"])
                     for c in sol["completions"]]
            s.add_all(comps)
            s.flush()
            res.completions += len(comps)
            is_gold = sol["gold"] is not None
            s.add(Item(project_id=p.id, prompt_id=pr.id, completion_ids=[c.id for c in comps], is_gold=is_gold,
                       gold_answer=sol["gold"]))
            res.items += 1
            res.gold_items += is_gold
    unused = sum(g["unused_labels"] for g in groups)
    if unused:
        res.warnings.append(f"{unused} non-gold row(s) carry labels: not imported (labelers label them; mark a row "
                            '"gold": true to use its labels as the known answer)')
    return res


def insert_groups(s: Session, p: Project, groups: list[dict]) -> ImportResult:
    """Write parsed groups (see `parse_rows`) into project `p` in the caller's transaction."""
    if p.task_type == "steps":
        return _insert_step_groups(s, p, groups)
    res = ImportResult()
    for g in groups:
        warning = _check_group(g, p.task_type)
        if warning:
            res.warnings.append(warning)
            continue
        pr = Prompt(project_id=p.id, messages=g["messages"], is_chat=g["is_chat"], meta=g["meta"])
        s.add(pr)
        s.flush()
        res.prompts += 1
        comps = [Completion(prompt_id=pr.id, text=c["text"], model=c["model"], params=c["params"])
                 for c in g["completions"]]
        s.add_all(comps)
        s.flush()
        res.completions += len(comps)
        is_gold = g["gold"] is not None
        for cids in item_completions(p, [c.id for c in comps], g["where"]):
            s.add(Item(project_id=p.id, prompt_id=pr.id, completion_ids=cids, is_gold=is_gold,
                       gold_answer=g["gold"]))
            res.items += 1
            res.gold_items += is_gold
    return res
