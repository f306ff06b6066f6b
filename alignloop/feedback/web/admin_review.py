"""Admin review pages: the items worth a look (labels that disagree, flags, comments) and one item's page with every
label, the completions with their model (admins may see it), and the adjudication form (accept / override with
the task's answer fields / exclude, with a note). Export honours the newest decision (`review.py`, `export.py`).
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from alignloop.errors import UserError

from .. import review
from ..errors import ValidationError
from ..models import STEP_LABEL_NAMES
from .admin_projects import project_by_id
from .common import HTTPError, check_csrf, read_form, render, require_admin, store_of

router = APIRouter()
REVIEW_PAGE_ROWS = 500


def _queue(store, p, show: str) -> list[dict]:
    return review.review_queue(store.current_judgements(p.id), p.task_type, store.adjudications(p.id), show)


@router.get("/admin/p/{pid:int}/review", response_class=HTMLResponse)
def review_list(request: Request, pid: int, show: str = "attention"):
    require_admin(request)
    try:
        review.check_show(show)
    except UserError as e:
        raise HTTPError(422, str(e)) from None
    store = store_of(request)
    p = project_by_id(request, pid)
    if p.task_type == "demonstration":  # free text is reviewed one demonstration at a time (admin_demonstrations.py)
        return RedirectResponse(f"/admin/p/{p.id}/demonstrations", status_code=303)
    if p.task_type == "conversation":  # ratings of different conversations: read them whole (admin_conversations.py)
        return RedirectResponse(f"/admin/p/{p.id}/conversations", status_code=303)
    rows = _queue(store, p, show)
    return render(request, "admin_review.html", {"project": p, "rows": rows[:REVIEW_PAGE_ROWS], "total": len(rows),
                                                 "show": show})


def _labels_text(task_type: str, j: dict, letters: str) -> str:
    """One judgement's answer in words, canonical terms (A = the item's first completion)."""
    if task_type == "pairwise":
        if j["answers"]:
            return "; ".join(f"{n}: {_choice_text(a['choice'], a.get('strength'))}" for n, a in j["answers"].items())
        return _choice_text(j["choice"], j["strength"])
    if task_type == "rank":
        return ", ".join(f"{letters[i]} {r}" for i, r in enumerate(j["ranking"] or []))
    if task_type == "thumbs":
        return {1: "up", -1: "down"}.get(j["thumbs"], "–")
    if task_type == "likert":
        return str(j["likert"])
    names = {v: k for k, v in STEP_LABEL_NAMES.items()}
    return " ".join(names.get(x, "?") for x in (j["step_labels"] or []))


def _choice_text(choice: str | None, strength: str | None) -> str:
    if choice in ("a", "b"):
        return f"{choice.upper()} ({(strength or '').replace('_', ' ')})"
    return {"tie": "tie", "both_bad": "both bad"}.get(choice or "", "–")


def _item_page(request: Request, p, item_id: int, errors: dict, values: dict, status: int = 200):
    store = store_of(request)
    data = store.item_review(p.id, item_id)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for j in data["judgements"]:
        j["text"] = _labels_text(p.task_type, j, letters)
    for a in data["adjudications"]:
        a["text"] = _labels_text(p.task_type, {"answers": None, "choice": None, "strength": None, "ranking": None,
                                               "thumbs": None, "likert": None, "step_labels": None,
                                               **(a["answer"] or {})}, letters) if a["answer"] else ""
    prev_id, next_id = review.neighbours(_queue(store, p, "attention"), item_id)
    return render(request, "admin_item.html", {"project": p, "data": data, "errors": errors, "values": values,
                                               "letters": letters, "prev_id": prev_id, "next_id": next_id,
                                               "step_names": list(STEP_LABEL_NAMES)}, status)


@router.get("/admin/p/{pid:int}/items/{item_id:int}", response_class=HTMLResponse)
def item_page(request: Request, pid: int, item_id: int):
    require_admin(request)
    return _item_page(request, project_by_id(request, pid), item_id, {}, {})


@router.post("/admin/p/{pid:int}/items/{item_id:int}/adjudicate")
async def adjudicate(request: Request, pid: int, item_id: int):
    form = await read_form(request)
    return await run_in_threadpool(_adjudicate, request, form, pid, item_id)


def _adjudicate(request: Request, form: dict, pid: int, item_id: int):
    """Record the decision; a wrong override comes back with the message next to the field (422)."""
    admin = require_admin(request)
    check_csrf(request, form)
    p = project_by_id(request, pid)
    decision = str(form.get("decision", ""))
    fields = {k: v for k, v in form.items() if k not in ("csrf_token", "decision", "note")}
    try:
        store_of(request).adjudicate(p.id, item_id, admin.id, decision, fields, str(form.get("note", "")))
    except ValidationError as e:
        return _item_page(request, p, item_id, e.errors, form, 422)
    return RedirectResponse(f"/admin/p/{p.id}/items/{item_id}?saved=1", status_code=303)
