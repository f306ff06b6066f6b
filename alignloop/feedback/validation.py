"""Checking a labeler's submission: fields in *screen* terms (left/right, a rank per shown position) in, the canonical
fields of a `Judgement` out (choice "a" = the item's first completion, ranks per canonical completion).

    validate_submission("pairwise", shown_order=[1, 0], fields={"choice": "left", "strength": "better"})
    -> {"choice": "b", "strength": "better", "picked_position": 0, "flags": [], "comment": ""}

    validate_submission("steps", shown_order=[0, 1, 2], fields={"step_0": "good", "first_error": "1"})
    -> {"step_labels": [1, -1, -1], "flags": [], "comment": ""}

    validate_submission("pairwise", [1, 0], {"choice_helpful": "left", "strength_helpful": "better",
                                             "choice_harmless": "tie"}, questions=("helpful", "harmless"))
    -> {"answers": {"helpful": {"choice": "b", "strength": "better", "picked_position": 0},
                    "harmless": {"choice": "tie", "strength": None, "picked_position": None}},
        "choice": "b", "strength": "better", "picked_position": 0, "flags": [], "comment": ""}

Both submit paths (the portable ORM one and the SQLite hot path) call `validate_submission`, so a judgement is
checked the same way whichever path stores it. Errors are collected per field and raised together as one
`ValidationError` (the form shows each message next to its field).

An AI labeler's judgement comes in *canonical* terms already (`Store.record_ai_judgements`):
`validate_ai_judgement` checks it with the same rules (strengths, competition ranks, flags, comment) and returns
the same canonical fields plus its `shown_order`, `details` and `time_spent_ms`.
"""
from __future__ import annotations

import json
import numbers
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ValidationError
from .models import PAIRWISE_CHOICES, STEP_LABEL_NAMES, STRENGTHS
from .questions import check_answers
from .security import is_utf8_text

MAX_COMMENT_CHARS = 5000
MAX_DIGITS = 18  # an integer field's digits at most (a form's 30-digit number is refused, never parsed)
MAX_TIME_MS = 2**31 - 1  # time_spent_ms at most (~25 days; the column is a 32-bit integer on PostgreSQL)
MAX_MODEL_CHARS = 300  # Labeler.model
DEFAULT_MIN_CHARS = 20  # a demonstration's text at least (settings.min_chars) ...
DEFAULT_MAX_CHARS = 20000  # ... and at most (settings.max_chars)
_IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{8,100}$")
_AI_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")  # the rule of usernames (projects.py): an AI labeler is one
# The keys of an AI judgement (`validate_ai_judgement`): these for every task, plus the task's own (AI_TASK_KEYS). A
# key of another task is accepted only as None; any other key is refused (a misspelt field is not ignored).
AI_JUDGEMENT_KEYS = frozenset({"item_id", "shown_order", "details", "comment", "time_spent_ms"})
AI_TASK_KEYS = {"pairwise": frozenset({"choice", "strength", "picked_position"}), "rank": frozenset({"ranking"}),
                "thumbs": frozenset({"thumbs"}), "likert": frozenset({"likert", "flags"}),
                "steps": frozenset({"step_labels"})}
_STEP_FIELD_RE = re.compile(r"^step_(\d+)$")


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
    """`value` as an integer in [lo, hi], else None. Exactly an integer: an int (not a bool, not a float such as 5.9
    or 5.0), or a string of ASCII digits (a form field: "5", not "٣" or "5.0"); nothing is coerced."""
    exact = (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS)
    if not exact:
        return None
    n = int(value)
    return n if lo <= n <= hi else None


@dataclass(frozen=True, slots=True)
class Rules:
    """What a task's check needs of the project: its flag names (Likert), whether ties (pairwise tie / both bad,
    equal ranks) are allowed, whether a pairwise pick needs a strength (settings `allow_ties`, `strength_required`,
    both default True)."""
    flag_names: Collection[str] = ()
    allow_ties: bool = True
    strength_required: bool = True
    min_chars: int = DEFAULT_MIN_CHARS  # a demonstration's length (settings.min_chars / max_chars)
    max_chars: int = DEFAULT_MAX_CHARS


# Each task's check reads `fields` and fills `out` (canonical fields) and `errors` (field -> message).
# `errors` may already hold the comment's error when a check runs.
_Check = Callable[[list[int], Mapping[str, Any], Rules, dict, dict], None]


def _pairwise(shown_order: list[int], fields: Mapping[str, Any], rules: Rules, out: dict, errors: dict) -> None:
    """`choice` left|right|tie|both_bad (tie and both bad only where the project allows ties); left/right need a
    `strength` (one of STRENGTHS) unless the project makes it optional (then a missing one is stored as None)."""
    choice = _get(fields, "choice")
    if choice is None:
        errors["choice"] = ("choose the better response, tie, or both bad" if rules.allow_ties
                            else "choose the better response")
    elif not isinstance(choice, str) or choice not in ("left", "right", "tie", "both_bad"):
        errors["choice"] = f"unknown choice {choice!r}"
    elif choice in ("tie", "both_bad"):
        if not rules.allow_ties:
            errors["choice"] = f"{choice!r} is turned off in this project: choose the better response (left or right)"
            return
        out["choice"] = choice
        out["picked_position"] = None
    else:
        pos = 0 if choice == "left" else 1
        out["picked_position"] = pos
        out["choice"] = "ab"[shown_order[pos]]
        strength = _get(fields, "strength")
        if strength is None:
            if rules.strength_required:
                errors["strength"] = "say how much better (significantly, better, slightly, negligibly)"
            else:
                out["strength"] = None
        elif not isinstance(strength, str) or strength not in STRENGTHS:
            errors["strength"] = f"unknown strength {strength!r}: one of {', '.join(STRENGTHS)}"
        else:
            out["strength"] = strength


def _rank(shown_order: list[int], fields: Mapping[str, Any], rules: Rules, out: dict, errors: dict) -> None:
    """`rank_<i>` for each shown position i: integers 1..K (ints, or ASCII digits in a form), rank 1 used; ties
    allowed unless the project turns them off (then the ranks are a permutation of 1..K)."""
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
    if not rules.allow_ties and len(set(ranks_shown)) != k:
        errors["ranking"] = f"ties are turned off in this project: give each response a different rank, 1 to {k}"
        return
    canonical = [0] * k  # ranks per canonical completion, stored as competition ranks (ties share a rank)
    for pos, r in enumerate(ranks_shown):
        canonical[shown_order[pos]] = r
    out["ranking"] = competition_ranks(canonical)


_THUMBS = {"up": 1, "+1": 1, "1": 1, "down": -1, "-1": -1}


def _thumbs(_shown_order, fields: Mapping[str, Any], _rules, out: dict, errors: dict) -> None:
    """`thumbs` up|down (or +1|-1: the ints, or their text). Exactly these: true, 1.0 and "yes" are refused."""
    t = _get(fields, "thumbs")
    if isinstance(t, str) and t in _THUMBS:
        out["thumbs"] = _THUMBS[t]
    elif isinstance(t, numbers.Integral) and not isinstance(t, bool) and t in (1, -1):
        out["thumbs"] = int(t)
    else:
        errors["thumbs"] = "choose thumbs up or thumbs down (\"up\" | \"down\", or 1 | -1)"


def _likert(_shown_order, fields: Mapping[str, Any], rules: Rules, out: dict, errors: dict) -> None:
    """`likert` 1..7 (an int, or ASCII digits in a form) and `flags` (a list of the project's flag names)."""
    lv = _int_in(_get(fields, "likert"), 1, 7)
    if lv is None:
        errors["likert"] = "choose a rating from 1 (worst) to 7 (best): a whole number"
    else:
        out["likert"] = lv
    flags = fields.get("flags")
    if flags is None:
        flags = []
    if not isinstance(flags, (list, tuple)) or not all(isinstance(f, str) for f in flags):
        errors["flags"] = "a list of flag names (texts)"
        return
    bad = [f for f in flags if f not in rules.flag_names]
    if bad:
        errors["flags"] = f"unknown flag(s): {', '.join(bad)}"
    else:
        out["flags"] = sorted(set(flags))


def step_label(value: Any) -> int | None:
    """A step's rating as its label: good | neutral | bad (the form), +1 | 0 | -1 (numbers or their text), or a
    boolean (the step format's true = +1, false = -1). None when it is none of these."""
    if isinstance(value, bool):
        return 1 if value else -1
    if isinstance(value, str):
        v = value.strip().lower()
        if v in STEP_LABEL_NAMES:
            return STEP_LABEL_NAMES[v]
        value = {"+1": 1, "1": 1, "0": 0, "-1": -1, "\u22121": -1}.get(v)
    if isinstance(value, numbers.Real) and value in (1, 0, -1):   # 1.0 too: some JSON clients send floats
        return int(value)
    return None


def _given_step_labels(n: int, fields: Mapping[str, Any], errors: dict) -> list[int | None]:
    """The labels given per shown step (None: not rated): `step_labels` (a list, the JSON API) or `step_<i>`."""
    extra = sorted(int(m.group(1)) for k in fields if (m := _STEP_FIELD_RE.match(str(k))) and int(m.group(1)) >= n)
    if extra:
        errors["steps"] = f"the solution has {n} steps (step_0 .. step_{n - 1}); no step_{extra[0]}"
    given = fields.get("step_labels")
    if given is None:
        labels = []
        for i in range(n):
            v = _get(fields, f"step_{i}")
            lab = step_label(v)
            if v is not None and lab is None:
                errors[f"step_{i}"] = f"step {i + 1}: unknown rating {v!r} (good, neutral or bad: +1, 0 or -1)"
            labels.append(lab)
        return labels
    if any(_STEP_FIELD_RE.match(str(k)) for k in fields):
        errors["step_labels"] = "give either step_labels (a list) or step_<i> fields, not both"
    if not isinstance(given, (list, tuple)) or len(given) != n:
        errors["step_labels"] = f"a list of {n} labels, one per step in order: +1 good, 0 neutral, -1 bad"
        return [None] * n
    labels = []
    for i, v in enumerate(given):
        lab = step_label(v)
        if v is not None and lab is None:
            errors[f"step_{i}"] = f"step {i + 1}: unknown rating {v!r} (+1 good, 0 neutral, -1 bad)"
        labels.append(lab)
    return labels


def _steps(shown_order: list[int], fields: Mapping[str, Any], _rules, out: dict, errors: dict) -> None:
    """A rating per step (`step_<i>` good|neutral|bad or +1|0|-1 for shown step i, or `step_labels` a list), and
    the optional `first_error` shortcut: the index of the first wrong step; that step and every later one are bad
    (-1), earlier steps keep their rating and unrated earlier ones are good (+1)."""
    n = len(shown_order)
    labels = _given_step_labels(n, fields, errors)
    first = _get(fields, "first_error")
    if first is not None:
        idx = None if isinstance(first, bool) else _int_in(first, 0, n - 1)
        if idx is None:
            errors["first_error"] = f"{first!r}: the index of the first wrong step, from 0 to {n - 1}"
        else:
            labels = [(1 if lab is None else lab) if i < idx else -1 for i, lab in enumerate(labels)]
    for i, lab in enumerate(labels):
        if lab is None and f"step_{i}" not in errors and "step_labels" not in errors:
            errors[f"step_{i}"] = f"rate step {i + 1}: good, neutral or bad"
    if not errors:
        canonical = [0] * n
        for pos, lab in enumerate(labels):
            canonical[shown_order[pos]] = lab
        out["step_labels"] = canonical


def _demonstration(_shown_order, fields: Mapping[str, Any], rules: Rules, out: dict, errors: dict) -> None:
    """`text`: the labeler's response (written, or the sampled answer edited), at least `min_chars` characters once
    stripped and at most `max_chars`. Stored as given (stripped at both ends: leading blank lines are noise)."""
    text = fields.get("text")
    if text is None or (isinstance(text, str) and not text.strip()):
        errors["text"] = "write the response (the text field is empty)"
    elif not isinstance(text, str):
        errors["text"] = f"must be text, not {type(text).__name__}"
    elif not is_utf8_text(text):
        errors["text"] = "is not valid text (it holds a lone surrogate such as \\ud800)"
    elif len(text.strip()) < rules.min_chars:
        errors["text"] = (f"is too short: {len(text.strip())} characters, at least {rules.min_chars} in this "
                          "project")
    elif len(text.strip()) > rules.max_chars:
        errors["text"] = f"is too long: {len(text.strip())} characters, at most {rules.max_chars} in this project"
    else:
        out["text"] = text.strip()


_CHECKS: dict[str, _Check] = {"pairwise": _pairwise, "rank": _rank, "thumbs": _thumbs, "likert": _likert,
                              "steps": _steps, "demonstration": _demonstration}


def _comment(fields: Mapping[str, Any], out: dict, errors: dict) -> None:
    comment = fields.get("comment")
    if comment is None:
        comment = ""
    if not isinstance(comment, str):
        errors["comment"] = "must be text"
    elif not is_utf8_text(comment):  # a lone surrogate ("\\ud800" in JSON): SQLite cannot store it (was a 500)
        errors["comment"] = "is not valid text (it holds a lone surrogate such as \\ud800)"
    elif len(comment) > MAX_COMMENT_CHARS:
        errors["comment"] = f"is too long (at most {MAX_COMMENT_CHARS} characters)"
    else:
        out["comment"] = comment.strip()


def validate_submission(task_type: str, shown_order: list[int], fields: Mapping[str, Any],
                        flag_names: Collection[str] = (), questions: tuple[str, ...] = (),
                        allow_ties: bool = True, strength_required: bool = True,
                        min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS) -> dict:
    """Check a submission and translate it to canonical fields for a `Judgement`.

    pairwise: `choice` in left|right|tie|both_bad, `strength` (one of STRENGTHS) required for left/right.
    rank: `rank_<i>` for each shown position i (integers 1..K, ties allowed, rank 1 must be used).
    thumbs: `thumbs` up|down. likert: `likert` 1..7 and `flags` (list of names). steps: `step_<i>` for each shown
    step i (good|neutral|bad or +1|0|-1) or `step_labels` (a list), optional `first_error` (the index of the first
    wrong step: it and every later step bad, unrated earlier ones good). demonstration: `text` (the response,
    `min_chars` to `max_chars` characters once stripped). All: optional `comment`.
    A pairwise project asking several `questions` (their names): `choice_<name>` and `strength_<name>` per
    question, or `answers` {name: {choice, strength}} (`questions.check_answers`).
    `allow_ties` False (project setting): pairwise tie / both bad and equal ranks are refused; `strength_required`
    False: a pairwise pick without a strength is stored with strength None.
    Values are exactly the type asked for (no coercion): numbers are ints (a form's ASCII digits), not bools or
    floats; texts are strings; `flags` a list of strings. Each mistake is an error naming its field.
    """
    errors: dict[str, str] = {}
    out: dict[str, Any] = {"flags": [], "comment": ""}
    _comment(fields, out, errors)
    check = _CHECKS.get(task_type)
    if check is None:
        errors["task_type"] = f"unknown task type {task_type!r}"
    elif task_type == "pairwise" and len(questions) > 1:
        check_answers(shown_order, fields, questions, out, errors, STRENGTHS, allow_ties, strength_required)
    else:
        check(shown_order, fields, Rules(flag_names, allow_ties, strength_required, min_chars, max_chars), out,
              errors)
    if errors:
        raise ValidationError(errors)
    return out


# ----------------------------------------------------------------------------------------------------------------
# AI labelers: judgements given in canonical terms
# ----------------------------------------------------------------------------------------------------------------

def check_ai_labeler(name: Any, model: Any) -> None:
    """An AI labeler's name follows the rule of usernames; its model is a non-empty string (at most 300)."""
    errors = {}
    if not isinstance(name, str) or not _AI_NAME_RE.match(name):
        errors["name"] = f"AI labeler name {name!r}: use letters, digits, '_', '-', '.' (at most 100)"
    if not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_CHARS:
        errors["model"] = (f"AI labeler model {model!r}: a non-empty name or spec of at most {MAX_MODEL_CHARS} "
                           "characters")
    if errors:
        raise ValidationError(errors)


def _is_int(v: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _shown_order(value: Any, n_completions: int, errors: dict) -> list[int] | None:
    """A permutation of 0..K-1 (the order the first judging order showed the canonical completions)."""
    if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value) \
            and sorted(value) == list(range(n_completions)):
        return [int(v) for v in value]
    errors["shown_order"] = (f"{value!r}: the order the canonical completions were shown in, a permutation of "
                             f"{list(range(n_completions))}")
    return None


def _canonical_pairwise(shown_order: list[int], fields: Mapping[str, Any], _rules, out: dict,
                        errors: dict) -> None:
    """`choice` a|b|tie|both_bad ("a" = the item's first completion); `strength` one of STRENGTHS or None for a|b,
    None otherwise; `picked_position` the screen position of the choice in `shown_order` (0|1; None: derived from
    `shown_order`), None for tie|both_bad."""
    choice, strength, pos = fields.get("choice"), fields.get("strength"), fields.get("picked_position")
    if choice not in PAIRWISE_CHOICES:
        errors["choice"] = (f"{choice!r}: choose one of {', '.join(PAIRWISE_CHOICES)} (canonical: a = the item's "
                            "first completion)")
        return
    if choice in ("tie", "both_bad"):
        if strength is not None:
            errors["strength"] = f"{strength!r}: only a choice of a or b has a strength (got {choice!r})"
        if pos is not None:
            errors["picked_position"] = f"{pos!r}: only a choice of a or b has a picked position (got {choice!r})"
        out.update(choice=choice, strength=None, picked_position=None)
        return
    if strength is not None and strength not in STRENGTHS:
        errors["strength"] = f"unknown strength {strength!r}: choose one of {', '.join(STRENGTHS)} or null"
    shown_at = shown_order.index("ab".index(choice))
    if pos is None:
        pos = shown_at
    elif not _is_int(pos) or pos not in (0, 1):
        errors["picked_position"] = f"{pos!r}: 0 (shown first), 1 or null"
    elif pos != shown_at:
        errors["picked_position"] = (f"{pos}: shown_order {shown_order} showed choice {choice!r} at position "
                                     f"{shown_at}")
    out.update(choice=choice, strength=strength, picked_position=int(pos) if _is_int(pos) else None)


def _canonical_rank(shown_order: list[int], fields: Mapping[str, Any], _rules, out: dict, errors: dict) -> None:
    """`ranking`: a rank per canonical completion, integers 1..K (1 = best, ties allowed, rank 1 used)."""
    k, ranking = len(shown_order), fields.get("ranking")
    if not isinstance(ranking, (list, tuple)) or len(ranking) != k or not all(_is_int(r) and 1 <= r <= k
                                                                             for r in ranking):
        errors["ranking"] = f"{ranking!r}: a rank from 1 to {k} per canonical completion ({k} of them)"
    elif 1 not in ranking:
        errors["ranking"] = f"{ranking!r}: some completion must be ranked 1 (best)"
    else:
        out["ranking"] = competition_ranks(list(ranking))


def _canonical_steps(shown_order: list[int], fields: Mapping[str, Any], _rules, out: dict,
                     errors: dict) -> None:
    """`step_labels`: a label per step in the solution's order, +1 | 0 | -1 (or true / false); steps are shown in
    their order, so `shown_order` must be 0..n-1."""
    n, given = len(shown_order), fields.get("step_labels")
    if shown_order != list(range(n)):
        errors["shown_order"] = f"{shown_order!r}: steps are shown in their order, {list(range(n))}"
    labels = [step_label(v) for v in given] if isinstance(given, (list, tuple)) else []
    if len(labels) != n or None in labels or any(isinstance(v, str) for v in given):
        errors["step_labels"] = f"{given!r}: a label per step ({n} of them): +1 good, 0 neutral, -1 bad"
    else:
        out["step_labels"] = labels


_CANONICAL_CHECKS: dict[str, _Check] = {"pairwise": _canonical_pairwise, "rank": _canonical_rank,
                                        "thumbs": _thumbs, "likert": _likert, "steps": _canonical_steps}


def _details(details: Any, out: dict, errors: dict) -> None:
    """None or a JSON object (no NaN: PostgreSQL's JSON has none); `raw_picks`, if there, a list of 0 / 1 / None."""
    if details is None:
        out["details"] = None
        return
    if not isinstance(details, dict):
        errors["details"] = f"a JSON object (dict) or null, not {type(details).__name__}"
        return
    try:
        json.dumps(details, allow_nan=False)
    except (TypeError, ValueError) as e:
        errors["details"] = f"not storable as JSON ({e})"
        return
    picks = details.get("raw_picks")
    if picks is not None and (not isinstance(picks, list) or any(p not in (0, 1, None) or isinstance(p, bool)
                                                                 for p in picks)):
        errors["details"] = f"raw_picks {picks!r}: a list of 0 (first shown position), 1 or null, one per order judged"
        return
    out["details"] = details


def validate_ai_judgement(task_type: str, n_completions: int, fields: Mapping[str, Any],
                          flag_names: Iterable[str] = ()) -> dict:
    """Check an AI judgement given in canonical terms and return the fields of a `Judgement`: `shown_order`, the
    task's canonical fields (as `validate_submission` returns them), `flags`, `comment`, `details`, `time_spent_ms`.

    All: `shown_order` (a permutation of 0..K-1: how the first judging order showed the canonical completions),
    optional `details` (dict), `comment`, `time_spent_ms`. pairwise: `choice` a|b|tie|both_bad, `strength` (one of
    STRENGTHS or None), `picked_position` (0|1|None, consistent with `shown_order`). rank: `ranking` (a rank per
    canonical completion, 1 = best). thumbs: `thumbs` +1|-1. likert: `likert` 1..7, `flags`. steps: `step_labels`
    (+1|0|-1 per step; `shown_order` 0..n-1). Another task's keys
    are accepted as None only, other keys never. (`item_id` is checked by the caller, against the database.)
    """
    errors: dict[str, str] = {}
    out: dict[str, Any] = {"flags": [], "comment": ""}
    own = AI_JUDGEMENT_KEYS | AI_TASK_KEYS.get(task_type, frozenset())
    other_tasks = frozenset().union(*AI_TASK_KEYS.values())
    unknown = sorted(str(k) for k, v in fields.items() if k not in own and not (k in other_tasks and v is None))
    if unknown:
        errors["fields"] = f"field(s) {', '.join(unknown)}: not fields of a {task_type} judgement"
    _comment(fields, out, errors)
    shown = _shown_order(fields.get("shown_order"), n_completions, errors)
    check = _CANONICAL_CHECKS.get(task_type)
    if check is None:
        errors["task_type"] = f"unknown task type {task_type!r}"
    elif shown is not None:
        check(shown, fields, Rules(flag_names), out, errors)
    _details(fields.get("details"), out, errors)
    spent = fields.get("time_spent_ms")
    if spent is not None and not (_is_int(spent) and 0 <= spent <= MAX_TIME_MS):
        errors["time_spent_ms"] = f"{spent!r}: milliseconds (an integer from 0 to {MAX_TIME_MS}) or null"
    if errors:
        raise ValidationError(errors)
    return {**out, "shown_order": shown, "time_spent_ms": spent}
