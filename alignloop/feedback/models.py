"""The feedback store's schema (SQLAlchemy 2 declarative). Alembic migrations in `migrations/` create it.

Tables: projects, prompts, completions, items, labelers, assignments, judgements, sessions, project_members,
adjudications, demonstration_reviews, conversations, conversation_turns.

* An **item** is what one labeler judges once: a prompt plus the completions shown (2 for pairwise, K for rank,
  1 for thumbs / Likert), in a canonical order `completion_ids` (position 0 is "A"). A steps item is one solution:
  each of its steps is a completion row and `completion_ids` lists them in the solution's order (always shown in
  that order).
* An **assignment** gives one item to one labeler (unique per pair: never twice to the same labeler) and records
  the order the completions were shown in (`shown_order`: a permutation of canonical positions, left to right).
* A **judgement** is append-only: an edit inserts a new row with `version + 1`; the current judgement of an
  assignment is its highest version. `idempotency_key` is unique so a retried submission is stored once.
* A **labeler** is a person (kind "human", signs in with a password) or an AI labeler (kind "ai", its `model`
  named; it never signs in and its assignments never take a person's slot: see `Store.record_ai_judgements`).
  An AI judgement keeps its evidence in `Judgement.details` (per-order probabilities, principle, rationale).
  A labeler's `public_id` is what exports name it by (random, so neither the username nor guessable from the numeric
  id), and `attributes` are what an admin says about them (group, locale, expertise: str -> str; migration 0005).
* A project may ask several **questions** of each pairwise item (its `questions` setting, `questions.py`): a
  judgement then keeps every answer in `Judgement.answers` ({name: {choice, strength, picked_position}}) and the
  first question's answer in the usual columns too, so quality and agreement read it as a one-question judgement.
* A **demonstration** project (migration 0007): an item is a prompt, with one sampled completion when the labeler
  edits a model's answer (`completion_ids` = [original]) or none when they write from scratch; the labeler's
  response is `Judgement.text` (an edit is a new version, as for every judgement). An admin accepts or rejects each
  demonstration with a note (`DemonstrationReview`, append-only, of one judgement version: the newest row counts).
* A **conversation** project (migration 0007): an item is an opening prompt; its assignment owns one
  `Conversation`, whose `ConversationTurn`s each hold the messages so far (`context`), two candidate next messages
  generated in the background (`candidates`, canonical order; `shown_order` says which is shown as A), the
  labeler's choice on the 8-point scale (1 = "A is much better" .. 8 = "B is much better") and the chosen
  candidate. Ending the conversation stores a judgement with `likert` = the 1-7 rating and the comment.
"""
from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from alignloop.data import STRENGTH_MARGINS

TASK_TYPES = ("pairwise", "rank", "thumbs", "likert", "steps", "demonstration", "conversation")
ROLES = ("admin", "labeler")
LABELER_KINDS = ("human", "ai")
PAIRWISE_CHOICES = ("a", "b", "tie", "both_bad")
# How much better the chosen response is, strongest first: the names of the data contract's strength table (export
# turns them into margins with `alignloop.data.strength_to_margin`).
STRENGTHS = tuple(STRENGTH_MARGINS["small"])
# A steps judgement rates every step of a solution: +1 good, 0 neutral, -1 bad (PRM800K's labels). The form's names.
STEP_LABEL_NAMES = {"good": 1, "neutral": 0, "bad": -1}
# A conversation turn's 8-point choice (Anthropic's interface, Bai et al. 2022): 1 = A much better .. 4 = A negligibly
# better | 5 = B negligibly better .. 8 = B much better. No middle: one of the two is always chosen. The strength of
# each point is a name of the data contract's strength table (`alignloop.data.strength_to_margin` gives the margin).
CONVERSATION_SCALE = (1, 2, 3, 4, 5, 6, 7, 8)
SCALE_STRENGTHS = {1: "significantly_better", 2: "better", 3: "slightly_better", 4: "negligibly_better",
                   5: "negligibly_better", 6: "slightly_better", 7: "better", 8: "significantly_better"}
TURN_STATUSES = ("pending", "ready", "failed", "chosen")
CONVERSATION_STATUSES = ("open", "ended")
REVIEW_DECISIONS = ("accept", "reject")


PROJECT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")  # projects.check_project_name's characters


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_public_id() -> str:
    """A labeler's pseudonymous id for exports: "L" + 16 random hex digits (64 bits: not guessable, and random
    rather than derived from the username or the row id, so it says nothing about either)."""
    return "L" + secrets.token_hex(8)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    task_type: Mapped[str] = mapped_column(String(20), nullable=False)
    guidelines_md: Mapped[str] = mapped_column(Text, nullable=False, default="")
    overlap_k: Mapped[int] = mapped_column(Integer, nullable=False, default=3)
    gold_rate: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    settings: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)

    @property
    def url_key(self) -> str:
        """What a URL names the project by (`/p/<url_key>/...`): its name when it is a slug that reads as a name
        (`projects.check_project_name`'s rule), else its id: a name made before that rule may read as an id
        ("2024"), a path step ("." / "..") or hold characters a path segment cannot carry ("/", "?", "#", "%")."""
        n = self.name
        slug = PROJECT_NAME_RE.fullmatch(n) and not n.isdigit() and n not in (".", "..")
        return n if slug else str(self.id)


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), nullable=False, index=True)
    # list of {"role", "content"}; a plain-string prompt is stored as one user message and `is_chat` False.
    messages: Mapped[list] = mapped_column(JSON, nullable=False)
    is_chat: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    meta: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    # what makes an import idempotent: "id:<row id>" or a hash of the row's content; unique per project (0006)
    source_key: Mapped[str | None] = mapped_column(String(100))
    __table_args__ = (Index("uq_prompts_project_source", "project_id", "source_key", unique=True),)


class Completion(Base):
    __tablename__ = "completions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), nullable=False, index=True)
    text: Mapped[str] = mapped_column(Text, nullable=False)
    model: Mapped[str | None] = mapped_column(String(300))
    params: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), nullable=False)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), nullable=False)
    completion_ids: Mapped[list] = mapped_column(JSON, nullable=False)
    is_gold: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    gold_answer: Mapped[dict | None] = mapped_column(JSON)
    # live assignments (assigned or done; skipped ones release their slot). Updated with a conditional UPDATE
    # (`n_active < k`), which is what keeps "k distinct labelers" true under concurrency on any database.
    n_active: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    n_done: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    prompt: Mapped[Prompt] = relationship(lazy="select")
    # matches the next-item query's WHERE and its whole ORDER BY (n_active, n_done, id): no sort per request
    __table_args__ = (Index("ix_items_queue", "project_id", "is_gold", "n_active", "n_done", "id"),)


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(300), nullable=False)
    role: Mapped[str] = mapped_column(String(20), nullable=False, default="labeler")
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    kind: Mapped[str] = mapped_column(String(20), nullable=False, default="human", server_default="human")
    model: Mapped[str | None] = mapped_column(String(300))  # an AI labeler's model name / spec
    __table_args__ = (Index("ix_labelers_public_id", "public_id", unique=True),)
    public_id: Mapped[str] = mapped_column(String(40), nullable=False, default=new_public_id)
    attributes: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)  # group, locale, ... (admin's)


class Assignment(Base):
    __tablename__ = "assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), nullable=False)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False, index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="assigned")  # assigned|done|skipped
    is_gold: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    shown_order: Mapped[list] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    item: Mapped[Item] = relationship(lazy="joined")
    __table_args__ = (UniqueConstraint("item_id", "labeler_id", name="uq_assignment_item_labeler"),
                      Index("ix_assignments_labeler_project_status", "labeler_id", "project_id", "status"))


class Judgement(Base):
    __tablename__ = "judgements"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), nullable=False)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), nullable=False, index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    shown_order: Mapped[list] = mapped_column(JSON, nullable=False)
    # pairwise: choice in canonical terms ("a" = completion_ids[0]), the strength, and the screen position picked
    choice: Mapped[str | None] = mapped_column(String(20))
    strength: Mapped[str | None] = mapped_column(String(30))
    picked_position: Mapped[int | None] = mapped_column(Integer)  # 0 = left/first shown, 1 = right; None if no pick
    # rank: rank per canonical completion (1 = best, ties share a rank)
    ranking: Mapped[list | None] = mapped_column(JSON)
    thumbs: Mapped[int | None] = mapped_column(Integer)  # +1 / -1
    likert: Mapped[int | None] = mapped_column(Integer)  # 1..7
    # steps: a label per step of the solution, in its order: +1 good / 0 neutral / -1 bad (migration 0004)
    step_labels: Mapped[list | None] = mapped_column(JSON)
    flags: Mapped[list] = mapped_column(JSON, nullable=False, default=list)
    comment: Mapped[str] = mapped_column(Text, nullable=False, default="")
    time_spent_ms: Mapped[int | None] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    # an AI judgement's evidence (per-order probabilities, raw picks, principle, rationale); NULL for people
    details: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    # a several-question project's answers {question name: {choice, strength, picked_position}}; NULL otherwise
    answers: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    # a demonstration's written (or edited) response; NULL for every other task (migration 0007)
    text: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (UniqueConstraint("assignment_id", "version", name="uq_judgement_assignment_version"),)


class WebSession(Base):
    """A signed-in client (migration 0006). `id` is the SHA-256 of the cookie's random token, never the token."""
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    __table_args__ = (Index("ix_sessions_labeler", "labeler_id"),)


class ProjectMember(Base):
    """A labeler allowed on a project whose `settings["access"]` is "members" (migration 0006)."""
    __tablename__ = "project_members"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id", ondelete="CASCADE"), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    __table_args__ = (Index("ix_project_members_labeler", "labeler_id"),)


ADJUDICATION_DECISIONS = ("accept", "override", "exclude")


class Adjudication(Base):
    """An admin's review of an item, append-only: the newest row per item counts (migration 0006). "accept": the
    consensus stands; "override": `answer` (a judgement's fields) replaces it; "exclude": the item leaves exports."""
    __tablename__ = "adjudications"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), nullable=False)
    admin_id: Mapped[int] = mapped_column(ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False)
    decision: Mapped[str] = mapped_column(String(20), nullable=False)
    answer: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    note: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    __table_args__ = (Index("ix_adjudications_item", "item_id", "id"),)


class DemonstrationReview(Base):
    """An admin's decision on one demonstration (a judgement version), append-only: the newest row per judgement
    counts (migration 0007). "accept" or "reject", with a note the labeler can read."""
    __tablename__ = "demonstration_reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    judgement_id: Mapped[int] = mapped_column(ForeignKey("judgements.id", ondelete="CASCADE"), nullable=False)
    admin_id: Mapped[int] = mapped_column(ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False)
    decision: Mapped[str] = mapped_column(String(20), nullable=False)
    note: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    __table_args__ = (Index("ix_demonstration_reviews_judgement", "judgement_id", "id"),)


class Conversation(Base):
    """A labeler's conversation with the served model: one per assignment of a conversation project (migration
    0007). `revision` goes up with every change, so a second tab can tell that its page is stale."""
    __tablename__ = "conversations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), nullable=False,
                                               unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), nullable=False)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="open")  # open | ended
    rating: Mapped[int | None] = mapped_column(Integer)  # 1..7 when ended
    comment: Mapped[str] = mapped_column(Text, nullable=False, default="")
    revision: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    # at most one open conversation per labeler and project: a double-clicked Start (or two tabs) on an open_start
    # project cannot open two, on PostgreSQL's parallel writers too (a partial unique index: ended ones are many)
    __table_args__ = (Index("ix_conversations_project", "project_id", "status"),
                      Index("ux_conversations_open", "project_id", "labeler_id", unique=True,
                            sqlite_where=text("status = 'open'"), postgresql_where=text("status = 'open'")))


class ConversationTurn(Base):
    """One turn: the messages so far (`context`, ending with the user's message) and two candidate next messages.
    status: pending (generating) -> ready (both candidates stored) -> chosen; or failed (`error` says why; a retry
    sets it pending again and counts in `attempts`)."""
    __tablename__ = "conversation_turns"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False)
    idx: Mapped[int] = mapped_column(Integer, nullable=False)  # 0, 1, ... within the conversation
    context: Mapped[list] = mapped_column(JSON, nullable=False)  # [{"role", "content"}], last = the user's message
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="pending")
    # [{"text", "model", "params", "stopped"}] x 2 in canonical order (candidate 0 = model 0's / the first sample)
    candidates: Mapped[list | None] = mapped_column(JSON(none_as_null=True))
    shown_order: Mapped[list] = mapped_column(JSON, nullable=False)  # [0, 1] or [1, 0]: canonical index shown as A, B
    choice: Mapped[int | None] = mapped_column(Integer)  # 1..8 on the screen's scale (A/B as shown)
    chosen: Mapped[int | None] = mapped_column(Integer)  # canonical index of the chosen candidate
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    gen_ms: Mapped[int | None] = mapped_column(Integer)  # how long the generation took
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    chosen_at: Mapped[datetime | None] = mapped_column(DateTime)
    __table_args__ = (UniqueConstraint("conversation_id", "idx", name="uq_conversation_turn_idx"),)
