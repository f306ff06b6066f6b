from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fb_helpers import PASSWORD, SECRET, csrf_of

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
