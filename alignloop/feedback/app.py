"""The labeling web app: FastAPI + Jinja2 (autoescaped) + vendored HTMX, server-rendered and usable without JS.

    app = create_app(Store("feedback.db"), secret_key="...")   # or create_app("feedback.db")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every POST needs the session's CSRF token (form field `csrf_token`, or header `X-CSRF-Token` for the JSON API).
Sessions are signed cookies (Starlette's SessionMiddleware, itsdangerous). Admin pages and export are admin-only; a
labeler can only see, submit, skip and edit their own assignments (others' give 404).
"""
from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import Route

from .models import STRENGTHS, Labeler
from .security import new_token, resolve_secret_key, tokens_equal
from .errors import Forbidden, NotFound, ValidationError
from .projects import DEFAULT_FLAGS
from .store import Store

HERE = Path(__file__).parent
STRENGTH_LABELS = {"significantly_better": "Significantly better", "better": "Better",
                   "slightly_better": "Slightly better", "negligibly_better": "Negligibly better / unsure"}
USER_CACHE_S = 5.0
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class _Redirect(Exception):
    def __init__(self, url: str):
        self.url = url


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


THROTTLE_MESSAGE = "Too many failed sign-ins for this username; wait a few minutes and try again."


class LoginThrottle:
    """At most `max_failures` failed sign-ins per username in `window_s` (in-process; also spares the CPU that
    argon2 would spend on a password-guessing run)."""

    def __init__(self, max_failures: int = 5, window_s: float = 300.0):
        self.max_failures, self.window_s = max_failures, window_s
        self._fails: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, name: str, now: float) -> list[float]:
        fails = [t for t in self._fails.get(name, []) if now - t < self.window_s]
        if fails:
            self._fails[name] = fails
        else:
            self._fails.pop(name, None)
        return fails

    def blocked(self, username: str) -> bool:
        with self._lock:
            return len(self._recent(username.lower(), time.monotonic())) >= self.max_failures

    def failed(self, username: str) -> None:
        with self._lock:
            if len(self._fails) > 100_000:
                self._fails.clear()
            self._fails.setdefault(username.lower(), []).append(time.monotonic())

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._fails.pop(username.lower(), None)


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


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable("table")
    return md


def create_app(store: Store | str, secret_key: str | None = None, secure_cookies: bool = False,
               session_max_age: int = 14 * 24 * 3600, threads: int | None = None,
               inline_db: bool | None = None, freeze_gc: bool = True,
               background_checkpoints: bool = True, group_commit: bool | None = None) -> FastAPI:
    """`threads`: worker threads for the blocking database work (default: 8 on SQLite, whose writes are serialised
    anyway, so more threads only add GIL contention; anyio's default of 40 elsewhere). `inline_db`: run the JSON API's
    short database calls on the event loop (default on SQLite). `freeze_gc`: at startup, `gc.freeze()` what is
    loaded (full collections then stay short). `background_checkpoints`: SQLite WAL checkpoints (where SQLite
    fsyncs) run in a background thread while the server runs, not in the request that happens to commit
    (`Store.start_checkpointer`). `group_commit`: the JSON submit+next calls that arrive together are stored in one
    transaction, each acknowledged after its COMMIT (default: with `inline_db`)."""
    if isinstance(store, str):
        store = Store(store)
    key = resolve_secret_key(secret_key, store.url)
    if threads is None and store.engine.dialect.name == "sqlite":
        threads = 8
    if inline_db is None:
        inline_db = store.engine.dialect.name == "sqlite"
    if group_commit is None:
        group_commit = inline_db

    @asynccontextmanager
    async def lifespan(_app):
        if threads:
            import anyio.to_thread
            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        checkpointing = store.start_checkpointer() if background_checkpoints else False
        if freeze_gc:
            # Everything loaded so far (FastAPI, SQLAlchemy, the models, templates) lives as long as the process:
            # move it out of the garbage collector's view, so a full collection scans only request garbage
            # (without this a full collection paused the event loop for ~40 ms, every submission then waiting).
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if checkpointing:
                store.stop_checkpointer()
            if freeze_gc:
                gc.unfreeze()  # an app run inside a longer process (tests) leaves its collector as it was

    app = FastAPI(title="alignloop feedback", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store = store
    app.add_middleware(SessionMiddleware, secret_key=key, session_cookie="alignloop_session", max_age=session_max_age,
                       same_site="lax", https_only=secure_cookies)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html
    md = _markdown()
    templates.env.filters["markdown"] = lambda text: Markup(md.render(text or ""))
    templates.env.globals["STRENGTHS"] = STRENGTHS
    templates.env.globals["STRENGTH_LABELS"] = STRENGTH_LABELS

    app.add_middleware(SecurityHeaders)

    @app.exception_handler(_Redirect)
    async def _redir(request: Request, exc: _Redirect):
        return RedirectResponse(exc.url, status_code=303)

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, exc: _HTTPError):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return render(request, "error.html", {"message": exc.message, "status": exc.status}, status=exc.status)

    @app.exception_handler(NotFound)
    async def _nf(request: Request, exc: NotFound):
        return await _http_error(request, _HTTPError(404, str(exc) or "not found"))

    @app.exception_handler(Forbidden)
    async def _fb(request: Request, exc: Forbidden):
        return await _http_error(request, _HTTPError(403, str(exc) or "forbidden"))

    async def db_call(fn, *args):
        """Run short database work: inline on the event loop for SQLite (writes are serialised anyway, and this
        avoids thread hand-offs and GIL contention), in the thread pool otherwise."""
        if inline_db:
            return fn(*args)
        return await run_in_threadpool(fn, *args)

    throttle = LoginThrottle()

    # -- helpers --------------------------------------------------------------------------------------------------
    def csrf_token(request: Request) -> str:
        tok = request.session.get("csrf")
        if not tok:
            tok = request.session["csrf"] = new_token()
        return tok

    def render(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> HTMLResponse:
        user = getattr(request.state, "user", None)
        base = {"request": request, "user": user, "csrf_token": csrf_token(request)}
        return templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status)

    user_cache: dict[int, tuple[float, Labeler | None]] = {}

    def get_user(uid: int) -> Labeler | None:
        """The labeler, cached for USER_CACHE_S seconds (a deactivation takes effect within that)."""
        now = time.monotonic()
        hit = user_cache.get(uid)
        if hit is not None and now - hit[0] < USER_CACHE_S:
            return hit[1]
        user = store.get_labeler(uid)
        if len(user_cache) > 10_000:
            user_cache.clear()
        user_cache[uid] = (now, user)
        return user

    def user_or_redirect(request: Request) -> Labeler:
        uid = request.session.get("uid")
        user = get_user(uid) if isinstance(uid, int) else None
        if user is None or not user.active:
            request.session.pop("uid", None)
            if request.url.path.startswith("/api/"):
                raise _HTTPError(401, "sign in first")
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise _Redirect(f"/login?next={quote(target)}")
        request.state.user = user
        return user

    def admin(request: Request) -> Labeler:
        user = user_or_redirect(request)
        if user.role != "admin":
            raise _HTTPError(403, "admins only")
        return user

    async def read_form(request: Request) -> dict[str, Any]:
        form = await request.form()
        out: dict[str, Any] = {}
        for k in form.keys():
            vals = form.getlist(k)
            out[k] = vals if k == "flags" else vals[-1]
        return out

    def check_csrf(request: Request, form: dict[str, Any]) -> dict[str, Any]:
        if not tokens_equal(form.get("csrf_token"), request.session.get("csrf")):
            raise _HTTPError(403, "invalid or missing CSRF token; reload the page and try again")
        return form

    def check_api_csrf(request: Request) -> None:
        if not tokens_equal(request.headers.get("x-csrf-token"), request.session.get("csrf")):
            raise _HTTPError(403, "invalid or missing X-CSRF-Token header")

    def project_or_404(name: str):
        return store.get_project(name) if not name.isdigit() else store.get_project(int(name))

    def safe_next(url: str | None) -> str:
        if url and url.startswith("/") and not url.startswith("//") and "\\" not in url:
            return url
        return "/"

    def label_context(project, assignment, errors=None, values=None, edit=False) -> dict:
        view = store.item_view(assignment.item, assignment.shown_order)
        return {"project": project, "assignment": assignment, "view": view, "errors": errors or {},
                "values": values or {}, "progress": store.progress(project.id, assignment.labeler_id),
                "flags": project.settings.get("flags", DEFAULT_FLAGS), "edit": edit,
                "idempotency_key": uuid.uuid4().hex, "shown_at": int(time.time() * 1000),
                "k": len(view["completions"])}

    def values_from_judgement(j, shown_order) -> dict:
        v: dict[str, Any] = {"comment": j.comment or "", "flags": j.flags or []}
        if j.choice in ("tie", "both_bad"):
            v["choice"] = j.choice
        elif j.choice in ("a", "b"):
            v["choice"] = "left" if j.picked_position == 0 else "right"
            v["strength"] = j.strength
        if j.ranking:
            for pos, canon in enumerate(shown_order):
                v[f"rank_{pos}"] = str(j.ranking[canon])
        if j.thumbs is not None:
            v["thumbs"] = "up" if j.thumbs == 1 else "down"
        if j.likert is not None:
            v["likert"] = str(j.likert)
        return v

    # -- routes: auth ---------------------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/"):
        return render(request, "login.html", {"next": safe_next(next), "error": None})

    @app.post("/login")
    async def login(request: Request):
        form = await read_form(request)
        return await run_in_threadpool(_login, request, form)

    def _login(request: Request, form: dict):
        check_csrf(request, form)
        username, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
        nxt = safe_next(form.get("next"))
        if not username or not password:
            return render(request, "login.html", {"next": nxt, "error": "Enter your username and password."}, 422)
        if throttle.blocked(username):
            return render(request, "login.html", {"next": nxt, "error": THROTTLE_MESSAGE}, 429)
        user = store.authenticate(username, password)
        if user is None:
            throttle.failed(username)
            return render(request, "login.html", {"next": nxt, "error": "Wrong username or password."}, 401)
        throttle.succeeded(username)
        request.session.clear()
        request.session["uid"] = user.id
        request.session["csrf"] = new_token()  # rotate on sign-in
        return RedirectResponse(nxt, status_code=303)

    @app.post("/logout")
    async def logout(request: Request):
        check_csrf(request, await read_form(request))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -- routes: labeling -----------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        user = user_or_redirect(request)
        rows = [(p, store.progress(p.id, user.id)) for p in store.list_projects()]
        return render(request, "projects.html", {"rows": rows})

    @app.get("/p/{name}/guidelines", response_class=HTMLResponse)
    def guidelines(request: Request, name: str):
        user_or_redirect(request)
        return render(request, "guidelines.html", {"project": project_or_404(name)})

    @app.get("/p/{name}/label", response_class=HTMLResponse)
    def label(request: Request, name: str):
        user = user_or_redirect(request)
        p = project_or_404(name)
        a = store.next_assignment(p.id, user.id)
        if a is None:
            return render(request, "done.html", {"project": p, "progress": store.progress(p.id, user.id)})
        return render(request, "label.html", label_context(p, a))

    @app.post("/p/{name}/label/{aid}")
    async def submit(request: Request, name: str, aid: int):
        form = await read_form(request)
        return await run_in_threadpool(_submit, request, form, name, aid)

    def _submit(request: Request, form: dict, name: str, aid: int):
        user = user_or_redirect(request)
        check_csrf(request, form)
        p = project_or_404(name)
        a = store.get_assignment(aid, labeler_id=user.id)
        if a.project_id != p.id:
            raise NotFound("no such assignment")
        started = None
        if str(form.get("shown_at", "")).isdigit():
            started = datetime.fromtimestamp(int(form["shown_at"]) / 1000, tz=UTC).replace(tzinfo=None)
        edit = a.status == "done"
        try:
            store.submit(aid, user.id, form, str(form.get("idempotency_key", "")), started_at=started)
        except ValidationError as e:
            ctx = label_context(p, a, errors=e.errors, values=form, edit=edit)
            ctx["idempotency_key"] = form.get("idempotency_key") or ctx["idempotency_key"]
            return render(request, "label.html", ctx, status=422)
        return RedirectResponse(f"/p/{p.name}/history" if edit else f"/p/{p.name}/label", status_code=303)

    @app.post("/p/{name}/skip/{aid}")
    async def skip(request: Request, name: str, aid: int):
        form = await read_form(request)
        return await run_in_threadpool(_skip, request, form, name, aid)

    def _skip(request: Request, form: dict, name: str, aid: int):
        user = user_or_redirect(request)
        check_csrf(request, form)
        p = project_or_404(name)
        store.skip(aid, user.id)
        return RedirectResponse(f"/p/{p.name}/label", status_code=303)

    @app.get("/p/{name}/history", response_class=HTMLResponse)
    def history(request: Request, name: str):
        user = user_or_redirect(request)
        p = project_or_404(name)
        return render(request, "history.html", {"project": p, "rows": store.labeler_history(p.id, user.id),
                                                "progress": store.progress(p.id, user.id)})

    @app.get("/p/{name}/edit/{aid}", response_class=HTMLResponse)
    def edit(request: Request, name: str, aid: int):
        user = user_or_redirect(request)
        p = project_or_404(name)
        a = store.get_assignment(aid, labeler_id=user.id)
        j = store.current_judgement(aid)
        if a.project_id != p.id or j is None:
            raise NotFound("nothing to edit here")
        ctx = label_context(p, a, values=values_from_judgement(j, a.shown_order), edit=True)
        ctx["version"] = j.version
        return render(request, "label.html", ctx)

    # -- routes: admin --------------------------------------------------------------------------------------------
    @app.get("/admin", response_class=HTMLResponse)
    def admin_home(request: Request):
        admin(request)
        projects = [(p, store.project_summary(p.id)) for p in store.list_projects()]
        return render(request, "admin.html", {"projects": projects, "labelers": store.list_labelers(),
                                              "errors": {}, "values": {}})

    @app.post("/admin/labelers")
    async def admin_add_labeler(request: Request):
        form = await read_form(request)
        return await run_in_threadpool(_admin_add_labeler, request, form)

    def _admin_add_labeler(request: Request, form: dict):
        admin(request)
        check_csrf(request, form)
        try:
            store.add_labeler(str(form.get("username", "")).strip(), str(form.get("password", "")),
                              str(form.get("role", "labeler")))
        except Exception as e:  # UserError: show it on the form
            from alignloop.errors import UserError
            if not isinstance(e, UserError):
                raise
            projects = [(p, store.project_summary(p.id)) for p in store.list_projects()]
            return render(request, "admin.html", {"projects": projects, "labelers": store.list_labelers(),
                                                  "errors": {"labeler": str(e)},
                                                  "values": {"username": form.get("username", "")}}, 422)
        return RedirectResponse("/admin", status_code=303)

    @app.get("/admin/p/{name}", response_class=HTMLResponse)
    def dashboard(request: Request, name: str):
        admin(request)
        p = project_or_404(name)
        ctx = dashboard_data(store, p)
        return render(request, "dashboard.html", {"project": p, **ctx})

    @app.get("/admin/p/{name}/export")
    def export(request: Request, name: str, format: str = "preference", mode: str = "consensus",
               consensus: str = "majority", ties: str = "drop", both_bad: str = "drop",
               exclude_flagged: bool = True, include_gold: bool = False, likert_threshold: int = 5):
        from . import export as export_mod
        from . import quality

        admin(request)
        p = project_or_404(name)
        opts = export_mod.ExportOptions(format=format, mode=mode, consensus=consensus, ties=ties, both_bad=both_bad,
                                        exclude_flagged=exclude_flagged, include_gold=include_gold,
                                        likert_threshold=likert_threshold,
                                        thresholds=quality.thresholds_from_dict(p.settings.get("thresholds")))
        from alignloop.errors import UserError
        try:
            rows, _summary = export_mod.export_records(store, p.id, opts)
        except UserError as e:
            raise _HTTPError(400, str(e)) from None
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(body, media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="{p.name}-{format}.jsonl"'})

    # -- JSON API (used by the load test and scripts) ------------------------------------------------------------
    @app.post("/api/login")
    async def api_login(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise _HTTPError(415, "send JSON")
        try:
            body = await request.json()
        except Exception:
            raise _HTTPError(400, "body must be JSON") from None
        if not isinstance(body, dict):
            raise _HTTPError(400, "body must be a JSON object")
        username = str(body.get("username", "")).strip()
        if throttle.blocked(username):
            raise _HTTPError(429, THROTTLE_MESSAGE)
        user = await run_in_threadpool(store.authenticate, username, str(body.get("password", "")))
        if user is None:
            throttle.failed(username)
            raise _HTTPError(401, "wrong username or password")
        throttle.succeeded(username)
        request.session.clear()
        request.session["uid"] = user.id
        request.session["csrf"] = tok = new_token()
        return {"csrf_token": tok, "labeler": user.username, "role": user.role}

    @app.get("/api/p/{name}/next")
    async def api_next(request: Request, name: str):
        return await db_call(_api_next, request, name)

    def _api_next(request: Request, name: str):
        user = user_or_redirect(request)
        return next_payload(project_or_404(name).id, user.id)

    def next_payload(project_id: int, labeler_id: int) -> dict:
        return assignment_payload(store.next_assignment(project_id, labeler_id))

    def assignment_payload(a) -> dict:
        if a is None:
            return {"assignment_id": None}
        task_type, _flags = store.project_rules(a.project_id)
        view = store.item_view(a.item, a.shown_order)
        return {"assignment_id": a.id, "task_type": task_type, "shown_order": a.shown_order, **view}

    async def api_submit(request: Request):
        """POST /api/assignments/<aid>/judgement: the hot path of labeling scripts and the load test. A plain
        Starlette route at the head of the route list (no FastAPI parameter solving, matched first); the body is
        still validated field by field in the store (`validate_submission`)."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise _HTTPError(400, "body must be JSON") from None
        if not isinstance(body, dict):
            raise _HTTPError(400, "body must be a JSON object")
        aid = request.path_params["aid"]
        if group_commit and request.query_params.get("next") in ("1", "true"):
            user = user_or_redirect(request)
            check_api_csrf(request)
            try:
                j, created, a = await grouped_submit_and_next(aid, user.id, body,
                                                              str(body.get("idempotency_key", "")))
            except ValidationError as e:
                return JSONResponse({"error": "invalid judgement", "fields": e.errors}, status_code=422)
            return JSONResponse({"judgement_id": j.id, "version": j.version, "created": created,
                                 "next": assignment_payload(a)}, status_code=201 if created else 200)
        return await db_call(_api_submit, request, body, aid)

    # Group commit (SQLite, database work on the event loop): submissions that arrive in the same turn of the event
    # loop are stored in one transaction (Store.submit_and_next_batch) right after it; each waits for that COMMIT
    # before its reply is built, so an acknowledged judgement is a stored one.
    pending: list[tuple[tuple, asyncio.Future]] = []

    def flush_pending() -> None:
        batch = pending[:]
        pending.clear()
        try:
            results = store.submit_and_next_batch([req for req, _ in batch])
        except Exception as e:  # noqa: BLE001 - the COMMIT failed: nothing of the batch is stored; all get the error
            results = [e] * len(batch)
        for (_req, fut), r in zip(batch, results):
            if fut.done():  # the client went away; the judgement may be stored (its retry finds it by key)
                continue
            if isinstance(r, Exception):
                fut.set_exception(r)
            else:
                fut.set_result(r)

    async def grouped_submit_and_next(aid: int, labeler_id: int, fields: dict, key: str):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not pending:
            loop.call_soon(flush_pending)
        pending.append(((aid, labeler_id, fields, key), fut))
        return await fut

    app.router.routes.insert(0, Route("/api/assignments/{aid:int}/judgement", api_submit, methods=["POST"]))

    def _api_submit(request: Request, body: dict, aid: int):
        user = user_or_redirect(request)
        check_api_csrf(request)
        want_next = request.query_params.get("next") in ("1", "true")
        key = str(body.get("idempotency_key", ""))
        try:
            if want_next:  # one round trip and one write transaction per judgement: submit + next
                j, created, a = store.submit_and_next(aid, user.id, body, key)
            else:
                j, created = store.submit(aid, user.id, body, key)
        except ValidationError as e:
            return JSONResponse({"error": "invalid judgement", "fields": e.errors}, status_code=422)
        out: dict[str, Any] = {"judgement_id": j.id, "version": j.version, "created": created}
        if want_next:
            out["next"] = assignment_payload(a)
        return JSONResponse(out, status_code=201 if created else 200)

    @app.post("/api/assignments/{aid}/skip")
    def api_skip(request: Request, aid: int):
        user = user_or_redirect(request)
        check_api_csrf(request)
        store.skip(aid, user.id)
        return {"skipped": aid}

    return app


def dashboard_data(store: Store, p) -> dict:
    # numpy, scipy, scikit-learn: loaded when an admin first opens a dashboard, not at server startup
    from . import quality

    records = store.current_judgements(p.id)
    th = quality.thresholds_from_dict(p.settings.get("thresholds"))
    stats = quality.labeler_stats(records, p.task_type)
    flags = quality.flag_labelers(stats, th)
    agreement = quality.project_agreement(records, p.task_type)
    kappas = quality.pairwise_cohen_kappa(quality.annotations_from_records(p.task_type, records))
    return {"stats": stats, "flags": flags, "agreement": agreement, "kappas": kappas,
            "summary": store.project_summary(p.id), "thresholds": th,
            "charts": {"agreement": bar_chart({w: d["agreement"] for w, d in stats.items()}, 0, 1,
                                              "Leave-one-out agreement", ref=th.min_agreement),
                       "left": bar_chart({w: d["left_share"] for w, d in stats.items()}, 0, 1,
                                         "Share of left picks", ref=0.5),
                       "time": bar_chart({w: d["median_seconds"] for w, d in stats.items()}, 0, None,
                                         "Median seconds per item", ref=th.min_median_seconds),
                       "gold": bar_chart({w: d["gold_accuracy"] for w, d in stats.items()}, 0, 1,
                                         "Gold accuracy", ref=th.min_gold_accuracy)}}


def bar_chart(values: dict, lo: float, hi: float | None, title: str, ref: float | None = None) -> dict:
    """Geometry for a server-rendered horizontal SVG bar chart (the template draws it; labels are escaped)."""
    vals = {k: v for k, v in values.items() if v is not None}
    top = hi if hi is not None else max([*vals.values(), ref or 0, 1e-9]) * 1.1
    width, bar_h, left = 320, 18, 110
    bars = []
    for n, (k, v) in enumerate(sorted(values.items(), key=lambda kv: repr(kv[0]))):
        frac = 0.0 if v is None else max(0.0, min(1.0, (v - lo) / (top - lo)))
        bars.append({"label": str(k), "y": 24 + n * (bar_h + 6), "w": round(frac * width, 1),
                     "value": "n/a" if v is None else f"{v:.2f}"})
    ref_x = None if ref is None else left + round(max(0.0, min(1.0, (ref - lo) / (top - lo))) * width, 1)
    return {"title": title, "bars": bars, "left": left, "width": width, "bar_h": bar_h, "ref_x": ref_x,
            "height": 30 + len(bars) * (bar_h + 6)}
