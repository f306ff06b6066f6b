"""Admin pages (admins only: others get 403): projects and labelers (adding a labeler, setting a labeler's
attributes, deactivating and reactivating one, resetting a password), a project's quality dashboard, and the export
download. Creating and editing projects, members and imports are in `admin_projects.py`, review and adjudication in
`admin_review.py`, the review of demonstrations in `admin_demonstrations.py` and the conversations' transcripts in
`admin_conversations.py` (both included here). The statistics and export modules (numpy, scipy, scikit-learn;
torch through `alignloop.data`) are loaded when an admin first needs them, not at server start-up."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from alignloop.errors import UserError

from ..projects import parse_attributes
from ..questions import questions_of
from . import admin_conversations, admin_demonstrations, admin_projects, admin_review
from .common import HTTPError, check_csrf, project_or_404, read_form, render, require_admin, store_of

router = APIRouter()
router.include_router(admin_projects.router)
router.include_router(admin_review.router)
router.include_router(admin_demonstrations.router)
router.include_router(admin_conversations.router)


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


def _on_labeler(request: Request, form: dict, lid: int):
    """An admin's form about labeler `lid`: (the admin, the store) once the admin, the CSRF token and the labeler
    are checked (403 / 404 otherwise)."""
    admin = require_admin(request)
    check_csrf(request, form)
    store = store_of(request)
    if store.get_labeler(lid) is None:
        raise HTTPError(404, f"no labeler {lid}")
    return admin, store


@router.post("/admin/labelers/{lid}/attributes")
async def set_attributes(request: Request, lid: int):
    form = await read_form(request)
    return await run_in_threadpool(_set_attributes, request, form, lid)


def _set_attributes(request: Request, form: dict, lid: int):
    """Replace a labeler's attributes with the form's lines (`name=value` each; empty: none)."""
    _, store = _on_labeler(request, form, lid)
    text = str(form.get("attributes", ""))
    try:
        store.set_labeler_attributes(lid, parse_attributes(text.splitlines(), "attributes:"))
    except UserError as e:  # shown next to that labeler's form, the text kept
        return _admin_home(request, {f"attributes_{lid}": str(e)}, {f"attributes_{lid}": text}, 422)
    return RedirectResponse("/admin", status_code=303)


@router.post("/admin/labelers/{lid:int}/active")
async def set_active(request: Request, lid: int):
    form = await read_form(request)
    return await run_in_threadpool(_set_active, request, form, lid)


def _set_active(request: Request, form: dict, lid: int):
    """Deactivate (`active=0`: signed out everywhere at once, `Store.set_active`) or reactivate a labeler."""
    admin, store = _on_labeler(request, form, lid)
    active = str(form.get("active", "")) == "1"
    if lid == admin.id and not active:
        return _admin_home(request, {f"labeler_{lid}": "you cannot deactivate yourself"}, {}, 422)
    store.set_active(lid, active)
    return RedirectResponse(f"/admin#labeler-{lid}", status_code=303)


@router.post("/admin/labelers/{lid:int}/password")
async def reset_password(request: Request, lid: int):
    form = await read_form(request)
    return await run_in_threadpool(_reset_password, request, form, lid)


def _reset_password(request: Request, form: dict, lid: int):
    """Set a new password (the password rules apply; the labeler's sessions end, `Store.set_password`)."""
    _, store = _on_labeler(request, form, lid)
    try:
        store.set_password(lid, str(form.get("password", "")))
    except UserError as e:
        return _admin_home(request, {f"labeler_{lid}": str(e)}, {}, 422)
    return _admin_home(request, {}, {"notice": f"password of labeler {store.get_labeler(lid).username} reset"})


@router.get("/admin/p/{name}", response_class=HTMLResponse)
def dashboard(request: Request, name: str):
    require_admin(request)
    from ..dashboard import dashboard_data  # noqa: PLC0415 - heavy (numpy, scipy, scikit-learn): off start-up

    store = store_of(request)
    p = project_or_404(store, name)
    return render(request, "dashboard.html", {"project": p, "questions": questions_of(p.settings),
                                              **dashboard_data(store, p)})


def _int_param(name: str, value: str | None, default: int | None) -> int | None:
    """A whole-number query parameter of the export form: empty or absent -> `default` (the form's cleared field
    means the project's setting); anything else but ASCII digits -> 400 naming the field (not FastAPI's JSON 422)."""
    value = (value or "").strip()
    if not value:
        return default
    if value.isascii() and value.isdigit() and len(value) <= 9:
        return int(value)
    raise HTTPError(400, f"export {name} {value[:40]!r}: a whole number (or leave it empty)")


def _bool_param(name: str, value: str | None, default: bool) -> bool:
    """A yes/no query parameter (true/false, 1/0, yes/no, on/off); empty or absent -> `default`; else 400."""
    value = (value or "").strip().lower()
    if not value:
        return default
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise HTTPError(400, f"export {name} {value[:40]!r}: true or false")


@router.get("/admin/p/{name}/export")
def export(request: Request, name: str, format: str | None = None, mode: str = "consensus",
           consensus: str = "majority", ties: str = "drop", both_bad: str = "drop",
           exclude_flagged: str | None = None, include_gold: str | None = None, likert_threshold: str | None = None,
           criterion: str | None = None, labelers: str = "all", min_labels: str | None = None,
           allow_empty: str | None = None, review: str = "not_rejected"):
    """The export as a JSONL download (parameters: README "Export"). An export of 0 rows is refused with a page
    that says why (422) unless `allow_empty`; the counts are in the `X-Export-Summary` header (JSON). The numbers
    and yes/no parameters are read here: an empty one (a cleared form field) takes its default (`min_labels`: the
    project's setting), a malformed one is the app's 400 page naming it."""
    require_admin(request)
    min_labels = _int_param("min_labels", min_labels, None)
    likert_threshold = _int_param("likert_threshold", likert_threshold, 5)
    exclude_flagged = _bool_param("exclude_flagged", exclude_flagged, True)
    include_gold = _bool_param("include_gold", include_gold, False)
    allow_empty = _bool_param("allow_empty", allow_empty, False)
    from .. import export as export_mod  # noqa: PLC0415 - heavy (scipy, scikit-learn): off start-up

    store = store_of(request)
    p = project_or_404(store, name)
    format = format or export_mod.default_format(p.task_type)  # by the task type when not given
    if p.task_type in export_mod.PROMPT_TASKS:  # demonstrations, conversations: formats of their own
        try:
            rows, summary = export_mod.export_prompt_task(store, p, format, review)
        except UserError as e:
            raise HTTPError(400, str(e)) from None
        if not rows and not allow_empty:
            raise HTTPError(422, export_mod.prompt_task_empty_message(p, summary)
                            + " (add allow_empty=true to download it anyway)")
        return _jsonl_download(rows, summary, f"{p.name}-{format}.jsonl")
    try:
        opts = export_mod.project_options(p, format=format, mode=mode, consensus=consensus, ties=ties,
                                          both_bad=both_bad, exclude_flagged=exclude_flagged,
                                          include_gold=include_gold, likert_threshold=likert_threshold,
                                          criterion=criterion or None, labelers=labelers, min_labels=min_labels)
        rows, summary = export_mod.export_records(store, p.id, opts)
    except UserError as e:
        raise HTTPError(400, str(e)) from None
    if not rows and not allow_empty:
        raise HTTPError(422, export_mod.empty_message(summary) + " (add allow_empty=true to download it anyway)")
    suffix = f"-{criterion}" if criterion else ""  # a checked question name (or "all"): a safe file name part
    return _jsonl_download(rows, summary, f"{p.name}-{format}{suffix}.jsonl")


def _jsonl_download(rows: list[dict], summary: dict, filename: str) -> Response:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return Response(body, media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="{filename}"',
        "X-Export-Summary": json.dumps(summary, default=str, ensure_ascii=True)})

