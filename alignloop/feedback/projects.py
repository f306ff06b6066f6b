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

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignloop.errors import UserError

from .errors import NotFound
from .models import ROLES, TASK_TYPES, Labeler, Project
from .questions import DEFAULT_QUESTION, check_questions, names_of
from .security import hash_password, verify_password

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
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
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

    @classmethod
    def of(cls, task_type: str, overlap_k: int, gold_rate: float, settings: dict | None) -> ProjectInfo:
        settings = settings or {}
        return cls(task_type, [f["name"] for f in settings.get("flags", DEFAULT_FLAGS)], overlap_k, gold_rate,
                   settings.get("assignment_timeout_s", DEFAULT_ASSIGNMENT_TIMEOUT_S), names_of(settings))


class ProjectInfoCache:
    """project id -> ProjectInfo, each entry used for `ttl_s` seconds. One per store, shared by both submit paths
    (each loads a missing entry its own way: plain SQL on the SQLite hot path, the ORM elsewhere)."""

    def __init__(self, ttl_s: float = PROJECT_INFO_TTL_S):
        self.ttl_s = ttl_s
        self._entries: dict[int, tuple[float, ProjectInfo]] = {}

    def get(self, project_id: int) -> ProjectInfo | None:
        """The cached info if it is younger than `ttl_s`, else None."""
        hit = self._entries.get(project_id)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        return None

    def put(self, project_id: int, info: ProjectInfo) -> ProjectInfo:
        self._entries[project_id] = (time.monotonic(), info)
        return info


def project_info(s: Session, project_id: int, cache: ProjectInfoCache) -> ProjectInfo:
    """The project's ProjectInfo, from `cache` or read through the ORM."""
    info = cache.get(project_id)
    if info is not None:
        return info
    p = s.get(Project, project_id)
    if p is None:
        raise NotFound(f"no project {project_id}")
    return cache.put(project_id, ProjectInfo.of(p.task_type, p.overlap_k, p.gold_rate, p.settings))


# -- projects -----------------------------------------------------------------------------------------------------
def new_project(name: str, task_type: str, guidelines_md: str = "", overlap_k: int = 3, gold_rate: float = 0.0,
                settings: dict | None = None) -> Project:
    """A checked, unsaved Project (settings get the default flags unless they name their own)."""
    if not _NAME_RE.match(name or ""):
        raise UserError(f"project name {name!r}: use letters, digits, '_', '-', '.' (at most 100)")
    if task_type not in TASK_TYPES:
        raise UserError(f"task type {task_type!r}: choose one of {', '.join(TASK_TYPES)}")
    if not 1 <= int(overlap_k) <= 100:
        raise UserError(f"overlap k = {overlap_k}: must be between 1 and 100")
    if not 0.0 <= float(gold_rate) < 1.0:
        raise UserError(f"gold rate {gold_rate}: must be in [0, 1)")
    settings = dict(settings or {})
    settings.setdefault("flags", DEFAULT_FLAGS)
    if "questions" in settings:
        settings["questions"] = check_questions(settings["questions"], task_type)
    return Project(name=name, task_type=task_type, guidelines_md=guidelines_md, overlap_k=int(overlap_k),
                   gold_rate=float(gold_rate), settings=settings)


def find_project(s: Session, name_or_id: str | int) -> Project:
    """By id (an int or a string of digits) or by name; NotFound otherwise."""
    if isinstance(name_or_id, int) or (isinstance(name_or_id, str) and name_or_id.isdigit()):
        p = s.get(Project, int(name_or_id))
    else:
        p = s.scalar(select(Project).where(Project.name == name_or_id))
    if p is None:
        raise NotFound(f"no project {name_or_id!r}")
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
    if not _NAME_RE.match(username or ""):
        raise UserError(f"username {username!r}: use letters, digits, '_', '-', '.' (at most 100)")
    if role not in ROLES:
        raise UserError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    if len(password or "") < 8:
        raise UserError("password: at least 8 characters")
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
