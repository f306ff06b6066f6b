"""Several questions per item (criteria): a pairwise project's `questions` setting, checking the answers to them,
and one question's judgements as one-question records (what quality and export read).

    settings = {"questions": [{"name": "helpful", "question": "Which response is more helpful?"},
                              {"name": "harmless", "question": "Which response is more harmless?"}]}

A project without the setting asks one question, DEFAULT_QUESTION. Names are slugs (lowercase letters, digits and
`_`, starting with a letter): they name the form's fields (`choice_<name>`, `strength_<name>`), the JSON API's
`answers` keys and the export's `criterion` column. Only pairwise projects take the setting: a ranking, a rating or
a steps judgement per question would each need their own form and exports, and a project of another task type with
`questions` is refused when it is created.

A judgement of a project with two or more questions stores every answer in `Judgement.answers`
`{name: {"choice", "strength", "picked_position"}}` (canonical terms, as the columns) and the first question's in
the usual `choice` / `strength` / `picked_position` columns, so everything that reads one answer per judgement
(quality, agreement, the dashboard) reads the first question. A one-question project stores no `answers`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from alignloop.errors import UserError

DEFAULT_QUESTION = {"name": "overall", "question": "Which response is better?"}
MAX_QUESTIONS = 10
MAX_QUESTION_CHARS = 500
QUESTION_TASK_TYPES = ("pairwise",)
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
NAME_RULE = "a slug: lowercase letters, digits and _, starting with a letter, at most 40 characters"


def check_questions(value: Any, task_type: str) -> list[dict]:
    """The `questions` setting checked: a list of 1..MAX_QUESTIONS {"name", "question"} with unique slug names.
    UserError naming the setting (and the entry) otherwise."""
    if task_type not in QUESTION_TASK_TYPES:
        raise UserError(f"settings.questions: several questions are supported for {', '.join(QUESTION_TASK_TYPES)} "
                        f"projects only, not {task_type} (leave the setting out)")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_QUESTIONS:
        raise UserError(f'settings.questions: a list of 1 to {MAX_QUESTIONS} {{"name": ..., "question": ...}} '
                        "objects")
    out, seen = [], set()
    for n, q in enumerate(value):
        where = f"settings.questions[{n}]"
        if not isinstance(q, Mapping) or set(q) != {"name", "question"}:
            raise UserError(f'{where}: an object with exactly "name" and "question", got {q!r}')
        name, text = q["name"], q["question"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UserError(f"{where}.name {name!r}: {NAME_RULE}")
        if name in seen:
            raise UserError(f"{where}.name {name!r}: used twice (names must be unique)")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_QUESTION_CHARS:
            raise UserError(f"{where}.question: a non-empty text of at most {MAX_QUESTION_CHARS} characters")
        seen.add(name)
        out.append({"name": name, "question": text.strip()})
    return out


def questions_of(settings: Mapping[str, Any] | None) -> list[dict]:
    """A project's questions (its `questions` setting, else [DEFAULT_QUESTION])."""
    qs = (settings or {}).get("questions")
    return list(qs) if qs else [dict(DEFAULT_QUESTION)]


def names_of(settings: Mapping[str, Any] | None) -> tuple[str, ...]:
    return tuple(q["name"] for q in questions_of(settings))


def is_named(settings: Mapping[str, Any] | None) -> bool:
    """Whether the admin named the project's questions (then export rows carry their `criterion`)."""
    return bool((settings or {}).get("questions"))


# -- answers to several questions (screen terms in, canonical out) -------------------------------------------------
def _given(fields: Mapping[str, Any], name: str, key: str) -> Any:
    """One answer's `key` (choice | strength): `answers[name][key]` (the JSON API) or the field `<key>_<name>`."""
    answers = fields.get("answers")
    v = answers.get(name, {}).get(key) if isinstance(answers, Mapping) and isinstance(answers.get(name), Mapping) \
        else fields.get(f"{key}_{name}")
    if isinstance(v, str):
        v = v.strip() or None
    return v


def _check_answers_shape(fields: Mapping[str, Any], names: Sequence[str], errors: dict) -> None:
    answers = fields.get("answers")
    if answers is None:
        if fields.get("choice") not in (None, ""):
            errors["choice"] = (f"this item asks {len(names)} questions: answer each with choice_<name> and "
                                f"strength_<name> (or answers), for {', '.join(names)}")
        return
    if not isinstance(answers, Mapping):
        errors["answers"] = 'an object {question name: {"choice": ..., "strength": ...}}'
        return
    unknown = sorted(str(k) for k in answers if k not in names)
    bad = sorted(str(k) for k, v in answers.items() if k in names and not isinstance(v, Mapping))
    if unknown:
        errors["answers"] = f"unknown question(s) {', '.join(unknown)}: the questions are {', '.join(names)}"
    elif bad:
        errors["answers"] = f"answers[{bad[0]}]: an object {{\"choice\": ..., \"strength\": ...}}"


def check_answers(shown_order: list[int], fields: Mapping[str, Any], names: Sequence[str], out: dict, errors: dict,
                  strengths: Sequence[str], allow_ties: bool = True, strength_required: bool = True) -> None:
    """Every question's `choice` (left|right|tie|both_bad) and, for left/right, `strength` (one of `strengths`),
    from `choice_<name>` / `strength_<name>` fields or `answers` {name: {choice, strength}}. Fills `out["answers"]`
    (canonical: a = the item's first completion) and the first question's `choice` / `strength` /
    `picked_position`; errors are keyed by the form's field names and name the question. The project's settings:
    `allow_ties` False refuses tie / both bad, `strength_required` False lets a pick go without a strength (None)."""
    _check_answers_shape(fields, names, errors)
    answers: dict[str, dict] = {}
    for name in names:
        choice = _given(fields, name, "choice")
        if choice is None:
            errors[f"choice_{name}"] = f"{name}: choose the better response, tie, or both bad"
        elif not isinstance(choice, str) or choice not in ("left", "right", "tie", "both_bad"):
            errors[f"choice_{name}"] = f"{name}: unknown choice {choice!r}"
        elif choice in ("tie", "both_bad"):
            if allow_ties:
                answers[name] = {"choice": choice, "strength": None, "picked_position": None}
            else:
                errors[f"choice_{name}"] = f"{name}: {choice!r} is turned off in this project (choose left or right)"
        else:
            pos = 0 if choice == "left" else 1
            strength = _given(fields, name, "strength")
            if strength is None and not strength_required:
                answers[name] = {"choice": "ab"[shown_order[pos]], "strength": None, "picked_position": pos}
            elif strength is None:
                errors[f"strength_{name}"] = f"{name}: say how much better (significantly, better, slightly, " \
                                             "negligibly)"
            elif not isinstance(strength, str) or strength not in strengths:
                errors[f"strength_{name}"] = f"{name}: unknown strength {strength!r}"
            else:
                answers[name] = {"choice": "ab"[shown_order[pos]], "strength": strength, "picked_position": pos}
    if len(answers) == len(names):
        out["answers"] = answers
        out.update(answers[names[0]])


def criterion_records(records: Sequence[Mapping[str, Any]], name: str, first: str) -> list[dict]:
    """The judgements as answers to question `name` (its choice / strength / picked_position in the columns'
    place). The first question's answer is in the columns of every judgement (an AI labeler's too, which answers
    only that one); another question's only in `answers`, so judgements without one are left out."""
    if name == first:
        return [dict(r) for r in records]
    out = []
    for r in records:
        a = (r.get("answers") or {}).get(name)
        if a is not None:
            out.append({**r, "choice": a["choice"], "strength": a["strength"],
                        "picked_position": a["picked_position"]})
    return out
