"""The admin's view of a conversation project's conversations (read-only; the labeler's side is `conversations.py`).

    GET /admin/p/<id>/conversations[?show=all|open|ended]   the newest PAGE_ROWS conversations: labeler, status,
                                                            turns chosen, rating, comment, started / ended
    GET /admin/p/<id>/conversations/<cid>                   one conversation's whole transcript: the opening, then
                                                            per turn the user's message, BOTH candidates with their
                                                            models and which was shown as A / B, the 8-point choice
                                                            and the chosen one, a failure's error and attempts, the
                                                            generation time

Unlike the labeler's view (`conversations.conversation_state`, blind), this one names the models and the canonical
order. Admins only (others 403); a conversation of another project, a missing one or an id past the database's
integers (>= 2**63) is a 404, as is a project that is not a conversation project. Every text is escaped by the
templates (autoescape; never `|safe`).
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import case, func, select

from ..conversations import SCALE_LABELS
from ..models import SCALE_STRENGTHS, Assignment, Conversation, ConversationTurn, Item, Labeler, Prompt
from .admin_projects import project_by_id
from .common import HTTPError, render, require_admin, store_of

router = APIRouter()
PAGE_ROWS = 500  # conversations listed on the page, newest first (the filter narrows it)
FILTERS = ("all", "open", "ended")
MAX_ID = 2**63  # no row has an id this large (SQLite's and PostgreSQL's integers): a 404 without asking


def _conversation_project(request: Request, pid: int):
    p = project_by_id(request, pid)
    if p.task_type != "conversation":
        raise HTTPError(404, f"project {p.name!r} is a {p.task_type} project: it has no conversations")
    return p


def conversation_rows(store, project_id: int, show: str = "all", limit: int = PAGE_ROWS) -> tuple[list[dict], int]:
    """(the newest `limit` conversations of the project passing `show`, newest first; how many pass `show`). Each:
    `id`, `labeler`, `labeler_public_id`, `status`, `turns` (all), `chosen` (turns chosen), `rating`, `comment`,
    `created_at`, `ended_at`."""
    cond = [Conversation.project_id == project_id] + ([] if show == "all" else [Conversation.status == show])
    turns = (select(ConversationTurn.conversation_id.label("cid"), func.count().label("n"),
                    func.sum(case((ConversationTurn.status == "chosen", 1), else_=0)).label("chosen"))
             .group_by(ConversationTurn.conversation_id).subquery())
    with store.read() as s:
        total = s.scalar(select(func.count()).select_from(Conversation).where(*cond)) or 0
        rows = s.execute(select(Conversation, Labeler, turns.c.n, turns.c.chosen)
                         .join(Labeler, Labeler.id == Conversation.labeler_id)
                         .outerjoin(turns, turns.c.cid == Conversation.id)
                         .where(*cond).order_by(Conversation.id.desc()).limit(limit)).all()
    return [{"id": c.id, "labeler": lab.username, "labeler_public_id": lab.public_id, "status": c.status,
             "turns": int(n or 0), "chosen": int(chosen or 0), "rating": c.rating, "comment": c.comment,
             "created_at": c.created_at, "ended_at": c.ended_at} for c, lab, n, chosen in rows], total


def _candidate(t: ConversationTurn, side: str, canonical: int) -> dict:
    cand = t.candidates[canonical] if t.candidates and canonical < len(t.candidates) else {}
    return {"side": side, "canonical": canonical, "text": cand.get("text", ""), "model": cand.get("model"),
            "params": cand.get("params") or {}, "stopped": cand.get("stopped"),
            "chosen": t.status == "chosen" and t.chosen == canonical}


def _turn(t: ConversationTurn) -> dict:
    last = t.context[-1] if t.context else {}
    out: dict[str, Any] = {
        "idx": t.idx, "status": t.status, "user": last.get("content", ""), "user_role": last.get("role", "user"),
        "candidates": None, "choice": t.choice, "choice_label": SCALE_LABELS.get(t.choice),
        "strength": SCALE_STRENGTHS.get(t.choice), "chosen": t.chosen, "error": t.error, "attempts": t.attempts,
        "gen_ms": t.gen_ms, "created_at": t.created_at, "chosen_at": t.chosen_at}
    if t.candidates:
        order = list(t.shown_order) if len(t.shown_order or []) == 2 else [0, 1]
        out["candidates"] = [_candidate(t, side, i) for side, i in zip("AB", order, strict=True)]
    return out


def conversation_detail(store, project_id: int, conversation_id: int) -> dict | None:
    """One conversation of the project with every turn as the admin sees it (models named), or None when there is
    no such conversation in this project."""
    if not 0 <= conversation_id < MAX_ID:
        return None
    with store.read() as s:
        c = s.get(Conversation, conversation_id)
        if c is None or c.project_id != project_id:
            return None
        lab = s.get(Labeler, c.labeler_id)
        a = s.get(Assignment, c.assignment_id)
        item = s.get(Item, a.item_id) if a is not None else None
        prompt = s.get(Prompt, item.prompt_id) if item is not None else None
        turns = list(s.scalars(select(ConversationTurn).where(ConversationTurn.conversation_id == c.id)
                               .order_by(ConversationTurn.idx)))
    first = turns[0].context if turns else []
    return {"id": c.id, "status": c.status, "rating": c.rating, "comment": c.comment, "revision": c.revision,
            "created_at": c.created_at, "ended_at": c.ended_at, "labeler": lab.username,
            "labeler_public_id": lab.public_id, "item_id": item.id if item is not None else None,
            "open_start": bool(prompt is not None and (prompt.meta or {}).get("open_start")),
            "opening": [{"role": m.get("role"), "content": m.get("content")} for m in first[:-1]],
            "turns": [_turn(t) for t in turns], "chosen": sum(t.status == "chosen" for t in turns)}


@router.get("/admin/p/{pid:int}/conversations", response_class=HTMLResponse)
def conversation_list(request: Request, pid: int, show: str = "all"):
    require_admin(request)
    p = _conversation_project(request, pid)
    if show not in FILTERS:
        raise HTTPError(422, f"show: one of {', '.join(FILTERS)}")
    rows, total = conversation_rows(store_of(request), p.id, show)
    return render(request, "admin_conversations.html", {"project": p, "rows": rows, "total": total, "show": show,
                                                         "filters": FILTERS})


@router.get("/admin/p/{pid:int}/conversations/{cid:int}", response_class=HTMLResponse)
def conversation_page(request: Request, pid: int, cid: int):
    require_admin(request)
    p = _conversation_project(request, pid)
    c = conversation_detail(store_of(request), p.id, cid)
    if c is None:
        raise HTTPError(404, f"no conversation {cid} in project {p.name!r}")
    return render(request, "admin_conversation.html", {"project": p, "c": c, "scale": SCALE_LABELS})
