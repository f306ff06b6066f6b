"""The feedback store: projects, labelers, importing completions, assignment and judgements.

    store = Store("feedback.db")                          # creates / migrates the database
    p = store.create_project("hh", "pairwise", overlap_k=3, gold_rate=0.1, guidelines_md="# Be careful")
    store.import_records(p.name, [{"prompt": "Hi", "completions": ["Hello", "Go away"]}])
    lab = store.add_labeler("ann", "a long password")
    a = store.next_assignment(p.id, lab.id)               # None when nothing is left for this labeler
    store.submit(a.id, lab.id, {"choice": "left", "strength": "better"}, idempotency_key="...")

Assignment rules: an item goes to `overlap_k` distinct labelers (a skipped assignment frees its slot), never twice
to the same labeler (unique constraint), items with fewer labels first, gold items (known answers, outside the k
count) mixed in at `gold_rate`. An assignment left open longer than the project's `assignment_timeout_s` setting
(default 2 h) is expired and its slot given to someone else. Concurrency: the slot is taken with a conditional `UPDATE ... WHERE n_active < k`
checked for one affected row, so it holds under concurrent requests on SQLite and PostgreSQL alike.
"""
from __future__ import annotations

import json
import random
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, noload, sessionmaker

from alignloop.errors import UserError

from . import db as dbmod
from .models import (
    PAIRWISE_CHOICES,
    ROLES,
    STRENGTHS,
    TASK_TYPES,
    Assignment,
    Completion,
    Item,
    Judgement,
    Labeler,
    Project,
    Prompt,
    utcnow,
)
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
_IDEM_RE = re.compile(r"^[A-Za-z0-9_.:-]{8,100}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


@dataclass(frozen=True)
class _ProjectInfo:
    task_type: str
    flag_names: list
    overlap_k: int
    gold_rate: float
    timeout_s: float


# Core statements for the hot path, built once (see Store._fast_submit_and_next)
_J, _A, _I = Judgement.__table__, Assignment.__table__, Item.__table__
_Q_JUDGEMENT_BY_KEY = select(_J.c.id).where(_J.c.idempotency_key == bindparam("key"))
_Q_ASSIGNMENT = select(_A.c.item_id, _A.c.labeler_id, _A.c.project_id, _A.c.status, _A.c.shown_order,
                       _A.c.created_at).where(_A.c.id == bindparam("aid"))
_INS_JUDGEMENT = insert(_J)
_UPD_ASSIGNMENT_DONE = update(_A).where(_A.c.id == bindparam("aid_")).values(status="done",
                                                                            completed_at=bindparam("now"))
_UPD_ITEM_DONE = update(_I).where(_I.c.id == bindparam("iid")).values(n_done=_I.c.n_done + 1)
_Q_OPEN = select(_A.c.id).where(_A.c.labeler_id == bindparam("lid"), _A.c.project_id == bindparam("pid"),
                                _A.c.status == "assigned").limit(1)
_Q_CANDIDATES = (select(_I.c.id, _I.c.prompt_id, _I.c.completion_ids)
                 .where(_I.c.project_id == bindparam("pid"), _I.c.is_gold.is_(False),
                        _I.c.n_active < bindparam("k"),
                        _I.c.id.not_in(select(_A.c.item_id).where(_A.c.labeler_id == bindparam("lid"))
                                       .scalar_subquery()))
                 .order_by(_I.c.n_active, _I.c.n_done, _I.c.id).limit(20))
_UPD_TAKE = update(_I).where(_I.c.id == bindparam("iid"), _I.c.n_active < bindparam("k")).values(
    n_active=_I.c.n_active + 1)
_INS_ASSIGNMENT = insert(_A)
_Q_PROMPT = select(Prompt.__table__.c.messages, Prompt.__table__.c.is_chat).where(
    Prompt.__table__.c.id == bindparam("pid"))
_Q_COMPLETIONS = select(Completion.__table__.c.id, Completion.__table__.c.text, Completion.__table__.c.model).where(
    Completion.__table__.c.id.in_(bindparam("ids", expanding=True)))

# The same hot path as plain SQL on SQLite's own connection (see Store._raw_submit_and_next): SQLAlchemy's per-statement
# work (compile cache lookup, parameter processing, result metadata) cost more than SQLite itself. Columns and value
# formats are the ones the ORM writes: JSON as json.dumps text, DateTime as "YYYY-MM-DD HH:MM:SS.ffffff", booleans
# as 0/1.
_SQL_JUDGEMENT_BY_KEY = "SELECT id FROM judgements WHERE idempotency_key = ?"
_SQL_ASSIGNMENT = ("SELECT item_id, labeler_id, project_id, status, shown_order, created_at FROM assignments "
                   "WHERE id = ?")
_SQL_PROJECT = "SELECT task_type, overlap_k, gold_rate, settings FROM projects WHERE id = ?"
_SQL_INS_JUDGEMENT = ("INSERT INTO judgements (assignment_id, item_id, labeler_id, version, shown_order, choice, "
                      "strength, picked_position, ranking, thumbs, likert, flags, comment, time_spent_ms, "
                      "idempotency_key, created_at) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SQL_ASSIGNMENT_DONE = "UPDATE assignments SET status = 'done', completed_at = ? WHERE id = ?"
_SQL_ITEM_DONE = "UPDATE items SET n_done = n_done + 1 WHERE id = ?"
_SQL_OPEN = ("SELECT a.id, a.item_id, a.is_gold, a.shown_order, a.created_at, i.prompt_id, i.completion_ids "
             "FROM assignments a JOIN items i ON i.id = a.item_id "
             "WHERE a.labeler_id = ? AND a.project_id = ? AND a.status = 'assigned' ORDER BY a.id LIMIT 1")
_SQL_CANDIDATES = ("SELECT id, prompt_id, completion_ids FROM items WHERE project_id = ? AND is_gold = 0 "
                   "AND n_active < ? AND id NOT IN (SELECT item_id FROM assignments WHERE labeler_id = ?) "
                   "ORDER BY n_active, n_done, id LIMIT 4")
_SQL_TAKE = "UPDATE items SET n_active = n_active + 1 WHERE id = ? AND n_active < ?"
_SQL_INS_ASSIGNMENT = ("INSERT INTO assignments (item_id, labeler_id, project_id, status, is_gold, shown_order, "
                       "created_at) VALUES (?, ?, ?, 'assigned', 0, ?, ?)")
_SQL_PROMPT = "SELECT messages, is_chat FROM prompts WHERE id = ?"
_SQL_COMPLETION = "SELECT text, model FROM completions WHERE id = ?"


@dataclass(slots=True)
class StoredJudgement:
    """A judgement row as the SQLite hot path wrote it (same attributes as `Judgement`; not an ORM instance, which
    would cost more to build than the SQL to store it)."""
    id: int
    assignment_id: int
    item_id: int
    labeler_id: int
    version: int
    shown_order: list
    choice: str | None
    strength: str | None
    picked_position: int | None
    ranking: list | None
    thumbs: int | None
    likert: int | None
    flags: list
    comment: str
    time_spent_ms: int | None
    idempotency_key: str
    created_at: datetime


@dataclass(slots=True)
class ItemRef:
    """The `Item` attributes a labeler's view needs (see StoredJudgement)."""
    id: int
    project_id: int
    prompt_id: int
    completion_ids: list
    is_gold: bool


@dataclass(slots=True)
class AssignmentRef:
    """An open assignment as the SQLite hot path wrote or found it (same attributes as `Assignment`)."""
    id: int
    item_id: int
    labeler_id: int
    project_id: int
    status: str
    is_gold: bool
    shown_order: list
    created_at: datetime
    item: ItemRef
    completed_at: datetime | None = None


def _sqlite_datetime(d: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME storage format (microseconds always written)."""
    return d.strftime("%Y-%m-%d %H:%M:%S.%f")


def _json_or_null(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


class ValidationError(UserError):
    """A submitted form is invalid; `errors` maps field -> message."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))


class NotFound(UserError):
    pass


class Forbidden(UserError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Validation of a submission (fields in *screen* terms: left/right, rank per shown position) -> canonical fields
# ---------------------------------------------------------------------------------------------------------------

def _get(fields: Mapping[str, Any], name: str) -> Any:
    v = fields.get(name)
    if isinstance(v, str):
        v = v.strip()
        return v or None
    return v


def validate_submission(task_type: str, shown_order: list[int], fields: Mapping[str, Any],
                        flag_names: Iterable[str] = ()) -> dict:
    """Check a submission and translate it to canonical fields for a `Judgement`.

    pairwise: `choice` in left|right|tie|both_bad, `strength` (one of STRENGTHS) required for left/right.
    rank: `rank_<i>` for each shown position i (integers 1..K, ties allowed, rank 1 must be used).
    thumbs: `thumbs` up|down. likert: `likert` 1..7 and `flags` (list of names). All: optional `comment`.
    """
    errors: dict[str, str] = {}
    out: dict[str, Any] = {"flags": [], "comment": ""}
    comment = fields.get("comment") or ""
    if not isinstance(comment, str):
        errors["comment"] = "must be text"
    elif len(comment) > 5000:
        errors["comment"] = "is too long (at most 5000 characters)"
    else:
        out["comment"] = comment.strip()
    k = len(shown_order)
    if task_type == "pairwise":
        choice = _get(fields, "choice")
        if choice is None:
            errors["choice"] = "choose the better response, tie, or both bad"
        elif choice not in ("left", "right", "tie", "both_bad"):
            errors["choice"] = f"unknown choice {choice!r}"
        else:
            if choice in ("left", "right"):
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
            else:
                out["choice"] = choice
                out["picked_position"] = None
    elif task_type == "rank":
        ranks_shown = []
        for i in range(k):
            v = _get(fields, f"rank_{i}")
            try:
                r = int(v)
                if not 1 <= r <= k:
                    raise ValueError
            except (TypeError, ValueError):
                errors[f"rank_{i}"] = f"give response {i + 1} a rank from 1 to {k}"
                continue
            ranks_shown.append(r)
        if not errors:
            if 1 not in ranks_shown:
                errors["ranking"] = "some response must be ranked 1 (best)"
            else:
                # dense-then-standard: ties share a rank; we store ranks as given, normalised to competition ranking
                canonical = [0] * k
                for pos, r in enumerate(ranks_shown):
                    canonical[shown_order[pos]] = r
                out["ranking"] = competition_ranks(canonical)
    elif task_type == "thumbs":
        t = _get(fields, "thumbs")
        if t in ("up", "+1", 1, "1"):
            out["thumbs"] = 1
        elif t in ("down", "-1", -1):
            out["thumbs"] = -1
        else:
            errors["thumbs"] = "choose thumbs up or thumbs down"
    elif task_type == "likert":
        v = _get(fields, "likert")
        try:
            lv = int(v)
            if not 1 <= lv <= 7:
                raise ValueError
            out["likert"] = lv
        except (TypeError, ValueError):
            errors["likert"] = "choose a rating from 1 (worst) to 7 (best)"
        flags = fields.get("flags") or []
        if isinstance(flags, str):
            flags = [flags]
        allowed = set(flag_names)
        bad = [f for f in flags if f not in allowed]
        if bad:
            errors["flags"] = f"unknown flag(s): {', '.join(map(str, bad))}"
        else:
            out["flags"] = sorted(set(flags))
    else:
        errors["task_type"] = f"unknown task type {task_type!r}"
    if errors:
        raise ValidationError(errors)
    return out


def competition_ranks(values: list[int]) -> list[int]:
    """Normalise ranks so ties share a rank and the next rank skips ("1224"): [1, 3, 3] -> [1, 2, 2]."""
    return [1 + sum(1 for w in values if w < v) for v in values]


# ---------------------------------------------------------------------------------------------------------------
# Import parsing
# ---------------------------------------------------------------------------------------------------------------

def normalise_prompt(prompt: Any, where: str) -> tuple[list[dict], bool]:
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


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {n}: each line must be a JSON object")
            row["_where"] = f"{path}, line {n}"
            rows.append(row)
    return rows


@dataclass
class ImportResult:
    prompts: int = 0
    completions: int = 0
    items: int = 0
    gold_items: int = 0
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------------

class Store:
    def __init__(self, db: str, create: bool = True, synchronous: str = "NORMAL", seed: int | None = None):
        self.url = dbmod.normalise_url(db)
        self.engine = dbmod.open_engine(self.url, synchronous=synchronous)
        if create:
            dbmod.upgrade(self.engine)
        elif not dbmod.is_initialised(self.engine):
            raise UserError(f"{db}: not a feedback database (run `alignloop feedback create` first)")
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(dbmod.write_engine(self.engine), expire_on_commit=False)
        # display order and gold mixing: unpredictable for people; `seed` makes simulations (the demo) reproducible
        self._rng = random.SystemRandom() if seed is None else random.Random(seed)
        self._rules_cache: dict[int, tuple[float, tuple[str, list[str]]]] = {}
        self._last_expiry: dict[int, float] = {}
        self._view_cache: dict[int, tuple[dict, list[dict]]] = {}
        self._info_cache: dict[int, tuple[float, _ProjectInfo]] = {}
        self.expiry_check_interval_s = 30.0
        # SQLite has one writer at a time: queue writers of this process on a lock (a cheap hand-off) rather than
        # on SQLite's busy handler (which sleeps in steps of up to 100 ms); other processes still wait on
        # busy_timeout. PostgreSQL writers run concurrently.
        self._write_lock = threading.Lock() if self.engine.dialect.name == "sqlite" else nullcontext()
        # SQLite: one pooled connection kept for the submit hot path, used only under _write_lock (plain SQL)
        self._hot = None
        self.raw_hot_path = self.engine.dialect.name == "sqlite"
        self._checkpointer: threading.Thread | None = None
        self._checkpointer_stop = threading.Event()
        self.checkpoints = 0  # completed background checkpoints (for tests and diagnostics)

    def dispose(self) -> None:
        self.stop_checkpointer()
        with self._write_lock:
            if self._hot is not None:
                self._hot.close()  # back to the pool
                self._hot = None
        self.engine.dispose()

    def _hot_connection(self) -> sqlite3.Connection:
        """The hot path's DBAPI connection (call with _write_lock held). Opened through the engine, so it has the
        pragmas of every connection (WAL, busy_timeout, synchronous, foreign keys) and autocommit mode (we BEGIN)."""
        if self._hot is None:
            self._hot = self.engine.raw_connection()
            if self._checkpointer is not None:
                self._hot.driver_connection.execute("PRAGMA wal_autocheckpoint=0")
        return self._hot.driver_connection

    # -- WAL checkpoints off the request path ---------------------------------------------------------------------
    def start_checkpointer(self, interval_s: float = 0.2) -> bool:
        """SQLite: copy the WAL back into the database file from a background thread, every `interval_s`, and turn
        SQLite's automatic checkpoint off on the submit hot path's connection. A checkpoint is where SQLite fsyncs
        in WAL + synchronous=NORMAL mode; done by the committing request (the default) it stalled the event loop
        for up to ~1 s whenever the disk was busy. PASSIVE checkpoints never block writers or readers. Returns
        False (nothing started) on other databases. The web app starts it for the server's lifetime."""
        if self.engine.dialect.name != "sqlite" or self._checkpointer is not None:
            return False
        self._checkpointer_stop.clear()
        conn = self.engine.raw_connection()

        def loop() -> None:
            try:
                while not self._checkpointer_stop.wait(interval_s):
                    try:
                        conn.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                        self.checkpoints += 1
                    except sqlite3.Error:
                        continue  # e.g. SQLITE_BUSY while another checkpoint runs: try again next round
            finally:
                conn.close()

        self._checkpointer = threading.Thread(target=loop, name="sqlite-checkpointer", daemon=True)
        self._checkpointer.start()
        with self._write_lock:
            if self._hot is not None:
                self._hot.driver_connection.execute("PRAGMA wal_autocheckpoint=0")
        return True

    def stop_checkpointer(self) -> None:
        """Stop the background checkpoints; SQLite's automatic ones apply again on every connection."""
        t = self._checkpointer
        if t is None:
            return
        self._checkpointer_stop.set()
        t.join()
        self._checkpointer = None
        with self._write_lock:
            if self._hot is not None:
                self._hot.driver_connection.execute("PRAGMA wal_autocheckpoint=1000")  # SQLite's default

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._write_lock, self._write() as s, s.begin():
            yield s

    # -- projects -------------------------------------------------------------------------------------------------
    def create_project(self, name: str, task_type: str, guidelines_md: str = "", overlap_k: int = 3,
                       gold_rate: float = 0.0, settings: dict | None = None) -> Project:
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
        try:
            with self.write() as s:
                p = Project(name=name, task_type=task_type, guidelines_md=guidelines_md, overlap_k=int(overlap_k),
                            gold_rate=float(gold_rate), settings=settings)
                s.add(p)
                s.flush()
        except IntegrityError:
            raise UserError(f"a project named {name!r} already exists") from None
        return p

    def get_project(self, name_or_id: str | int) -> Project:
        with self.read() as s:
            if isinstance(name_or_id, int) or (isinstance(name_or_id, str) and name_or_id.isdigit()):
                p = s.get(Project, int(name_or_id))
            else:
                p = s.scalar(select(Project).where(Project.name == name_or_id))
        if p is None:
            raise NotFound(f"no project {name_or_id!r}")
        return p

    def list_projects(self) -> list[Project]:
        with self.read() as s:
            return list(s.scalars(select(Project).order_by(Project.id)))

    # -- labelers -------------------------------------------------------------------------------------------------
    def add_labeler(self, username: str, password: str, role: str = "labeler") -> Labeler:
        if not _NAME_RE.match(username or ""):
            raise UserError(f"username {username!r}: use letters, digits, '_', '-', '.' (at most 100)")
        if role not in ROLES:
            raise UserError(f"role {role!r}: choose one of {', '.join(ROLES)}")
        if len(password or "") < 8:
            raise UserError("password: at least 8 characters")
        try:
            with self.write() as s:
                lab = Labeler(username=username, password_hash=hash_password(password), role=role)
                s.add(lab)
                s.flush()
        except IntegrityError:
            raise UserError(f"a labeler named {username!r} already exists") from None
        return lab

    def authenticate(self, username: str, password: str) -> Labeler | None:
        with self.read() as s:
            lab = s.scalar(select(Labeler).where(Labeler.username == username))
        if lab is None:
            verify_password(None, password)  # same cost whether or not the user exists
            return None
        if not lab.active or not verify_password(lab.password_hash, password):
            return None
        return lab

    def get_labeler(self, labeler_id: int) -> Labeler | None:
        with self.read() as s:
            return s.get(Labeler, labeler_id)

    def list_labelers(self) -> list[Labeler]:
        with self.read() as s:
            return list(s.scalars(select(Labeler).order_by(Labeler.id)))

    # -- importing ------------------------------------------------------------------------------------------------
    def import_jsonl(self, project: str | int, path: str | Path, model: str | None = None) -> ImportResult:
        return self.import_records(project, read_jsonl(path), model=model)

    def import_records(self, project: str | int, rows: Iterable[dict], model: str | None = None) -> ImportResult:
        """Rows: `{"prompt", "completions": [str | {"text","model","params"}], "gold"?, "meta"?}` or one completion
        per row `{"prompt", "completion", "model"?, "params"?}` (rows with the same prompt are grouped)."""
        p = self.get_project(project)
        groups: dict[str, dict] = {}
        for i, row in enumerate(rows):
            where = row.get("_where", f"record {i + 1}")
            if "prompt" not in row:
                raise UserError(f"{where}: missing field 'prompt'")
            msgs, is_chat = normalise_prompt(row["prompt"], where)
            key = json.dumps(msgs, sort_keys=True)
            g = groups.setdefault(key, {"messages": msgs, "is_chat": is_chat, "completions": [], "gold": None,
                                        "meta": {}, "where": where})
            if "completions" in row:
                cs = row["completions"]
                if not isinstance(cs, list) or not cs:
                    raise UserError(f"{where}: 'completions' must be a non-empty list")
                g["completions"].extend(_norm_completion(c, where, row.get("model", model)) for c in cs)
            elif "completion" in row:
                c = row["completion"]
                if isinstance(c, str):
                    c = {"text": c, "model": row.get("model", model), "params": row.get("params") or {}}
                g["completions"].append(_norm_completion(c, where, model))
            else:
                raise UserError(f"{where}: needs 'completions' (a list) or 'completion' (one string)")
            if row.get("gold") is not None:
                g["gold"] = self._check_gold(p.task_type, row["gold"], where)
            if isinstance(row.get("meta"), dict):
                g["meta"].update(row["meta"])
        res = ImportResult()
        with self.write() as s:
            for g in groups.values():
                cs = g["completions"]
                if p.task_type in ("pairwise", "rank") and len(cs) < 2:
                    res.warnings.append(f"{g['where']}: fewer than 2 completions for a {p.task_type} project; skipped")
                    continue
                if g["gold"] is not None and p.task_type == "pairwise" and len(cs) != 2:
                    raise UserError(f"{g['where']}: a pairwise gold item needs exactly 2 completions")
                if g["gold"] is not None and p.task_type == "rank" and len(g["gold"]["ranking"]) != len(cs):
                    raise UserError(f"{g['where']}: gold ranking has {len(g['gold']['ranking'])} ranks for "
                                    f"{len(cs)} completions")
                if g["gold"] is not None and p.task_type in ("thumbs", "likert") and len(cs) != 1:
                    raise UserError(f"{g['where']}: a {p.task_type} gold item needs exactly 1 completion")
                pr = Prompt(project_id=p.id, messages=g["messages"], is_chat=g["is_chat"], meta=g["meta"])
                s.add(pr)
                s.flush()
                res.prompts += 1
                comp_rows = [Completion(prompt_id=pr.id, text=c["text"], model=c["model"], params=c["params"])
                             for c in cs]
                s.add_all(comp_rows)
                s.flush()
                res.completions += len(comp_rows)
                ids = [c.id for c in comp_rows]
                if p.task_type == "pairwise":
                    groups_ids = [[ids[a], ids[b]] for a in range(len(ids)) for b in range(a + 1, len(ids))]
                elif p.task_type == "rank":
                    max_k = int(p.settings.get("max_rank_k", 9))
                    if len(ids) > max_k:
                        raise UserError(f"{g['where']}: {len(ids)} completions; a rank item shows at most {max_k}")
                    groups_ids = [ids]
                else:
                    groups_ids = [[i] for i in ids]
                for cids in groups_ids:
                    s.add(Item(project_id=p.id, prompt_id=pr.id, completion_ids=cids, is_gold=g["gold"] is not None,
                               gold_answer=g["gold"]))
                    res.items += 1
                    res.gold_items += g["gold"] is not None
        return res

    @staticmethod
    def _check_gold(task_type: str, gold: Any, where: str) -> dict:
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

    # -- assignment -----------------------------------------------------------------------------------------------
    def next_assignment(self, project_id: int, labeler_id: int) -> Assignment | None:
        """The labeler's open assignment in this project (resume), else a new one, else None (nothing left)."""
        for _attempt in range(5):
            try:
                return self._next_assignment(project_id, labeler_id)
            except IntegrityError:  # the same labeler racing itself (two tabs): retry, it then finds the open one
                continue
        raise RuntimeError("could not assign an item after 5 attempts")

    def _next_assignment(self, project_id: int, labeler_id: int) -> Assignment | None:
        with self.write() as s:
            return self._next_in(s, project_id, labeler_id)

    def _next_in(self, s: Session, project_id: int, labeler_id: int) -> Assignment | None:
        open_a = s.scalar(select(Assignment).where(
            Assignment.labeler_id == labeler_id, Assignment.project_id == project_id,
            Assignment.status == "assigned").order_by(Assignment.id).limit(1))
        if open_a is not None:
            open_a.item  # noqa: B018 - load it while the session is open
            return open_a
        p = s.get(Project, project_id)
        if p is None:
            raise NotFound(f"no project {project_id}")
        self._expire_stale(s, p)
        mine = select(Assignment.item_id).where(Assignment.labeler_id == labeler_id).scalar_subquery()
        want_gold = False
        if p.gold_rate > 0:
            n_all, n_gold = s.execute(select(func.count(), func.coalesce(func.sum(
                func.cast(Assignment.is_gold, Integer)), 0)).where(
                Assignment.labeler_id == labeler_id, Assignment.project_id == project_id)).one()
            want_gold = n_gold < p.gold_rate * (n_all + 1)
        if want_gold:
            gold = s.scalars(select(Item).where(Item.project_id == project_id, Item.is_gold.is_(True),
                                                Item.id.not_in(mine)).order_by(Item.n_done, Item.id)
                             .limit(50)).all()
            if gold:
                item = self._rng.choice(gold)
                s.execute(update(Item).where(Item.id == item.id).values(n_active=Item.n_active + 1))
                return self._new_assignment(s, item, labeler_id, project_id)
        candidates = s.scalars(select(Item).where(
            Item.project_id == project_id, Item.is_gold.is_(False), Item.n_active < p.overlap_k,
            Item.id.not_in(mine)).order_by(Item.n_active, Item.n_done, Item.id).limit(20)).all()
        for item in candidates:
            r = s.execute(update(Item).where(Item.id == item.id, Item.n_active < p.overlap_k)
                          .values(n_active=Item.n_active + 1), execution_options={"synchronize_session": False})
            if r.rowcount == 1:
                return self._new_assignment(s, item, labeler_id, project_id)
        return None

    def _expire_stale(self, s: Session, p: Project) -> int:
        """Release assignments left open longer than the project's `assignment_timeout_s` (setting; default 2 h; 0
        = never): status "expired", slot freed for another labeler. Checked at most every
        `expiry_check_interval_s` per project. Returns how many were released."""
        ttl = p.settings.get("assignment_timeout_s", DEFAULT_ASSIGNMENT_TIMEOUT_S)
        now_m = time.monotonic()
        if not ttl or now_m - self._last_expiry.get(p.id, -1e18) < self.expiry_check_interval_s:
            return 0
        self._last_expiry[p.id] = now_m
        now = utcnow()
        stale = s.execute(select(Assignment.id, Assignment.item_id).where(
            Assignment.project_id == p.id, Assignment.status == "assigned",
            Assignment.created_at < now - timedelta(seconds=float(ttl)))).all()
        n = 0
        for aid, item_id in stale:
            r = s.execute(update(Assignment).where(Assignment.id == aid, Assignment.status == "assigned")
                          .values(status="expired", completed_at=now))
            if r.rowcount == 1:
                s.execute(update(Item).where(Item.id == item_id).values(n_active=Item.n_active - 1))
                n += 1
        return n

    def _new_assignment(self, s: Session, item: Item, labeler_id: int, project_id: int) -> Assignment:
        order = list(range(len(item.completion_ids)))
        self._rng.shuffle(order)
        a = Assignment(item_id=item.id, labeler_id=labeler_id, project_id=project_id, status="assigned",
                       is_gold=item.is_gold, shown_order=order)
        s.add(a)
        s.flush()
        a.item = item
        return a

    def get_assignment(self, assignment_id: int, labeler_id: int | None = None) -> Assignment:
        """The assignment; with `labeler_id`, raise NotFound unless it belongs to that labeler."""
        with self.read() as s:
            a = s.get(Assignment, assignment_id)
            if a is None or (labeler_id is not None and a.labeler_id != labeler_id):
                raise NotFound("no such assignment")
            return a

    def skip(self, assignment_id: int, labeler_id: int) -> None:
        with self.write() as s:
            a = s.get(Assignment, assignment_id)
            if a is None or a.labeler_id != labeler_id:
                raise NotFound("no such assignment")
            if a.status != "assigned":
                return
            a.status = "skipped"
            a.completed_at = utcnow()
            s.execute(update(Item).where(Item.id == a.item_id).values(n_active=Item.n_active - 1))

    def submit(self, assignment_id: int, labeler_id: int, fields: Mapping[str, Any], idempotency_key: str,
               started_at: datetime | None = None) -> tuple[Judgement, bool]:
        """Store a judgement (a new version if the assignment already has one). Returns (judgement, created);
        a repeated `idempotency_key` returns the stored judgement and created=False."""
        if not isinstance(idempotency_key, str) or not _IDEM_RE.match(idempotency_key):
            raise ValidationError({"idempotency_key": "missing or malformed (8-100 letters, digits, _.:-)"})
        for _attempt in range(5):
            try:
                return self._submit(assignment_id, labeler_id, fields, idempotency_key, started_at)
            except IntegrityError:
                with self.read() as s:
                    j = s.scalar(select(Judgement).where(Judgement.idempotency_key == idempotency_key))
                if j is not None:
                    if j.labeler_id != labeler_id:
                        raise Forbidden("idempotency key belongs to another labeler") from None
                    return j, False
                continue  # version race between two edits: retry with the next version
        raise RuntimeError("could not store the judgement after 5 attempts")

    def _submit(self, assignment_id, labeler_id, fields, idempotency_key, started_at):
        with self.write() as s:
            j, created, _project_id = self._submit_in(s, assignment_id, labeler_id, fields, idempotency_key,
                                                      started_at)
            return j, created

    def submit_and_next(self, assignment_id: int, labeler_id: int, fields: Mapping[str, Any],
                        idempotency_key: str) -> tuple[Judgement, bool, Assignment | None]:
        """`submit`, then `next_assignment` in the same project, in one write transaction (one round trip and one
        lock hand-off per judgement on the hot path). On SQLite's hot path the results are `StoredJudgement` /
        `AssignmentRef` (the same attributes as the ORM classes, read-only snapshots)."""
        if not isinstance(idempotency_key, str) or not _IDEM_RE.match(idempotency_key):
            raise ValidationError({"idempotency_key": "missing or malformed (8-100 letters, digits, _.:-)"})
        if self.raw_hot_path:
            with self._write_lock:
                conn = self._hot_connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    fast = self._raw_submit_and_next(conn, assignment_id, labeler_id, fields, idempotency_key)
                    # the reply (the acknowledgement) is only built after COMMIT returned; None: nothing was
                    # written, and the general path below decides
                    conn.execute("COMMIT" if fast is not None else "ROLLBACK")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                if fast is not None:
                    return fast
        try:
            with self.write() as s:
                fast = self._fast_submit_and_next(s, assignment_id, labeler_id, fields, idempotency_key)
                if fast is not None:
                    return fast
                j, created, project_id = self._submit_in(s, assignment_id, labeler_id, fields, idempotency_key,
                                                         None)
                return j, created, self._next_in(s, project_id, labeler_id)
        except IntegrityError:  # a concurrent duplicate or version race: fall back to the two-step path
            j, created = self.submit(assignment_id, labeler_id, fields, idempotency_key)
            return j, created, self.next_assignment(self.get_assignment(assignment_id).project_id, labeler_id)

    def submit_and_next_batch(self, requests: list[tuple[int, int, Mapping[str, Any], str]]) -> list[Any]:
        """Group commit: `submit_and_next` for several (assignment_id, labeler_id, fields, idempotency_key) in one
        write transaction on SQLite, each in its own SAVEPOINT, so one invalid submission does not undo the others.
        Returns, per request, what `submit_and_next` returns or the exception it raises. Nothing is returned before
        the one COMMIT has returned: a caller that acknowledges a result acknowledges a stored judgement. If the
        COMMIT fails, this raises and none of them is stored. Cases the hot path does not take (retries, edits,
        ...) run after the COMMIT, one by one, through `submit_and_next`. Elsewhere than SQLite: one by one."""
        results: list[Any] = [None] * len(requests)
        later: list[int] = []
        if not self.raw_hot_path:
            later = list(range(len(requests)))
        else:
            with self._write_lock:
                conn = self._hot_connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for i, (aid, labeler_id, fields, key) in enumerate(requests):
                        if not isinstance(key, str) or not _IDEM_RE.match(key):
                            later.append(i)  # submit_and_next raises the ValidationError
                            continue
                        conn.execute("SAVEPOINT submission")
                        try:
                            r = self._raw_submit_and_next(conn, aid, labeler_id, fields, key)
                        except Exception as e:  # noqa: BLE001 - ValidationError, NotFound, a database error: this one only
                            r = e
                        if r is None or isinstance(r, Exception):
                            conn.execute("ROLLBACK TO submission")
                        conn.execute("RELEASE submission")
                        if r is None:
                            later.append(i)
                        else:
                            results[i] = r
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        for i in later:
            try:
                results[i] = self.submit_and_next(*requests[i])
            except Exception as e:  # noqa: BLE001 - handed to that request's caller
                results[i] = e
        return results

    def _fast_submit_and_next(self, s: Session, assignment_id: int, labeler_id: int, fields: Mapping[str, Any],
                              idempotency_key: str) -> tuple[Judgement, bool, Assignment | None] | None:
        """The common case in Core statements built once (no ORM loading or flush): the first judgement of an open
        assignment, then a non-gold next item, no expiry check due. Returns None (nothing written) for anything
        else, and the caller takes the general path."""
        conn = s.connection()
        if conn.execute(_Q_JUDGEMENT_BY_KEY, {"key": idempotency_key}).first() is not None:
            return None
        row = conn.execute(_Q_ASSIGNMENT, {"aid": assignment_id}).first()
        if row is None or row.labeler_id != labeler_id or row.status != "assigned":
            return None
        info = self._project_info(s, row.project_id)
        if info.gold_rate > 0 or (info.timeout_s and time.monotonic() - self._last_expiry.get(row.project_id, -1e18)
                                  >= self.expiry_check_interval_s):
            return None
        canon = validate_submission(info.task_type, row.shown_order, fields, info.flag_names)
        now = utcnow()
        values = {"assignment_id": assignment_id, "item_id": row.item_id, "labeler_id": labeler_id, "version": 1,
                  "shown_order": row.shown_order, "idempotency_key": idempotency_key, "created_at": now,
                  "time_spent_ms": int(max(0.0, (now - row.created_at).total_seconds()) * 1000),
                  "choice": None, "strength": None, "picked_position": None, "ranking": None, "thumbs": None,
                  "likert": None, **canon}
        jid = conn.execute(_INS_JUDGEMENT, values).inserted_primary_key[0]
        conn.execute(_UPD_ASSIGNMENT_DONE, {"aid_": assignment_id, "now": now})
        conn.execute(_UPD_ITEM_DONE, {"iid": row.item_id})
        j = Judgement(id=jid, **values)
        nxt = None
        if conn.execute(_Q_OPEN, {"lid": labeler_id, "pid": row.project_id}).first() is not None:
            nxt = self._next_in(s, row.project_id, labeler_id)  # an older open one (two tabs): general path
        else:
            cands = conn.execute(_Q_CANDIDATES, {"pid": row.project_id, "k": info.overlap_k, "lid": labeler_id}).all()
            for cand in cands:
                if conn.execute(_UPD_TAKE, {"iid": cand.id, "k": info.overlap_k}).rowcount == 1:
                    order = list(range(len(cand.completion_ids)))
                    self._rng.shuffle(order)
                    avals = {"item_id": cand.id, "labeler_id": labeler_id, "project_id": row.project_id,
                             "status": "assigned", "is_gold": False, "shown_order": order, "created_at": now}
                    aid = conn.execute(_INS_ASSIGNMENT, avals).inserted_primary_key[0]
                    nxt = Assignment(id=aid, **avals)
                    nxt.item = Item(id=cand.id, project_id=row.project_id, prompt_id=cand.prompt_id,
                                    completion_ids=cand.completion_ids, is_gold=False)
                    break
        return j, True, nxt

    def _raw_submit_and_next(self, conn: sqlite3.Connection, assignment_id: int, labeler_id: int,
                             fields: Mapping[str, Any], idempotency_key: str
                             ) -> tuple[StoredJudgement, bool, AssignmentRef | None] | None:
        """`_fast_submit_and_next` in plain SQL on SQLite's connection, inside the caller's write transaction: the
        first judgement of an open assignment, then a non-gold next item, no expiry check due. Returns None before
        writing anything when the case is not that one (a retry, an edit, another labeler's assignment, gold mixing,
        an expiry check due, an older open assignment); the caller rolls back and takes the general path.
        ValidationError (nothing written) for invalid fields."""
        if conn.execute(_SQL_JUDGEMENT_BY_KEY, (idempotency_key,)).fetchone() is not None:
            return None
        row = conn.execute(_SQL_ASSIGNMENT, (assignment_id,)).fetchone()
        if row is None:
            return None
        item_id, a_labeler, project_id, status, shown_order_json, created_at = row
        if a_labeler != labeler_id or status != "assigned":
            return None
        info = self._raw_project_info(conn, project_id)
        if info.gold_rate > 0 or (info.timeout_s and time.monotonic() - self._last_expiry.get(project_id, -1e18)
                                  >= self.expiry_check_interval_s):
            return None
        shown_order = json.loads(shown_order_json)
        canon = validate_submission(info.task_type, shown_order, fields, info.flag_names)
        now = utcnow()
        now_s = _sqlite_datetime(now)
        spent = int(max(0.0, (now - datetime.fromisoformat(created_at)).total_seconds()) * 1000)
        values = {"assignment_id": assignment_id, "item_id": item_id, "labeler_id": labeler_id, "version": 1,
                  "shown_order": shown_order, "choice": canon.get("choice"), "strength": canon.get("strength"),
                  "picked_position": canon.get("picked_position"), "ranking": canon.get("ranking"),
                  "thumbs": canon.get("thumbs"), "likert": canon.get("likert"), "flags": canon["flags"],
                  "comment": canon["comment"], "time_spent_ms": spent, "idempotency_key": idempotency_key,
                  "created_at": now}
        try:
            cur = conn.execute(_SQL_INS_JUDGEMENT, (
                assignment_id, item_id, labeler_id, shown_order_json, values["choice"], values["strength"],
                values["picked_position"], _json_or_null(values["ranking"]), values["thumbs"], values["likert"],
                json.dumps(values["flags"]), values["comment"], spent, idempotency_key, now_s))
        except sqlite3.IntegrityError:  # e.g. a version row from another process: the general path sorts it out
            return None
        jid = cur.lastrowid
        conn.execute(_SQL_ASSIGNMENT_DONE, (now_s, assignment_id))
        conn.execute(_SQL_ITEM_DONE, (item_id,))
        j = StoredJudgement(id=jid, **values)
        open_row = conn.execute(_SQL_OPEN, (labeler_id, project_id)).fetchone()
        if open_row is not None:  # another open assignment (two tabs): resume it, as next_assignment does
            aid, cand_id, is_gold, order_json, a_created, prompt_id, completion_ids_json = open_row
            item = ItemRef(cand_id, project_id, prompt_id, json.loads(completion_ids_json), bool(is_gold))
            return j, True, AssignmentRef(aid, cand_id, labeler_id, project_id, "assigned", bool(is_gold),
                                          json.loads(order_json), datetime.fromisoformat(a_created), item)
        k = info.overlap_k
        for cand_id, prompt_id, completion_ids_json in conn.execute(_SQL_CANDIDATES,
                                                                      (project_id, k, labeler_id)).fetchall():
            if conn.execute(_SQL_TAKE, (cand_id, k)).rowcount != 1:
                continue
            completion_ids = json.loads(completion_ids_json)
            order = list(range(len(completion_ids)))
            self._rng.shuffle(order)
            aid = conn.execute(_SQL_INS_ASSIGNMENT, (cand_id, labeler_id, project_id, json.dumps(order),
                                                     now_s)).lastrowid
            nxt = AssignmentRef(aid, cand_id, labeler_id, project_id, "assigned", False, order, now,
                                ItemRef(cand_id, project_id, prompt_id, completion_ids, False))
            if cand_id not in self._view_cache:
                self._cache_view_raw(conn, cand_id, prompt_id, completion_ids)
            return j, True, nxt
        return j, True, None

    def _raw_project_info(self, conn: sqlite3.Connection, project_id: int) -> _ProjectInfo:
        now = time.monotonic()
        hit = self._info_cache.get(project_id)
        if hit is not None and now - hit[0] < 5.0:
            return hit[1]
        row = conn.execute(_SQL_PROJECT, (project_id,)).fetchone()
        if row is None:
            raise NotFound(f"no project {project_id}")
        task_type, overlap_k, gold_rate, settings_json = row
        settings = json.loads(settings_json) if settings_json else {}
        info = _ProjectInfo(task_type, [f["name"] for f in settings.get("flags", DEFAULT_FLAGS)], overlap_k, gold_rate,
                            settings.get("assignment_timeout_s", DEFAULT_ASSIGNMENT_TIMEOUT_S))
        self._info_cache[project_id] = (now, info)
        return info

    def _cache_view_raw(self, conn: sqlite3.Connection, item_id: int, prompt_id: int, completion_ids: list) -> None:
        messages_json, is_chat = conn.execute(_SQL_PROMPT, (prompt_id,)).fetchone()
        comps = [conn.execute(_SQL_COMPLETION, (cid,)).fetchone() for cid in completion_ids]
        self._put_view(item_id, ({"messages": json.loads(messages_json), "is_chat": bool(is_chat)},
                                 [{"text": text, "model": model} for text, model in comps]))

    def _put_view(self, item_id: int, view: tuple[dict, list[dict]]) -> None:
        if len(self._view_cache) >= 4096:
            self._view_cache.pop(next(iter(self._view_cache)))
        self._view_cache[item_id] = view

    def _project_info(self, s: Session, project_id: int) -> _ProjectInfo:
        now = time.monotonic()
        hit = self._info_cache.get(project_id)
        if hit is not None and now - hit[0] < 5.0:
            return hit[1]
        p = s.get(Project, project_id)
        if p is None:
            raise NotFound(f"no project {project_id}")
        info = _ProjectInfo(p.task_type, [f["name"] for f in p.settings.get("flags", DEFAULT_FLAGS)], p.overlap_k,
                            p.gold_rate, p.settings.get("assignment_timeout_s", DEFAULT_ASSIGNMENT_TIMEOUT_S))
        self._info_cache[project_id] = (now, info)
        return info

    def _submit_in(self, s: Session, assignment_id, labeler_id, fields, idempotency_key, started_at):
        j = s.scalar(select(Judgement).where(Judgement.idempotency_key == idempotency_key))
        if j is not None:
            if j.labeler_id != labeler_id:
                raise Forbidden("idempotency key belongs to another labeler")
            return j, False, s.get(Assignment, j.assignment_id, options=[noload(Assignment.item)]).project_id
        a = s.get(Assignment, assignment_id, options=[noload(Assignment.item)])
        if a is None or a.labeler_id != labeler_id:
            raise NotFound("no such assignment")
        if a.status == "skipped":
            raise ValidationError({"assignment": "this item was skipped; it can no longer be judged"})
        if a.status == "expired":  # left open too long: take the slot back if nobody else has it
            p = s.get(Project, a.project_id)
            cond = [Item.id == a.item_id] + ([] if a.is_gold else [Item.n_active < p.overlap_k])
            if s.execute(update(Item).where(*cond).values(n_active=Item.n_active + 1)).rowcount != 1:
                raise ValidationError({"assignment": "this item was given to another labeler after you left it "
                                                     "open too long; your judgement was not stored"})
            a.status = "assigned"
        task_type, flag_names = self._project_rules(s, a.project_id)
        canon = validate_submission(task_type, a.shown_order, fields, flag_names)
        last = 0 if a.status == "assigned" else (  # first judgement of an open assignment: version 1
            s.scalar(select(func.max(Judgement.version)).where(Judgement.assignment_id == a.id)) or 0)
        now = utcnow()
        start = a.created_at if last == 0 or started_at is None else started_at
        spent = int(max(0.0, (now - start).total_seconds()) * 1000)
        j = Judgement(assignment_id=a.id, item_id=a.item_id, labeler_id=labeler_id, version=last + 1,
                      shown_order=a.shown_order, idempotency_key=idempotency_key, time_spent_ms=spent,
                      created_at=now, **canon)
        s.add(j)
        if a.status == "assigned":
            a.status = "done"
            a.completed_at = now
            s.execute(update(Item).where(Item.id == a.item_id).values(n_done=Item.n_done + 1))
        s.flush()
        return j, True, a.project_id

    def _project_rules(self, s: Session, project_id: int) -> tuple[str, list[str]]:
        """(task type, flag names) of a project, cached for a few seconds (the hot path of every submission)."""
        now = time.monotonic()
        hit = self._rules_cache.get(project_id)
        if hit is not None and now - hit[0] < 5.0:
            return hit[1]
        p = s.get(Project, project_id)
        rules = (p.task_type, [f["name"] for f in p.settings.get("flags", DEFAULT_FLAGS)])
        self._rules_cache[project_id] = (now, rules)
        return rules

    def project_rules(self, project_id: int) -> tuple[str, list[str]]:
        hit = self._rules_cache.get(project_id)
        if hit is not None and time.monotonic() - hit[0] < 5.0:
            return hit[1]
        with self.read() as s:
            return self._project_rules(s, project_id)

    # -- reading --------------------------------------------------------------------------------------------------
    def item_view(self, item: Item, shown_order: list[int]) -> dict:
        """What a labeler sees: prompt messages and completions in the shown order. Cached per item (prompts and
        completions never change once imported; an item is shown to k labelers)."""
        cached = self._view_cache.get(item.id)
        if cached is None:
            with self.engine.connect() as conn:
                prompt = conn.execute(_Q_PROMPT, {"pid": item.prompt_id}).one()
                comps = {c.id: c for c in conn.execute(_Q_COMPLETIONS, {"ids": list(item.completion_ids)})}
            cached = ({"messages": prompt.messages, "is_chat": prompt.is_chat},
                      [{"text": comps[cid].text, "model": comps[cid].model} for cid in item.completion_ids])
            self._put_view(item.id, cached)
        head, canon = cached
        return {**head, "completions": [dict(canon[i]) for i in shown_order]}

    def judgement_history(self, assignment_id: int) -> list[Judgement]:
        with self.read() as s:
            return list(s.scalars(select(Judgement).where(Judgement.assignment_id == assignment_id)
                                  .order_by(Judgement.version)))

    def current_judgement(self, assignment_id: int) -> Judgement | None:
        with self.read() as s:
            return s.scalar(select(Judgement).where(Judgement.assignment_id == assignment_id)
                            .order_by(Judgement.version.desc()).limit(1))

    def labeler_history(self, project_id: int, labeler_id: int, limit: int = 200) -> list[dict]:
        latest = (select(Judgement.assignment_id, func.max(Judgement.version).label("v"))
                  .where(Judgement.labeler_id == labeler_id).group_by(Judgement.assignment_id).subquery())
        with self.read() as s:
            rows = s.execute(select(Judgement, Assignment).join(
                latest, (Judgement.assignment_id == latest.c.assignment_id) & (Judgement.version == latest.c.v))
                .join(Assignment, Assignment.id == Judgement.assignment_id)
                .where(Assignment.project_id == project_id).order_by(Judgement.created_at.desc()).limit(limit)).all()
        return [{"judgement": j, "assignment": a} for j, a in rows]

    def progress(self, project_id: int, labeler_id: int) -> dict:
        with self.read() as s:
            p = s.get(Project, project_id)
            counts = dict(s.execute(select(Assignment.status, func.count()).where(
                Assignment.labeler_id == labeler_id, Assignment.project_id == project_id)
                .group_by(Assignment.status)).all())
            mine = select(Assignment.item_id).where(Assignment.labeler_id == labeler_id).scalar_subquery()
            remaining = s.scalar(select(func.count()).select_from(Item).where(
                Item.project_id == project_id, Item.is_gold.is_(False), Item.n_active < p.overlap_k,
                Item.id.not_in(mine)))
        done = counts.get("done", 0)
        return {"done": done, "skipped": counts.get("skipped", 0), "open": counts.get("assigned", 0),
                "remaining": remaining, "total": done + counts.get("assigned", 0) + remaining}

    def project_summary(self, project_id: int) -> dict:
        with self.read() as s:
            p = s.get(Project, project_id)
            n_items = s.scalar(select(func.count()).select_from(Item).where(Item.project_id == project_id,
                                                                             Item.is_gold.is_(False)))
            n_gold = s.scalar(select(func.count()).select_from(Item).where(Item.project_id == project_id,
                                                                            Item.is_gold.is_(True)))
            n_complete = s.scalar(select(func.count()).select_from(Item).where(
                Item.project_id == project_id, Item.is_gold.is_(False), Item.n_done >= p.overlap_k))
            n_judgements = s.scalar(select(func.count()).select_from(Judgement).join(
                Assignment, Assignment.id == Judgement.assignment_id).where(Assignment.project_id == project_id))
        return {"items": n_items, "gold_items": n_gold, "complete_items": n_complete, "judgement_rows": n_judgements}

    def current_judgements(self, project_id: int) -> list[dict]:
        """The current (latest-version) judgement of every done assignment in the project, as plain dicts."""
        latest = (select(Judgement.assignment_id, func.max(Judgement.version).label("v"))
                  .group_by(Judgement.assignment_id).subquery())
        with self.read() as s:
            rows = s.execute(select(Judgement, Assignment, Labeler.username, Item).join(
                latest, (Judgement.assignment_id == latest.c.assignment_id) & (Judgement.version == latest.c.v))
                .join(Assignment, Assignment.id == Judgement.assignment_id)
                .join(Labeler, Labeler.id == Judgement.labeler_id)
                .join(Item, Item.id == Judgement.item_id)
                .where(Assignment.project_id == project_id).order_by(Judgement.id)).all()
        out = []
        for j, a, username, item in rows:
            out.append({"item_id": item.id, "prompt_id": item.prompt_id, "completion_ids": item.completion_ids,
                        "is_gold": item.is_gold, "gold_answer": item.gold_answer, "labeler": username,
                        "labeler_id": j.labeler_id, "version": j.version, "shown_order": j.shown_order,
                        "choice": j.choice, "strength": j.strength, "picked_position": j.picked_position,
                        "ranking": j.ranking, "thumbs": j.thumbs, "likert": j.likert, "flags": j.flags,
                        "comment": j.comment, "time_spent_ms": j.time_spent_ms})
        return out

    def prompts_and_completions(self, project_id: int) -> tuple[dict[int, Prompt], dict[int, Completion]]:
        with self.read() as s:
            prompts = {p.id: p for p in s.scalars(select(Prompt).where(Prompt.project_id == project_id))}
            comps = {c.id: c for c in s.scalars(select(Completion).join(Prompt).where(
                Prompt.project_id == project_id))}
        return prompts, comps

