"""The gate every request passes before a route runs (a pure ASGI middleware, inside the session middleware): the
request body's size limit, then the sign-in check, both before anything reads the body.

* Body limit: a `Content-Length` over the limit gets 413 at once; a body without one (chunked) is counted as it is
  read and cut off with 413 at the limit. The default limit is 1 MiB; the admin import upload
  (`POST /admin/p/<project>/import`) has its own, larger one (default 256 MiB).
* Sign-in: every path except `/login`, `/api/login`, `/healthz` and `/static/` needs a live session
  (`sessions.SessionManager`); without one the JSON API (`/api/`) answers 401 and the pages 303 to the login page,
  so an anonymous client cannot make the server read, parse or store a body. The signed-in labeler goes into the
  request's scope, where `common.require_user` finds it.
"""
from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from urllib.parse import quote

from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..db import is_busy
from ..errors import DatabaseBusy
from ..sessions import MISS, SessionManager

MAX_BODY_BYTES = 1 << 20
MAX_IMPORT_BYTES = 256 << 20
USER_KEY = "alignloop.user"  # the scope key of the signed-in Labeler
PUBLIC_PATHS = frozenset(("/login", "/api/login", "/healthz"))
RETRY_AFTER_S = 2  # as common.RETRY_AFTER_S (common imports this module)
IMPORT_PATH = re.compile(r"^/admin/p/[^/]+/import/?$")


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body passes its limit. An HTTPException, so a FastAPI route reading its body
    lets it through (it turns other exceptions into 400s); the gate answers 413 in any case."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class Gate:
    def __init__(self, app, sessions: SessionManager, max_body: int = MAX_BODY_BYTES,
                 max_import_body: int = MAX_IMPORT_BYTES):
        self.app, self.sessions = app, sessions
        self.max_body, self.max_import_body = max_body, max_import_body
        self._background: set = set()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = self.max_import_body if IMPORT_PATH.match(path) else self.max_body
        length = _content_length(scope)
        if length is not None and length > limit:
            return await _answer(send, path, 413, f"request body too large (limit {limit} bytes)")
        if path not in PUBLIC_PATHS and not path.startswith("/static/"):
            try:
                user = await self._user(scope)
            except (DatabaseBusy, OperationalError, sqlite3.OperationalError) as e:
                # outside the app's error handlers (`common.on_busy`): the session read itself met a busy database
                if not isinstance(e, DatabaseBusy) and not is_busy(getattr(e, "orig", e)):
                    raise
                return await _answer(send, path, 503, "the database is busy; try again in a moment",
                                     retry_after=RETRY_AFTER_S)
            if user is None:
                return await _refuse(scope, send)
            scope[USER_KEY] = user
        if length is not None or scope["method"] in ("GET", "HEAD"):  # the server delivers no more than
            return await self.app(scope, receive, send)                 # Content-Length; no GET route reads a body
        await self._counted(scope, receive, send, limit)

    async def _user(self, scope):
        """The session's labeler (None: signed out). Memory answers nearly every request; a database read (and the
        once-a-minute `last_seen_at` write) runs in a worker thread, off the event loop."""
        session = scope.get("session")
        token = session.get("sid") if session else None
        if not isinstance(token, str):
            return None
        user, due = self.sessions.lookup(token)
        if user is MISS:
            user = await run_in_threadpool(self.sessions.refresh, token)
        elif due:  # served from the copy; re-read in the background (`SessionManager.lookup`)
            task = asyncio.ensure_future(run_in_threadpool(self.sessions.refresh_quietly, token))
            self._background.add(task)  # a reference until done: the loop keeps only weak ones
            task.add_done_callback(self._background.discard)
        if user is None:
            session.pop("sid", None)  # a dead session: the cookie loses it
        return user

    async def _counted(self, scope, receive, send, limit: int):
        """Run the app with a `receive` that counts the body and stops it past `limit` (then the reply is 413)."""
        state = {"received": 0, "too_large": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["too_large"] = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message):
            if state["too_large"]:  # whatever the app answers, the client gets the 413 (sent once)
                if not state["started"]:
                    state["started"] = True
                    await _answer(send, scope["path"], 413, f"request body too large (limit {limit} bytes)")
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not state["started"]:
                state["started"] = True
                await _answer(send, scope["path"], 413, f"request body too large (limit {limit} bytes)")


def _content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(scope, send):
    path = scope["path"]
    if path.startswith("/api/"):
        return await _answer(send, path, 401, "sign in first")
    query = scope.get("query_string", b"").decode("latin-1")
    target = path + (f"?{query}" if query else "")
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", f"/login?next={quote(target)}".encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _answer(send, path: str, status: int, message: str, retry_after: int | None = None):
    """A short error reply: JSON `{"error": ...}` on the API, plain text elsewhere."""
    if path.startswith("/api/"):
        body, ctype = json.dumps({"error": message}).encode(), b"application/json"
    else:
        body, ctype = message.encode(), b"text/plain; charset=utf-8"
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
