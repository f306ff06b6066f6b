"""Conversations with the served model (a "conversation" project, Anthropic's interface, Bai et al. 2022): the
store-level verbs the web app (`web/conversations.py`) and the pipeline call.

    conv = start_conversation(store, project_id, labeler_id)          # the open one, or takes the next item
    state = conversation_state(store, conv.id, labeler_id)            # blind: A/B texts, no models, no order
    choose(store, conv.id, labeler_id, idx=0, choice=2, expected_revision=state["revision"])     # 1..8
    turn = add_message(store, conv.id, labeler_id, "and then?", expected_revision=...)   # a new pending turn
    turn_generated(store, turn.id, candidates, gen_ms)   # or turn_failed(store, turn.id, "model exploded")
    end_conversation(store, conv.id, labeler_id, rating=6, comment="", expected_revision=...)   # 1..7
    rows, summary = export_conversation_rows(store, project_id, "preference")   # or "sft" / "messages"

A conversation belongs to one assignment (its item is the opening prompt). Each turn holds the messages so far
(`context`, ending with the user's message) and, once generated, two candidates in canonical order; the page shows
them as A and B in the turn's `shown_order` (drawn per turn from the project's seed, so position bias does not
favour a model). The labeler's 8-point `choice` (1 = "A is much better" .. 8 = "B is much better") says which one
continues the conversation (`chosen`, a canonical index) and how strongly (`SCALE_STRENGTHS` -> margin).

Concurrency (two tabs, double clicks, PostgreSQL's parallel writers): every change is a conditional UPDATE on the
state it read (the turn's status and attempt, the conversation's `revision`), so two requests can never create two
turns, choose twice or end twice. A request made on a stale view raises `Stale` (the web app answers 409 with the
current state); repeating exactly what was done already (the same choice, the same rating) is not an error.
Generation results come back through `turn_generated` / `turn_failed` from the worker's thread; a late result for
an attempt that is no longer pending changes nothing.
"""
from __future__ import annotations

import hashlib
import random
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from alignloop.data import strength_to_margin
from alignloop.errors import UserError

from .assignment import gold_seed
from .errors import NotFound, ValidationError
from .export_meta import judgement_meta
from .generation import public_error
from .models import (
    SCALE_STRENGTHS,
    Assignment,
    Conversation,
    ConversationTurn,
    Item,
    Judgement,
    Labeler,
    Project,
    Prompt,
    utcnow,
)
from .projects import DEFAULT_ASSIGNMENT_TIMEOUT_S
from .security import is_utf8_text
from .validation import MAX_TIME_MS, validate_submission

DEFAULT_MAX_TURNS = 10
DEFAULT_GENERATION = {"max_new_tokens": 128, "temperature": 0.8, "top_p": 1.0, "top_k": 0}
MAX_MESSAGE_CHARS = 20000
EXPORT_FORMATS = ("preference", "sft", "messages")
# An open_start item's slots: its labeler's own, never offered to anyone (an expiry's n_active - 1, or a higher
# overlap_k, still leaves it far above any k)
OPEN_START_SLOTS = 1 << 30
SCALE_LABELS = {1: "A is much better", 2: "A is better", 3: "A is slightly better", 4: "A is negligibly better",
                5: "B is negligibly better", 6: "B is slightly better", 7: "B is better", 8: "B is much better"}


class Stale(UserError):
    """The request acted on a view of the conversation that is no longer current (another tab chose, sent or ended
    first; a wrong `expected_revision`), or on a state that does not allow it. Nothing changed; the web app answers
    409 with the current state."""


# -- settings and small helpers -----------------------------------------------------------------------------------
def conversation_settings(settings: dict | None) -> dict:
    """A conversation project's settings with their defaults: models, generation params, max_turns, open_start."""
    settings = settings or {}
    return {"models": list(settings.get("models") or []),
            "generation": {**DEFAULT_GENERATION, **(settings.get("generation") or {})},
            "max_turns": int(settings.get("max_turns") or DEFAULT_MAX_TURNS),
            "open_start": bool(settings.get("open_start", False))}


def _draw(seed: str) -> int:
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big")


def turn_shown_order(project: Project, conversation_id: int, idx: int) -> list[int]:
    """Which canonical candidate is shown as A and which as B in a turn: a seeded draw per (project, conversation,
    turn), so it is random across turns (position bias spread over both models) and the same on every run."""
    order = [0, 1]
    random.Random(_draw(f"{gold_seed(project)}:conversation:{conversation_id}:{idx}")).shuffle(order)
    return order


def generation_seed(turn: ConversationTurn) -> int:
    """The sampling seed of a turn's attempt (a retry samples afresh)."""
    return _draw(f"turn:{turn.id}:{turn.attempts}") % (2**31)


def job_id(turn: ConversationTurn) -> str:
    """The generation job of a turn's current attempt (`GenerationJob.job_id`)."""
    return f"turn{turn.id}.{turn.attempts}"


def _strict_int(value: Any, lo: int, hi: int, field: str, what: str) -> int:
    """`value` if it is exactly an int (not a bool, a float or a string) in [lo, hi]; else ValidationError naming
    `field`."""
    if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
        return value
    raise ValidationError({field: f"{what}: a whole number from {lo} to {hi} (got {value!r})"[:300]})


def check_choice(choice: Any) -> int:
    return _strict_int(choice, 1, 8, "choice", "the 8-point choice (1 = A is much better .. 8 = B is much better)")


def check_rating(rating: Any) -> int:
    return _strict_int(rating, 1, 7, "rating", "the conversation's rating (1 = worst .. 7 = best)")


def check_message(text: Any, field: str = "text") -> str:
    if not isinstance(text, str):
        raise ValidationError({field: f"the message must be text, not {type(text).__name__}"})
    if not is_utf8_text(text):
        raise ValidationError({field: "not valid text (a lone surrogate such as \\ud800)"})
    if not text.strip():
        raise ValidationError({field: "write a message (it is empty)"})
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValidationError({field: f"the message is too long ({len(text)} characters, at most "
                                      f"{MAX_MESSAGE_CHARS})"})
    return text.strip()


def _own(s, conversation_id: int, labeler_id: int | None) -> Conversation:
    """The conversation; with `labeler_id`, NotFound unless it is that labeler's (another's looks missing)."""
    c = s.get(Conversation, conversation_id)
    if c is None or (labeler_id is not None and c.labeler_id != labeler_id):
        raise NotFound("no such conversation")
    return c


def _turns(s, conversation_id: int) -> list[ConversationTurn]:
    return list(s.scalars(select(ConversationTurn).where(ConversationTurn.conversation_id == conversation_id)
                          .order_by(ConversationTurn.idx)))


def _bump(s, c: Conversation) -> None:
    """revision + 1, conditionally on the revision read: of two concurrent writers one wins, the other is Stale
    (its transaction rolls back)."""
    r = s.execute(update(Conversation).where(Conversation.id == c.id, Conversation.revision == c.revision)
                  .values(revision=Conversation.revision + 1, updated_at=utcnow())
                  .execution_options(synchronize_session=False))
    if r.rowcount != 1:
        raise Stale("this conversation changed in another tab; the page now shows its current state")
    s.refresh(c)


def _touch_assignment(s, c: Conversation) -> bool:
    """Keep the conversation's assignment alive while the labeler talks: its time (what `assignment.expire_stale`
    counts from) restarts with each message, choice and retry (and while a turn generates: `keep_alive`), so an
    active conversation is not expired. One that expired already (the labeler paused past the timeout; or was
    skipped through the generic API) is taken back when its slot is still free (`_take_slot_back`), so that a
    labeler who resumed keeps her opening and her end counts; when the slot went to another labeler it stays as it
    is (the end is then uncounted, see `_close_assignment`). True when the assignment is (again) assigned."""
    now = utcnow()
    if s.execute(update(Assignment).where(Assignment.id == c.assignment_id, Assignment.status == "assigned")
                 .values(created_at=now).execution_options(synchronize_session=False)).rowcount == 1:
        return True
    a = s.get(Assignment, c.assignment_id)
    if a is None or a.status not in ("expired", "skipped"):
        return False
    old = {"status": a.status, "completed_at": a.completed_at, "created_at": a.created_at}
    # the assignment first, conditionally on the status read: of two concurrent keep-alives (two tabs, PostgreSQL)
    # one takes the slot back, the other changes nothing
    if s.execute(update(Assignment).where(Assignment.id == a.id, Assignment.status == old["status"])
                 .values(status="assigned", completed_at=None, created_at=now)
                 .execution_options(synchronize_session=False)).rowcount != 1:
        return False
    if not _take_slot_back(s, a):  # the slot went to another labeler meanwhile: as it was
        s.execute(update(Assignment).where(Assignment.id == a.id).values(**old)
                  .execution_options(synchronize_session=False))
        s.expire(a)
        return False
    s.expire(a)
    return True


def _take_slot_back(s, a: Assignment) -> bool:
    """Take a slot of an expired (or skipped) assignment's item again (its n_active + 1) if one is free: True. Gold
    and open_start items are outside the k (always free)."""
    p = s.get(Project, a.project_id)
    item = s.get(Item, a.item_id)
    own = a.is_gold or item.n_active >= OPEN_START_SLOTS // 2  # gold, or an open_start item: outside the k
    cond = [Item.id == a.item_id] + ([] if own else [Item.n_active < p.overlap_k])
    return s.execute(update(Item).where(*cond).values(n_active=Item.n_active + 1)
                     .execution_options(synchronize_session=False)).rowcount == 1


KEEP_ALIVE_EVERY_S = 60.0  # the state poll restarts a waiting conversation's assignment at most this often


def keep_alive(store, conversation_id: int, labeler_id: int) -> bool:
    """The state poll's keep-alive: while a turn of the labeler's open conversation is generating (the page polls
    its state; the first turn's model may load for minutes), its assignment is kept alive as a message keeps it
    (`_touch_assignment`): restarted when its time is older than KEEP_ALIVE_EVERY_S (or a quarter of the project's
    `assignment_timeout_s`, when that is shorter), taken back at once when it expired with its slot free. A read
    only, unless a write is due; True when it wrote. A page closed stops polling: the assignment then expires as
    any other."""
    now = utcnow()
    with store.read() as s:
        c = s.get(Conversation, conversation_id)
        if c is None or c.labeler_id != labeler_id or c.status != "open":
            return False
        if s.scalar(select(ConversationTurn.id).where(ConversationTurn.conversation_id == c.id,
                                                      ConversationTurn.status == "pending").limit(1)) is None:
            return False
        a = s.get(Assignment, c.assignment_id)
        p = s.get(Project, c.project_id)
    if a is None:
        return False
    if a.status == "assigned":
        ttl = float((p.settings or {}).get("assignment_timeout_s", DEFAULT_ASSIGNMENT_TIMEOUT_S) or 0)
        if ttl <= 0 or (now - a.created_at).total_seconds() < min(KEEP_ALIVE_EVERY_S, ttl / 4):
            return False
    elif a.status not in ("expired", "skipped"):
        return False
    with store.write() as s:
        c = s.get(Conversation, conversation_id)
        return c is not None and c.status == "open" and _touch_assignment(s, c)


def _check_revision(c: Conversation, expected_revision: int | None) -> None:
    if expected_revision is not None and expected_revision != c.revision:
        raise Stale("this conversation changed in another tab; the page now shows its current state")


def _chosen_message(turn: ConversationTurn) -> dict:
    return {"role": "assistant", "content": turn.candidates[turn.chosen]["text"]}


# -- starting -----------------------------------------------------------------------------------------------------
def open_conversation(store, project_id: int, labeler_id: int) -> Conversation | None:
    """The labeler's open conversation in the project (the oldest), if any: a read (what a GET may do)."""
    with store.read() as s:
        return s.scalar(select(Conversation).where(
            Conversation.project_id == project_id, Conversation.labeler_id == labeler_id,
            Conversation.status == "open").order_by(Conversation.id).limit(1))


def _new_conversation(s, p: Project, a: Assignment, context: list[dict]) -> tuple[Conversation, ConversationTurn]:
    now = utcnow()
    c = Conversation(assignment_id=a.id, project_id=p.id, labeler_id=a.labeler_id, status="open", revision=1,
                     created_at=now, updated_at=now)
    s.add(c)
    s.flush()
    t = ConversationTurn(conversation_id=c.id, idx=0, context=context, status="pending",
                         shown_order=turn_shown_order(p, c.id, 0), attempts=1, created_at=now, updated_at=now)
    s.add(t)
    s.flush()
    return c, t


def take_conversation(store, project_id: int, labeler_id: int) -> tuple[Conversation | None, ConversationTurn | None]:
    """(the labeler's conversation, its new first turn when it was just made: the caller submits its generation).
    The open conversation if there is one; else the labeler's next item (`Store.next_assignment`) opens one whose
    first turn's context is the item's prompt; (None, None) when nothing is left for them."""
    c = open_conversation(store, project_id, labeler_id)
    if c is not None:
        return c, None
    for _attempt in range(3):
        if _attempt:
            c = open_conversation(store, project_id, labeler_id)
            if c is not None:  # another tab (or an open_start Start) made one meanwhile
                return c, None
        a = store.next_assignment(project_id, labeler_id)
        if a is None:
            return None, None
        try:
            with store.write() as s:
                existing = s.scalar(select(Conversation).where(Conversation.assignment_id == a.id))
                if existing is not None:  # made by another tab meanwhile
                    return existing, None
                p = s.get(Project, project_id)
                prompt = s.get(Prompt, s.get(Item, a.item_id).prompt_id)
                return _new_conversation(s, p, a, [dict(m) for m in prompt.messages])
        except IntegrityError:  # two tabs made it at once: the other one's is read back next round
            continue
    raise RuntimeError("could not start a conversation")


def start_conversation(store, project_id: int, labeler_id: int) -> Conversation | None:
    """The labeler's open conversation, or a new one on their next item; None when nothing is left."""
    return take_conversation(store, project_id, labeler_id)[0]


def start_open_conversation(store, project_id: int, labeler_id: int, first_message: str) -> Conversation:
    """An `open_start` project: the labeler begins with their own first message instead of an imported prompt
    (`take_open_conversation`); their open conversation, if they have one."""
    return take_open_conversation(store, project_id, labeler_id, first_message)[0]


def take_open_conversation(store, project_id: int, labeler_id: int,
                           first_message: str) -> tuple[Conversation, ConversationTurn | None]:
    """(conversation, its new first turn: the caller submits its generation). The message becomes a prompt and an
    item of its own whose slots are all taken for good (`OPEN_START_SLOTS`: it is nobody else's opening, even after
    its assignment expired or overlap_k was raised). The labeler's open conversation, if any, is returned instead
    (with None); of two concurrent Starts (a double click, two tabs) one makes it, the other gets it."""
    text = check_message(first_message, "first_message")
    c = open_conversation(store, project_id, labeler_id)
    if c is not None:
        return c, None
    if not store.may_label(project_id, labeler_id):
        raise NotFound("no such project")
    try:
        return _make_open_conversation(store, project_id, labeler_id, text)
    except IntegrityError:  # PostgreSQL: a concurrent Start made the labeler's open conversation (unique index)
        c = open_conversation(store, project_id, labeler_id)
        if c is None:
            raise
        return c, None


def _make_open_conversation(store, project_id: int, labeler_id: int,
                            text: str) -> tuple[Conversation, ConversationTurn | None]:
    with store.write() as s:
        p = s.get(Project, project_id)
        if p is None or p.task_type != "conversation":
            raise NotFound("no such conversation project")
        if not conversation_settings(p.settings)["open_start"]:
            raise ValidationError({"first_message": "this project starts from its own prompts (open_start is off)"})
        # again inside the write transaction (SQLite: BEGIN IMMEDIATE serialises it): a double-clicked Start or a
        # second tab finds the conversation the first one made; on PostgreSQL the partial unique index
        # `ux_conversations_open` refuses a second open conversation (IntegrityError, read back by the caller)
        c = s.scalar(select(Conversation).where(
            Conversation.project_id == project_id, Conversation.labeler_id == labeler_id,
            Conversation.status == "open").order_by(Conversation.id).limit(1))
        if c is not None:
            return c, None
        messages = [{"role": "user", "content": text}]
        prompt = Prompt(project_id=p.id, messages=messages, is_chat=False,
                        meta={"open_start": True}, source_key=f"open:{labeler_id}:{uuid.uuid4().hex}")
        s.add(prompt)
        s.flush()
        item = Item(project_id=p.id, prompt_id=prompt.id, completion_ids=[], n_active=OPEN_START_SLOTS, n_done=0)
        s.add(item)
        s.flush()
        a = Assignment(item_id=item.id, labeler_id=labeler_id, project_id=p.id, status="assigned", is_gold=False,
                       shown_order=[])
        s.add(a)
        s.flush()
        return _new_conversation(s, p, a, messages)


# -- the labeler's view -------------------------------------------------------------------------------------------
UNCOUNTED_NOTE = ("your conversation and rating are stored, but its opening was given to another labeler while it "
                  "stayed open, so it does not count toward that opening's labels")
INTERRUPTED_GRACE_S = 2.0  # a pending turn this young whose job the worker does not know is being submitted


def _turn_view(t: ConversationTurn, live: Callable[[str], dict | None] | None, now, models=()) -> dict:
    """A turn as the labeler sees it (blind: candidate texts in the shown order, the choice in screen terms). A
    pending turn: `live(job_id)` (the worker's status) gives its partial texts and queue position; a job the worker
    does not know (a restart lost it), or one it finished whose result was not stored (the store failed in
    `on_done`), shows the turn "interrupted", to retry."""
    out: dict[str, Any] = {"idx": t.idx, "status": t.status, "user": t.context[-1]["content"] if t.context else "",
                           "candidates": None, "choice": t.choice, "chosen_side": None,
                           "error": public_error(t.error, models),  # the full text is the admins'
                           "attempts": t.attempts}
    if t.candidates:
        out["candidates"] = [{"text": t.candidates[i]["text"]} for i in t.shown_order]
    if t.choice is not None:
        out["chosen_side"] = "A" if t.choice <= 4 else "B"
        out["choice_label"] = SCALE_LABELS[t.choice]
    if t.status == "pending":
        age = max(0.0, (now - t.updated_at).total_seconds())
        out["pending_s"] = round(age, 1)
        st = live(job_id(t)) if live is not None else None
        if st is None and live is not None and age >= INTERRUPTED_GRACE_S:
            out["status"] = "interrupted"
            out["error"] = ("the generation of this turn was interrupted (the server restarted); retry it")
        elif st is not None and st.get("state") in ("done", "failed"):
            # finished, yet the turn is still pending: storing its result failed (`Generation.on_done` gave up;
            # while it is still trying the state says "storing")
            out["status"] = "interrupted"
            out["error"] = "the answers of this turn could not be saved (the database was busy); retry it"
        elif st is not None:
            partial = list(st.get("partial") or ["", ""]) + ["", ""]
            out["job"] = {"state": st.get("state"), "position": st.get("position")}
            out["partial"] = [partial[i] or "" for i in t.shown_order]
    return out


def conversation_state(store, conversation_id: int, labeler_id: int | None,
                       live: Callable[[str], dict | None] | None = None) -> dict:
    """The labeler's view of a conversation: `{"conversation_id", "status", "revision", "rating", "comment",
    "max_turns", "opening": the prompt's messages, "turns": [{"idx", "status", "user", "candidates": [{"text"} as
    A, B] | None, "choice", "chosen_side", "error", "attempts"; pending: "pending_s", "partial", "job"}],
    "can_send", "can_end", "note": why an ended conversation does not count, or None}`. Blind: no model names,
    params or canonical order. NotFound for another labeler's.
    `live`: the generation worker's `status(job_id)`, for pending turns (see `_turn_view`)."""
    with store.read() as s:
        c = _own(s, conversation_id, labeler_id)
        p = s.get(Project, c.project_id)
        turns = _turns(s, c.id)
        uncounted = c.status == "ended" and s.scalar(select(Assignment.status).where(
            Assignment.id == c.assignment_id)) != "done"
    settings = conversation_settings(p.settings)
    max_turns = settings["max_turns"]
    # every model name an error may carry: the project's and those of stored candidates (models changed since)
    models = list(settings["models"]) + [c.get("model") for t in turns for c in (t.candidates or []) if c.get("model")]
    last = turns[-1] if turns else None
    is_open = c.status == "open"
    chosen = sum(t.status == "chosen" for t in turns)
    now = utcnow()
    opening = turns[0].context if turns else []
    return {"conversation_id": c.id, "project": p.url_key, "status": c.status, "revision": c.revision,
            "rating": c.rating, "comment": c.comment, "max_turns": max_turns,
            "opening": [{"role": m.get("role"), "content": m.get("content")} for m in opening],
            "turns": [_turn_view(t, live, now, models) for t in turns],
            "can_send": is_open and last is not None and last.status == "chosen" and len(turns) < max_turns,
            "can_end": is_open and chosen > 0,
            # ended after its item went to another labeler (left open past the assignment timeout)
            "note": UNCOUNTED_NOTE if uncounted else None}


# -- turns --------------------------------------------------------------------------------------------------------
def add_message(store, conversation_id: int, labeler_id: int, text: Any,
                expected_revision: int | None) -> ConversationTurn:
    """The labeler's next message: a new pending turn whose context is the conversation so far (the chosen branch)
    plus this message. Stale while the last turn is not chosen, after `max_turns` turns, after the end, or with a
    revision that is not the current one (a second tab's or a double click's send): exactly one turn is made."""
    text = check_message(text)
    try:
        with store.write() as s:
            c = _own(s, conversation_id, labeler_id)
            if c.status != "open":
                raise Stale("this conversation has ended")
            _check_revision(c, expected_revision)
            turns = _turns(s, c.id)
            last = turns[-1]
            if last.status != "chosen":
                raise Stale("choose between the two answers of the last turn before sending a message")
            p = s.get(Project, c.project_id)
            max_turns = conversation_settings(p.settings)["max_turns"]
            if len(turns) >= max_turns:
                raise Stale(f"this conversation has reached its {max_turns} turns: end it with a rating")
            _bump(s, c)
            _touch_assignment(s, c)
            now = utcnow()
            t = ConversationTurn(conversation_id=c.id, idx=last.idx + 1,
                                 context=[*last.context, _chosen_message(last), {"role": "user", "content": text}],
                                 status="pending", shown_order=turn_shown_order(p, c.id, last.idx + 1), attempts=1,
                                 created_at=now, updated_at=now)
            s.add(t)
            s.flush()
            return t
    except IntegrityError:  # the same idx made by a concurrent request (PostgreSQL): that one won
        raise Stale("this conversation changed in another tab; the page now shows its current state") from None


def _finish_turn(store, turn_id: int, attempt: int | None, values: dict) -> bool:
    """Set a pending turn's outcome (its attempt `attempt`, when given); False when it is not pending any more."""
    with store.write() as s:
        cond = [ConversationTurn.id == turn_id, ConversationTurn.status == "pending"]
        if attempt is not None:
            cond.append(ConversationTurn.attempts == attempt)
        r = s.execute(update(ConversationTurn).where(*cond).values(updated_at=utcnow(), **values)
                      .execution_options(synchronize_session=False))
        if r.rowcount != 1:
            return False
        cid = s.scalar(select(ConversationTurn.conversation_id).where(ConversationTurn.id == turn_id))
        s.execute(update(Conversation).where(Conversation.id == cid)
                  .values(revision=Conversation.revision + 1, updated_at=utcnow())
                  .execution_options(synchronize_session=False))
        return True


def turn_generated(store, turn_id: int, candidates: list[dict], gen_ms: int | None,
                   attempt: int | None = None) -> bool:
    """Store a turn's two generated candidates (canonical order: {"text", "model", "params", "stopped"}): the turn
    is ready to choose. Called from the generation worker's thread. False (nothing changed) when the turn is not
    pending any more or `attempt` is not its current one (a late result)."""
    if not (isinstance(candidates, list) and len(candidates) == 2
            and all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in candidates)):
        return turn_failed(store, turn_id, "the generation returned no two candidate texts", attempt)
    kept = [{"text": c["text"], "model": c.get("model"), "params": c.get("params") or {},
             "stopped": c.get("stopped")} for c in candidates]
    return _finish_turn(store, turn_id, attempt, {"status": "ready", "candidates": kept, "error": None,
                                                  "gen_ms": None if gen_ms is None else int(gen_ms)})


def turn_failed(store, turn_id: int, error: str, attempt: int | None = None) -> bool:
    """Mark a pending turn failed with `error` (shown to the labeler, who may retry)."""
    return _finish_turn(store, turn_id, attempt, {"status": "failed", "error": str(error)[:2000] or "failed"})


def _turn_at(s, conversation_id: int, idx: int) -> ConversationTurn:
    t = s.scalar(select(ConversationTurn).where(ConversationTurn.conversation_id == conversation_id,
                                                ConversationTurn.idx == idx))
    if t is None:
        raise NotFound(f"no turn {idx}")
    return t


def get_turn(store, conversation_id: int, labeler_id: int | None, idx: int) -> ConversationTurn:
    with store.read() as s:
        _own(s, conversation_id, labeler_id)
        return _turn_at(s, conversation_id, idx)


def retry_turn(store, conversation_id: int, labeler_id: int, idx: int,
               interrupted: bool = False) -> ConversationTurn:
    """Generate a failed turn again (its attempt + 1, pending). `interrupted`: the caller found that a pending
    turn's job is unknown to the generation worker (a server restart lost it), so that turn may be retried too.
    Stale when the turn is not in such a state (another tab retried first)."""
    with store.write() as s:
        c = _own(s, conversation_id, labeler_id)
        if c.status != "open":
            raise Stale("this conversation has ended")
        t = _turn_at(s, c.id, idx)
        allowed = ("failed", "pending") if interrupted else ("failed",)
        r = s.execute(update(ConversationTurn).where(
            ConversationTurn.id == t.id, ConversationTurn.status.in_(allowed),
            ConversationTurn.attempts == t.attempts).values(
            status="pending", attempts=ConversationTurn.attempts + 1, error=None, candidates=None,
            updated_at=utcnow()).execution_options(synchronize_session=False))
        if r.rowcount != 1:
            raise Stale("this turn is not waiting for a retry (it is generating or ready)")
        _bump(s, c)
        _touch_assignment(s, c)
        s.refresh(t)
        return t


def choose(store, conversation_id: int, labeler_id: int, idx: int, choice: Any,
           expected_revision: int | None) -> ConversationTurn:
    """Record the labeler's 8-point choice on turn `idx` (1..4: A continues, 5..8: B); `chosen` is the canonical
    index of the shown side. The same choice again is not an error (returns the turn); another choice of a chosen
    turn, a turn not ready or a stale revision is Stale."""
    choice = check_choice(choice)
    with store.write() as s:
        c = _own(s, conversation_id, labeler_id)
        t = _turn_at(s, c.id, idx)
        if t.status == "chosen":
            if t.choice == choice:
                return t  # a double click or a retried request: done already
            raise Stale("this turn was already chosen (in another tab?)")
        if c.status != "open":
            raise Stale("this conversation has ended")
        if t.status != "ready":
            raise Stale("the two answers of this turn are not ready yet")
        _check_revision(c, expected_revision)
        chosen = t.shown_order[0] if choice <= 4 else t.shown_order[1]
        now = utcnow()
        r = s.execute(update(ConversationTurn).where(ConversationTurn.id == t.id, ConversationTurn.status == "ready")
                      .values(status="chosen", choice=choice, chosen=chosen, chosen_at=now, updated_at=now)
                      .execution_options(synchronize_session=False))
        if r.rowcount != 1:
            raise Stale("this turn was already chosen (in another tab?)")
        _bump(s, c)
        _touch_assignment(s, c)
        s.refresh(t)
        return t


# -- the end ------------------------------------------------------------------------------------------------------
def _close_assignment(s, a: Assignment, now) -> bool:
    """The assignment done (its item's n_done + 1): True. One that expired (or was skipped through the generic API)
    meanwhile takes its slot back if one is free; when the slot went to another labeler the assignment stays as it
    is and the item's labels do not count this conversation: False (the conversation still ends, its rating
    stored: never a dead end for the labeler)."""
    if a.status in ("expired", "skipped"):
        if not _take_slot_back(s, a):
            return False
        a.status = "assigned"
    if a.status != "assigned":
        raise Stale(f"this conversation's assignment is {a.status}")
    a.status = "done"
    a.completed_at = now
    s.execute(update(Item).where(Item.id == a.item_id).values(n_done=Item.n_done + 1)
              .execution_options(synchronize_session=False))
    return True


def end_conversation(store, conversation_id: int, labeler_id: int, rating: Any, comment: Any,
                     expected_revision: int | None) -> Conversation:
    """End the conversation with a 1-7 rating and an optional comment: stored on the conversation and as its
    assignment's judgement (likert = rating, the comment; the assignment done, so history, progress and quality
    count it), in one transaction. Needs at least one chosen turn (ValidationError). Ending again with the same
    rating and comment returns the conversation; otherwise an ended conversation is Stale. When the assignment
    expired and its slot went to another labeler, the conversation ends all the same (rating, turns and export
    kept; the judgement stored on the expired assignment) but does not count toward the item's labels."""
    rating = check_rating(rating)
    fields = validate_submission("likert", [], {"likert": rating, "comment": "" if comment is None else comment})
    comment = fields["comment"]
    with store.write() as s:
        c = _own(s, conversation_id, labeler_id)
        if c.status == "ended":
            if c.rating == rating and c.comment == comment:
                return c
            raise Stale("this conversation has ended already (in another tab?)")
        _check_revision(c, expected_revision)
        if not any(t.status == "chosen" for t in _turns(s, c.id)):
            raise ValidationError({"turns": "choose between the two answers at least once before ending"})
        seen = c.revision
        now = utcnow()
        a = s.get(Assignment, c.assignment_id)
        _close_assignment(s, a, now)  # False: not counted toward the item (its slot went to another labeler)
        r = s.execute(update(Conversation).where(Conversation.id == c.id, Conversation.revision == seen,
                                                 Conversation.status == "open")
                      .values(status="ended", rating=rating, comment=comment, ended_at=now, updated_at=now,
                              revision=Conversation.revision + 1).execution_options(synchronize_session=False))
        if r.rowcount != 1:
            raise Stale("this conversation changed in another tab; the page now shows its current state")
        version = (s.scalar(select(func.max(Judgement.version)).where(Judgement.assignment_id == a.id)) or 0) + 1
        # from the conversation's start (the assignment's time restarts with each message); clamped to what the
        # column holds (a 32-bit integer on PostgreSQL)
        spent = min(int(max(0.0, (now - c.created_at).total_seconds()) * 1000), MAX_TIME_MS)
        s.add(Judgement(assignment_id=a.id, item_id=a.item_id, labeler_id=labeler_id, version=version,
                        shown_order=a.shown_order, likert=rating, comment=comment, flags=[], time_spent_ms=spent,
                        idempotency_key=f"conversation:{c.id}:end:{version}", created_at=now))
        s.flush()
        s.refresh(c)
        return c


# -- export -------------------------------------------------------------------------------------------------------
def _export_records(store, project_id: int, include_open: bool) -> tuple[list, Counter]:
    """(conversation, turns, labeler meta) per conversation of the project; counts of what was left out."""
    left_out: Counter = Counter()
    out = []
    with store.read() as s:
        labelers = {lab.id: lab for lab in s.scalars(select(Labeler).join(
            Conversation, Conversation.labeler_id == Labeler.id).where(Conversation.project_id == project_id))}
        convs = list(s.scalars(select(Conversation).where(Conversation.project_id == project_id)
                               .order_by(Conversation.id)))
        for c in convs:
            if c.status != "ended" and not include_open:
                left_out["conversation not ended"] += 1
                continue
            lab = labelers[c.labeler_id]
            meta = judgement_meta({"labeler_public_id": lab.public_id, "labeler_attributes": lab.attributes,
                                   "comment": c.comment, "flags": []})
            out.append((c, _turns(s, c.id), meta))
    return out, left_out


def export_conversation_rows(store, project_id: int, format: str = "preference",
                             include_open: bool = False) -> tuple[list[dict], dict]:
    """Rows for training from the project's ended conversations (`include_open`: open ones too).

    "preference": one row per chosen turn, TRL's conversational preference form: `{"prompt": the context (messages,
    ending with the user's), "chosen": [{"role": "assistant", "content": ...}], "rejected": [...], "margin":
    strength_to_margin(SCALE_STRENGTHS[choice]), "strength", + the labeler columns (labeler, labeler_attributes,
    comment: the conversation's, flags)}`; turns whose two candidates are the same text are left out.
    "sft" / "messages": one row per conversation with a chosen turn: `{"messages": the conversation on its chosen
    branch (the last chosen turn's context and chosen message), + the labeler columns}`.
    Summary: {"conversations", "turns", "pairs", "rows", "left_out": {reason: count}}."""
    if format not in EXPORT_FORMATS:
        raise UserError(f"format must be one of {', '.join(EXPORT_FORMATS)} (got {format!r})")
    records, left_out = _export_records(store, project_id, include_open)
    rows: list[dict] = []
    n_turns = pairs = 0
    for _c, turns, meta in records:
        n_turns += len(turns)
        chosen = [t for t in turns if t.status == "chosen"]
        left_out["turn not chosen"] += len(turns) - len(chosen)
        if format == "preference":
            for t in chosen:
                win, lose = t.candidates[t.chosen]["text"], t.candidates[1 - t.chosen]["text"]
                if win == lose:
                    left_out["identical candidates"] += 1
                    continue
                strength = SCALE_STRENGTHS[t.choice]
                rows.append({"prompt": [dict(m) for m in t.context],
                             "chosen": [{"role": "assistant", "content": win}],
                             "rejected": [{"role": "assistant", "content": lose}],
                             "margin": strength_to_margin(strength), "strength": strength, **meta})
                pairs += 1
        elif chosen:
            last = chosen[-1]
            rows.append({"messages": [*[dict(m) for m in last.context], _chosen_message(last)], **meta})
        else:
            left_out["no chosen turn"] += 1
    summary = {"conversations": len(records), "turns": n_turns, "pairs": pairs, "rows": len(rows),
               "left_out": {k: v for k, v in left_out.items() if v}}
    return rows, summary
