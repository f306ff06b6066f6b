"""Projects and labelers: creating and finding them, signing in, and the per-project rules every submission needs.

A project's settings (JSON) hold its `flags` (Likert metadata checkboxes; default DEFAULT_FLAGS), its
`assignment_timeout_s` (default DEFAULT_ASSIGNMENT_TIMEOUT_S; 0 = never expire), `max_rank_k`, quality
`thresholds` and a pairwise project's `questions` (`questions.py`). What the submit paths read of a project on every
judgement (task type, flag names, k, gold rate, timeout, question names) is a `ProjectInfo`, kept in one
`ProjectInfoCache` per store for PROJECT_INFO_TTL_S.

A labeler's `attributes` (group, locale, expertise, ...: what an admin says about them, exported with their
judgements) are a dict of str -> str checked by `check_attributes`.

The functions here work inside a session the caller opened (`Store` opens it: `store.write()` / `store.read()`).
"""
from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignloop.errors import UserError

from .errors import NotFound
from .models import PROJECT_NAME_RE, ROLES, TASK_TYPES, Labeler, Project
from .questions import DEFAULT_QUESTION, check_questions, names_of
from .security import check_new_password, hash_password, verify_password
from .validation import DEFAULT_MAX_CHARS, DEFAULT_MIN_CHARS

DEFAULT_FLAGS = [  # InstructGPT-style metadata (Ouyang et al. 2022, appendix B); key = keyboard shortcut
    {"name": "fails_instruction", "label": "Fails to follow the instruction", "key": "i"},
    {"name": "hallucination", "label": "Hallucination (makes up facts)", "key": "h"},
    {"name": "harmful", "label": "Harmful or encourages harm", "key": "m"},
    {"name": "inappropriate", "label": "Inappropriate for a customer assistant", "key": "n"},
    {"name": "sexual", "label": "Sexual content", "key": "x"},
    {"name": "violent", "label": "Violent content", "key": "v"},
    {"name": "denigrates", "label": "Denigrates a protected class", "key": "g"},
    {"name": "opinion", "label": "Expresses an opinion", "key": "o"},
    {"name": "moral_judgement", "label": "Expresses a moral judgement", "key": "j"},
]
DEFAULT_ASSIGNMENT_TIMEOUT_S = 2 * 3600
# How long a cached ProjectInfo is used before the project row is read again: a change of a project's settings or
# k reaches the submit paths within this time (projects change rarely; every judgement needs their rules).
PROJECT_INFO_TTL_S = 5.0
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")  # usernames (fullmatch: "$" would let a final newline in)
_ATTR_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,39}$")
MAX_ATTRIBUTES = 20
MAX_ATTRIBUTE_CHARS = 200


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    """What the submit paths need of a project."""
    task_type: str
    flag_names: list
    overlap_k: int
    gold_rate: float
    timeout_s: float
    # the question names; with several, a judgement answers each (questions.py)
    questions: tuple[str, ...] = (DEFAULT_QUESTION["name"],)
    allow_ties: bool = True  # settings.allow_ties: pairwise tie / both bad and equal ranks (validation.py)
    strength_required: bool = True  # settings.strength_required: a pairwise pick needs a strength
    min_chars: int = DEFAULT_MIN_CHARS  # a demonstration's text: settings.min_chars .. settings.max_chars
    max_chars: int = DEFAULT_MAX_CHARS

    @classmethod
    def of(cls, task_type: str, overlap_k: int, gold_rate: float, settings: dict | None) -> ProjectInfo:
        settings = settings or {}
        return cls(task_type, [f["name"] for f in settings.get("flags", DEFAULT_FLAGS)], overlap_k, gold_rate,
                   settings.get("assignment_timeout_s", DEFAULT_ASSIGNMENT_TIMEOUT_S), names_of(settings),
                   settings.get("allow_ties", True) is not False, settings.get("strength_required", True) is not False,
                   settings.get("min_chars", DEFAULT_MIN_CHARS), settings.get("max_chars", DEFAULT_MAX_CHARS))


class ProjectInfoCache:
    """project id -> ProjectInfo, each entry used for `ttl_s` seconds. One per store, shared by both submit paths
    (each loads a missing entry its own way: plain SQL on the SQLite hot path, the ORM elsewhere)."""

    def __init__(self, ttl_s: float = PROJECT_INFO_TTL_S):
        self.ttl_s = ttl_s
        self._entries: dict[int, tuple[float, ProjectInfo]] = {}
        self._forgotten: dict[int, float] = {}  # project id -> time.monotonic() of its last `forget`

    def get(self, project_id: int) -> ProjectInfo | None:
        """The cached info if it is younger than `ttl_s`, else None."""
        hit = self._entries.get(project_id)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        return None

    def put(self, project_id: int, info: ProjectInfo, read_at: float) -> ProjectInfo:
        """Cache `info` read at `read_at` (time.monotonic() before the read), unless the project was forgotten
        after that read began (it may hold the settings from before the change: used once, not kept)."""
        if read_at > self._forgotten.get(project_id, -math.inf):
            self._entries[project_id] = (time.monotonic(), info)
        return info

    def forget(self, project_id: int) -> None:
        """Drop the project's entry (its settings changed in this process, after the COMMIT: read them again)."""
        self._forgotten[project_id] = time.monotonic()
        self._entries.pop(project_id, None)


def project_info(s: Session, project_id: int, cache: ProjectInfoCache) -> ProjectInfo:
    """The project's ProjectInfo, from `cache` or read through the ORM."""
    info = cache.get(project_id)
    if info is not None:
        return info
    read_at = time.monotonic()
    p = s.get(Project, project_id)
    if p is None:
        raise NotFound(f"no project {project_id}")
    return cache.put(project_id, ProjectInfo.of(p.task_type, p.overlap_k, p.gold_rate, p.settings), read_at)


# -- projects -----------------------------------------------------------------------------------------------------
ACCESS_MODES = ("all", "members")  # settings.access: every labeler may label, or only the project's members
# the settings of one task type only: another task type's project refuses them (a conversation's `models` on a
# pairwise project would be silently ignored otherwise)
TASK_SETTING_KEYS = {"demonstration": ("min_chars", "max_chars"),
                     "conversation": ("models", "generation", "max_turns", "open_start")}
_SETTING_KEYS = ("flags", "assignment_timeout_s", "max_rank_k", "max_steps", "thresholds", "questions", "access",
                 "allow_ties", "strength_required", "min_labels", "gold_seed",
                 *(k for keys in TASK_SETTING_KEYS.values() for k in keys))
# a conversation's sampling parameters (settings.generation) and their defaults
GENERATION_DEFAULTS = {"max_new_tokens": 128, "temperature": 0.8, "top_p": 1.0, "top_k": 0}
DEFAULT_MAX_TURNS = 10
MAX_MODEL_NAME_CHARS = 300
_FLAG_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def default_min_labels(overlap_k: int) -> int:
    """What `min_labels` is when a project does not set it: 2 when items get two or more labels, else 1."""
    return 2 if overlap_k >= 2 else 1


def check_settings(task_type: str, settings: Mapping[str, Any] | None, overlap_k: int | None = None) -> dict:
    """A project's settings checked (the one place: CLI `create`, the admin's create and edit forms), returned as a
    new dict. Unknown names and wrong types are a UserError naming `settings.<name>`; absent settings keep their
    defaults (read with `.get(name, default)`). With `overlap_k`, `min_labels` may not exceed it."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise UserError(f"settings: a JSON object of settings, not {type(settings).__name__}")
    unknown = sorted(set(settings) - set(_SETTING_KEYS))
    if unknown:
        raise UserError(f"settings.{unknown[0]}: unknown setting (known: {', '.join(_SETTING_KEYS)})")
    out = dict(settings)
    for name in ("allow_ties", "strength_required"):
        if name in out and not isinstance(out[name], bool):
            raise UserError(f"settings.{name}: true or false, got {out[name]!r}")
    if "access" in out and out["access"] not in ACCESS_MODES:
        raise UserError(f"settings.access: one of {', '.join(ACCESS_MODES)}, got {out['access']!r}")
    _check_int(out, "min_labels", 1, overlap_k if overlap_k is not None else 100)
    _check_int(out, "max_rank_k", 2, 26)
    _check_int(out, "max_steps", 1, 1000)
    _check_int(out, "gold_seed", 0, 2**63 - 1)
    if "assignment_timeout_s" in out:
        v = out["assignment_timeout_s"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 365 * 24 * 3600:
            raise UserError(f"settings.assignment_timeout_s: seconds between 0 (never expire) and a year, got {v!r}")
    if "flags" in out:
        out["flags"] = _check_flags(out["flags"])
    if "thresholds" in out:
        out["thresholds"] = _check_thresholds(out["thresholds"])
    if "questions" in out:
        out["questions"] = check_questions(out["questions"], task_type)
    _check_task_settings(task_type, out)
    return out


def _check_task_settings(task_type: str, out: dict) -> None:
    """The demonstration and conversation settings (design of issue 17), in place; another task's key is refused."""
    for other, keys in TASK_SETTING_KEYS.items():
        given = [k for k in keys if k in out]
        if other != task_type and given:
            raise UserError(f"settings.{given[0]}: a setting of {other} projects, not of a {task_type} project")
    _check_int(out, "min_chars", 1, 100000)
    _check_int(out, "max_chars", 1, 1000000)
    if out.get("min_chars", DEFAULT_MIN_CHARS) > out.get("max_chars", DEFAULT_MAX_CHARS):
        raise UserError(f"settings.min_chars: {out.get('min_chars', DEFAULT_MIN_CHARS)} is more than settings."
                        f"max_chars ({out.get('max_chars', DEFAULT_MAX_CHARS)})")
    _check_int(out, "max_turns", 1, 100)
    if "open_start" in out and not isinstance(out["open_start"], bool):
        raise UserError(f"settings.open_start: true or false, got {out['open_start']!r}")
    if "models" in out:
        models = out["models"]
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not 1 <= len(models) <= 2 or not all(
                isinstance(m, str) and m.strip() and len(m) <= MAX_MODEL_NAME_CHARS for m in models):
            raise UserError("settings.models: a list of 1 or 2 model paths or hub ids (non-empty texts; 1 model = "
                            f"two samples of it, 2 models = one answer of each), got {out['models']!r}")
        out["models"] = [m.strip() for m in models]
    if "generation" in out:
        out["generation"] = check_generation(out["generation"])


def check_generation(gen: Any) -> dict:
    """A conversation's sampling parameters (settings.generation), defaults filled in: `max_new_tokens` 1..4096,
    `temperature` 0..5, `top_p` in (0, 1], `top_k` >= 0 (0 = off)."""
    if not isinstance(gen, Mapping):
        raise UserError(f"settings.generation: an object of sampling parameters "
                        f"({', '.join(GENERATION_DEFAULTS)}), got {gen!r}")
    unknown = sorted(set(gen) - set(GENERATION_DEFAULTS))
    if unknown:
        raise UserError(f"settings.generation.{unknown[0]}: unknown (known: {', '.join(GENERATION_DEFAULTS)})")
    out = {**GENERATION_DEFAULTS, **gen}

    def number(name: str, ok, what: str, integer: bool = False) -> None:
        v = out[name]
        kind = int if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kind) or v != v or not ok(v):
            raise UserError(f"settings.generation.{name}: {what}, got {v!r}")
        out[name] = int(v) if integer else float(v)

    number("max_new_tokens", lambda v: 1 <= v <= 4096, "a whole number from 1 to 4096", integer=True)
    number("temperature", lambda v: 0 <= v <= 5, "a number from 0 to 5")
    number("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
    number("top_k", lambda v: v >= 0, "a whole number >= 0 (0 = off)", integer=True)
    return out


def _check_int(settings: dict, name: str, lo: int, hi: int) -> None:
    if name not in settings:
        return
    v = settings[name]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise UserError(f"settings.{name}: a whole number from {lo} to {hi}, got {v!r}")


def _check_flags(flags: Any) -> list[dict]:
    """Likert's metadata checkboxes: a list of {"name", "label", "key"} (names slugs, names and keys unique)."""
    if not isinstance(flags, list) or len(flags) > 26:
        raise UserError('settings.flags: a list of at most 26 {"name", "label", "key"} objects')
    out, names, keys = [], set(), set()
    for n, f in enumerate(flags):
        where = f"settings.flags[{n}]"
        if not isinstance(f, Mapping) or set(f) != {"name", "label", "key"}:
            raise UserError(f'{where}: an object with exactly "name", "label" and "key", got {f!r}')
        if not isinstance(f["name"], str) or not _FLAG_NAME_RE.match(f["name"]) or f["name"] in names:
            raise UserError(f"{where}.name {f['name']!r}: a unique slug (lowercase letters, digits, _)")
        if not isinstance(f["label"], str) or not f["label"].strip() or len(f["label"]) > 200:
            raise UserError(f"{where}.label: a non-empty text of at most 200 characters")
        key = f["key"]
        if not isinstance(key, str) or len(key) != 1 or not key.isascii() or not key.isalpha() or key.lower() in keys:
            raise UserError(f"{where}.key {key!r}: one letter, not used by another flag")
        names.add(f["name"])
        keys.add(key.lower())
        out.append({"name": f["name"], "label": f["label"].strip(), "key": key.lower()})
    return out


def _check_thresholds(th: Any) -> dict:
    """Quality thresholds: known names (`quality.Thresholds`' fields) with numbers."""
    from dataclasses import fields  # noqa: PLC0415

    from .quality import Thresholds  # noqa: PLC0415 - numpy, scipy: only when thresholds are given

    known = {f.name for f in fields(Thresholds)}
    if not isinstance(th, Mapping):
        raise UserError("settings.thresholds: an object of threshold names to numbers")
    for k, v in th.items():
        if k not in known:
            raise UserError(f"settings.thresholds.{k}: unknown threshold (known: {', '.join(sorted(known))})")
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v < 0:
            raise UserError(f"settings.thresholds.{k}: a number ≥ 0, got {v!r}")
    return dict(th)


def new_project(name: str, task_type: str, guidelines_md: str = "", overlap_k: int = 3, gold_rate: float = 0.0,
                settings: dict | None = None) -> Project:
    """A checked, unsaved Project (settings get the default flags unless they name their own)."""
    check_project_name(name)
    if task_type not in TASK_TYPES:
        raise UserError(f"task type {task_type!r}: choose one of {', '.join(TASK_TYPES)}")
    if not 1 <= int(overlap_k) <= 100:
        raise UserError(f"overlap k = {overlap_k}: must be between 1 and 100")
    if not 0.0 <= float(gold_rate) < 1.0:
        raise UserError(f"gold rate {gold_rate}: must be in [0, 1)")
    settings = check_settings(task_type, settings or {}, int(overlap_k))
    settings.setdefault("flags", DEFAULT_FLAGS)
    # gold placement is seeded per project (random here, kept in the settings): reproducible, not guessable
    settings.setdefault("gold_seed", secrets.randbits(63))
    return Project(name=name, task_type=task_type, guidelines_md=guidelines_md, overlap_k=int(overlap_k),
                   gold_rate=float(gold_rate), settings=settings)


def check_project_name(name: Any) -> str:
    """A new project's name: a slug (letters, digits, '_', '-', '.'; at most 100), not all digits (`/p/<digits>`
    and `--project-id` are ids, so a name like "2024" would be taken for one) and not "." or ".." (path segments in
    URLs). Projects made before the rule keep their names and are reached by id."""
    if not isinstance(name, str) or not PROJECT_NAME_RE.fullmatch(name):
        raise UserError(f"project name {name!r}: use letters, digits, '_', '-', '.' (at most 100)")
    if name.isdigit():
        raise UserError(f"project name {name!r}: not only digits (a number is a project id); e.g. 'round-{name}'")
    if name in (".", ".."):
        raise UserError(f"project name {name!r}: not '.' or '..'")
    return name


def find_project(s: Session, name_or_id: str | int) -> Project:
    """By name (a str, never parsed: "2024" is a name) or by id (an int); NotFound otherwise."""
    if isinstance(name_or_id, bool) or not isinstance(name_or_id, (str, int)):
        raise TypeError(f"a project name (str) or id (int), not {type(name_or_id).__name__}")
    if isinstance(name_or_id, int):
        p = s.get(Project, name_or_id) if -2**63 <= name_or_id < 2**63 else None
    else:
        p = s.scalar(select(Project).where(Project.name == name_or_id))
    if p is None:
        raise NotFound(f"no project {name_or_id!r}" if isinstance(name_or_id, str)
                       else f"no project with id {name_or_id}")
    return p


# -- labelers -----------------------------------------------------------------------------------------------------
def check_attributes(attributes: Any) -> dict[str, str]:
    """A labeler's attributes checked: at most MAX_ATTRIBUTES str -> str pairs, keys like `group` or `locale`
    (a letter, then letters, digits, `_.-`; at most 40), values non-empty text of at most MAX_ATTRIBUTE_CHARS without
    line breaks. UserError naming the attribute otherwise."""
    if not isinstance(attributes, Mapping):
        raise UserError(f"attributes: a mapping of names to texts (group=warm), not {type(attributes).__name__}")
    if len(attributes) > MAX_ATTRIBUTES:
        raise UserError(f"attributes: at most {MAX_ATTRIBUTES}, got {len(attributes)}")
    out = {}
    for k, v in attributes.items():
        if not isinstance(k, str) or not _ATTR_KEY_RE.match(k):
            raise UserError(f"attribute name {k!r}: a letter, then letters, digits, '_', '-', '.' (at most 40)")
        if not isinstance(v, str) or not v.strip() or len(v) > MAX_ATTRIBUTE_CHARS or "\n" in v or "\r" in v:
            raise UserError(f"attribute {k}: a non-empty one-line text of at most {MAX_ATTRIBUTE_CHARS} characters, "
                            f"got {v!r}")
        out[k] = v.strip()
    return out


def parse_attributes(pairs: Iterable[str], where: str = "--attr") -> dict[str, str]:
    """`["group=warm", "locale=en-GB"]` -> {"group": "warm", "locale": "en-GB"} (the CLI's --attr, the admin
    form's lines; blank entries skipped), checked with `check_attributes`. A name given twice is a UserError."""
    out: dict[str, str] = {}
    for pair in pairs:
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"{where} {pair.strip()!r}: write NAME=VALUE (e.g. group=warm)")
        key = key.strip()
        if key in out:
            raise UserError(f"{where}: attribute {key!r} given twice")
        out[key] = value.strip()
    return check_attributes(out)


def new_labeler(username: str, password: str, role: str = "labeler",
                attributes: Mapping[str, str] | None = None) -> Labeler:
    """A checked, unsaved Labeler with the password hashed (argon2id) and its attributes checked."""
    if not _NAME_RE.fullmatch(username or ""):
        raise UserError(f"username {username!r}: use letters, digits, '_', '-', '.' (at most 100)")
    if role not in ROLES:
        raise UserError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    check_new_password(password, username)
    attrs = check_attributes(attributes or {})
    return Labeler(username=username, password_hash=hash_password(password), role=role, attributes=attrs)


def find_labeler(s: Session, username_or_id: str | int) -> Labeler:
    """By username, or by id (an int); NotFound otherwise."""
    if isinstance(username_or_id, int):
        lab = s.get(Labeler, username_or_id)
    else:
        lab = s.scalar(select(Labeler).where(Labeler.username == username_or_id))
    if lab is None:
        raise NotFound(f"no labeler {username_or_id!r}")
    return lab


def check_password(lab: Labeler | None, password: Any) -> Labeler | None:
    """`lab` if it is active and `password` is its password, else None. An unknown user (None) costs one password
    check too, so a wrong username takes as long as a wrong password."""
    if lab is None:
        verify_password(None, password)
        return None
    if not lab.active or not verify_password(lab.password_hash, password):
        return None
    return lab
