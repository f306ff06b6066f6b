"""Real-browser tests of the steps task type: Playwright for Python driving Debian's chromium against a real uvicorn
server (as tests/feedback/test_browser.py does for the other task types). Labels a solution step by step with the
keyboard, uses the "first error" shortcut (key and button), submits, and checks the stored labels; also without
JavaScript, and the dashboard's agreement per step.

Screenshots go to $FEEDBACK_SCREENSHOTS (default: a temporary folder)."""
import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

from fb_helpers import PASSWORD  # noqa: E402 - after the skips above, on purpose
from fb_helpers import login as _login  # noqa: E402
from fb_helpers import open_label as _open_label  # noqa: E402
from fb_helpers import uniq as _uniq  # noqa: E402

expect = sync_api.expect
ACTIVE = re.compile(r"\bactive\b")  # the highlighted step, which the keys act on


def _setup(store, rows, k=1, labelers=1):
    name = _uniq("steps")
    store.create_project(name, "steps", overlap_k=k, guidelines_md="# Rate each step\n\nA step is *bad* if wrong.")
    store.import_records(name, rows)
    users = [_uniq("u") for _ in range(labelers)]
    for u in users:
        store.add_labeler(u, PASSWORD)
    return name, users


def _labels(store, project, username):
    """The labeler's stored step labels, by the solution's first step."""
    p = store.get_project(project)
    _prompts, comps = store.prompts_and_completions(p.id)
    return {comps[r["completion_ids"][0]].text: r["step_labels"] for r in store.current_judgements(p.id)
            if r["labeler"] == username}


def _checked(page, n):
    """The rating checked for each of the n steps on the page (None: unrated)."""
    out = []
    for i in range(n):
        box = page.locator(f"input[name=step_{i}]:checked")
        out.append(box.get_attribute("value") if box.count() else None)
    return out


def test_steps_keyboard_first_error_and_submit(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, [
        {"prompt": "What is 2 + 3 * 4?", "completions": ["3 * 4 = 12", "<b>2 + 12</b> = 14",
                                                         "So 2 + 3 * 4 = 20", "The answer is 20."]},
        {"prompt": "What is 5 - 2 - 1?", "completions": ["5 - 2 = 3", "3 - 1 = 1", "The answer is 1."]}])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    expect(page.locator(".context")).to_contain_text("What is 2 + 3 * 4?")
    assert page.locator("#step-1 .text").inner_text() == "<b>2 + 12</b> = 14"  # model output shown as text
    assert page.locator("#steps b").count() == 0
    page.keyboard.press("g")          # step 1 good, on to step 2
    page.keyboard.press("n")          # step 2 neutral, on to step 3
    page.keyboard.press("ArrowUp")    # back to step 2
    expect(page.locator("#step-1")).to_have_class(ACTIVE)
    page.keyboard.press("ArrowDown")  # step 3
    page.keyboard.press("f")          # first error: steps 3 and 4 bad
    assert _checked(page, 4) == ["good", "neutral", "bad", "bad"]
    expect(page.locator("#step-2")).to_have_class(ACTIVE)
    page.screenshot(path=str(shots / "steps_01_keyboard.png"), full_page=True)
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_contain_text("1 done")
    expect(page.locator(".context")).to_contain_text("What is 5 - 2 - 1?")
    # Enter with unrated steps submits nothing: it names them and highlights the first
    page.keyboard.press("Enter")
    expect(page.locator("#steps-missing")).to_have_text("Rate every step first: step 1, step 2, step 3 are not rated.")
    expect(page.locator("#step-0")).to_have_class(ACTIVE)
    expect(page.locator("#step-0")).to_have_class(re.compile(r"\bmissing\b"))
    page.screenshot(path=str(shots / "steps_02_missing.png"), full_page=True)
    assert page.locator("#progress").inner_text().startswith("1 done")
    page.locator("#comment").press("Control+Enter")   # from the comment box: the same check, nothing submitted
    expect(page.locator("#steps-missing")).to_be_visible()
    assert page.locator("#progress").inner_text().startswith("1 done")
    page.locator("#comment").press("Escape")          # leave the box: the keys act on the steps again
    page.keyboard.press("j")          # step 2
    page.keyboard.press("f")          # first error at step 2: the unrated step 1 becomes good
    assert _checked(page, 3) == ["good", "bad", "bad"]
    page.keyboard.press("k")          # back to step 1 ...
    page.keyboard.press("2")          # ... neutral after all (digits work too)
    assert _checked(page, 3) == ["neutral", "bad", "bad"]
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    assert _labels(store, proj, user) == {"3 * 4 = 12": [1, 0, -1, -1], "5 - 2 = 3": [0, -1, -1]}
    page.goto(f"{base}/p/{proj}/history")
    expect(page.locator("table")).to_contain_text("steps + 0 − −")
    page.screenshot(path=str(shots / "steps_03_history.png"))
    ctx.close()


def test_steps_first_error_button_all_good_key_and_the_mouse(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, [{"prompt": "p1", "completions": ["a1", "b1", "c1"]},
                                   {"prompt": "p2", "completions": ["a2", "b2"]}])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    page.click("#first-error-1")      # with JavaScript the button only marks the steps (no submit)
    assert _checked(page, 3) == ["good", "bad", "bad"]
    assert page.locator("#progress").inner_text().startswith("0 done")
    page.check("input[name=step_2][value=neutral]")  # the mouse overrides one
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_contain_text("1 done")
    page.keyboard.press("a")          # every unrated step good: a solution without an error
    assert _checked(page, 2) == ["good", "good"]
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    assert _labels(store, proj, user) == {"a1": [1, -1, 0], "a2": [1, 1]}
    ctx.close()


def test_steps_without_javascript(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, [{"prompt": "no js", "completions": ["s1", "s2", "s3"]}])
    ctx, page = _login(browser, base, user, js=False)
    _open_label(page, base, proj)
    page.check("input[name=step_0][value=neutral]")
    page.click("#submit")             # the server refuses the unrated steps, keeping the rating given
    expect(page.locator("#form-errors")).to_contain_text("rate step 2: good, neutral or bad")
    assert page.locator("input[name=step_0][value=neutral]").is_checked()
    page.screenshot(path=str(shots / "steps_04_nojs_errors.png"), full_page=True)
    page.click("#first-error-2")      # without JavaScript the button submits; the server applies the rule
    expect(page.locator("#all-done")).to_be_visible()
    assert _labels(store, proj, user) == {"s1": [0, 1, -1]}
    ctx.close()


def test_steps_two_labelers_and_the_dashboard(server, browser, shots):
    store, base = server
    proj, (u1, u2) = _setup(store, [{"prompt": "shared", "completions": ["x1", "x2", "x3"]}], k=2, labelers=2)
    c1, p1 = _login(browser, base, u1)
    c2, p2 = _login(browser, base, u2)
    _open_label(p1, base, proj)
    _open_label(p2, base, proj)
    p1.keyboard.press("a")            # all good
    p1.keyboard.press("Enter")
    for key in ("1", "3", "b"):       # good, bad, bad
        p2.keyboard.press(key)
    p2.keyboard.press("Enter")
    expect(p1.locator("#all-done")).to_be_visible()
    expect(p2.locator("#all-done")).to_be_visible()
    assert _labels(store, proj, u1) == {"x1": [1, 1, 1]} and _labels(store, proj, u2) == {"x1": [1, -1, -1]}
    c1.close()
    c2.close()
    boss = _uniq("boss")
    store.add_labeler(boss, PASSWORD, role="admin")
    ctx, page = _login(browser, base, boss)
    page.goto(f"{base}/admin/p/{proj}")
    # 3 steps, one pair of labels each, step 1 agrees: 33%; the first error: none vs step 2, a disagreement
    expect(page.locator("#step-agreement")).to_contain_text("33% pairwise agreement over 3 pairs of labels on 3 steps")
    expect(page.locator("#step-agreement")).to_contain_text("first error at the same step: 0% of 1 pairs")
    rows = page.locator("#step-position-table tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_contain_text("100%")
    page.screenshot(path=str(shots / "steps_05_dashboard.png"), full_page=True)
    with page.expect_download() as dl:
        page.click("text=Download JSONL")
    lines = Path(dl.value.path()).read_text().splitlines()
    assert lines == ['{"prompt": "shared", "completions": ["x1", "x2", "x3"], "labels": [1, 0, 0]}']
    ctx.close()
