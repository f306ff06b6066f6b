"""Admin pages for projects (admins only: others get 403; every change is a CSRF-checked form POST, then a 303):
creating a project, editing its guidelines and settings after creation, its members (who may label it when its
access is "members"), and importing a JSONL file into it (the CLI's import code: `importing.rows_from_bytes` and
`Store.import_records`).

Projects are addressed by id here (`/admin/p/<id>/settings`): a name never has to be told from an id. Settings are
checked in one place, `projects.check_settings`; a mistake comes back as the form with the message next to the
field and everything typed kept (422).
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from alignloop.errors import UserError

from ..errors import NotFound
from ..models import TASK_TYPES
from ..projects import ACCESS_MODES, default_min_labels
from .common import HTTPError, check_csrf, parse_json, read_form, render, require_admin, store_of

router = APIRouter()

# The settings the forms show as their own fields; every other setting is edited as JSON ("more settings").
FORM_SETTINGS = ("access", "allow_ties", "strength_required", "min_labels", "assignment_timeout_s")


def project_by_id(request: Request, pid: int):
    """The project with this id, or 404."""
    try:
        return store_of(request).get_project(int(pid))
    except (NotFound, UserError):
        raise HTTPError(404, f"no project with id {pid}") from None


def _whole_number(text: str, field: str, errors: dict) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        errors[field] = f"{field}: a whole number (digits 0-9), got {text!r}"
        return None
    return int(text)


def settings_from_form(form: dict, errors: dict) -> dict:
    """The project settings a create or edit form gives: its own fields plus the "more settings" JSON object.
    Problems go into `errors` keyed by field; the result is checked by `check_settings` afterwards."""
    more_text = str(form.get("more_settings", "")).strip()
    settings: dict[str, Any] = {}
    if more_text:
        try:  # common.parse_json: deep nesting, a huge number or a lone surrogate is a message, not a 500
            settings = parse_json(more_text, "more settings")
        except HTTPError as e:
            errors["more_settings"] = e.message
            return {}
        if not isinstance(settings, dict):
            errors["more_settings"] = "more settings: a JSON object ({...})"
            return {}
        clash = sorted(set(settings) & set(FORM_SETTINGS))
        if clash:
            errors["more_settings"] = f"more settings: set {clash[0]} with its own field above, not here"
    settings["access"] = str(form.get("access", "all"))
    settings["allow_ties"] = form.get("allow_ties") == "on"
    settings["strength_required"] = form.get("strength_required") == "on"
    for name in ("min_labels", "assignment_timeout_s"):
        n = _whole_number(str(form.get(name, "")), name, errors)
        if n is not None:
            settings[name] = n
    return settings


def form_values(p=None) -> dict:
    """The settings form's values for an existing project `p` (or a new one's defaults)."""
    settings = dict(p.settings) if p is not None else {}
    more = {k: v for k, v in settings.items() if k not in FORM_SETTINGS and k not in ("gold_seed", "flags")}
    if p is not None and p.task_type == "likert" and "flags" in settings:
        more["flags"] = settings["flags"]
    return {"access": settings.get("access", "all"), "allow_ties": settings.get("allow_ties", True),
            "strength_required": settings.get("strength_required", True),
            "min_labels": str(settings.get("min_labels", "")),
            "assignment_timeout_s": str(settings.get("assignment_timeout_s", "")),
            "more_settings": json.dumps(more, indent=2, ensure_ascii=False) if more else "",
            "guidelines": p.guidelines_md if p is not None else ""}


def _posted_values(form: dict) -> dict:
    """What was typed, to show again with the errors."""
    return {**{k: str(form.get(k, "")) for k in ("name", "task_type", "overlap_k", "gold_rate", "guidelines",
                                                 "min_labels", "assignment_timeout_s", "more_settings", "access")},
            "allow_ties": form.get("allow_ties") == "on", "strength_required": form.get("strength_required") == "on"}


def _form_page(request: Request, template: str, ctx: dict, status: int = 200):
    return render(request, template, {"task_types": TASK_TYPES, "access_modes": ACCESS_MODES, **ctx}, status)


# -- create -------------------------------------------------------------------------------------------------------
@router.get("/admin/projects/new", response_class=HTMLResponse)
def new_project_page(request: Request):
    require_admin(request)
    values = {**form_values(), "task_type": "pairwise", "overlap_k": "3", "gold_rate": "0"}
    return _form_page(request, "admin_project_new.html", {"values": values, "errors": {}})


@router.post("/admin/projects")
async def create_project(request: Request):
    form = await read_form(request)
    return await run_in_threadpool(_create_project, request, form)


def _create_project(request: Request, form: dict):
    require_admin(request)
    check_csrf(request, form)
    errors: dict[str, str] = {}
    settings = settings_from_form(form, errors)
    k = _whole_number(str(form.get("overlap_k", "")), "overlap_k", errors)
    if k is None and "overlap_k" not in errors:
        errors["overlap_k"] = "overlap_k: how many labelers see each item (a whole number)"
    try:
        gold_rate = float(str(form.get("gold_rate", "0")).strip() or "0")
    except ValueError:
        errors["gold_rate"] = f"gold_rate: a number in [0, 1), got {form.get('gold_rate')!r}"
        gold_rate = 0.0
    if not errors:
        try:
            p = store_of(request).create_project(str(form.get("name", "")).strip(), str(form.get("task_type", "")),
                                                 str(form.get("guidelines", "")), k, gold_rate, settings)
        except UserError as e:
            errors["project"] = str(e)
        else:
            return RedirectResponse(f"/admin/p/{p.id}/settings?created=1", status_code=303)
    return _form_page(request, "admin_project_new.html", {"values": _posted_values(form), "errors": errors}, 422)


# -- settings and guidelines ----------------------------------------------------------------------------------------
@router.get("/admin/p/{pid:int}/settings", response_class=HTMLResponse)
def settings_page(request: Request, pid: int, created: int = 0, saved: int = 0):
    require_admin(request)
    p = project_by_id(request, pid)
    return _form_page(request, "admin_settings.html", {
        "project": p, "values": form_values(p), "errors": {}, "created": created, "saved": saved,
        "default_min_labels": default_min_labels(p.overlap_k)})


@router.post("/admin/p/{pid:int}/settings")
async def save_settings(request: Request, pid: int):
    form = await read_form(request)
    return await run_in_threadpool(_save_settings, request, form, pid)


def _save_settings(request: Request, form: dict, pid: int):
    require_admin(request)
    check_csrf(request, form)
    p = project_by_id(request, pid)
    errors: dict[str, str] = {}
    settings = settings_from_form(form, errors)
    if not errors:
        if "flags" in p.settings:  # shown (as JSON) only on a Likert project's form: kept unless given there
            settings.setdefault("flags", p.settings["flags"])
        try:
            store_of(request).update_project(p.id, guidelines_md=str(form.get("guidelines", "")), settings=settings)
        except UserError as e:
            errors["settings"] = str(e)
        else:
            return RedirectResponse(f"/admin/p/{p.id}/settings?saved=1", status_code=303)
    return _form_page(request, "admin_settings.html", {
        "project": p, "values": _posted_values(form), "errors": errors, "created": 0, "saved": 0,
        "default_min_labels": default_min_labels(p.overlap_k)}, 422)


# -- members --------------------------------------------------------------------------------------------------------
@router.get("/admin/p/{pid:int}/members", response_class=HTMLResponse)
def members_page(request: Request, pid: int):
    require_admin(request)
    return _members(request, project_by_id(request, pid), {})


def _members(request: Request, p, errors: dict, status: int = 200):
    store = store_of(request)
    people = [lab for lab in store.list_labelers() if lab.kind == "human"]
    return render(request, "admin_members.html", {"project": p, "people": people, "errors": errors,
                                                  "members": store.project_members(p.id),
                                                  "access": p.settings.get("access", "all")}, status)


@router.post("/admin/p/{pid:int}/members")
async def save_members(request: Request, pid: int):
    form = await request.form()
    fields = {"csrf_token": form.get("csrf_token"), "access": form.get("access", "all"),
              "members": form.getlist("member")}
    return await run_in_threadpool(_save_members, request, fields, pid)


def _save_members(request: Request, form: dict, pid: int):
    """The checked labelers become the members; the access select sets `settings.access`."""
    require_admin(request)
    check_csrf(request, form)
    store = store_of(request)
    p = project_by_id(request, pid)
    ids = []
    for v in form["members"]:
        if not (isinstance(v, str) and v.isascii() and v.isdigit() and len(v) < 12):
            return _members(request, p, {"members": f"members: labeler ids, got {v!r}"}, 422)
        ids.append(int(v))
    if form["access"] not in ACCESS_MODES:
        return _members(request, p, {"access": f"access: one of {', '.join(ACCESS_MODES)}"}, 422)
    try:
        store.set_project_members(p.id, ids)
        if p.settings.get("access", "all") != form["access"]:
            store.update_project(p.id, settings={**p.settings, "access": form["access"]})
    except UserError as e:
        return _members(request, p, {"members": str(e)}, 422)
    return RedirectResponse(f"/admin/p/{p.id}/members", status_code=303)


# -- import ---------------------------------------------------------------------------------------------------------
@router.get("/admin/p/{pid:int}/import", response_class=HTMLResponse)
def import_page(request: Request, pid: int):
    require_admin(request)
    return render(request, "admin_import.html", {"project": project_by_id(request, pid), "result": None,
                                                 "error": None})


@router.post("/admin/p/{pid:int}/import")
async def import_file(request: Request, pid: int):
    require_admin(request)  # before the body is read
    form = await request.form()
    upload = form.get("file")
    fields = {"csrf_token": form.get("csrf_token")}
    if upload is None or isinstance(upload, str):
        data, filename = None, ""
    else:
        data, filename = await upload.read(), upload.filename or "upload.jsonl"
    return await run_in_threadpool(_import_file, request, fields, pid, data, filename)


def _import_file(request: Request, form: dict, pid: int, data: bytes | None, filename: str):
    """Read the whole upload, check every row, then write (the CLI's import: batches, idempotent by id/content)."""
    from .. import importing  # noqa: PLC0415 - the reader; imported with the route's first use

    check_csrf(request, form)
    store = store_of(request)
    p = project_by_id(request, pid)
    if not data:
        return render(request, "admin_import.html", {"project": p, "result": None,
                                                     "error": "file: choose a JSONL file to import"}, 422)
    name = "".join(c for c in filename if c.isprintable())[:200]
    try:
        result = store.import_records(p.id, importing.rows_from_bytes(data, name))
    except UserError as e:  # the first bad line, named (nothing written)
        return render(request, "admin_import.html", {"project": p, "result": None, "error": str(e)}, 422)
    return render(request, "admin_import.html", {"project": p, "result": result, "error": None,
                                                 "filename": name})
