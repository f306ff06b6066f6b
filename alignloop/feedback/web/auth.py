"""Signing in and out (the form pages and the JSON API's `POST /api/login`), the health check, and the sign-in
throttle: failures are counted per username and per client address, in bounded memory."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from .common import (
    HTTPError,
    check_csrf,
    end_session,
    parse_json,
    read_form,
    render,
    safe_next,
    start_session,
    store_of,
    web,
)

THROTTLE_MESSAGE = "Too many failed sign-ins for this username; wait a few minutes and try again."
IP_THROTTLE_MESSAGE = "Too many failed sign-ins from your address; wait a few minutes and try again."
MAX_FAILURES = 5          # per username ...
MAX_IP_FAILURES = 20      # ... and per client address, within
FAILURE_WINDOW_S = 300.0
MAX_TRACKED = 50_000      # usernames (and, separately, addresses) remembered; the oldest are forgotten first

router = APIRouter()


class FailureLog:
    """Recent failures per key: blocked once `max_failures` fall within `window_s`. Holds at most `max_keys` keys;
    past that the key whose last failure is oldest is dropped (one at a time: a flood of new names cannot wipe the
    counts of the names under attack)."""

    def __init__(self, max_failures: int, window_s: float, max_keys: int, clock: Callable[[], float]):
        self.max_failures, self.window_s, self.max_keys, self.clock = max_failures, window_s, max_keys, clock
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, key: str) -> bool:
        fails = self._fails.get(key)
        return fails is not None and len(fails) >= self.max_failures and self.clock() - fails[0] < self.window_s

    def failed(self, key: str) -> None:
        fails = self._fails.get(key)
        if fails is None:
            fails = self._fails[key] = deque(maxlen=self.max_failures)  # only the newest few decide `blocked`
        else:
            self._fails.move_to_end(key)
        fails.append(self.clock())
        while len(self._fails) > self.max_keys:
            self._fails.popitem(last=False)

    def forget(self, key: str) -> None:
        self._fails.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._fails

    def __len__(self) -> int:
        return len(self._fails)


class LoginThrottle:
    """At most `max_failures` failed sign-ins per username and `max_ip_failures` per client address in `window_s`
    (in-process; also spares the CPU that argon2 would spend on a password-guessing run). A successful sign-in
    clears its username's count, not its address's (else one valid account would reset a guessing run's count)."""

    def __init__(self, max_failures: int = MAX_FAILURES, max_ip_failures: int = MAX_IP_FAILURES,
                 window_s: float = FAILURE_WINDOW_S, max_tracked: int = MAX_TRACKED,
                 clock: Callable[[], float] = time.monotonic):
        self.users = FailureLog(max_failures, window_s, max_tracked, clock)
        self.ips = FailureLog(max_ip_failures, window_s, max_tracked, clock)
        self._lock = threading.Lock()

    def refusal(self, username: str, ip: str) -> str | None:
        """Why a sign-in attempt is refused before its password is checked (None: go ahead)."""
        with self._lock:
            if self.ips.blocked(ip):
                return IP_THROTTLE_MESSAGE
            if self.users.blocked(username.lower()):
                return THROTTLE_MESSAGE
            return None

    def failed(self, username: str, ip: str) -> None:
        with self._lock:
            self.users.failed(username.lower())
            self.ips.failed(ip)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self.users.forget(username.lower())


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def sign_in(request: Request, username: str, password: str):
    """(labeler, None) with a new session started, or (None, (status, message)). Blocking (argon2, a database
    write): run it in the thread pool."""
    throttle, ip = web(request).throttle, client_ip(request)
    refusal = throttle.refusal(username, ip)
    if refusal:
        return None, (429, refusal)
    user = store_of(request).authenticate(username, password)
    if user is None:
        throttle.failed(username, ip)
        return None, (401, "Wrong username or password.")
    throttle.succeeded(username)
    start_session(request, user)
    return user, None


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
    user, error = sign_in(request, username, password)
    if user is None:
        return render(request, "login.html", {"next": nxt, "error": error[1]}, error[0])
    return RedirectResponse(nxt, status_code=303)


@router.post("/api/login")
async def api_login(request: Request):
    """`{"username", "password"}` -> `{"csrf_token", "labeler", "role"}` and the session cookie. (Matched before
    the API router's route of the same path, which `create_app` includes after this router.)"""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPError(415, "send JSON")
    body = parse_json(await request.body())  # 400/422, never a 500 (deep nesting, huge numbers, lone surrogates)
    if not isinstance(body, dict):
        raise HTTPError(400, "body must be a JSON object")
    username, password = body.get("username", ""), body.get("password", "")
    if not isinstance(username, str) or not isinstance(password, str):
        raise HTTPError(422, "username and password must be strings")
    user, error = await run_in_threadpool(sign_in, request, username.strip(), password)
    if user is None:
        raise HTTPError(*error)
    return {"csrf_token": request.session["csrf"], "labeler": user.username, "role": user.role}


@router.post("/logout")
async def logout(request: Request):
    check_csrf(request, await read_form(request))
    await run_in_threadpool(end_session, request)
    return RedirectResponse("/login", status_code=303)
