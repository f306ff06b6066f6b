"""The labeling web app: FastAPI + Jinja2 (autoescaped) + vendored HTMX, server-rendered and usable without JS.

    app = create_app(Store("feedback.db"), secret_key="...")   # or create_app("feedback.db")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every POST needs the session's CSRF token (form field `csrf_token`, or header `X-CSRF-Token` for the JSON API).
Sessions are server-side (`sessions.py`: a random token in a signed cookie, its hash in the `sessions` table), so
sign-out, deactivation and a password change end them; they time out when idle and after a maximum age. Admin pages
and export are admin-only; a labeler can only see, submit, skip and edit their own assignments (others' give 404).

`create_app` only assembles: the routers of `web/` (auth, labeling, admin, JSON API), the shared `WebContext` they
read from `app.state.web`, the middleware (security headers, the session cookie, and the gate of `web/gate.py`: body
size limit and sign-in, before any route reads a body), static files, error handlers and the server's lifespan
(thread pool size, background WAL checkpoints, gc.freeze).
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio.to_thread
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.middleware.sessions import SessionMiddleware

from .errors import Forbidden, NotFound
from .security import resolve_secret_key
from .sessions import SESSION_IDLE_S, SESSION_MAX_S, SessionManager
from .store import Store
from .web import admin, api, auth, conversations, labeling
from .web.common import (
    BUSY_ERRORS,
    OUT_OF_RANGE_ERRORS,
    STATIC_DIR,
    HTTPError,
    Redirect,
    WebContext,
    make_templates,
    on_busy,
    on_forbidden,
    on_http_error,
    on_not_found,
    on_out_of_range,
    on_redirect,
)
from .web.gate import MAX_BODY_BYTES, MAX_IMPORT_BYTES, Gate

if TYPE_CHECKING:
    from .generation import GenerationWorker

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SQLITE_THREADS = 8


class SecurityHeaders:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): CSP and friends on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                h["Content-Security-Policy"] = CSP
                h["X-Content-Type-Options"] = "nosniff"
                h["Referrer-Policy"] = "same-origin"
                h["X-Frame-Options"] = "DENY"
                if path != "/healthz" and not path.startswith("/static"):
                    h["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _lifespan(store: Store, sessions: SessionManager, threads: int | None, background_checkpoints: bool,
              freeze_gc: bool, generation: conversations.Generation):
    @asynccontextmanager
    async def lifespan(_app):
        if threads:
            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        checkpointing = store.start_checkpointer() if background_checkpoints else False
        sessions.start_validator()  # renews the cached sessions in one query per half TTL
        if freeze_gc:
            # Everything loaded so far (FastAPI, SQLAlchemy, the models, templates) lives as long as the process:
            # move it out of the garbage collector's view, so a full collection scans only request garbage
            # (without this a full collection paused the event loop for ~40 ms, every submission then waiting).
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            generation.stop()  # the worker it built (lazily, on the first generation), if any
            sessions.stop_validator()
            if checkpointing:
                store.stop_checkpointer()
            if freeze_gc:
                gc.unfreeze()  # an app run inside a longer process (tests) leaves its collector as it was

    return lifespan


def create_app(store: Store | str, secret_key: str | None = None, secure_cookies: bool = False,
               session_max_age: int = SESSION_MAX_S, threads: int | None = None,
               inline_db: bool | None = None, freeze_gc: bool = True,
               background_checkpoints: bool = True, group_commit: bool | None = None,
               session_idle_timeout: int = SESSION_IDLE_S, max_body_bytes: int = MAX_BODY_BYTES,
               max_import_bytes: int = MAX_IMPORT_BYTES, clock: Callable[[], float] | None = None,
               generation: GenerationWorker | None = None, generation_queue: int = 8,
               generation_timeout_s: float = 120.0, generation_threads: int = 1,
               generation_backend: str | None = None) -> FastAPI:
    """`session_max_age` / `session_idle_timeout`: a session ends this many seconds after sign-in / after its last
    request (default 14 days / 12 hours). `max_body_bytes`: the largest request body (413 past it; default 1 MiB);
    `max_import_bytes`: the same for the admin import upload (default 256 MiB). `clock`: epoch seconds for the
    session timeouts (tests pass their own).
    `threads`: worker threads for the blocking database work (default: 8 on SQLite, whose writes are serialised
    anyway, so more threads only add GIL contention; anyio's default of 40 elsewhere). `inline_db`: run the JSON API's
    short database calls on the event loop (default on SQLite). `freeze_gc`: at startup, `gc.freeze()` what is
    loaded (full collections then stay short). `background_checkpoints`: SQLite WAL checkpoints (where SQLite
    fsyncs) run in a background thread while the server runs, not in the request that happens to commit
    (`Store.start_checkpointer`). `group_commit`: the JSON submit+next calls that arrive together are stored in one
    transaction, each acknowledged after its COMMIT (default: with `inline_db`).
    `generation`: the conversation task's worker (`generation.GenerationWorker`; its owner starts and stops it);
    without one, a worker with `generation_queue` (jobs queued or running at most), `generation_timeout_s`,
    `generation_threads` (torch threads of its process) and `generation_backend` ("module:function"; default the
    Hugging Face backend) is built and started on the first generation (an app without conversations never spawns
    its process) and stopped with the server."""
    if isinstance(store, str):
        store = Store(store)
    key = resolve_secret_key(secret_key, store.url)
    sqlite = store.engine.dialect.name == "sqlite"
    if threads is None and sqlite:
        threads = SQLITE_THREADS
    if inline_db is None:
        inline_db = sqlite
    if group_commit is None:
        group_commit = inline_db

    sessions = SessionManager(store, idle_s=session_idle_timeout, max_s=session_max_age, clock=clock or time.time)
    gen = conversations.Generation(store, generation, queue=generation_queue, timeout_s=generation_timeout_s,
                                   threads=generation_threads, backend=generation_backend)
    app = FastAPI(title="alignloop feedback", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan(store, sessions, threads, background_checkpoints, freeze_gc, gen))
    app.state.store = store
    app.state.generation = gen
    app.state.web = WebContext(store=store, templates=make_templates(), sessions=sessions,
                               throttle=auth.LoginThrottle(), inline_db=inline_db,
                               batcher=api.GroupCommit(store) if group_commit else None)
    # outermost last: SecurityHeaders -> SessionMiddleware (the cookie) -> Gate (body limit, sign-in) -> routes
    app.add_middleware(Gate, sessions=sessions, max_body=max_body_bytes, max_import_body=max_import_bytes)
    app.add_middleware(SessionMiddleware, secret_key=key, session_cookie="alignloop_session", max_age=session_max_age,
                       same_site="lax", https_only=secure_cookies)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(Redirect, on_redirect)
    app.add_exception_handler(HTTPError, on_http_error)
    app.add_exception_handler(NotFound, on_not_found)
    app.add_exception_handler(Forbidden, on_forbidden)
    for busy in BUSY_ERRORS:  # the database stayed locked past the store's lock timeout: 503 + Retry-After (H3)
        app.add_exception_handler(busy, on_busy)
    for out_of_range in OUT_OF_RANGE_ERRORS:  # an id >= 2**63: 404, not 500 (H2)
        app.add_exception_handler(out_of_range, on_out_of_range)
    for router in (auth.router, labeling.router, admin.router, api.router, conversations.router):
        app.include_router(router)
    app.router.routes.insert(0, api.submit_route())  # the labeling hot path: matched first
    return app
