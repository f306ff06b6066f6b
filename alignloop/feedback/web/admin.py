"""Admin pages (admins only: others get 403): projects and labelers (adding a labeler, setting a labeler's
attributes), a project's quality dashboard, and the export download. The statistics and export modules (numpy,
scipy, scikit-learn; torch through `alignloop.data`) are loaded when an admin first needs them, not at server
start-up."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from alignloop.errors import UserError

from ..projects import parse_attributes
from ..questions import questions_of
from .common import HTTPError, check_csrf, project_or_404, read_form, render, require_admin, store_of

router = APIRouter()


def attributes_text(attributes: dict) -> str:
    """A labeler's attributes as the form shows them: one `name=value` per line."""
    return "\n".join(f"{k}={v}" for k, v in (attributes or {}).items())


def _admin_home(request: Request, errors: dict, values: dict, status: int = 200):
    store = store_of(request)
    projects = [(p, store.project_summary(p.id)) for p in store.list_projects()]
    labelers = [(lab, values.get(f"attributes_{lab.id}", attributes_text(lab.attributes)))
                for lab in store.list_labelers()]
    return render(request, "admin.html", {"projects": projects, "labelers": labelers, "errors": errors,
                                          "values": values}, status)


@router.get("/admin", response_class=HTMLResponse)
def admin_home(request: Request):
    require_admin(request)
    return _admin_home(request, {}, {})


@router.post("/admin/labelers")
async def add_labeler(request: Request):
    form = await read_form(request)
    return await run_in_threadpool(_add_labeler, request, form)


def _add_labeler(request: Request, form: dict):
    require_admin(request)
    check_csrf(request, form)
    text = str(form.get("attributes", ""))
    try:
        store_of(request).add_labeler(str(form.get("username", "")).strip(), str(form.get("password", "")),
                                      str(form.get("role", "labeler")), parse_attributes(text.splitlines(),
                                                                                         "attributes:"))
    except UserError as e:  # shown on the form
        return _admin_home(request, {"labeler": str(e)}, {"username": form.get("username", ""),
                                                          "attributes": text}, 422)
    return RedirectResponse("/admin", status_code=303)


@router.post("/admin/labelers/{lid}/attributes")
async def set_attributes(request: Request, lid: int):
    form = await read_form(request)
    return await run_in_threadpool(_set_attributes, request, form, lid)


def _set_attributes(request: Request, form: dict, lid: int):
    """Replace a labeler's attributes with the form's lines (`name=value` each; empty: none)."""
    require_admin(request)
    check_csrf(request, form)
    store = store_of(request)
    if store.get_labeler(lid) is None:
        raise HTTPError(404, f"no labeler {lid}")
    text = str(form.get("attributes", ""))
    try:
        store.set_labeler_attributes(lid, parse_attributes(text.splitlines(), "attributes:"))
    except UserError as e:  # shown next to that labeler's form, the text kept
        return _admin_home(request, {f"attributes_{lid}": str(e)}, {f"attributes_{lid}": text}, 422)
    return RedirectResponse("/admin", status_code=303)


@router.get("/admin/p/{name}", response_class=HTMLResponse)
def dashboard(request: Request, name: str):
    require_admin(request)
    from ..dashboard import dashboard_data  # noqa: PLC0415 - heavy (numpy, scipy, scikit-learn): off start-up

    store = store_of(request)
    p = project_or_404(store, name)
    return render(request, "dashboard.html", {"project": p, "questions": questions_of(p.settings),
                                              **dashboard_data(store, p)})


@router.get("/admin/p/{name}/export")
def export(request: Request, name: str, format: str | None = None, mode: str = "consensus",
           consensus: str = "majority", ties: str = "drop", both_bad: str = "drop",
           exclude_flagged: bool = True, include_gold: bool = False, likert_threshold: int = 5,
           criterion: str | None = None):
    require_admin(request)
    from .. import export as export_mod  # noqa: PLC0415 - heavy (scipy, scikit-learn): off start-up

    store = store_of(request)
    p = project_or_404(store, name)
    format = format or ("steps" if p.task_type == "steps" else "preference")  # by the task type when not given
    opts = export_mod.project_options(p, format=format, mode=mode, consensus=consensus, ties=ties, both_bad=both_bad,
                                      exclude_flagged=exclude_flagged, include_gold=include_gold,
                                      likert_threshold=likert_threshold, criterion=criterion or None)
    try:
        rows, _summary = export_mod.export_records(store, p.id, opts)
    except UserError as e:
        raise HTTPError(400, str(e)) from None
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    suffix = f"-{criterion}" if criterion else ""  # a checked question name (or "all"): a safe file name part
    return Response(body, media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="{p.name}-{format}{suffix}.jsonl"'})
