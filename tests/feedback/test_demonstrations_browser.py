"""Demonstrations in a real browser (Playwright + Debian's chromium, the live-server fixtures of conftest.py): a
response written with the keyboard only (focus lands in the box, letters typed there never trigger shortcuts, Esc
leaves it and the page's keys work, W comes back, Ctrl+Enter submits), a sampled answer edited with the keyboard,
undo reopening it prefilled, and the layout at desktop and 390 px widths. Screenshots go to $FEEDBACK_SCREENSHOTS
(default: a temporary folder): demo_desktop.png, demo_390.png, admin_demos.png."""
import os

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
pytestmark = pytest.mark.slow

from fb_helpers import PASSWORD  # noqa: E402 - after the skips above, on purpose
from fb_helpers import login as _login  # noqa: E402
from fb_helpers import open_label as _open  # noqa: E402
from fb_helpers import uniq as _uniq  # noqa: E402

GUIDELINES = "# Guidelines\n\n* Answer the **question** asked.\n* Be kind and brief."
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour, and say why."}]
ORIGINAL = "Blue, probably."


def _setup(store, rows, **settings):
    name = _uniq("demo")
    p = store.create_project(name, "demonstration", overlap_k=1, guidelines_md=GUIDELINES,
                             settings=settings or None)
    store.import_records(name, rows)
    user = _uniq("u")
    store.add_labeler(user, PASSWORD)
    return p, user


def _errors(page):
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def _focused(page) -> str:
    return page.evaluate("document.activeElement && document.activeElement.id")


def _texts(store, p) -> dict[str, tuple[str, int]]:
    """prompt's last message -> (current text, version) of the project's demonstrations."""
    from alignloop.feedback.demonstrations import demonstration_records

    return {r["messages"][-1]["content"]: (r["text"], r["version"])
            for r in demonstration_records(store, p.id, "all")}


def test_write_and_edit_with_the_keyboard_only(server, browser, shots):
    store, base = server
    p, user = _setup(store, [{"prompt": "Write a haiku about rain."}, {"prompt": CHAT, "completion": ORIGINAL}])
    ctx, page = _login(browser, base, user)
    errors = _errors(page)
    _open(page, base, p.url_key)
    # 1. written from scratch: the focus is in the box, typed letters stay text (s, u, r, w, e are page keys)
    assert _focused(page) == "demo-text"
    expect(page.locator("#char-count")).to_contain_text("0 characters")
    page.keyboard.type("Rain")
    expect(page.locator("#char-count")).to_contain_text("16 more")
    page.keyboard.type(" taps; soft skies weep. Undo? Raw!")
    assert page.locator("#demo-text").input_value() == "Rain taps; soft skies weep. Undo? Raw!"
    expect(page.locator("#progress")).to_contain_text("0 done")  # "s" did not skip, "u" did not undo
    expect(page.locator("#char-count")).to_contain_text("at least 20 ✓")
    page.keyboard.press("Escape")  # out of the box: the page's single keys work
    assert _focused(page) != "demo-text"
    page.keyboard.press("r")
    assert page.locator("#raw-toggle").is_checked()
    page.keyboard.press("r")
    page.keyboard.press("w")  # back to writing, the key not typed
    assert _focused(page) == "demo-text"
    assert page.locator("#demo-text").input_value() == "Rain taps; soft skies weep. Undo? Raw!"
    page.keyboard.press("Control+Enter")
    # 2. the sampled answer, prefilled and kept beside; the caret at its end: edit and submit
    expect(page.locator("#original")).to_contain_text(ORIGINAL)
    expect(page.locator("#demo-text")).to_have_value(ORIGINAL)
    assert _focused(page) == "demo-text"
    assert _texts(store, p)["Write a haiku about rain."] == ("Rain taps; soft skies weep. Undo? Raw!", 1)
    page.screenshot(path=str(shots / "demo_desktop.png"), full_page=True)
    page.keyboard.type(" Or green, like spring leaves.")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#all-done")
    assert _texts(store, p)["Name a colour, and say why."] == (ORIGINAL + " Or green, like spring leaves.", 1)
    # 3. undo (its key on the "all done" page) reopens the last one, prefilled; Ctrl+Enter saves version 2
    page.keyboard.press("u")
    expect(page.locator("#demo-text")).to_have_value(ORIGINAL + " Or green, like spring leaves.")
    assert _focused(page) == "demo-text"
    page.keyboard.press("Control+a")
    page.keyboard.type("Green: the colour of spring leaves.")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#all-done")
    assert _texts(store, p)["Name a colour, and say why."] == ("Green: the colour of spring leaves.", 2)
    assert errors == []
    ctx.close()


def test_too_short_and_restore_controls(server, browser):
    """The server's 422 keeps the text in the box and says why; "start from scratch" empties it and "restore
    original" brings the sampled answer back (keyboard: Tab to the button, Enter)."""
    store, base = server
    p, user = _setup(store, [{"prompt": CHAT, "completion": ORIGINAL}], min_chars=30)
    ctx, page = _login(browser, base, user)
    errors = _errors(page)
    _open(page, base, p.url_key)
    page.keyboard.press("Control+Enter")  # the original is 15 characters: too short here
    expect(page.locator("#form-errors")).to_contain_text("too short: 15 characters, at least 30")
    expect(page.locator("#demo-text")).to_have_value(ORIGINAL)
    page.focus("#demo-text")
    page.keyboard.press("Tab")  # the first control after the box
    assert _focused(page) == "demo-clear"
    page.keyboard.press("Enter")
    expect(page.locator("#demo-text")).to_have_value("")
    assert _focused(page) == "demo-text"
    page.keyboard.type("Something else entirely")
    page.focus("#demo-restore")
    page.keyboard.press("Enter")
    expect(page.locator("#demo-text")).to_have_value(ORIGINAL)
    assert _texts(store, p) == {}
    assert errors == []
    ctx.close()


def test_layout_at_390_px_and_admin_review(server, browser, shots):
    store, base = server
    long_original = "A sampled answer that runs on for a while. " * 12
    p, user = _setup(store, [{"prompt": CHAT, "completion": long_original}])
    ctx, page = _login(browser, base, user, viewport={"width": 390, "height": 844}, is_mobile=True,
                       has_touch=True)
    _open(page, base, p.url_key)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no horizontal scrolling
    box = page.locator("#demo-text").bounding_box()
    assert box["width"] >= 300 and box["height"] >= 150 and box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.screenshot(path=str(shots / "demo_390.png"), full_page=True)
    page.keyboard.type(" And a labeler's last words.")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#all-done")
    ctx.close()
    admin = _uniq("admin")
    store.add_labeler(admin, PASSWORD, role="admin")
    ctx, page = _login(browser, base, admin)
    page.goto(f"{base}/admin/p/{p.id}/demonstrations")
    expect(page.locator(".demo-card")).to_have_count(1)
    page.fill("input[name=note]", "Good, but trim the repetition.")
    page.screenshot(path=str(shots / "admin_demos.png"), full_page=True)
    page.click("button[value=reject]")
    expect(page.locator("#demos-empty")).to_be_visible()  # it left the "not reviewed" list
    page.goto(f"{base}/admin/p/{p.id}/demonstrations?show=rejected")
    expect(page.locator(".demo-card")).to_contain_text("Good, but trim the repetition.")
    ctx.close()
