"""Real-browser tests: Playwright for Python driving Debian's chromium against a real uvicorn server.

Screenshots of every page go to $FEEDBACK_SCREENSHOTS (default: a temporary folder)."""
import os
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


def _setup(store, task, rows, k=1, labelers=1, **kw):
    name = _uniq(task)
    store.create_project(name, task, overlap_k=k, guidelines_md="# Guidelines\n\n* Be **careful**.", **kw)
    store.import_records(name, rows)
    users = [_uniq("u") for _ in range(labelers)]
    for u in users:
        store.add_labeler(u, PASSWORD)
    return name, users


def _current(store, project, username):
    return [r for r in store.current_judgements(store.get_project(project).id) if r["labeler"] == username]


def test_sign_in(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, "pairwise", [{"prompt": f"p{i}", "completions": ["x", "y"]} for i in range(3)])
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(base + "/p/anything/label")
    assert "/login" in page.url
    page.screenshot(path=str(shots / "01_login.png"))
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    sync_api.expect(page.locator(".error")).to_contain_text("Wrong username or password")
    page.screenshot(path=str(shots / "02_login_error.png"))
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    sync_api.expect(page.locator("header")).to_contain_text(f"Signed in as {user}")
    assert page.url.endswith("/p/anything/label")  # back where sign-in was asked (a 404 page: no such project)
    page.goto(base + "/")
    sync_api.expect(page.locator("h1")).to_have_text("Projects")
    sync_api.expect(page.locator("table")).to_contain_text(proj)
    page.screenshot(path=str(shots / "03_projects.png"), full_page=True)
    ctx.close()


def test_pairwise_keyboard_and_guidelines(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, "pairwise", [
        {"prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "Apple."}, {"role": "user", "content": "Another one?"}],
         "completions": ["Banana.", "I refuse to answer questions about fruit."]},
        {"prompt": "Capital of France?", "completions": ["Paris.", "Lyon."]}])
    ctx, page = _login(browser, base, user)
    page.goto(f"{base}/p/{proj}/guidelines")
    sync_api.expect(page.locator("article h1")).to_have_text("Guidelines")
    page.screenshot(path=str(shots / "04_guidelines.png"))
    _open_label(page, base, proj)
    sync_api.expect(page.locator(".context")).to_contain_text("Another one?")
    first_left = page.locator("#completion-0 .text").inner_text()
    page.keyboard.press("a")
    page.keyboard.press("2")
    assert page.locator("input[name=choice][value=left]").is_checked()
    assert page.locator("input[name=strength][value=better]").is_checked()
    page.screenshot(path=str(shots / "05_pairwise.png"), full_page=True)
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#progress")).to_contain_text("1 done")
    # the second item: the tie shortcut
    page.keyboard.press("t")
    assert page.locator("input[name=choice][value=tie]").is_checked()
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    page.screenshot(path=str(shots / "06_all_done.png"))
    js = _current(store, proj, user)
    assert len(js) == 2
    by_choice = {j["choice"]: j for j in js}
    assert "tie" in by_choice
    decisive = next(j for j in js if j["choice"] in ("a", "b"))
    assert decisive["strength"] == "better" and decisive["picked_position"] == 0
    texts = {0: "Banana.", 1: "I refuse to answer questions about fruit."}
    assert texts["ab".index(decisive["choice"])] == first_left  # the left one was chosen, in canonical terms
    page.goto(f"{base}/p/{proj}/history")
    page.screenshot(path=str(shots / "07_history.png"))
    ctx.close()


def test_arrow_keys_and_strength_validation_message(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, "pairwise", [{"prompt": "p", "completions": ["x", "y"]}])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#form-errors")).to_contain_text("say how much better")
    page.screenshot(path=str(shots / "08_validation.png"))
    assert page.locator("input[name=choice][value=right]").is_checked()
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    (j,) = _current(store, proj, user)
    assert j["picked_position"] == 1 and j["strength"] == "significantly_better"
    ctx.close()


def test_both_bad_with_the_mouse_and_skip(server, browser):
    store, base = server
    proj, (user,) = _setup(store, "pairwise", [{"prompt": f"p{i}", "completions": ["x", "y"]} for i in range(2)])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    page.keyboard.press("s")  # skip
    sync_api.expect(page.locator("#progress")).to_contain_text("1 skipped")
    page.check("input[name=choice][value=both_bad]")
    page.click("#submit")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    (j,) = _current(store, proj, user)
    assert j["choice"] == "both_bad"
    ctx.close()


def test_rank_keyboard(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, "rank", [{"prompt": "Rank these haiku.", "completions": ["one", "two", "three",
                                                                                           "four"]}])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    shown = [page.locator(f"#completion-{i} .text").inner_text() for i in range(4)]
    for key in ("2", "1", "2", "4"):  # ranks for shown positions 0..3; a tie at 2
        page.keyboard.press(key)
    page.screenshot(path=str(shots / "09_rank.png"), full_page=True)
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    (j,) = _current(store, proj, user)
    canonical = ["one", "two", "three", "four"]
    got = {canonical[i]: r for i, r in enumerate(j["ranking"])}
    assert [got[t] for t in shown] == [2, 1, 2, 4]
    ctx.close()


def test_thumbs_keyboard_with_comment(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, "thumbs", [{"prompt": "Tell me a joke.", "completions": ["No."]}])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    page.keyboard.press("d")
    page.keyboard.press("c")
    page.keyboard.type("not funny")
    page.screenshot(path=str(shots / "10_thumbs.png"), full_page=True)
    page.keyboard.press("Control+Enter")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    (j,) = _current(store, proj, user)
    assert j["thumbs"] == -1 and j["comment"] == "not funny"
    ctx.close()


def test_likert_keyboard_with_flags(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, "likert", [{"prompt": "Who won the 2090 World Cup?", "completions": [
        "Atlantis won 7-0."]}])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    page.keyboard.press("2")
    page.keyboard.press("h")
    page.keyboard.press("i")
    page.keyboard.press("i")  # toggled off again
    page.screenshot(path=str(shots / "11_likert.png"), full_page=True)
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    (j,) = _current(store, proj, user)
    assert j["likert"] == 2 and j["flags"] == ["hallucination"]
    ctx.close()


def test_resume_after_reload(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, "pairwise", [{"prompt": f"p{i}", "completions": [f"x{i}", f"y{i}"]}
                                               for i in range(3)])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    page.keyboard.press("b")
    page.keyboard.press("3")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#progress")).to_contain_text("1 done")
    action = page.locator("#judge").get_attribute("action")
    order = [page.locator(f"#completion-{i} .text").inner_text() for i in range(2)]
    page.reload()
    assert page.locator("#judge").get_attribute("action") == action  # same item
    assert [page.locator(f"#completion-{i} .text").inner_text() for i in range(2)] == order  # same order
    sync_api.expect(page.locator("#progress")).to_contain_text("1 done")
    ctx.close()
    ctx, page = _login(browser, base, user)  # a new session (another device) resumes too
    _open_label(page, base, proj)
    assert page.locator("#judge").get_attribute("action") == action
    page.screenshot(path=str(shots / "12_resumed.png"))
    ctx.close()


def test_two_labelers_same_item(server, browser, shots):
    store, base = server
    proj, (u1, u2) = _setup(store, "pairwise", [{"prompt": "shared", "completions": ["x", "y"]}], k=2, labelers=2)
    c1, p1 = _login(browser, base, u1)
    c2, p2 = _login(browser, base, u2)
    _open_label(p1, base, proj)
    _open_label(p2, base, proj)
    sync_api.expect(p1.locator(".context")).to_contain_text("shared")
    sync_api.expect(p2.locator(".context")).to_contain_text("shared")
    p1.keyboard.press("a")
    p1.keyboard.press("1")
    p1.keyboard.press("Enter")
    p2.keyboard.press("t")
    p2.keyboard.press("Enter")
    sync_api.expect(p1.locator("#all-done")).to_be_visible()
    sync_api.expect(p2.locator("#all-done")).to_be_visible()
    recs = store.current_judgements(store.get_project(proj).id)
    assert sorted(r["labeler"] for r in recs) == sorted([u1, u2]) and len({r["item_id"] for r in recs}) == 1
    c1.close()
    c2.close()


def test_xss_completion_is_inert(server, browser, shots):
    store, base = server
    payload = '<script>window.__xss = 1; alert("xss")</script><img src=x onerror="window.__xss = 2">'
    proj, (user,) = _setup(store, "pairwise", [{"prompt": "<b>bold?</b>" + payload,
                                                "completions": [payload, "<i>plain</i>"]}])
    ctx, page = _login(browser, base, user)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    _open_label(page, base, proj)
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None and not dialogs
    texts = page.locator(".completion .text").all_inner_texts()
    assert payload in texts and "<i>plain</i>" in texts
    assert page.locator(".completion img, .context img, .completion i").count() == 0
    page.screenshot(path=str(shots / "13_xss_inert.png"), full_page=True)
    ctx.close()


def test_labeler_refused_admin_and_admin_dashboard(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, "pairwise", [{"prompt": "p", "completions": ["x", "y"]}])
    ctx, page = _login(browser, base, user)
    resp = page.goto(f"{base}/admin")
    assert resp.status == 403
    sync_api.expect(page.locator(".error")).to_contain_text("admins only")
    page.screenshot(path=str(shots / "14_admin_refused.png"))
    assert page.goto(f"{base}/admin/p/{proj}").status == 403
    assert page.goto(f"{base}/admin/p/{proj}/export").status == 403
    _open_label(page, base, proj)
    page.keyboard.press("a")
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    ctx.close()
    boss = _uniq("boss")
    store.add_labeler(boss, PASSWORD, role="admin")
    ctx, page = _login(browser, base, boss)
    page.goto(f"{base}/admin")
    page.screenshot(path=str(shots / "15_admin.png"), full_page=True)
    page.goto(f"{base}/admin/p/{proj}")
    sync_api.expect(page.locator("#labeler-table")).to_contain_text(user)
    page.screenshot(path=str(shots / "16_dashboard.png"), full_page=True)
    ctx.close()


def test_works_without_javascript(server, browser, shots):
    store, base = server
    proj, (user,) = _setup(store, "pairwise", [{"prompt": "no js", "completions": ["x", "y"]}])
    ctx, page = _login(browser, base, user, js=False)
    _open_label(page, base, proj)
    page.check("input[name=choice][value=right]")
    page.click("#submit")
    sync_api.expect(page.locator("#form-errors")).to_contain_text("say how much better")
    page.check("input[name=strength][value=slightly_better]")
    page.click("#submit")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    page.screenshot(path=str(shots / "17_nojs_done.png"))
    (j,) = _current(store, proj, user)
    assert j["picked_position"] == 1 and j["strength"] == "slightly_better"
    ctx.close()


def test_dashboard_with_simulated_labelers(server, browser, shots):
    store, base = server
    name = _uniq("dash")
    p = store.create_project(name, "pairwise", overlap_k=4, gold_rate=0.2,
                             settings={"thresholds": {"min_items": 5, "min_median_seconds": 0.0}})
    store.import_records(name, [{"prompt": f"q{i}", "completions": [f"good {i}", f"bad {i}"]} for i in range(16)]
                         + [{"prompt": f"gold {i}", "completions": [f"good g{i}", f"bad g{i}"],
                             "gold": {"choice": "a"}} for i in range(5)])
    users = {}
    for kind in ("careful1", "careful2", "careful3", "leftclicker"):
        u = _uniq(kind)
        users[u] = kind
        lab = store.add_labeler(u, PASSWORD)
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            view = store.item_view(a.item, a.shown_order)
            left_good = view["completions"][0]["text"].startswith("good")
            if kind == "leftclicker":
                fields = {"choice": "left", "strength": "significantly_better"}
            else:
                fields = {"choice": "left" if left_good else "right", "strength": "better"}
            store.submit(a.id, lab.id, fields, f"dash-{a.id}-{lab.id}")
    boss = _uniq("boss")
    store.add_labeler(boss, PASSWORD, role="admin")
    ctx, page = _login(browser, base, boss)
    page.goto(f"{base}/admin/p/{name}")
    bad = next(u for u, k in users.items() if k == "leftclicker")
    row = page.locator("#labeler-table tr", has_text=bad)
    sync_api.expect(row).to_have_class("flagged")
    page.screenshot(path=str(shots / "18_dashboard_simulated.png"), full_page=True)
    with page.expect_download() as dl:
        page.click("text=Download JSONL")
    path = dl.value.path()
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 16  # consensus of the three careful labelers; the flagged one left out
    ctx.close()


def test_remaining_shortcuts_both_bad_thumbs_up_rank_navigation(server, browser):
    store, base = server
    proj, (user,) = _setup(store, "pairwise", [{"prompt": "p", "completions": ["x", "y"]}])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    page.keyboard.press("x")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    assert _current(store, proj, user)[0]["choice"] == "both_bad"
    ctx.close()

    proj, (user,) = _setup(store, "thumbs", [{"prompt": "p", "completions": ["fine"]}])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    page.keyboard.press("u")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    assert _current(store, proj, user)[0]["thumbs"] == 1
    ctx.close()

    proj, (user,) = _setup(store, "rank", [{"prompt": "p", "completions": ["r0", "r1", "r2"]}])
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    page.keyboard.press("j")  # highlight the second response
    page.keyboard.press("1")  # rank it 1 (moves to the third)
    page.keyboard.press("k")
    page.keyboard.press("k")  # back to the first
    page.keyboard.press("2")  # rank it 2 (moves to the second)
    page.keyboard.press("j")  # on to the third
    page.keyboard.press("3")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#all-done")).to_be_visible()
    (j,) = _current(store, proj, user)
    assignment = store.get_assignment(store.labeler_history(store.get_project(proj).id, j["labeler_id"])[0][
        "assignment"].id)
    shown_ranks = [j["ranking"][c] for c in assignment.shown_order]
    assert shown_ranks == [2, 1, 3]
    ctx.close()
