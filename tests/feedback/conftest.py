from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fb_helpers import PASSWORD, SECRET, csrf_of, free_port

from alignloop.feedback.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "fb.db"))
    yield s
    s.dispose()


@pytest.fixture
def make_client(store):
    from fastapi.testclient import TestClient

    from alignloop.feedback.app import create_app

    app = create_app(store, secret_key=SECRET)
    clients = []

    def make(username: str | None = None, password: str = PASSWORD):
        c = TestClient(app)
        clients.append(c)
        if username:
            r = c.get("/login")
            r = c.post("/login", data={"username": username, "password": password, "csrf_token": csrf_of(r.text),
                                       "next": "/"})
            assert r.status_code == 200 and r.url.path == "/", r.text
        return c

    yield make
    for c in clients:
        c.close()


# -- the real-browser tests (test_browser.py, test_steps_browser.py): a uvicorn server, chromium, screenshots ----
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(store, base URL) of the app served by uvicorn on a free port, one per test module."""
    import threading
    import time

    import uvicorn

    from alignloop.feedback.app import create_app

    store = Store(str(tmp_path_factory.mktemp("web") / "fb.db"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(store, secret_key=SECRET), host="127.0.0.1", port=port,
                                        log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield store, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)
    store.dispose()


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (the test is skipped without them)."""
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium is not installed at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path):
    """Where screenshots go: $FEEDBACK_SCREENSHOTS, else a temporary folder."""
    import os
    from pathlib import Path

    d = Path(os.environ.get("FEEDBACK_SCREENSHOTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d
