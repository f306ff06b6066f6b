"""What the routes share: the app's WebContext and small functions for the signed-in user, CSRF, rendering, forms,
database calls and errors. Routes call them first thing (`user = require_user(request)`), in the order that decides
which error a request gets: sign-in (303 to the login page, or 401 on the JSON API), then role (403), then CSRF (403).
"""
from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlalchemy.exc import DataError, OperationalError
from starlette.concurrency import run_in_threadpool

from ..access import check_may_label
from ..db import is_busy, no_wait
from ..errors import DatabaseBusy, WouldBlock
from ..models import STRENGTHS, Labeler
from ..render import render_markdown
from ..security import is_utf8_text, new_token, tokens_equal
from ..store import Store
from .gate import USER_KEY

if TYPE_CHECKING:
    from ..sessions import SessionManager
    from .api import GroupCommit
    from .auth import LoginThrottle

FEEDBACK_DIR = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = FEEDBACK_DIR / "templates"
STATIC_DIR = FEEDBACK_DIR / "static"
STRENGTH_LABELS = {"significantly_better": "Significantly better", "better": "Better",
                   "slightly_better": "Slightly better", "negligibly_better": "Negligibly better / unsure"}


class Redirect(Exception):
    """Answer with a 303 redirect to `url` (sign-in needed)."""

    def __init__(self, url: str):
        self.url = url


class HTTPError(Exception):
    """Answer with `status`: JSON `{"error": message}` (and `"fields"`: {field: problem} when given) on the API, the
    error page elsewhere."""

    def __init__(self, status: int, message: str, fields: dict[str, str] | None = None):
        self.status, self.message, self.fields = status, message, fields


# -- request bodies: one JSON parser for every route that reads JSON (F6, F15) ---------------------------------
def parse_json(text: str | bytes, what: str = "body") -> Any:
    """`text` parsed as JSON, or HTTPError: 400 for text that is not JSON, 422 (naming the field) for JSON this app
    cannot take: nesting too deep for the parser (RecursionError), an integer of more than Python's 4300 digits
    (ValueError), a string or key holding a lone surrogate ("\\ud800" is valid JSON but not text: SQLite, argon2
    and the UTF-8 reply all refuse it). Never a 500. `what` names the text in the messages ("body", "more settings")."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise HTTPError(422, f"{what}: JSON nested too deeply", {what: "nested too deeply"}) from None
    except json.JSONDecodeError as e:
        raise HTTPError(400, f"{what}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise HTTPError(400, f"{what}: not valid JSON (not UTF-8)") from None
    except ValueError as e:  # Python's limit on the digits of an integer (sys.get_int_max_str_digits)
        raise HTTPError(422, f"{what}: a number with too many digits ({e})",
                        {what: "a number with too many digits"}) from None
    bad = _not_text(value)
    if bad is not None:
        field = bad or what
        where = field if what == "body" or not bad else f"{what}: {field}"
        raise HTTPError(422, f"{where}: not valid text (a lone surrogate such as \\ud800)",
                        {field: "not valid text (a lone surrogate such as \\ud800)"})
    return value


def _not_text(value: Any) -> str | None:
    """The path ("comment", "answers.helpful.choice", "flags[0]"; "" for the top level) of the first string or key
    in `value` that does not encode as UTF-8, or None. Iterative: `value` may be as deep as the parser allowed."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not is_utf8_text(v):
                return path
        elif isinstance(v, dict):
            for k, x in v.items():
                key_path = f"{path}.{k}" if path else str(k)
                if not is_utf8_text(k):
                    return printable(key_path) + " (a key)"
                stack.append((key_path, x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def printable(s: str) -> str:
    """`s` with each character that does not encode as UTF-8 (a lone surrogate) replaced by U+FFFD."""
    return s if is_utf8_text(s) else _SURROGATE.sub("\ufffd", s)


def text_or_422(value: Any, field: str) -> Any:
    """`value` if it is not a string or a string that encodes as UTF-8, else HTTPError 422 naming `field`."""
    if isinstance(value, str) and not is_utf8_text(value):
        raise HTTPError(422, f"{field}: not valid text (a lone surrogate)", {field: "not valid text"})
    return value


class SafeJSONResponse(JSONResponse):
    """A JSONResponse whose text may hold lone surrogates (an item imported before the import refused them): they
    are written as U+FFFD instead of failing the reply with a 500."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return printable(text).encode("utf-8")


def _finalize(value: Any) -> Any:
    """Jinja's finalize: every `{{ ... }}` string on a page passes here, so a stored lone surrogate shows as U+FFFD
    instead of failing the page's UTF-8 encoding (a 500). Markup (already escaped) stays Markup."""
    if isinstance(value, str) and not is_utf8_text(value):
        clean = printable(str(value))
        return Markup(clean) if isinstance(value, Markup) else clean
    return value


def _markdown(text: Any) -> Any:
    return render_markdown(printable(text) if isinstance(text, str) else text)


@dataclass
class WebContext:
    """One app's state (`app.state.web`): the store and what the routes keep between requests."""
    store: Store
    templates: Jinja2Templates
    sessions: SessionManager          # server-side sign-in sessions and their in-process cache
    throttle: LoginThrottle
    inline_db: bool                   # run the JSON API's short database calls on the event loop (SQLite)
    batcher: GroupCommit | None       # group commit of the JSON API's submit + next (None: off)


def web(request: Request) -> WebContext:
    return request.app.state.web


def store_of(request: Request) -> Store:
    return request.app.state.web.store


def make_templates() -> Jinja2Templates:
    """Jinja2 (autoescape on for .html) with a `markdown` filter: guidelines, prompts and answers as sanitised HTML
    (`render.render_markdown`: raw HTML off, then an allow-list sanitiser)."""
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.finalize = _finalize  # before any template compiles
    templates.env.filters["markdown"] = _markdown
    templates.env.globals["STRENGTHS"] = STRENGTHS
    templates.env.globals["STRENGTH_LABELS"] = STRENGTH_LABELS
    return templates


async def db_call(request: Request, fn, *args):
    """Run short database work. SQLite (`inline_db`): on the event loop (writes are serialised anyway, and this
    avoids thread hand-offs and GIL contention) but under `db.no_wait()`: if the write lock is taken (an import
    batch, a writer in another process) it raises WouldBlock before writing anything, and the work runs again in
    the thread pool, which waits up to the store's lock timeout (then 503, `on_busy`). Other databases: the pool."""
    if web(request).inline_db:
        try:
            with no_wait():
                return fn(*args)
        except WouldBlock:
            pass
    return await run_in_threadpool(fn, *args)


# H3: the database stayed busy longer than the store's lock timeout -> 503 with Retry-After (never a 500).
# `create_app` registers it for each of BUSY_ERRORS; an OperationalError that is not "database is locked" re-raises.
BUSY_ERRORS = (DatabaseBusy, OperationalError, sqlite3.OperationalError)
RETRY_AFTER_S = 2


async def on_busy(request: Request, exc: Exception):
    if not isinstance(exc, DatabaseBusy) and not is_busy(getattr(exc, "orig", exc)):
        raise exc
    message = "the database is busy; try again in a moment"
    if request.url.path.startswith("/api/"):
        resp = JSONResponse({"error": message}, status_code=503)
    else:
        resp = render(request, "error.html", {"message": message, "status": 503}, status=503)
    resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    return resp


# -- the signed-in user -------------------------------------------------------------------------------------------
def require_user(request: Request) -> Labeler:
    """The signed-in, active labeler (also set as `request.state.user` for the templates); else a redirect to the
    login page (401 on the JSON API). The gate (`gate.py`) has checked the session before the route ran."""
    user = request.scope.get(USER_KEY)
    if user is None:
        if request.url.path.startswith("/api/"):
            raise HTTPError(401, "sign in first")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise Redirect(f"/login?next={quote(target)}")
    request.state.user = user
    return user


def require_admin(request: Request) -> Labeler:
    user = require_user(request)
    if user.role != "admin":
        raise HTTPError(403, "admins only")
    return user


def start_session(request: Request, user: Labeler) -> str:
    """Sign `user` in: a new server-side session (the one this client had ends) and a new CSRF token (rotated at
    sign-in), which is returned. Writes to the database: call it off the event loop."""
    sessions = web(request).sessions
    old = request.session.get("sid")
    if isinstance(old, str):
        sessions.end(old)
    request.session.clear()
    request.session["sid"] = sessions.start(user)
    request.session["csrf"] = tok = new_token()
    return tok


def end_session(request: Request) -> None:
    """Sign out: the server-side session ends (a copy of the cookie is worthless from now on). A database write."""
    sid = request.session.get("sid")
    if isinstance(sid, str):
        web(request).sessions.end(sid)
    request.session.clear()


# -- CSRF and forms -----------------------------------------------------------------------------------------------
def csrf_token(request: Request) -> str:
    tok = request.session.get("csrf")
    if not tok:
        tok = request.session["csrf"] = new_token()
    return tok


def check_csrf(request: Request, form: dict[str, Any]) -> dict[str, Any]:
    if not tokens_equal(form.get("csrf_token"), request.session.get("csrf")):
        raise HTTPError(403, "invalid or missing CSRF token; reload the page and try again")
    return form


def check_api_csrf(request: Request) -> None:
    if not tokens_equal(request.headers.get("x-csrf-token"), request.session.get("csrf")):
        raise HTTPError(403, "invalid or missing X-CSRF-Token header")


async def read_form(request: Request) -> dict[str, Any]:
    """The posted form as a dict: the last value of each field, all values of `flags`."""
    form = await request.form()
    return {k: (form.getlist(k) if k == "flags" else form.getlist(k)[-1]) for k in form}


def safe_next(url: str | None) -> str:
    """`url` if it is a local path (no open redirect), else "/"."""
    if url and url.startswith("/") and not url.startswith("//") and "\\" not in url:
        return url
    return "/"


def project_or_404(store: Store, name: str, user: Labeler | None = None):
    # /p/<ASCII digits> is an id (a project name is never all digits, projects.check_project_name); anything else,
    # "٣" or "²" included (str.isdigit() says yes, int() reads or refuses them), is a name (H3)
    p = store.get_project(int(name)) if name.isascii() and name.isdigit() else store.get_project(name)
    if user is not None:  # a labeler's page or API call: 404 unless they may label it (access.py, H5)
        check_may_label(store, p, user)
    return p


# -- responses ----------------------------------------------------------------------------------------------------
def render(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> HTMLResponse:
    user = getattr(request.state, "user", None)
    base = {"request": request, "user": user, "csrf_token": csrf_token(request)}
    return web(request).templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status)


async def on_redirect(request: Request, exc: Redirect):
    return RedirectResponse(exc.url, status_code=303)


async def on_http_error(request: Request, exc: HTTPError):
    if request.url.path.startswith("/api/"):
        body: dict[str, Any] = {"error": exc.message}
        if exc.fields:
            body["fields"] = exc.fields
        return SafeJSONResponse(body, status_code=exc.status)
    return render(request, "error.html", {"message": exc.message, "status": exc.status}, status=exc.status)


async def on_not_found(request: Request, exc: Exception):
    return await on_http_error(request, HTTPError(404, str(exc) or "not found"))


async def on_forbidden(request: Request, exc: Exception):
    return await on_http_error(request, HTTPError(403, str(exc) or "forbidden"))


# (H2) An id past the database's integers (2**63 and up, in a path or a body): SQLite's driver raises OverflowError
# when binding it, PostgreSQL a DataError ("out of range"). No row can have it, so it is a 404 like any missing one,
# never a 500. `create_app` registers this for each of OUT_OF_RANGE_ERRORS.
OUT_OF_RANGE_ERRORS = (OverflowError, DataError)


async def on_out_of_range(request: Request, exc: Exception):
    return await on_http_error(request, HTTPError(404, "not found (a number in the request is out of range)"))
