"""The conversation page in Debian's chromium (Playwright): keys 1-8 choose, Enter sends, the rating with keys 1-7;
the conversation continues from the chosen branch; a failed generation shows its error and Retry; desktop and
390 px screenshots (FEEDBACK_SCREENSHOTS keeps them)."""
from __future__ import annotations

import threading
import time

import pytest
from fb_helpers import PASSWORD, SECRET, free_port, login

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def conv_server(tmp_path_factory):
    """(store, base URL, worker) of an app whose generation is the echo fake, streamed word by word ("slow")."""
    import uvicorn

    from alignloop.feedback.app import create_app
    from alignloop.feedback.generation import GenerationWorker
    from alignloop.feedback.store import Store

    store = Store(str(tmp_path_factory.mktemp("conv") / "fb.db"))
    store.create_project("cv", "conversation", overlap_k=1, settings={"models": ["m1"], "max_turns": 5})
    store.import_records("cv", [{"prompt": f"Tell me a <b>story</b> {i}"} for i in range(4)])
    store.add_labeler("ann", PASSWORD)
    store.add_labeler("bob", PASSWORD)
    worker = GenerationWorker(backend="gen_fakes:slow", in_process=True, timeout_s=30)
    worker.start()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(store, secret_key=SECRET, generation=worker), host="127.0.0.1",
                                        port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield store, f"http://127.0.0.1:{port}", worker
    srv.should_exit = True
    th.join(10)
    worker.stop()
    store.dispose()


def until(check, timeout=15.0):
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("width", [1280, 390])
def test_two_turns_with_the_keyboard(conv_server, browser, shots, width):
    _store, base, _worker = conv_server
    ctx, page = login(browser, base, "ann", viewport={"width": width, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/p/cv/converse")
    page.click("#start")
    page.wait_for_selector("#conversation")
    until(lambda: "enerating" in page.text_content("#status"))
    page.screenshot(path=str(shots / f"conversation-pending-{width}.png"), full_page=True)
    page.wait_for_selector("#scale:not([hidden])")
    a_text = page.text_content("#candidate-a .conv-text")
    assert "<b>story</b>" in a_text  # the model's text as text, never as HTML
    page.keyboard.press("2")  # "A is better"
    until(lambda: page.is_enabled("#send"))
    assert a_text in page.text_content("#transcript")  # continues from the chosen branch
    page.fill("#message", "go on")
    page.press("#message", "Enter")
    page.wait_for_selector("#scale:not([hidden])")
    assert "go on" in page.text_content("#candidate-b .conv-text")
    page.screenshot(path=str(shots / f"conversation-ready-{width}.png"), full_page=True)
    page.keyboard.press("7")  # "B is better"
    page.wait_for_selector("#end:not([hidden])")
    page.click("#end")
    page.keyboard.press("6")
    assert page.get_attribute('[data-rating="6"]', "aria-pressed") == "true"
    page.fill("#comment", "fine")
    page.screenshot(path=str(shots / f"conversation-rating-{width}.png"), full_page=True)
    page.click("#finish")
    page.wait_for_selector("#ended:not([hidden])")
    assert "6 of 7" in page.text_content("#ended-text")
    assert not errors
    ctx.close()


def test_a_failed_generation_shows_its_error_and_retry(conv_server, browser, shots):
    from alignloop.feedback import conversations as conv

    store, base, _worker = conv_server
    ctx, page = login(browser, base, "bob")
    page.goto(base + "/p/cv/converse")
    page.click("#start")
    page.wait_for_selector("#conversation")
    cid = int(page.get_attribute("#conversation", "data-conversation"))
    bob = next(x for x in store.list_labelers() if x.username == "bob")
    turn = conv.get_turn(store, cid, bob.id, 0)
    assert conv.turn_failed(store, turn.id, "model exploded", turn.attempts)  # before the slow fake finishes
    page.wait_for_selector("#retry:not([hidden])")
    assert "model exploded" in page.text_content("#status")
    page.screenshot(path=str(shots / "conversation-failed-1280.png"), full_page=True)
    page.click("#retry")
    page.wait_for_selector("#scale:not([hidden])")
    assert page.is_hidden("#retry")
    ctx.close()
