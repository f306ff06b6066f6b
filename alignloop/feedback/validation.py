"""Checking a labeler's submission: fields in *screen* terms (left/right, a rank per shown position) in, the canonical
fields of a `Judgement` out (choice "a" = the item's first completion, ranks per canonical completion).

    validate_submission("pairwise", shown_order=[1, 0], fields={"choice": "left", "strength": "better"})
    -> {"choice": "b", "strength": "better", "picked_position": 0, "flags": [], "comment": ""}

Both submit paths (the portable ORM one and the SQLite hot path) call `validate_submission`, so a judgement is
checked the same way whichever path stores it. Errors are collected per field and raised together as one
`ValidationError` (the form shows each message next to its field).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ValidationError
from .models import STRENGTHS

MAX_COMMENT_CHARS = 5000
_IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{8,100}$")


def valid_idempotency_key(key: Any) -> bool:
    return isinstance(key, str) and _IDEMPOTENCY_KEY_RE.match(key) is not None


def check_idempotency_key(key: Any) -> None:
    if not valid_idempotency_key(key):
        raise ValidationError({"idempotency_key": "missing or malformed (8-100 letters, digits, _.:-)"})


def competition_ranks(values: list[int]) -> list[int]:
    """Normalise ranks so ties share a rank and the next rank skips ("1224"): [1, 3, 3] -> [1, 2, 2]."""
    return [1 + sum(1 for w in values if w < v) for v in values]


def _get(fields: Mapping[str, Any], name: str) -> Any:
    """A field's value; a string is stripped and an empty one is None."""
    v = fields.get(name)
    if isinstance(v, str):
        v = v.strip()
        return v or None
    return v


def _int_in(value: Any, lo: int, hi: int) -> int | None:
    """`value` as an integer in [lo, hi], else None."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if lo <= n <= hi else None


# Each task's check reads `fields` and fills `out` (canonical fields) and `errors` (field -> message).
# `errors` may already hold the comment's error when a check runs.
_Check = Callable[[list[int], Mapping[str, Any], Iterable[str], dict, dict], None]


def _pairwise(shown_order: list[int], fields: Mapping[str, Any], _flag_names, out: dict, errors: dict) -> None:
    """`choice` left|right|tie|both_bad; left/right need a `strength` (one of STRENGTHS)."""
    choice = _get(fields, "choice")
    if choice is None:
        errors["choice"] = "choose the better response, tie, or both bad"
    elif choice not in ("left", "right", "tie", "both_bad"):
        errors["choice"] = f"unknown choice {choice!r}"
    elif choice in ("tie", "both_bad"):
        out["choice"] = choice
        out["picked_position"] = None
    else:
        pos = 0 if choice == "left" else 1
        out["picked_position"] = pos
        out["choice"] = "ab"[shown_order[pos]]
        strength = _get(fields, "strength")
        if strength is None:
            errors["strength"] = "say how much better (significantly, better, slightly, negligibly)"
        elif strength not in STRENGTHS:
            errors["strength"] = f"unknown strength {strength!r}"
        else:
            out["strength"] = strength


def _rank(shown_order: list[int], fields: Mapping[str, Any], _flag_names, out: dict, errors: dict) -> None:
    """`rank_<i>` for each shown position i: integers 1..K, ties allowed, rank 1 used."""
    k = len(shown_order)
    ranks_shown = []
    for i in range(k):
        r = _int_in(_get(fields, f"rank_{i}"), 1, k)
        if r is None:
            errors[f"rank_{i}"] = f"give response {i + 1} a rank from 1 to {k}"
        else:
            ranks_shown.append(r)
    if errors:
        return
    if 1 not in ranks_shown:
        errors["ranking"] = "some response must be ranked 1 (best)"
        return
    canonical = [0] * k  # ranks per canonical completion, stored as competition ranks (ties share a rank)
    for pos, r in enumerate(ranks_shown):
        canonical[shown_order[pos]] = r
    out["ranking"] = competition_ranks(canonical)


def _thumbs(_shown_order, fields: Mapping[str, Any], _flag_names, out: dict, errors: dict) -> None:
    """`thumbs` up|down (+1 / -1)."""
    t = _get(fields, "thumbs")
    if t in ("up", "+1", 1, "1"):
        out["thumbs"] = 1
    elif t in ("down", "-1", -1):
        out["thumbs"] = -1
    else:
        errors["thumbs"] = "choose thumbs up or thumbs down"


def _likert(_shown_order, fields: Mapping[str, Any], flag_names: Iterable[str], out: dict, errors: dict) -> None:
    """`likert` 1..7 and `flags` (a list of the project's flag names)."""
    lv = _int_in(_get(fields, "likert"), 1, 7)
    if lv is None:
        errors["likert"] = "choose a rating from 1 (worst) to 7 (best)"
    else:
        out["likert"] = lv
    flags = fields.get("flags") or []
    if isinstance(flags, str):
        flags = [flags]
    allowed = set(flag_names)
    bad = [f for f in flags if f not in allowed]
    if bad:
        errors["flags"] = f"unknown flag(s): {', '.join(map(str, bad))}"
    else:
        out["flags"] = sorted(set(flags))


_CHECKS: dict[str, _Check] = {"pairwise": _pairwise, "rank": _rank, "thumbs": _thumbs, "likert": _likert}


def _comment(fields: Mapping[str, Any], out: dict, errors: dict) -> None:
    comment = fields.get("comment") or ""
    if not isinstance(comment, str):
        errors["comment"] = "must be text"
    elif len(comment) > MAX_COMMENT_CHARS:
        errors["comment"] = f"is too long (at most {MAX_COMMENT_CHARS} characters)"
    else:
        out["comment"] = comment.strip()


def validate_submission(task_type: str, shown_order: list[int], fields: Mapping[str, Any],
                        flag_names: Iterable[str] = ()) -> dict:
    """Check a submission and translate it to canonical fields for a `Judgement`.

    pairwise: `choice` in left|right|tie|both_bad, `strength` (one of STRENGTHS) required for left/right.
    rank: `rank_<i>` for each shown position i (integers 1..K, ties allowed, rank 1 must be used).
    thumbs: `thumbs` up|down. likert: `likert` 1..7 and `flags` (list of names). All: optional `comment`.
    """
    errors: dict[str, str] = {}
    out: dict[str, Any] = {"flags": [], "comment": ""}
    _comment(fields, out, errors)
    check = _CHECKS.get(task_type)
    if check is None:
        errors["task_type"] = f"unknown task type {task_type!r}"
    else:
        check(shown_order, fields, flag_names, out, errors)
    if errors:
        raise ValidationError(errors)
    return out
