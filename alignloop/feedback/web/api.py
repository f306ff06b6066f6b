"""The JSON API (labeling scripts, the load test):

    POST /api/login {"username", "password"}          -> {"csrf_token", "labeler", "role"} (web/auth.py)
    POST /api/p/<project>/next                         -> the labeler's open item, else the next one
                                                       ({"assignment_id": null}: none left)
    GET  /api/p/<project>/next                         -> the open item only (405 if none: a GET takes nothing)
    POST /api/assignments/<id>/judgement [?next=1]     the form fields as JSON plus `idempotency_key`; with next=1
                                                       the reply carries the next item (one round trip). A steps
                                                       item: {"step_labels": [1, 0, -1, ...]} (or step_<i> fields),
                                                       optional "first_error" (0-based index). An item
                                                       asking several questions (its payload lists their
                                                       `questions`): {"answers": {name: {"choice": "left",
                                                       "strength": "better"}, ...}} or choice_<name> /
                                                       strength_<name> fields
    POST /api/assignments/<id>/skip
    POST /api/p/<project>/undo [{"assignment_id": N}]  undo the last judgement (reopened for an edit: the reply
                                                       carries its `values`) or skip (the item back); 409 if not.
                                                       With `assignment_id` (the `undo_of` of a reply: the last
                                                       action's assignment), a repeat is a 409 that changes nothing

Calls after sign-in send the session's CSRF token as `X-CSRF-Token`. The submit route is a plain Starlette route
that `create_app` puts at the head of the route list (matched first, no FastAPI parameter solving); the body is
still validated field by field in the store. With group commit (SQLite, database work on the event loop), the
submit + next calls that arrive in the same turn of the event loop are stored in one transaction right after it
(`Store.submit_and_next_batch`), and each reply is built only after that COMMIT: an acknowledged judgement is a
stored one. The loop never waits for the write lock there: a batch that meets it taken goes to a worker thread.
"""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.routing import Route

from ..assignment import UndoRefused
from ..db import no_wait
from ..errors import DatabaseBusy, ValidationError, WouldBlock
from ..store import Store
from .common import (
    HTTPError,
    SafeJSONResponse,
    check_api_csrf,
    db_call,
    parse_json,
    project_or_404,
    require_user,
    store_of,
    web,
)
from .labeling import undo_of_field, values_from_judgement

router = APIRouter()


class GroupCommit:
    """Collects the submit + next calls of one event-loop turn and stores them in one transaction after it."""

    def __init__(self, store: Store):
        self.store = store
        self.pending: list[tuple[tuple, asyncio.Future]] = []

    async def submit_and_next(self, assignment_id: int, labeler_id: int, fields: dict, key: str):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:
            loop.call_soon(self.flush)
        self.pending.append(((assignment_id, labeler_id, fields, key), fut))
        return await fut

    def flush(self) -> None:
        """On the event loop, under `db.no_wait()`: a write lock taken by an import batch or another process raises
        WouldBlock at once (nothing written) instead of the loop sleeping on it; those requests are stored by a
        worker thread, which waits (bounded by the store's lock timeout, then DatabaseBusy: a 503), and are
        answered back on the loop. A free lock: no thread hop."""
        batch, self.pending = self.pending, []
        try:
            with no_wait():
                results = self.store.submit_and_next_batch([req for req, _ in batch])
        except Exception as e:  # noqa: BLE001 - the COMMIT failed: nothing of the batch is stored; all get the error
            results = [e] * len(batch)
        blocked = [b for b, r in zip(batch, results, strict=True) if isinstance(r, WouldBlock)]
        self.resolve(batch, results, later=WouldBlock)
        if blocked:
            self.in_thread(blocked)

    def in_thread(self, batch: list) -> None:
        """Store `batch` from a worker thread (waiting for the lock there) and resolve its futures on the loop."""
        requests = [req for req, _ in batch]

        def run() -> list:
            try:
                return self.store.submit_and_next_batch(requests)
            except Exception as e:  # noqa: BLE001 - as in flush: nothing of the batch is stored; all get the error
                return [e] * len(requests)

        done = asyncio.get_running_loop().run_in_executor(None, run)
        done.add_done_callback(lambda f: self.resolve(batch, f.result() if not f.cancelled() else
                                                      [DatabaseBusy("the server is stopping")] * len(batch)))

    @staticmethod
    def resolve(batch: list, results: list, later: type | tuple = ()) -> None:
        """Answer each request once, after its COMMIT; those whose result is a `later` (WouldBlock: nothing
        written, it runs again in a thread) are left unanswered here."""
        for (_req, fut), r in zip(batch, results, strict=True):
            if fut.done() or isinstance(r, later):  # done: the client went away (a retry finds it by key)
                continue
            if isinstance(r, Exception):
                fut.set_exception(r)
            else:
                fut.set_result(r)


def assignment_payload(store: Store, a) -> dict:
    """An assignment as the API shows it: id, task type and the item's view in the order shown (a steps item: its
    steps as `completions` in the solution's order, and their texts as `steps`; an item asking several questions:
    their names as `questions`, in order). Blind: not the shown order itself (it tells which side is the import's
    first completion, often a fixed model); a client answers in screen terms (left/right, rank_<i>)."""
    if a is None:
        return {"assignment_id": None}
    task_type, _flags = store.project_rules(a.project_id)
    view = store.item_view(a.item, a.shown_order)
    out = {"assignment_id": a.id, "task_type": task_type, **view}
    if task_type == "steps":
        out["steps"] = [c["text"] for c in view["completions"]]
    names = store.question_names(a.project_id)
    if len(names) > 1:
        out["questions"] = list(names)
    return out


def _judgement_reply(store: Store, j, created: bool, nxt: Any = None, with_next: bool = False) -> JSONResponse:
    out: dict[str, Any] = {"judgement_id": j.id, "version": j.version, "created": created}
    if with_next:
        out["next"] = assignment_payload(store, nxt)
    return SafeJSONResponse(out, status_code=201 if created else 200)


def _invalid(e: ValidationError) -> JSONResponse:
    return JSONResponse({"error": "invalid judgement", "fields": e.errors}, status_code=422)


@router.get("/api/p/{name}/next")
async def api_open(request: Request, name: str):
    return await db_call(request, _api_open, request, name)


def _api_open(request: Request, name: str):
    """A GET changes nothing: the labeler's open assignment, else 405 saying how to take one."""
    user = require_user(request)
    store = store_of(request)
    a = store.open_assignment(project_or_404(store, name, user).id, user.id)
    if a is None:
        return JSONResponse({"error": f"no open assignment: POST /api/p/{name}/next (with X-CSRF-Token) takes the "
                                      "next item"}, status_code=405, headers={"Allow": "GET, POST"})
    return SafeJSONResponse(assignment_payload(store, a))  # an item's lone surrogate: U+FFFD, not a 500


@router.post("/api/p/{name}/next")
async def api_next(request: Request, name: str):
    return await db_call(request, _api_next, request, name)


def _api_next(request: Request, name: str):
    """The labeler's open assignment, else a new one ({"assignment_id": null}: nothing left)."""
    user = require_user(request)
    check_api_csrf(request)
    store = store_of(request)
    return SafeJSONResponse(assignment_payload(store, store.next_assignment(project_or_404(store, name, user).id,
                                                                            user.id)))


@router.post("/api/p/{name}/undo")
async def api_undo(request: Request, name: str):
    raw = await request.body()
    body = parse_json(raw) if raw.strip() else {}  # optional: {"assignment_id": the action to undo}
    if not isinstance(body, dict):
        raise HTTPError(400, "body must be a JSON object (or empty)")
    return await db_call(request, _api_undo, request, name, body.get("assignment_id"))


def _api_undo(request: Request, name: str, expected: Any = None):
    """Undo the labeler's last judgement or skip in the project: `{"undone": "judgement" | "skip", ...the
    assignment's payload}`; a judgement's also carries its current `version` and `values` (the form fields, screen
    terms) to prefill; 409 with the reason when there is nothing to undo or the skipped item's slots are taken.
    With `assignment_id` (`expected`): 409 "already undone" and nothing changes unless it is the assignment of the
    labeler's last action (`Store.undo` with the client's `assignment_id`: a double click or a retry undoes once)."""
    user = require_user(request)
    check_api_csrf(request)
    store = store_of(request)
    p = project_or_404(store, name, user)
    try:
        kind, a = store.undo(p.id, user.id, undo_of_field(expected, "assignment_id"))
    except UndoRefused as e:
        raise HTTPError(409, str(e)) from None
    out = {"undone": kind, **assignment_payload(store, a)}
    if kind == "judgement":
        j = store.current_judgement(a.id)
        out.update(version=j.version, values=values_from_judgement(j, a.shown_order))
    return SafeJSONResponse(out)


@router.post("/api/assignments/{aid}/skip")
def api_skip(request: Request, aid: int):
    user = require_user(request)
    check_api_csrf(request)
    store_of(request).skip(aid, user.id)
    return {"skipped": aid}


async def api_submit(request: Request):
    """POST /api/assignments/<aid>/judgement: the hot path of labeling scripts and the load test."""
    body = parse_json(await request.body())  # 400/422 for deep nesting, huge numbers, lone surrogates (never 500)
    if not isinstance(body, dict):
        raise HTTPError(400, "body must be a JSON object")
    aid = request.path_params["aid"]
    batcher = web(request).batcher
    if batcher is not None and request.query_params.get("next") in ("1", "true"):
        user = require_user(request)
        check_api_csrf(request)
        try:
            j, created, a = await batcher.submit_and_next(aid, user.id, body, str(body.get("idempotency_key", "")))
        except ValidationError as e:
            return _invalid(e)
        return _judgement_reply(store_of(request), j, created, a, with_next=True)
    return await db_call(request, _api_submit, request, body, aid)


def _api_submit(request: Request, body: dict, aid: int):
    user = require_user(request)
    check_api_csrf(request)
    store = store_of(request)
    want_next = request.query_params.get("next") in ("1", "true")
    key = str(body.get("idempotency_key", ""))
    a = None
    try:
        if want_next:  # one round trip and one write transaction per judgement: submit + next
            j, created, a = store.submit_and_next(aid, user.id, body, key)
        else:
            j, created = store.submit(aid, user.id, body, key)
    except ValidationError as e:
        return _invalid(e)
    return _judgement_reply(store, j, created, a, with_next=want_next)


def submit_route() -> Route:
    """The submit route, for the head of the app's route list."""
    return Route("/api/assignments/{aid:int}/judgement", api_submit, methods=["POST"])
