"""The conversation task's page and JSON API (the store's side: `feedback/conversations.py`).

    GET  /p/<project>/converse                         the labeler's open conversation (the page, conversation.js
                                                       drives it); else a Start form; else "all done". A GET takes
                                                       nothing: Start is a POST
    POST /p/<project>/converse/start                   form (csrf_token, optional first_message on an open_start
                                                       project): opens a conversation on the next item, 303 back
    POST /api/p/<project>/conversations                {"first_message"?} -> the state of the open conversation,
                                                       else of a new one (201); {"conversation_id": null}: none left
    GET  /api/p/<project>/conversations/<id>           the state (blind; pending turns with live partial texts)
    POST /api/p/<project>/conversations/<id>/messages  {"text", "revision"} -> 201 the state with a new pending turn
    POST .../<id>/turns/<idx>/choose                   {"choice": 1..8, "revision"}
    POST .../<id>/turns/<idx>/retry                    a failed or interrupted turn generated again
    POST .../<id>/end                                  {"rating": 1..7, "comment", "revision"}

Starting, sending and retrying run in the thread pool (a turn, then its submission, which may fail the turn: two
writes, which must not meet a taken write lock on the event loop); the state, choose and end are `db_call`s.

Every POST needs the CSRF token (`X-CSRF-Token` on the API). Replies carry the state (`conversations.
conversation_state`); a stale request (another tab acted first, a wrong revision) is a 409 `{"error", "state"}`; a
full generation queue is a 503 with Retry-After `{"error", "state"}` (the turn is marked failed, with the message,
to retry). Validation errors are 422 `{"error", "fields"}` naming the field.

Generation runs in the app's `Generation` (a `generation.GenerationWorker`, built and started on the first
generation, so an app without conversation projects never spawns its process); results come back through its
`on_done`, in a thread of its own (never the event loop, nor the worker's listener, which meanwhile streams the next
jobs). A job is "storing" from the moment the worker finishes it until its result is stored: the page never offers
to retry a result about to be saved.

The state poll (every ~300 ms while a turn is generating) keeps the conversation's assignment alive
(`conversations.keep_alive`): the labeler is waiting for the model, so the assignment must not expire meanwhile.
"""
from __future__ import annotations

import collections
import logging
import queue as queue_mod
import sqlite3
import threading
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from .. import conversations as conv
from ..db import is_busy, no_wait
from ..errors import DatabaseBusy, NotFound, ValidationError
from ..generation import GenerationJob, GenerationWorker, QueueFull
from ..models import Conversation, ConversationTurn
from .common import (
    HTTPError,
    SafeJSONResponse,
    check_api_csrf,
    check_csrf,
    db_call,
    parse_json,
    project_or_404,
    read_form,
    render,
    require_user,
    store_of,
)

log = logging.getLogger(__name__)
router = APIRouter()
QUEUE_RETRY_AFTER_S = 5


class QueueBusy(Exception):
    """The generation queue was full: the turn is marked failed with `message`."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ShuttingDown(QueueBusy):
    """The app's lifespan stopped the generation worker (the server is shutting down): no new worker is built for a
    request still in flight; the turn is marked failed (Retry after the restart) and the reply is a 503."""

    def __init__(self):
        super().__init__("the server is shutting down; retry in a moment")


class Generation:
    """The app's generation worker and the bridge from its results to the store. `worker`: a given one (its owner
    starts and stops it; its `on_done` and `on_finish` are set here when it has no `on_done`); else one is built
    with these settings on the first `submit` and started, and `stop` (the app's lifespan) stops it.

    Results: the worker's `on_finish` marks a job "storing" before its state says finished, and its `on_done`
    (`deliver`) hands the result to the storing thread ("generation-store", one, in order of finishing), which
    stores it (`on_done`, retrying on a busy database), so the worker's listener never waits on the database. A job
    stays "storing" to `status` while that runs and once stored (the turn, read a moment earlier, may still say
    pending); only a result that could not be stored lets the worker's done/failed through, which the page shows as
    interrupted (Retry)."""

    KEEP_STORED = 1024  # stored jobs remembered (for a state read just before the store)

    def __init__(self, store, worker=None, queue: int = 8, timeout_s: float = 120.0, threads: int = 1,
                 backend: str | None = None):
        self.store = store
        self.queue, self.timeout_s, self.threads, self.backend = queue, timeout_s, threads, backend
        self._worker = worker
        self._built = False
        self._closed = False  # stop() ran: no worker is built any more
        self._storing: set[str] = set()  # finished jobs whose result is not stored yet (and not given up)
        self._stored: collections.OrderedDict[str, None] = collections.OrderedDict()  # the newest stored jobs
        self._results: queue_mod.Queue = queue_mod.Queue()  # the storing thread's: (job, candidates, error, gen_ms)
        self._storer: threading.Thread | None = None
        self._storer_stopped = False
        self._lock = threading.Lock()
        self._done_lock = threading.Lock()
        if worker is not None and getattr(worker, "on_done", None) is None:
            self._attach(worker)

    def _attach(self, worker) -> None:
        worker.on_finish = self._mark_storing
        worker.on_done = self.deliver

    @property
    def running(self) -> bool:
        """Whether a worker is there (given, or built by the first generation)."""
        return self._worker is not None

    def worker(self):
        with self._lock:
            if self._worker is None:
                if self._closed:  # the lifespan's stop() ran: a request still in flight builds no new worker
                    raise ShuttingDown()
                kw: dict[str, Any] = {"max_queue": self.queue, "timeout_s": self.timeout_s, "threads": self.threads}
                if self.backend:
                    kw["backend"] = self.backend
                w = GenerationWorker(**kw)
                self._attach(w)
                w.start()
                self._worker, self._built = w, True
            return self._worker

    def stop(self) -> None:
        """Stop the worker built here (its unfinished jobs fail), then the storing thread once it has stored what
        it was given (30 s at most)."""
        with self._lock:
            self._closed = True
            w = self._worker if self._built else None
            if w is not None:
                self._worker, self._built = None, False
        if w is not None:
            w.stop()  # outside the lock: its last results come through `deliver`, which takes it
        with self._lock:
            self._storer_stopped = True
            storer = self._storer
        if storer is not None:
            self._results.put(None)
            storer.join(timeout=30)

    def status(self, job_id: str) -> dict | None:
        """The worker's status of a job; None when it does not know it (or no worker runs: a restart lost it)."""
        w = self._worker
        st = None if w is None else w.status(job_id)
        if st is not None and (job_id in self._storing or job_id in self._stored):
            st = {**st, "state": "storing"}  # finished; its result is being stored (not lost: no retry offered)
        return st

    def _mark_storing(self, job) -> None:
        """The worker's `on_finish` (under its lock: a set operation only)."""
        self._storing.add(job.job_id)

    def deliver(self, job, candidates: list[dict] | None, error: str | None, gen_ms: int) -> None:
        """The worker's `on_done` (its listener thread): the result goes to the storing thread, started on first
        use; returns at once. After `stop` the result is stored here, in the caller's thread."""
        self._storing.add(job.job_id)
        with self._lock:
            if not self._storer_stopped:
                if self._storer is None:
                    self._storer = threading.Thread(target=self._store_results, name="generation-store",
                                                    daemon=True)
                    self._storer.start()
                self._results.put((job, candidates, error, gen_ms))
                return
        self.on_done(job, candidates, error, gen_ms)

    def _store_results(self) -> None:
        while (args := self._results.get()) is not None:
            try:
                self.on_done(*args)
            except Exception:  # on_done logs its own failures; this thread serves on
                log.exception("storing a generation result failed")

    def submit(self, turn: ConversationTurn, settings: dict) -> None:
        """Queue the generation of a pending turn. A full queue: the turn is failed with a clear message and
        QueueBusy raised; no model in the settings or a worker that cannot start: the turn is failed."""
        cfg = conv.conversation_settings(settings)
        if not cfg["models"]:
            conv.turn_failed(self.store, turn.id, "this project names no model to converse with (settings.models)",
                             turn.attempts)
            return
        job = GenerationJob(job_id=conv.job_id(turn), turn_id=turn.id, context=list(turn.context),
                            models=cfg["models"], params=dict(cfg["generation"]), seed=conv.generation_seed(turn))
        try:
            self.worker().submit(job)
        except ShuttingDown as e:
            conv.turn_failed(self.store, turn.id, e.message, turn.attempts)
            raise
        except QueueFull as e:
            message = f"the model is busy: {e}" if str(e) else "the model is busy; retry in a moment"
            conv.turn_failed(self.store, turn.id, message, turn.attempts)
            raise QueueBusy(message) from None
        except Exception as e:  # the worker could not start (a wrong backend): shown on the turn
            log.exception("generation worker failed to take a job")
            conv.turn_failed(self.store, turn.id, f"the generation could not start: {e}", turn.attempts)

    # waits between the tries of storing a result on a busy database (then on_done gives up: the turn shows
    # "interrupted", to retry)
    STORE_RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1.0, 2.0)

    def on_done(self, job, candidates: list[dict] | None, error: str | None, gen_ms: int) -> None:
        """Store a finished job's result (the storing thread calls it, see `deliver`): the turn's candidates or
        error, for that attempt. A busy database is tried again a few times (`STORE_RETRY_DELAYS_S`); a result
        that still could not be stored leaves the turn pending with its job finished, which the page shows as
        interrupted (Retry)."""
        try:
            attempt = int(str(job.job_id).rsplit(".", 1)[1])
        except (IndexError, ValueError):
            attempt = None
        self._storing.add(job.job_id)
        try:
            for i in range(len(self.STORE_RETRY_DELAYS_S) + 1):
                try:
                    if error is not None or candidates is None:
                        conv.turn_failed(self.store, job.turn_id, error or "the generation failed", attempt)
                    else:
                        conv.turn_generated(self.store, job.turn_id, candidates, gen_ms, attempt)
                    with self._done_lock:
                        self._stored[job.job_id] = None
                        while len(self._stored) > self.KEEP_STORED:
                            self._stored.popitem(last=False)
                    return
                except (DatabaseBusy, OperationalError) as e:
                    if i == len(self.STORE_RETRY_DELAYS_S):
                        log.error("storing the generation of turn %s failed (the turn shows interrupted): %s",
                                  job.turn_id, e)
                        return
                    time.sleep(self.STORE_RETRY_DELAYS_S[i])
                except Exception:  # never kill the worker's thread; the turn shows interrupted (Retry)
                    log.exception("storing the generation of turn %s failed", job.turn_id)
                    return
        finally:
            self._storing.discard(job.job_id)


def generation_of(request: Request) -> Generation:
    return request.app.state.generation


# -- helpers ------------------------------------------------------------------------------------------------------
def _project(request: Request, name: str):
    user = require_user(request)
    store = store_of(request)
    p = project_or_404(store, name, user)
    if p.task_type != "conversation":
        raise NotFound(f"{p.name} is not a conversation project")
    return user, store, p


def _owned(store, p, cid: int, user) -> None:
    """NotFound unless conversation `cid` is this labeler's, in this project."""
    with store.read() as s:
        c = s.get(Conversation, cid)
    if c is None or c.labeler_id != user.id or c.project_id != p.id:
        raise NotFound("no such conversation")


def _state(request: Request, store, cid: int, user) -> dict:
    return conv.conversation_state(store, cid, user.id, live=generation_of(request).status)


def _reply(state: dict, status: int = 200) -> SafeJSONResponse:
    return SafeJSONResponse(state, status_code=status)


def _stale(request, store, cid, user, e: Exception) -> SafeJSONResponse:
    return SafeJSONResponse({"error": str(e), "state": _state(request, store, cid, user)}, status_code=409)


def _busy(request, store, cid, user, e: QueueBusy) -> SafeJSONResponse:
    return SafeJSONResponse({"error": e.message, "state": _state(request, store, cid, user)}, status_code=503,
                            headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)})


def _invalid(e: ValidationError) -> SafeJSONResponse:
    return SafeJSONResponse({"error": str(e), "fields": e.errors}, status_code=422)


async def _body(request: Request) -> dict:
    raw = await request.body()
    body = parse_json(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise HTTPError(400, "body must be a JSON object")
    return body


def _revision(body: dict) -> int | None:
    v = body.get("revision")
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62):
        return v
    raise HTTPError(422, "revision: the conversation's revision from its state (a whole number)",
                    {"revision": "a whole number"})


def _open_new(request: Request, store, p, user, first_message: Any = None):
    """The open conversation or a new one (its first turn's generation submitted): (conversation, created)."""
    if first_message is not None:
        c, turn = conv.take_open_conversation(store, p.id, user.id, first_message)
    else:
        c, turn = conv.take_conversation(store, p.id, user.id)
    if turn is not None:
        generation_of(request).submit(turn, p.settings)
    return c, turn is not None


# -- the page -----------------------------------------------------------------------------------------------------
@router.get("/p/{name}/converse")
def converse_page(request: Request, name: str):
    """The labeler's open conversation, else the Start form (a GET takes nothing), else "all done". A boosted
    (htmx) navigation here gets a full page load (`HX-Redirect`): the page's script must run."""
    user, store, p = _project(request, name)
    if request.headers.get("hx-request"):
        return Response(status_code=200, headers={"HX-Redirect": f"/p/{p.url_key}/converse"})
    c = conv.open_conversation(store, p.id, user.id)
    cfg = conv.conversation_settings(p.settings)
    ctx: dict[str, Any] = {"project": p, "conversation": None, "open_start": cfg["open_start"],
                           "scale": conv.SCALE_LABELS, "max_turns": cfg["max_turns"]}
    if c is not None:
        ctx["conversation"] = {"id": c.id}
        return render(request, "conversation.html", ctx)
    progress = store.progress(p.id, user.id)
    ctx["progress"] = progress
    # an item the labeler holds without a conversation (the generic API's next, a start whose write failed): Start
    # opens the conversation on it
    ctx["all_done"] = not progress["remaining"] and not progress.get("open") and not cfg["open_start"]
    return render(request, "conversation.html", ctx)


@router.post("/p/{name}/converse/start")
async def converse_start(request: Request, name: str):
    form = await read_form(request)
    return await run_in_threadpool(_converse_start, request, form, name)


def _converse_start(request: Request, form: dict, name: str):
    user, store, p = _project(request, name)
    check_csrf(request, form)
    first = form.get("first_message")
    try:
        _open_new(request, store, p, user, first if isinstance(first, str) and first.strip() else None)
    except QueueBusy:
        pass  # the page shows the failed turn, its message and Retry
    except ValidationError as e:
        raise HTTPError(422, str(e)) from None
    return RedirectResponse(f"/p/{p.url_key}/converse", status_code=303)


# -- the JSON API -------------------------------------------------------------------------------------------------
@router.post("/api/p/{name}/conversations")
async def api_start(request: Request, name: str):
    body = await _body(request)
    return await run_in_threadpool(_api_start, request, name, body)  # two writes: off the loop


def _api_start(request: Request, name: str, body: dict):
    user, store, p = _project(request, name)
    check_api_csrf(request)
    try:
        c, created = _open_new(request, store, p, user, body.get("first_message"))
    except ValidationError as e:
        return _invalid(e)
    except QueueBusy as e:
        c = conv.open_conversation(store, p.id, user.id)
        return _busy(request, store, c.id, user, e)
    if c is None:
        return _reply({"conversation_id": None})
    return _reply(_state(request, store, c.id, user), 201 if created else 200)


@router.get("/api/p/{name}/conversations/{cid}")
async def api_state(request: Request, name: str, cid: int):
    return await db_call(request, _api_state, request, name, cid)


def _api_state(request: Request, name: str, cid: int):
    user, store, p = _project(request, name)
    _owned(store, p, cid, user)
    _keep_alive(store, cid, user)
    return _reply(_state(request, store, cid, user))


def _keep_alive(store, cid: int, user) -> None:
    """`conversations.keep_alive` without waiting for the write lock (`no_wait`): a busy database skips it (the
    poll comes again in a moment) and never fails or holds the state read."""
    try:
        with no_wait():
            conv.keep_alive(store, cid, user.id)
    except (DatabaseBusy, OperationalError, sqlite3.OperationalError) as e:  # WouldBlock is a DatabaseBusy
        if not isinstance(e, DatabaseBusy) and not is_busy(getattr(e, "orig", e)):
            raise


@router.post("/api/p/{name}/conversations/{cid}/messages")
async def api_message(request: Request, name: str, cid: int):
    body = await _body(request)
    return await run_in_threadpool(_api_message, request, name, cid, body)  # two writes: off the loop


def _api_message(request: Request, name: str, cid: int, body: dict):
    user, store, p = _project(request, name)
    check_api_csrf(request)
    _owned(store, p, cid, user)
    try:
        turn = conv.add_message(store, cid, user.id, body.get("text"), _revision(body))
        generation_of(request).submit(turn, p.settings)
    except ValidationError as e:
        return _invalid(e)
    except conv.Stale as e:
        return _stale(request, store, cid, user, e)
    except QueueBusy as e:
        return _busy(request, store, cid, user, e)
    return _reply(_state(request, store, cid, user), 201)


@router.post("/api/p/{name}/conversations/{cid}/turns/{idx}/choose")
async def api_choose(request: Request, name: str, cid: int, idx: int):
    body = await _body(request)
    return await db_call(request, _api_choose, request, name, cid, idx, body)


def _api_choose(request: Request, name: str, cid: int, idx: int, body: dict):
    user, store, p = _project(request, name)
    check_api_csrf(request)
    _owned(store, p, cid, user)
    try:
        conv.choose(store, cid, user.id, idx, body.get("choice"), _revision(body))
    except ValidationError as e:
        return _invalid(e)
    except conv.Stale as e:
        return _stale(request, store, cid, user, e)
    return _reply(_state(request, store, cid, user))


@router.post("/api/p/{name}/conversations/{cid}/turns/{idx}/retry")
async def api_retry(request: Request, name: str, cid: int, idx: int):
    return await run_in_threadpool(_api_retry, request, name, cid, idx)  # two writes: off the loop


def _api_retry(request: Request, name: str, cid: int, idx: int):
    """A failed turn, or a pending one whose job the worker does not know (interrupted), generated again. A turn
    that is generating already is left alone (a second tab's or a double click's retry): the state comes back."""
    user, store, p = _project(request, name)
    check_api_csrf(request)
    _owned(store, p, cid, user)
    gen = generation_of(request)
    try:
        t = conv.get_turn(store, cid, user.id, idx)
        if t.status == "pending":
            view = conv.conversation_state(store, cid, user.id, live=gen.status)["turns"][idx]
            if view["status"] != "interrupted":
                return _reply(_state(request, store, cid, user))
        turn = conv.retry_turn(store, cid, user.id, idx, interrupted=t.status == "pending")
        gen.submit(turn, p.settings)
    except conv.Stale as e:
        return _stale(request, store, cid, user, e)
    except QueueBusy as e:
        return _busy(request, store, cid, user, e)
    return _reply(_state(request, store, cid, user))


@router.post("/api/p/{name}/conversations/{cid}/end")
async def api_end(request: Request, name: str, cid: int):
    body = await _body(request)
    return await db_call(request, _api_end, request, name, cid, body)


def _api_end(request: Request, name: str, cid: int, body: dict):
    user, store, p = _project(request, name)
    check_api_csrf(request)
    _owned(store, p, cid, user)
    try:
        conv.end_conversation(store, cid, user.id, body.get("rating"), body.get("comment"), _revision(body))
    except ValidationError as e:
        return _invalid(e)
    except conv.Stale as e:
        return _stale(request, store, cid, user, e)
    return _reply(_state(request, store, cid, user))
