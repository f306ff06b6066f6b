"""Real-browser test of an item asking two questions: Playwright for Python driving Debian's chromium against a real
uvicorn server (the fixtures of conftest.py). Answers both questions with the keyboard (an answered question moves
the highlight on; Enter with a question unanswered names it and submits nothing), submits, checks the stored
answers, then downloads each criterion's export from the dashboard; also the form without JavaScript.

Screenshots go to $FEEDBACK_SCREENSHOTS (default: a temporary folder)."""
import json
import os
import re

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
ACTIVE = re.compile(r"\bactive\b")
QUESTIONS = [{"name": "helpful", "question": "Which response is more helpful?"},
             {"name": "harmless", "question": "Which response is more <em>harmless</em>?"}]


def _setup(store, n_items=2):
    name = _uniq("qq")
    store.create_project(name, "pairwise", overlap_k=1, settings={"questions": QUESTIONS})
    store.import_records(name, [{"prompt": f"Question {i}?", "completions": [f"first {i}", f"second {i}"]}
                                for i in range(n_items)])
    user, boss = _uniq("u"), _uniq("boss")
    store.add_labeler(user, PASSWORD, attributes={"group": "warm"})
    store.add_labeler(boss, PASSWORD, role="admin")
    return name, user, boss


def _answers(store, project):
    """Each stored judgement's answers in screen terms: {prompt: {question: (left|right|tie|both_bad, strength)}}."""
    p = store.get_project(project)
    prompts, _comps = store.prompts_and_completions(p.id)
    out = {}
    for r in store.current_judgements(p.id):
        screen = {}
        for name, a in r["answers"].items():
            pos = a["picked_position"]
            screen[name] = (a["choice"] if pos is None else ("left", "right")[pos], a["strength"])
        out[prompts[r["prompt_id"]].messages[-1]["content"]] = screen
    return out


def test_two_questions_with_the_keyboard_then_export_per_criterion(server, browser, shots, tmp_path):
    store, base = server
    proj, user, boss = _setup(store)
    ctx, page = _login(browser, base, user)
    _open_label(page, base, proj)
    expect(page.locator("#question-helpful")).to_have_class(ACTIVE)
    expect(page.locator("#question-harmless legend").first).to_have_text("2. Which response is more <em>harmless</em>?")
    first_prompt = page.locator(".context .text").last.inner_text()
    first_left = page.locator("#completion-0 .text").inner_text()  # the shown order is random
    page.keyboard.press("a")            # helpful: A better ... still needs a strength: stays
    expect(page.locator("#question-helpful")).to_have_class(ACTIVE)
    page.keyboard.press("2")            # ... better: answered, on to harmless
    expect(page.locator("#question-harmless")).to_have_class(ACTIVE)
    assert page.evaluate("document.activeElement.id") == "question-harmless"
    page.keyboard.press("Enter")        # harmless unanswered: nothing submitted, the question named
    expect(page.locator("#questions-missing")).to_have_text(
        "Answer every question first: Which response is more <em>harmless</em>? (a choice).")
    expect(page.locator("#question-harmless")).to_have_class(re.compile(r"\bmissing\b"))
    page.screenshot(path=str(shots / "questions_01_missing.png"), full_page=True)
    assert store.current_judgements(store.get_project(proj).id) == []
    page.keyboard.press("t")            # harmless: tie
    expect(page.locator("#question-harmless")).not_to_have_class(re.compile(r"\bmissing\b"))
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_contain_text("1 done")
    # the second item: both bad, then B better with no strength (Enter names it), then 1 (significantly)
    second_prompt = page.locator(".context .text").last.inner_text()
    assert second_prompt != first_prompt
    second_right = page.locator("#completion-1 .text").inner_text()
    page.keyboard.press("x")
    expect(page.locator("#question-harmless")).to_have_class(ACTIVE)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    expect(page.locator("#questions-missing")).to_contain_text("harmless</em>? (how much better)")
    page.keyboard.press("k")            # back up to helpful and forward again (J/K move between questions)
    expect(page.locator("#question-helpful")).to_have_class(ACTIVE)
    page.keyboard.press("j")
    page.keyboard.press("1")
    page.screenshot(path=str(shots / "questions_02_answered.png"), full_page=True)
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    assert _answers(store, proj) == {
        first_prompt: {"helpful": ("left", "better"), "harmless": ("tie", None)},
        second_prompt: {"helpful": ("both_bad", None), "harmless": ("right", "significantly_better")}}
    ctx.close()

    ctx, page = _login(browser, base, boss)  # the export of each criterion, downloaded from the dashboard
    page.goto(f"{base}/admin/p/{proj}")
    expect(page.locator("#question-table")).to_contain_text("harmless")
    page.screenshot(path=str(shots / "questions_03_dashboard.png"), full_page=True)
    rows = {}
    for criterion in ("helpful", "harmless", "all"):
        page.select_option("select[name=criterion]", criterion)
        page.select_option("select[name=mode]", "all")
        page.select_option("select[name=exclude_flagged]", "false")
        with page.expect_download() as dl:
            page.click("form[action$='/export'] button[type=submit]")
        path = tmp_path / f"{criterion}.jsonl"
        dl.value.save_as(path)
        assert dl.value.suggested_filename == f"{proj}-preference-{criterion}.jsonl"
        rows[criterion] = [json.loads(x) for x in path.read_text().splitlines()]
    ctx.close()
    (helpful,) = rows["helpful"]  # the tie and both-bad answers are dropped (ties: drop)
    assert (helpful["prompt"], helpful["chosen"], helpful["criterion"]) == (first_prompt, first_left, "helpful")
    assert helpful["labeler_attributes"] == {"group": "warm"} and helpful["labeler"].startswith("L")
    (harmless,) = rows["harmless"]
    assert (harmless["prompt"], harmless["chosen"], harmless["criterion"], harmless["margin"]) == (
        second_prompt, second_right, "harmless", 1.0)
    assert sorted(r["criterion"] for r in rows["all"]) == ["harmless", "helpful"]
    assert len({r["group"] for r in rows["all"]}) == 2


def test_two_questions_without_javascript(server, browser):
    store, base = server
    proj, user, _boss = _setup(store, n_items=1)
    ctx, page = _login(browser, base, user, js=False)
    _open_label(page, base, proj)
    page.check("input[name=choice_helpful][value=right]")
    page.click("#submit")               # no strength for helpful, harmless unanswered: the server names both
    expect(page.locator("#form-errors")).to_contain_text("helpful: say how much better")
    expect(page.locator("#form-errors")).to_contain_text("harmless: choose the better response")
    assert page.locator("input[name=choice_helpful][value=right]").is_checked()  # kept
    page.check("input[name=strength_helpful][value=slightly_better]")
    page.check("input[name=choice_harmless][value=both_bad]")
    page.click("#submit")
    expect(page.locator("#all-done")).to_be_visible()
    (answers,) = _answers(store, proj).values()
    assert answers == {"helpful": ("right", "slightly_better"), "harmless": ("both_bad", None)}
    ctx.close()
