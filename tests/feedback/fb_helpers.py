"""Helpers shared by the feedback tests (imported as a top-level module: tests/feedback is on sys.path)."""
from __future__ import annotations

import re

PASSWORD = "correct horse battery"
SECRET = "s" * 48


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token in page"
    return m.group(1)


def field_of(html: str, name: str) -> str:
    m = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert m, f"no field {name}"
    return m.group(1)


def assignment_of(html: str) -> int:
    m = re.search(r'id="judge" method="post" action="/p/[^/]+/label/(\d+)"', html)
    assert m, "no labeling form in page"
    return int(m.group(1))


def label_page(client, project: str):
    """The label page with an item on it: GET /p/<project>/label, and if it offers "Start" / "Next item" (a GET
    takes no item), POST that form (the reply after its redirect)."""
    r = client.get(f"/p/{project}/label")
    if 'id="start-form"' in r.text:
        r = client.post(f"/p/{project}/next", data={"csrf_token": csrf_of(r.text)})
    return r


def api_next(client, project: str, csrf: str):
    """POST /api/p/<project>/next (the labeler's open item, else a new one): the JSON reply."""
    r = client.post(f"/api/p/{project}/next", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    return r.json()


class Labeling:
    """Drive one labeler's client through the labeling form."""

    def __init__(self, client, project):
        self.c, self.project = client, project

    def page(self):
        return label_page(self.c, self.project)

    def submit(self, fields: dict, page=None):
        page = page or self.page()
        aid = assignment_of(page.text)
        data = {"csrf_token": csrf_of(page.text), "idempotency_key": field_of(page.text, "idempotency_key"), **fields}
        return aid, self.c.post(f"/p/{self.project}/label/{aid}", data=data)


def uniq(prefix):
    """A fresh name: prefix + 6 hex digits."""
    import uuid

    return f"{prefix}{uuid.uuid4().hex[:6]}"


def login(browser, base, username, js=True, **context):
    """A new browser context signed in as `username` (PASSWORD): (context, page) on the home page. `context`:
    more `browser.new_context` options (a viewport, is_mobile, ...)."""
    ctx = browser.new_context(**{"java_script_enabled": js, "viewport": {"width": 1280, "height": 900}, **context})
    page = ctx.new_page()
    page.goto(base + "/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    return ctx, page


def open_label(page, base, project):
    """Playwright: open the project's label page and, if it offers "Start" / "Next item" (a GET takes no item),
    press it; returns once an item (or "all done") is shown."""
    page.goto(f"{base}/p/{project}/label")
    if page.locator("#start").count():
        page.click("#start")
    page.wait_for_selector("#judge, #all-done")


def free_port():
    """A TCP port on 127.0.0.1 free at the time of asking (a test server or database binds it next)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_login(make_client, user: str = "ann"):
    """A test client signed in through the JSON API: (client, headers carrying its CSRF token)."""
    c = make_client()
    r = c.post("/api/login", json={"username": user, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return c, {"X-CSRF-Token": r.json()["csrf_token"]}
