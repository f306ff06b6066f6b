"""The labeling page in a real browser (Playwright + Debian's chromium, the live-server fixtures of conftest.py):
Enter does what the focused control does, no key throws, two keystrokes where strength is optional, undo (key and
no-JS button), the raw-text switch, and the layout: guidelines beside the item, A/B stacked at 390 px without
horizontal scrolling, decision controls that stay in view over long answers.

Screenshots go to $FEEDBACK_SCREENSHOTS (default: a temporary folder)."""
import os
import string

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

from fb_helpers import PASSWORD  # noqa: E402 - after the skips above, on purpose
from fb_helpers import login as _login  # noqa: E402
from fb_helpers import open_label as _open  # noqa: E402
from fb_helpers import uniq as _uniq  # noqa: E402

GUIDELINES = "# Guidelines\n\n* Prefer the **correct** answer.\n* Then the shorter one.\n\n```text\nA > B\n```"
LONG_ANSWER = ("## Plan\n\n" + "\n".join(f"{i}. Step {i}: check the `input` and write it down." for i in range(1, 16))
               + "\n\n```python\ndef solve(xs):\n    return sorted(xs, key=lambda x: (len(str(x)), x), reverse=True)"
               "  # a long line that must scroll inside its box, not the page\n```\n\n"
               + "\n\n".join(f"Paragraph {i}: " + "a reasonably long sentence about the answer " * 6
                             for i in range(8)))


def _setup(store, task, rows, **settings):
    name = _uniq(task)
    store.create_project(name, task, overlap_k=1, guidelines_md=GUIDELINES, settings=settings or None)
    store.import_records(name, rows)
    user = _uniq("u")
    store.add_labeler(user, PASSWORD)
    return name, user


def _errors(page):
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def _current(store, proj):
    return store.current_judgements(store.get_project(proj).id)


def test_enter_does_what_the_focused_control_does(server, browser):
    store, base = server
    proj, user = _setup(store, "thumbs", [{"prompt": f"Joke {i}?", "completions": [f"No {i}."]} for i in range(2)])
    ctx, page = _login(browser, base, user)
    errors = _errors(page)
    _open(page, base, proj)
    page.keyboard.press("u")  # thumbs up picked ...
    assert page.locator("input[name=thumbs][value=up]").is_checked()
    page.focus("#skip")       # ... then Skip focused + Enter: skips, stores nothing
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_contain_text("1 skipped")
    assert _current(store, proj) == []
    page.keyboard.press("d")
    page.focus("#guidelines-panel summary")  # Enter on the guidelines' summary folds them, submits nothing
    was_open = page.evaluate("document.getElementById('guidelines-panel').open")
    page.keyboard.press("Enter")
    assert page.evaluate("document.getElementById('guidelines-panel').open") is (not was_open)
    page.focus("#comment")  # Enter in the comment is a new line
    page.keyboard.press("Enter")
    page.wait_for_timeout(200)
    assert _current(store, proj) == [] and page.locator("#comment").input_value() == "\n"
    page.focus("input[name=thumbs][value=down]")  # Enter on the judgement's own choice submits it
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    (j,) = _current(store, proj)
    assert j["thumbs"] == -1 and not errors
    ctx.close()


def test_every_printable_key_on_a_likert_page_is_harmless(server, browser):
    store, base = server
    proj, user = _setup(store, "likert", [{"prompt": "Rate me.", "completions": ["Fine."]}])
    ctx, page = _login(browser, base, user)
    errors = _errors(page)
    _open(page, base, proj)
    page.keyboard.press('"')
    # every printable ASCII key but S (skip) and space, each once: digits set the rating (7 last of 1-7), each flag
    # key toggles its flag (once: the lower case only), the rest do nothing; no key may throw
    keys = [c for c in string.digits + string.ascii_lowercase + string.punctuation if c != "s"]
    for c in keys:
        page.keyboard.press(c)
    assert not errors, errors
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    (j,) = _current(store, proj)
    assert j["likert"] == 7 and len(j["flags"]) == 9 and not errors  # every default flag's key once: all on
    ctx.close()


def test_pairwise_in_two_keystrokes_without_ties(server, browser, shots):
    store, base = server
    proj, user = _setup(store, "pairwise", [{"prompt": f"Q{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(2)],
                        strength_required=False, allow_ties=False)
    ctx, page = _login(browser, base, user)
    errors = _errors(page)
    _open(page, base, proj)
    assert page.locator("input[name=choice]").count() == 2  # A or B only
    expect(page.locator("#two-keys")).to_be_visible()
    page.keyboard.press("t")  # no tie on this project: nothing happens
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_contain_text("1 done")
    (j,) = _current(store, proj)
    assert j["picked_position"] == 1 and j["strength"] is None and not errors
    page.screenshot(path=str(shots / "page_two_keys.png"))
    ctx.close()


def test_raw_text_switch(server, browser):
    store, base = server
    proj, user = _setup(store, "pairwise", [{"prompt": "Show **code**", "completions": [
        "```python\nprint(1)\n```", "*just* text"]}])
    ctx, page = _login(browser, base, user)
    _open(page, base, proj)
    md, raw = page.locator(".context .text.md").first, page.locator(".context .raw-text").first
    expect(md.locator("strong")).to_have_text("code")
    expect(raw).to_be_hidden()
    page.keyboard.press("r")
    expect(raw).to_have_text("Show **code**")
    expect(md).to_be_hidden()
    assert page.locator("#raw-toggle").is_checked()
    page.keyboard.press("r")
    expect(md).to_be_visible()
    ctx.close()


def test_undo_with_the_key_reopens_the_last_judgement(server, browser):
    store, base = server
    proj, user = _setup(store, "pairwise", [{"prompt": f"Q{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(2)])
    ctx, page = _login(browser, base, user)
    errors = _errors(page)
    _open(page, base, proj)
    first = page.locator("#judge").get_attribute("action")
    page.keyboard.press("t")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_contain_text("1 done")
    assert page.locator("#judge").get_attribute("action") != first
    page.keyboard.press("u")
    expect(page.locator("#judge")).to_have_attribute("action", first)
    assert page.locator("input[name=choice][value=tie]").is_checked()  # prefilled with what was stored
    expect(page.locator("#reopened")).to_be_visible()
    page.keyboard.press("x")
    page.keyboard.press("Enter")  # a new version of the same judgement, then on to the next item
    expect(page.locator("#progress")).to_contain_text("1 done")
    (j,) = _current(store, proj)
    assert j["choice"] == "both_bad" and j["version"] == 2
    second = page.locator("#judge").get_attribute("action")
    page.keyboard.press("t")
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    page.keyboard.press("u")  # the "all done" page has the key too
    expect(page.locator("#judge")).to_have_attribute("action", second)
    assert page.locator("input[name=choice][value=tie]").is_checked() and not errors
    ctx.close()


def test_undo_without_javascript(server, browser):
    store, base = server
    proj, user = _setup(store, "pairwise", [{"prompt": f"Q{i}", "completions": [f"a{i}", f"b{i}"]} for i in range(2)])
    ctx, page = _login(browser, base, user, js=False)
    _open(page, base, proj)
    page.check("input[name=choice][value=tie]")
    page.click("#submit")
    page.click("#skip")
    expect(page.locator("#all-done")).to_be_visible()
    page.click("#undo")  # undoes the skip: the item is back
    page.wait_for_selector("#judge")
    expect(page.locator("#progress")).to_contain_text("1 done")
    ctx.close()


def test_layout_wide_and_390px_with_sticky_controls(server, browser, shots):
    store, base = server
    proj, user = _setup(store, "pairwise", [{"prompt": "Sort a list of numbers by **digit count**, then value.",
                                             "completions": [LONG_ANSWER, LONG_ANSWER.replace("Plan", "Approach")]}])
    ctx, page = _login(browser, base, user)  # 1280 x 900
    _open(page, base, proj)
    a, b = page.locator("#completion-0").bounding_box(), page.locator("#completion-1").bounding_box()
    side = page.locator(".guidelines-side").bounding_box()
    assert abs(a["y"] - b["y"]) < 1 and a["x"] < b["x"] and side["x"] > b["x"]  # A | B | guidelines
    expect(page.locator("#guidelines-panel .guidelines-body li").first).to_have_text("Prefer the correct answer.")
    page.evaluate("window.scrollTo(0, 900)")  # the middle of the long answers: the controls are still in view
    _assert_in_view(page, "#submit", 900)
    page.screenshot(path=str(shots / "label_1280.png"))
    page.screenshot(path=str(shots / "label_1280_full.png"), full_page=True)
    ctx.close()

    ctx, page = _login(browser, base, user, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    _open(page, base, proj)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.evaluate("document.getElementById('guidelines-panel').open") is False  # folded on a phone
    a, b = page.locator("#completion-0").bounding_box(), page.locator("#completion-1").bounding_box()
    assert a["y"] + a["height"] <= b["y"] and abs(a["x"] - b["x"]) < 1  # A above B
    page.screenshot(path=str(shots / "label_390.png"))
    page.evaluate("window.scrollTo(0, 1500)")  # inside A: its heading and the controls stay in view
    _assert_in_view(page, "#submit", 844)
    _assert_in_view(page, "#completion-0 .head", 844)
    page.screenshot(path=str(shots / "label_390_scrolled.png"))
    page.click("#guidelines-panel summary")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(shots / "label_390_full.png"), full_page=True)
    ctx.close()


def _assert_in_view(page, selector, height):
    box = page.locator(selector).bounding_box()
    assert box and box["y"] >= 0 and box["y"] + box["height"] <= height, box
