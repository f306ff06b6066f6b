"""Admin pages in a real browser (Playwright, Debian's chromium, a uvicorn server): creating a project with its
settings, importing a file, the settings editor, labelers and members, the review page with an override, and the
rank dashboard. Screenshots go to $FEEDBACK_SCREENSHOTS (default: a temporary folder)."""
import os
import uuid

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
expect.set_options(timeout=15_000)  # two shared cores: a page can take a few seconds under load

from fb_helpers import PASSWORD  # noqa: E402 - after the skips above, on purpose
from fb_helpers import login as _login  # noqa: E402
from fb_helpers import uniq as _uniq  # noqa: E402


def _eventually(check, timeout_s: float = 5.0):
    """Wait until `check()` is true (a boosted form's POST lands after the click returns)."""
    import time

    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _admin(browser, store, base):
    boss = _uniq("boss")
    store.add_labeler(boss, PASSWORD, role="admin")
    return _login(browser, base, boss)


@pytest.mark.slow  # ~12 s: a dozen pages and four sign-ins
def test_create_import_settings_and_members(server, browser, shots, tmp_path):
    store, base = server
    ctx, page = _admin(browser, store, base)
    name = _uniq("hh")
    page.goto(base + "/admin")
    page.click("#new-project")
    page.fill("#name", name)
    page.select_option("#task_type", "pairwise")
    page.fill("#overlap_k", "2")
    page.fill("#guidelines", "# Rules\n\nPrefer **helpful** answers.")
    page.uncheck("#allow_ties")
    page.fill("#min_labels", "2")
    page.screenshot(path=str(shots / "admin_01_new_project.png"), full_page=True)
    page.click("#new-project-form button[type=submit]")
    expect(page.locator("#notice")).to_contain_text("Project created")
    p = store.get_project(name)
    assert p.settings["allow_ties"] is False and p.settings["min_labels"] == 2 and p.overlap_k == 2
    # import a file: counts shown, the items stored
    data = tmp_path / "rows.jsonl"
    data.write_text('{"id": "1", "prompt": "Capital of France?", "completions": ["Paris.", "Lyon."]}\n'
                    '{"id": "2", "prompt": "2 + 2?", "completions": ["4", "5"]}\n', encoding="utf-8")
    page.goto(f"{base}/admin/p/{p.id}/import")
    page.set_input_files("#file", str(data))
    page.click("#import-form button[type=submit]")
    expect(page.locator("#import-result")).to_contain_text("2 prompts added (4 completions, 2 items, 0 gold)")
    page.screenshot(path=str(shots / "admin_02_import.png"), full_page=True)
    assert store.project_summary(p.id)["items"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completions": ["a", "b"]}\n{"prompt": "y", "completions": "oops"}\n')
    page.set_input_files("#file", str(bad))
    page.click("#import-form button[type=submit]")
    expect(page.locator("#import-error")).to_contain_text("bad.jsonl line 2")
    # the settings editor: a mistake names the field and keeps what was typed; then saved
    page.goto(f"{base}/admin/p/{p.id}/settings")
    page.fill("#more_settings", '{"thresholds": {"min_items": "ten"}}')
    page.click("#settings-form button[type=submit]")
    expect(page.locator("#settings-error")).to_contain_text("settings.thresholds.min_items")
    assert "ten" in page.input_value("#more_settings")
    page.fill("#more_settings", '{"thresholds": {"min_items": 10}}')
    page.fill("#guidelines", "# Rules v2")
    page.select_option("#access", "members")
    page.screenshot(path=str(shots / "admin_03_settings.png"), full_page=True)
    page.click("#settings-form button[type=submit]")
    expect(page.locator("#notice")).to_contain_text("Saved")
    _eventually(lambda: store.get_project(p.id).settings.get("access") == "members")
    p = store.get_project(p.id)
    assert p.settings["access"] == "members" and p.settings["thresholds"] == {"min_items": 10}
    assert p.guidelines_md == "# Rules v2"
    # labelers: add two, make one a member; the other does not see the project
    member, other = _uniq("mem"), _uniq("oth")
    for u in (member, other):
        page.goto(base + "/admin")
        page.fill("form[action='/admin/labelers'] input[name=username]", u)
        page.fill("form[action='/admin/labelers'] input[name=password]", PASSWORD)
        page.click("form[action='/admin/labelers'] button[type=submit]")
        expect(page.locator("#labeler-table, table").last).to_contain_text(u)
    mid = store.authenticate(member, PASSWORD).id
    page.goto(f"{base}/admin/p/{p.id}/members")
    page.check(f"#member-{mid}")
    page.screenshot(path=str(shots / "admin_04_members.png"), full_page=True)
    page.click("#members-form button[type=submit]")
    _eventually(lambda: store.project_members(p.id) == {mid})
    # deactivate the other labeler from the admin page
    oid = store.authenticate(other, PASSWORD).id
    page.goto(base + "/admin")
    page.click(f"#labeler-{oid} .active-form button")
    expect(page.locator(f"#labeler-{oid} .active-cell")).to_have_text("no")
    page.screenshot(path=str(shots / "admin_05_labelers.png"), full_page=True)
    ctx.close()
    mctx, mpage = _login(browser, base, member)
    expect(mpage.locator("table")).to_contain_text(name)
    mctx.close()
    assert store.authenticate(other, PASSWORD) is None  # deactivated


def _judge(store, pid, lab_id, fields_of):
    a = store.next_assignment(pid, lab_id)
    store.submit(a.id, lab_id, fields_of(a), uuid.uuid4().hex)


def test_review_page_override_and_rank_dashboard(server, browser, shots):
    store, base = server
    name = _uniq("pw")
    p = store.create_project(name, "pairwise", overlap_k=2)
    store.import_records(name, [{"prompt": "Explain **RLHF** in one line.", "completions": [
        {"text": "Reinforcement learning from human feedback: a reward model trained on preferences.",
         "model": "sft-v2"}, {"text": "It is a kind of <b>magic</b>.", "model": "base"}]}])
    ann, bob = (store.add_labeler(_uniq(n), PASSWORD) for n in ("ann", "bob"))
    _judge(store, p.id, ann.id, lambda a: {"choice": "left" if a.shown_order[0] == 0 else "right",
                                           "strength": "better", "comment": "A is accurate"})
    _judge(store, p.id, bob.id, lambda a: {"choice": "left" if a.shown_order[0] == 1 else "right",
                                           "strength": "slightly_better"})
    ctx, page = _admin(browser, store, base)
    page.goto(f"{base}/admin/p/{p.id}/review")
    expect(page.locator("#review-table")).to_contain_text("yes")  # the labels disagree
    page.screenshot(path=str(shots / "admin_06_review_list.png"), full_page=True)
    page.click("#review-table a")
    expect(page.locator("#label-table")).to_contain_text(ann.username)
    expect(page.locator("#label-table")).to_contain_text("A is accurate")
    expect(page.locator("#completions")).to_contain_text("model: sft-v2")
    expect(page.locator("#completion-1 .text")).to_have_text("It is a kind of <b>magic</b>.")  # escaped text
    page.check("input[name=decision][value=override]")
    page.check("input[name=choice][value=left]")
    page.select_option("select[name=strength]", "significantly_better")
    page.fill("textarea[name=note]", "A is right; B is wrong")
    page.screenshot(path=str(shots / "admin_07_review_item.png"), full_page=True)
    page.click("#adjudicate-form button[type=submit]")
    expect(page.locator("#adjudication-table")).to_contain_text("override")
    (adj,) = store.adjudications(p.id).values()
    assert adj["answer"] == {"choice": "a", "strength": "significantly_better"}
    assert adj["note"] == "A is right; B is wrong"
    # rank dashboard: rank columns, no pairwise ones
    rk = _uniq("rk")
    q = store.create_project(rk, "rank", overlap_k=2)
    store.import_records(rk, [{"prompt": f"rank {i}", "completions": [
        {"text": "best", "model": "big"}, {"text": "mid", "model": "mid"}, {"text": "worst", "model": "small"}]}
        for i in range(3)])
    for lab in (ann, bob):
        for _ in range(3):
            _judge(store, q.id, lab.id, lambda a: {f"rank_{pos}": str(c + 1) for pos, c in enumerate(a.shown_order)})
    page.goto(f"{base}/admin/p/{rk}")
    expect(page.locator("#rank-model-table")).to_contain_text("big")
    expect(page.locator("#labeler-table thead")).to_contain_text("Kendall's τ with the others")
    expect(page.locator("#labeler-table thead")).not_to_contain_text("Left picks")
    page.screenshot(path=str(shots / "admin_08_rank_dashboard.png"), full_page=True)
    ctx.close()
