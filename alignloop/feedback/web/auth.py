"""Signing in and out (form pages), the health check, and the per-username sign-in throttle (the JSON API's
`/api/login` uses the same throttle)."""
from __future__ import annotations

import threading
import time

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from .common import check_csrf, read_form, render, safe_next, start_session, store_of, web

THROTTLE_MESSAGE = "Too many failed sign-ins for this username; wait a few minutes and try again."
MAX_FAILURES = 5
FAILURE_WINDOW_S = 300.0
MAX_TRACKED_USERNAMES = 100_000

router = APIRouter()


class LoginThrottle:
    """At most `max_failures` failed sign-ins per username in `window_s` (in-process; also spares the CPU that
    argon2 would spend on a password-guessing run)."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW_S):
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
            if len(self._fails) > MAX_TRACKED_USERNAMES:
                self._fails.clear()
            self._fails.setdefault(username.lower(), []).append(time.monotonic())

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._fails.pop(username.lower(), None)


@router.get("/healthz")
def healthz():
    return {"ok": True}


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/"):
    return render(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login")
async def login(request: Request):
    form = await read_form(request)
    return await run_in_threadpool(_login, request, form)


def _login(request: Request, form: dict):
    check_csrf(request, form)
    username, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
    nxt = safe_next(form.get("next"))
    if not username or not password:
        return render(request, "login.html", {"next": nxt, "error": "Enter your username and password."}, 422)
    throttle = web(request).throttle
    if throttle.blocked(username):
        return render(request, "login.html", {"next": nxt, "error": THROTTLE_MESSAGE}, 429)
    user = store_of(request).authenticate(username, password)
    if user is None:
        throttle.failed(username)
        return render(request, "login.html", {"next": nxt, "error": "Wrong username or password."}, 401)
    throttle.succeeded(username)
    start_session(request, user)
    return RedirectResponse(nxt, status_code=303)


@router.post("/logout")
async def logout(request: Request):
    check_csrf(request, await read_form(request))
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
