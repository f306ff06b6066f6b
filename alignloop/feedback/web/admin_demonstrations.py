"""The admin's review of demonstrations: every current demonstration of a project (the prompt, the sampled answer
when the labeler edited one, the text, the labeler, its version, its newest review), filtered by review state, and
accept / reject with a note (`demonstrations.review_demonstration`; the labeler reads the note on their history
page). Exports leave rejected demonstrations out by default.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from .. import demonstrations
from ..errors import NotFound, ValidationError
from .admin_projects import project_by_id
from .common import HTTPError, check_csrf, read_form, render, require_admin, store_of

router = APIRouter()
PAGE_ROWS = 500  # demonstrations listed on the page (the newest review state filter narrows it)


def _demonstration_project(request: Request, pid: int):
    p = project_by_id(request, pid)
    if p.task_type != "demonstration":
        raise HTTPError(404, f"project {p.name!r} is a {p.task_type} project: it has no demonstrations")
    return p


def _page(request: Request, p, show: str, errors: dict | None = None, status: int = 200):
    if show not in demonstrations.REVIEW_FILTERS:
        raise HTTPError(422, f"show: one of {', '.join(demonstrations.REVIEW_FILTERS)}")
    rows = demonstrations.demonstration_records(store_of(request), p.id, show)
    rows.reverse()  # newest first
    return render(request, "admin_demonstrations.html", {
        "project": p, "rows": rows[:PAGE_ROWS], "total": len(rows), "show": show, "errors": errors or {},
        "filters": demonstrations.REVIEW_FILTERS}, status)


@router.get("/admin/p/{pid:int}/demonstrations", response_class=HTMLResponse)
def demonstration_list(request: Request, pid: int, show: str = "pending"):
    require_admin(request)
    return _page(request, _demonstration_project(request, pid), show)


@router.post("/admin/p/{pid:int}/demonstrations/{jid:int}/review")
async def review(request: Request, pid: int, jid: int):
    form = await read_form(request)
    return await run_in_threadpool(_review, request, form, pid, jid)


def _review(request: Request, form: dict, pid: int, jid: int):
    """Accept or reject one demonstration (a judgement version) with a note; back to the list it was on."""
    admin = require_admin(request)
    check_csrf(request, form)
    p = _demonstration_project(request, pid)
    show = str(form.get("show") or "pending")
    if show not in demonstrations.REVIEW_FILTERS:
        show = "pending"
    try:
        demonstrations.review_demonstration(store_of(request), p.id, jid, admin.id, str(form.get("decision", "")),
                                            str(form.get("note", "")))
    except ValidationError as e:
        return _page(request, p, show, {jid: "; ".join(f"{k}: {v}" for k, v in e.errors.items())}, 422)
    except NotFound:
        raise HTTPError(404, f"no demonstration {jid} in project {p.name!r}") from None
    return RedirectResponse(f"/admin/p/{p.id}/demonstrations?show={show}#d{jid}", status_code=303)
