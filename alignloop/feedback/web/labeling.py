"""The labeling pages (server-rendered; every action is a form POST followed by a redirect, so they work without
JavaScript): the project list, guidelines, the labeling form, submit, skip, undo, "my judgements" and editing one.
A GET changes nothing: taking an item is the "Start" / "Next item" form's POST (or a submit's or skip's). What a
labeler's page gets of an item is blind: the texts (`Store.item_view`) and a `BlindAssignment`, nothing of the
completions' models, gold or item ids.

A labeler sees and changes only their own assignments: another's gives 404, like a missing one.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from ..assignment import UndoneAlready, UndoRefused
from ..demonstrations import reviews_of
from ..errors import NotFound, ValidationError
from ..models import STEP_LABEL_NAMES
from ..projects import DEFAULT_FLAGS
from ..questions import questions_of
from .common import HTTPError, check_csrf, project_or_404, read_form, render, require_user, store_of

router = APIRouter()


@dataclass(frozen=True, slots=True)
class BlindAssignment:
    """What a labeler's page may know of an assignment: no item id (it tells the order of import), no gold flag."""
    id: int
    shown_order: list
    status: str
    labeler_id: int


def label_context(request: Request, project, assignment, errors=None, values=None, edit=False) -> dict:
    """What label.html needs: the item in the labeler's order (blind: `Store.item_view`, `BlindAssignment`),
    progress, flags, a fresh idempotency key."""
    store = store_of(request)
    view = store.item_view(assignment.item, assignment.shown_order)
    blind = BlindAssignment(assignment.id, assignment.shown_order, assignment.status, assignment.labeler_id)
    return {"project": project, "assignment": blind, "view": view, "errors": errors or {},
            "values": values or {}, "progress": store.progress(project.id, assignment.labeler_id),
            "flags": project.settings.get("flags", DEFAULT_FLAGS), "questions": questions_of(project.settings),
            "edit": edit, "undo_of": store.last_action(project.id, assignment.labeler_id),
            "idempotency_key": uuid.uuid4().hex, "shown_at": int(time.time() * 1000),
            "k": len(view["completions"])}


def undo_of_field(value: Any, field: str = "undo_of") -> int | None:
    """An optional assignment id from a form (ASCII digits) or JSON (an int); else HTTPError 422 naming it."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 63:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        return int(value)
    raise HTTPError(422, f"{field}: the id of the assignment to undo (a whole number)", {field: "a whole number"})


def values_from_judgement(j, shown_order: list[int]) -> dict:
    """A stored judgement as the form's values (screen terms), to edit it (several questions: `choice_<name>`,
    `strength_<name>` per answer)."""
    v: dict[str, Any] = {"comment": j.comment or "", "flags": j.flags or []}
    if j.text is not None:  # a demonstration: the response as written
        v["text"] = j.text
    for suffix, answer in ({f"_{n}": a for n, a in j.answers.items()} if j.answers else {"": {
            "choice": j.choice, "strength": j.strength, "picked_position": j.picked_position}}).items():
        if answer["choice"] in ("tie", "both_bad"):
            v[f"choice{suffix}"] = answer["choice"]
        elif answer["choice"] in ("a", "b"):
            v[f"choice{suffix}"] = "left" if answer["picked_position"] == 0 else "right"
            v[f"strength{suffix}"] = answer["strength"]
    if j.ranking:
        for pos, canon in enumerate(shown_order):
            v[f"rank_{pos}"] = str(j.ranking[canon])
    if j.thumbs is not None:
        v["thumbs"] = "up" if j.thumbs == 1 else "down"
    if j.likert is not None:
        v["likert"] = str(j.likert)
    if j.step_labels:
        names = {label: name for name, label in STEP_LABEL_NAMES.items()}
        for pos, canon in enumerate(shown_order):
            v[f"step_{pos}"] = names[j.step_labels[canon]]
    return v


SHOWN_AT_MIN_MS = 946_684_800_000  # 2000-01-01: `shown_at` is the server's own clock, written into the form
SHOWN_AT_SLACK_MS = 24 * 3600 * 1000  # ... so never more than this ahead of it


def _shown_at(form: dict) -> datetime | None:
    """When the form was shown (its `shown_at` field, ms since the epoch), as naive UTC; None when absent.
    ValidationError (422 naming the field) unless it is ASCII digits within [2000-01-01, now + 1 day]: a 30-digit
    number or "٣" is refused, not parsed into an overflow."""
    v = form.get("shown_at")
    if v is None or v == "":
        return None
    now_ms = int(time.time() * 1000)
    if not (isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 15
            and SHOWN_AT_MIN_MS <= int(v) <= now_ms + SHOWN_AT_SLACK_MS):
        raise ValidationError({"shown_at": "when the form was shown (milliseconds since 1970, as the page wrote "
                                           "it); reload the page"})
    return datetime.fromtimestamp(int(v) / 1000, tz=UTC).replace(tzinfo=None)


@router.get("/", response_class=HTMLResponse)
def home(request: Request):
    user = require_user(request)
    store = store_of(request)
    rows = [(p, store.progress(p.id, user.id)) for p in store.list_projects() if store.may_label(p.id, user.id)]
    return render(request, "projects.html", {"rows": rows})


@router.get("/p/{name}/guidelines", response_class=HTMLResponse)
def guidelines(request: Request, name: str):
    user = require_user(request)
    return render(request, "guidelines.html", {"project": project_or_404(store_of(request), name, user)})


@router.get("/p/{name}/label", response_class=HTMLResponse)
def label(request: Request, name: str):
    """The labeler's open assignment; else a page whose "Start" / "Next item" button POSTs for one (a GET takes
    nothing: an image or link on another page cannot hold the labeler's slots); else "all done"."""
    user = require_user(request)
    store = store_of(request)
    p = project_or_404(store, name, user)
    if p.task_type == "conversation":  # a conversation has a page of its own (web/conversations.py)
        return RedirectResponse(f"/p/{p.url_key}/converse", status_code=303)
    reopened = store.reopened_assignment(p.id, user.id)  # undo reopened a judgement: shown first, prefilled
    if reopened is not None:
        return _edit_page(request, store, p, reopened)
    a = store.open_assignment(p.id, user.id)
    if a is not None:
        return render(request, "label.html", label_context(request, p, a))
    progress = store.progress(p.id, user.id)
    ctx = {"project": p, "progress": progress, "undo_of": store.last_action(p.id, user.id)}
    return render(request, "start.html" if progress["remaining"] else "done.html", ctx)


@router.post("/p/{name}/next")
async def take_next(request: Request, name: str):
    form = await read_form(request)
    return await run_in_threadpool(_take_next, request, form, name)


def _take_next(request: Request, form: dict, name: str):
    user = require_user(request)
    check_csrf(request, form)
    store = store_of(request)
    p = project_or_404(store, name, user)
    if p.task_type == "conversation":  # taking an item there starts a conversation: its own page does
        return RedirectResponse(f"/p/{p.url_key}/converse", status_code=303)
    store.next_assignment(p.id, user.id)  # None: nothing left; the label page then says so
    return RedirectResponse(f"/p/{p.url_key}/label", status_code=303)


@router.post("/p/{name}/label/{aid}")
async def submit(request: Request, name: str, aid: int):
    form = await read_form(request)
    return await run_in_threadpool(_submit, request, form, name, aid)


def _submit(request: Request, form: dict, name: str, aid: int):
    user = require_user(request)
    check_csrf(request, form)
    store = store_of(request)
    p = project_or_404(store, name, user)
    a = store.get_assignment(aid, labeler_id=user.id)
    if a.project_id != p.id:
        raise NotFound("no such assignment")
    edit = a.status in ("done", "reopened")
    try:
        store.submit(aid, user.id, form, str(form.get("idempotency_key", "")), started_at=_shown_at(form))
    except ValidationError as e:
        ctx = label_context(request, p, a, errors=e.errors, values=form, edit=edit)
        ctx["idempotency_key"] = form.get("idempotency_key") or ctx["idempotency_key"]
        return render(request, "label.html", ctx, status=422)
    if a.status == "done":  # an edit from "My judgements": back there; one reopened by undo: on with labeling
        return RedirectResponse(f"/p/{p.url_key}/history", status_code=303)
    store.next_assignment(p.id, user.id)  # a POST: on to the next item (the label page shows it)
    return RedirectResponse(f"/p/{p.url_key}/label", status_code=303)


@router.post("/p/{name}/skip/{aid}")
async def skip(request: Request, name: str, aid: int):
    form = await read_form(request)
    return await run_in_threadpool(_skip, request, form, name, aid)


def _skip(request: Request, form: dict, name: str, aid: int):
    user = require_user(request)
    check_csrf(request, form)
    store = store_of(request)
    p = project_or_404(store, name, user)
    store.skip(aid, user.id)
    store.next_assignment(p.id, user.id)
    return RedirectResponse(f"/p/{p.url_key}/label", status_code=303)


@router.post("/p/{name}/undo")
async def undo(request: Request, name: str):
    form = await read_form(request)
    return await run_in_threadpool(_undo, request, form, name)


def _undo(request: Request, form: dict, name: str):
    """Undo the labeler's last judgement (reopened: the label page shows it prefilled) or skip (the item back, if
    a slot is free); 409 with the reason otherwise."""
    user = require_user(request)
    check_csrf(request, form)
    store = store_of(request)
    p = project_or_404(store, name, user)
    try:  # the form names what it undoes (`undo_of`): a second click of the same button changes nothing
        store.undo(p.id, user.id, undo_of_field(form.get("undo_of")))
    except UndoneAlready:
        pass  # the page shows where the first click left things
    except UndoRefused as e:
        raise HTTPError(409, str(e)) from None
    return RedirectResponse(f"/p/{p.url_key}/label", status_code=303)


# What "My judgements" shows of a judgement: its answer and when, nothing of the item (no id, no gold flag).
HISTORY_FIELDS = ("assignment_id", "version", "choice", "strength", "picked_position", "ranking", "thumbs", "likert",
                  "flags", "step_labels", "comment", "created_at", "text")


@router.get("/p/{name}/history", response_class=HTMLResponse)
def history(request: Request, name: str):
    user = require_user(request)
    store = store_of(request)
    p = project_or_404(store, name, user)
    history = store.labeler_history(p.id, user.id)
    # a demonstration's review (accept / reject and the admin's note) is the labeler's to read
    reviews = reviews_of(store, [r["judgement"].id for r in history]) if p.task_type == "demonstration" else {}
    rows = [{"judgement": {f: getattr(r["judgement"], f) for f in HISTORY_FIELDS}, "prompt": r.get("prompt", ""),
             "review": reviews.get(r["judgement"].id)} for r in history]
    return render(request, "history.html", {"project": p, "rows": rows, "progress": store.progress(p.id, user.id)})


@router.get("/p/{name}/edit/{aid}", response_class=HTMLResponse)
def edit(request: Request, name: str, aid: int):
    user = require_user(request)
    store = store_of(request)
    p = project_or_404(store, name, user)
    a = store.get_assignment(aid, labeler_id=user.id)
    if a.project_id != p.id:
        raise NotFound("nothing to edit here")
    if p.task_type == "conversation":  # its turns are the data: an ended conversation is not edited
        raise HTTPError(409, "a conversation cannot be edited once it has ended; start a new one")
    return _edit_page(request, store, p, a)


def _edit_page(request: Request, store, p, a):
    """The label page for a judged assignment, prefilled with its current judgement (a submission: version + 1)."""
    j = store.current_judgement(a.id)
    if j is None:
        raise NotFound("nothing to edit here")
    ctx = label_context(request, p, a, values=values_from_judgement(j, a.shown_order), edit=True)
    ctx["version"] = j.version
    return render(request, "label.html", ctx)
