"""The conversation task in a real browser (Playwright + Debian's chromium, the live-server fixtures of conftest.py)
with a tiny local model served by the REAL Hugging Face backend in the generation worker's child process (built
here, never downloaded; the app's default `hf_backend`):

- three turns driven with the keyboard: start, the two candidates streaming in (partial texts seen before the final
  ones), a choice on the 8-point scale per turn (keys 2, 7, 5), the conversation going on from the chosen branch
  (the transcript and the next turn's context hold the chosen message, never the other), the next message sent
  with Enter, the end with a 1-7 rating (key) and a comment; what the store holds afterwards;
- a second labeler in parallel: their pairwise submits (the JSON API's submit path) measured while the model
  generates a long reply in the worker's child for the first labeler (whose page polls meanwhile): p50 and max stay
  under 100 ms;
- the layout at 1280 px and 390 px (A beside B / A above B, no horizontal scrolling, the scale's buttons in view
  and big enough to tap, the rating form), with screenshots in $FEEDBACK_SCREENSHOTS (default: a temporary folder):
  conv_desktop.png, conv_390.png, conv_rating_desktop.png, conv_rating_390.png (and conv_streaming_desktop.png:
  a turn streaming).

The model: the demo's shape (GPT-2, 2 layers, 128 wide, 4 heads) with random weights and a tokenizer trained here on
made-up words (2000 tokens, so that the end-of-text token rarely cuts a reply short and every turn streams for a
second or more); 2048 positions so that three turns of 400-token replies fit.
"""
import json
import os
import random
import statistics
import time
import uuid

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

from fb_helpers import PASSWORD  # noqa: E402 - after the skips above, on purpose
from fb_helpers import login as _login  # noqa: E402
from fb_helpers import uniq as _uniq  # noqa: E402

GEN_WAIT_MS = 120_000   # a turn's generation (the first one starts the worker's process and loads the model)
OPENING = "Tell me about a good film you saw."
MESSAGES = ["Why did you like the ending?", "Would you watch it again?"]
KEYS = [2, 7, 5]        # turn 1: "A is better", turn 2: "B is better", turn 3: "B is negligibly better"
RATING, COMMENT = 6, "Coherent enough for a tiny model; turn 2 was the best."

# Records what the page shows in the two candidate boxes each time it changes (installed before the page's script
# runs), so the test sees the streamed partial texts, not only the final ones.
RECORDER = """
window.__cands = [];
document.addEventListener("DOMContentLoaded", function () {
  var turn = document.getElementById("turn");
  if (!turn) return;
  function text(id) { return document.querySelector("#" + id + " .conv-text").textContent; }
  new MutationObserver(function () {
    window.__cands.push({pending: document.getElementById("candidate-a").classList.contains("pending"),
                         a: text("candidate-a"), b: text("candidate-b")});
  }).observe(turn, {subtree: true, childList: true, characterData: true, attributes: true});
});
"""


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Sentences of made-up words (many distinct ones, so the tokenizer learns a 2000-token vocabulary)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(4000)})
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 25))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from alignloop.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("conv_model") / "policy", _corpus(), vocab_size=2000,
                                 n_layer=2, n_embd=128, n_head=4, n_positions=2048, seed=0)
    return str(path)


def _setup(store, model: str, generation: dict, prompts: list[str], max_turns: int = 3):
    name = _uniq("conv")
    p = store.create_project(name, "conversation", overlap_k=1, guidelines_md="Pick the more fluent reply.",
                             settings={"models": [model], "generation": generation, "max_turns": max_turns})
    store.import_records(name, [{"prompt": t} for t in prompts])
    user = _uniq("u")
    store.add_labeler(user, PASSWORD)
    return p, user


def _errors(page):
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def _focused(page) -> str:
    return page.evaluate("document.activeElement ? (document.activeElement.id || document.activeElement.tagName) : ''")


def _conversation(store, p):
    """(conversation, its turns in order) of the project's only conversation."""
    from sqlalchemy import select

    from alignloop.feedback.models import Conversation, ConversationTurn

    with store.read() as s:
        (c,) = s.scalars(select(Conversation).where(Conversation.project_id == p.id)).all()
        turns = list(s.scalars(select(ConversationTurn).where(ConversationTurn.conversation_id == c.id)
                               .order_by(ConversationTurn.idx)))
    return c, turns


def _wait_ready(page):
    """Wait until the current turn's two candidates are final (the scale shows): their texts (A, B)."""
    expect(page.locator("#scale")).to_be_visible(timeout=GEN_WAIT_MS)
    return (page.locator("#candidate-a .conv-text").text_content(),
            page.locator("#candidate-b .conv-text").text_content())


def _assert_streamed(seen: list[dict], final: tuple[str, str]) -> None:
    """While the turn was pending the boxes showed growing prefixes of the final texts, at least one of them a
    non-empty partial text (streaming visible, not just the end result)."""
    partial = [r for r in seen if r["pending"]]
    assert partial, "the page never showed the turn pending"
    for r in partial:
        for side, text in (("a", final[0]), ("b", final[1])):
            shown = r[side]
            assert shown in ("", "…") or text.startswith(shown), (side, shown[:80], text[:80])
    streamed = [r for r in partial if any(r[s] not in ("", "…") and r[s] != t for s, t in (("a", final[0]),
                                                                                         ("b", final[1])))]
    assert streamed, f"no partial text shown before the final one ({len(partial)} pending renders)"


@pytest.mark.slow
def test_three_turns_with_the_tiny_model_by_keyboard(server, browser, tiny_model):
    from alignloop.data import strength_to_margin
    from alignloop.feedback.conversations import export_conversation_rows
    from alignloop.feedback.models import SCALE_STRENGTHS, Judgement

    store, base = server
    p, user = _setup(store, tiny_model, {"max_new_tokens": 400, "temperature": 1.0}, [OPENING])
    ctx, page = _login(browser, base, user)
    ctx.add_init_script(RECORDER)
    errors = _errors(page)
    page.goto(f"{base}/p/{p.url_key}/converse")
    assert _focused(page) == "start"           # the Start button has the focus: Enter starts
    page.keyboard.press("Enter")
    page.wait_for_selector("#conversation")
    expect(page.locator("#transcript .conv-msg[data-role=user] .conv-text")).to_have_text(OPENING)

    shown: list[tuple[str, str]] = []          # (A, B) per turn, as the page showed them
    for turn, key in enumerate(KEYS):
        final = _wait_ready(page)
        assert final[0] and final[1] and final[0] != final[1], final
        _assert_streamed(page.evaluate("window.__cands.splice(0)"), final)
        shown.append(final)
        assert _focused(page) != "message"     # after sending, the box let go of the keys: 1-8 choose
        page.keyboard.press(str(key))
        picked = final[0] if key <= 4 else final[1]
        assistant = page.locator("#transcript .conv-msg[data-role=assistant]")
        expect(assistant).to_have_count(turn + 1)
        assert assistant.nth(turn).locator(".conv-text").text_content() == picked
        side = "A" if key <= 4 else "B"
        expect(assistant.nth(turn).locator(".conv-pick")).to_have_text(f"{side} · {_label(key)}")
        expect(page.locator("#turn")).to_be_hidden()
        if turn < len(MESSAGES):               # the message box has the focus: type, Enter sends
            expect(page.locator("#message")).to_be_focused()
            page.keyboard.type(MESSAGES[turn])
            page.keyboard.press("Enter")
            expect(page.locator("#transcript .conv-msg[data-role=user]")).to_have_count(turn + 2)
            expect(page.locator("#message")).to_have_value("")

    # three turns: max_turns reached, no more sending; the end with a rating (key) and a comment
    expect(page.locator("#status")).to_contain_text("reached its 3 turns")
    assert page.locator("#send").is_disabled()
    page.focus("#end")
    page.keyboard.press("Enter")
    expect(page.locator("#finish-form")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("Rate the whole conversation (keys 1–7)")
    assert page.locator("#finish").is_disabled()           # no rating yet
    page.keyboard.press(str(RATING))
    expect(page.locator(f"[data-rating='{RATING}']")).to_have_attribute("aria-pressed", "true")
    page.focus("#comment")
    page.keyboard.type(COMMENT)
    page.keyboard.press("Tab")                             # to "Submit rating"
    assert _focused(page) == "finish"
    page.keyboard.press("Enter")
    expect(page.locator("#ended")).to_be_visible()
    expect(page.locator("#ended-text")).to_contain_text(f"rated this conversation {RATING} of 7")
    transcript = page.locator("#transcript .conv-msg[data-role=assistant] .conv-text").all_text_contents()
    page.focus("#next")                                    # the project's only opening is done: "all done"
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()

    # the store: three chosen turns on the chosen branch, the choices, the rating and comment, the judgement
    c, turns = _conversation(store, p)
    assert (c.status, c.rating, c.comment) == ("ended", RATING, COMMENT)
    assert [t.status for t in turns] == ["chosen"] * 3 and [t.choice for t in turns] == KEYS
    chosen_texts = []
    for t, key, (a, b) in zip(turns, KEYS, shown, strict=True):
        assert sorted(t.shown_order) == [0, 1]
        assert [t.candidates[i]["text"] for i in t.shown_order] == [a, b]     # A, B as shown
        assert t.chosen == t.shown_order[0 if key <= 4 else 1]                # canonical index of the shown side
        assert {x["model"] for x in t.candidates} == {tiny_model}
        chosen_texts.append(t.candidates[t.chosen]["text"])
    assert transcript == chosen_texts
    for prev, nxt, msg in zip(turns, turns[1:], MESSAGES, strict=False):
        win, lose = prev.candidates[prev.chosen]["text"], prev.candidates[1 - prev.chosen]["text"]
        assert nxt.context[:-2] == prev.context                               # the conversation goes on ...
        assert nxt.context[-2:] == [{"role": "assistant", "content": win}, {"role": "user", "content": msg}]
        assert all(m["content"] != lose for m in nxt.context)                 # ... from the chosen branch only
        assert lose not in transcript
    assert turns[0].context == [{"role": "user", "content": OPENING}]
    with store.read() as s:
        (j,) = s.query(Judgement).filter(Judgement.assignment_id == c.assignment_id).all()
    assert (j.likert, j.comment, j.labeler_id) == (RATING, COMMENT, c.labeler_id)
    rows, summary = export_conversation_rows(store, p.id, "preference")
    assert summary["pairs"] == 3
    assert [r["chosen"][0]["content"] for r in rows] == chosen_texts
    assert [r["margin"] for r in rows] == [strength_to_margin(SCALE_STRENGTHS[k]) for k in KEYS]
    assert not errors, errors
    ctx.close()


def _label(key: int) -> str:
    from alignloop.feedback.conversations import SCALE_LABELS

    return SCALE_LABELS[key]


# -- a second labeler, not slowed by a generation ------------------------------------------------------------------
def _api_client(base: str, user: str):
    import httpx

    c = httpx.Client(base_url=base, timeout=30)
    r = c.post("/api/login", json={"username": user, "password": PASSWORD})
    assert r.status_code == 200, r.text
    c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return c


def _submits(c, project: str, n: int, pause_s: float = 0.0) -> list[float]:
    """n pairwise judgements through the JSON API's submit path (submit + the next item in one round trip), one
    every `pause_s` seconds or so (a labeler reads between two): the latency of each, in ms."""
    r = c.post(f"/api/p/{project}/next")
    assert r.status_code == 200, r.text
    aid = r.json()["assignment_id"]
    times = []
    for k in range(n):
        time.sleep(pause_s)
        body = {"choice": "left" if k % 2 else "right", "strength": "better", "idempotency_key": uuid.uuid4().hex}
        t = time.perf_counter()
        r = c.post(f"/api/assignments/{aid}/judgement?next=1", json=body)
        times.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 201, r.text
        aid = r.json()["next"]["assignment_id"]
    return times


def _turn0(c, project: str, cid: int) -> dict:
    r = c.get(f"/api/p/{project}/conversations/{cid}")
    assert r.status_code == 200, r.text
    return r.json()["turns"][0]


@pytest.mark.slow
def test_a_second_labeler_is_not_slowed_by_a_generation(server, browser, tiny_model, shots, capsys):
    store, base = server
    # labeler 1 converses with the model: greedy, 1500 tokens, so the reply takes several seconds to generate
    conv_p, talker = _setup(store, tiny_model, {"max_new_tokens": 1500, "temperature": 0}, [OPENING])
    pw = _uniq("pw")
    store.create_project(pw, "pairwise", overlap_k=1)
    store.import_records(pw, [{"prompt": f"Q{i}?", "completions": [f"yes {i}", f"no {i}"]} for i in range(50)])
    labeler = _uniq("u")
    store.add_labeler(labeler, PASSWORD)
    one, two = _api_client(base, talker), _api_client(base, labeler)
    ctx, page = _login(browser, base, talker)
    try:
        baseline = _submits(two, pw, 20)                 # no generation running (the worker may be idle)
        page.goto(f"{base}/p/{conv_p.url_key}/converse")    # labeler 1 starts on the page, which then polls the
        page.keyboard.press("Enter")                        # state every 300 ms while the turn generates
        page.wait_for_selector("#conversation")
        cid = int(page.get_attribute("#conversation", "data-conversation"))
        deadline = time.monotonic() + GEN_WAIT_MS / 1000
        while True:                                      # the model loaded and sampling: partial text streams
            before = _turn0(one, conv_p.url_key, cid)
            if before["status"] == "pending" and (before.get("job") or {}).get("state") == "running" \
                    and len(before["partial"][0]) > 20:
                break
            assert before["status"] == "pending" and time.monotonic() < deadline, before
            time.sleep(0.05)
        t0 = time.monotonic()
        during = _submits(two, pw, 20, pause_s=0.1)     # spread over two seconds of generation
        window_s = time.monotonic() - t0
        after = _turn0(one, conv_p.url_key, cid)
        # the generation ran during the whole measurement: still running after it, and its text grew meanwhile
        assert after["status"] == "pending" and after["job"]["state"] == "running", after
        assert len(after["partial"][0]) > len(before["partial"][0])
        expect(page.locator("#status")).to_contain_text("enerating")
        assert len(page.locator("#candidate-a .conv-text").text_content()) > len(before["partial"][0])
        page.screenshot(path=str(shots / "conv_streaming_desktop.png"))
        figures = {"baseline_ms": _stats(baseline), "during_generation_ms": _stats(during),
                   "window_s": round(window_s, 2),
                   "partial_chars_before_after": [len(before["partial"][0]), len(after["partial"][0])]}
        assert statistics.median(during) < 100 and max(during) < 100, figures
        while _turn0(one, conv_p.url_key, cid)["status"] == "pending":   # let it finish: the worker is free for
            assert time.monotonic() < deadline                           # the next test, and the turn is stored
            time.sleep(0.2)
        done = _turn0(one, conv_p.url_key, cid)
        assert done["status"] == "ready" and len(done["candidates"][0]["text"]) > len(after["partial"][0])
        figures["generation_ms"] = _conversation(store, conv_p)[1][0].gen_ms
        with capsys.disabled():
            print("\nsecond labeler's submit latency:", json.dumps(figures))
    finally:
        ctx.close()
        one.close()
        two.close()


def _stats(ms: list[float]) -> dict:
    return {"n": len(ms), "p50": round(statistics.median(ms), 1), "max": round(max(ms), 1),
            "mean": round(statistics.mean(ms), 1)}


# -- the layout at 1280 px and 390 px -------------------------------------------------------------------------------
@pytest.mark.slow
def test_layout_desktop_and_390px(server, browser, tiny_model, shots):
    store, base = server
    p, user = _setup(store, tiny_model, {"max_new_tokens": 120, "temperature": 1.0}, [OPENING], max_turns=2)
    ctx, page = _login(browser, base, user)  # 1280 x 900
    errors = _errors(page)
    page.goto(f"{base}/p/{p.url_key}/converse")
    page.click("#start")
    _wait_ready(page)
    a, b = page.locator("#candidate-a").bounding_box(), page.locator("#candidate-b").bounding_box()
    assert abs(a["y"] - b["y"]) < 1 and a["x"] + a["width"] <= b["x"]          # A | B
    first, last = page.locator("[data-choice='1']").bounding_box(), page.locator("[data-choice='8']").bounding_box()
    assert abs(first["y"] - last["y"]) < 1 and first["x"] < last["x"]          # the scale in one row, 1 .. 8
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    page.screenshot(path=str(shots / "conv_desktop.png"), full_page=True)

    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
    pctx, phone_page = _login(browser, base, user, **phone)
    phone_errors = _errors(phone_page)
    phone_page.goto(f"{base}/p/{p.url_key}/converse")   # the open conversation again, on a phone
    _wait_ready(phone_page)
    assert phone_page.evaluate("document.documentElement.scrollWidth") <= 390
    a, b = phone_page.locator("#candidate-a").bounding_box(), phone_page.locator("#candidate-b").bounding_box()
    assert a["y"] + a["height"] <= b["y"] and abs(a["x"] - b["x"]) < 1         # A above B
    for n in range(1, 9):                       # every point of the scale on screen, wide and tall enough to tap
        box = phone_page.locator(f"[data-choice='{n}']").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["width"] >= 40 and box["height"] >= 40, (n, box)
    phone_page.screenshot(path=str(shots / "conv_390.png"), full_page=True)
    phone_page.tap("[data-choice='3']")        # the scale works by touch: "A is slightly better"
    expect(phone_page.locator("#transcript .conv-msg[data-role=assistant] .conv-pick")).to_have_text(
        f"A · {_label(3)}")
    phone_page.tap("#end")
    expect(phone_page.locator("#finish-form")).to_be_visible()
    phone_page.tap("[data-rating='5']")
    phone_page.fill("#comment", "Short and fine.")
    assert phone_page.evaluate("document.documentElement.scrollWidth") <= 390
    for n in range(1, 8):
        box = phone_page.locator(f"[data-rating='{n}']").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["height"] >= 30, (n, box)
    phone_page.locator("#finish-form").scroll_into_view_if_needed()
    phone_page.screenshot(path=str(shots / "conv_rating_390.png"), full_page=True)

    page.reload()                               # the desktop tab sees the choice; its rating form, unsent
    expect(page.locator("#transcript .conv-msg[data-role=assistant]")).to_have_count(1)
    page.click("#end")
    page.click("[data-rating='5']")
    page.fill("#comment", "Short and fine.")
    page.screenshot(path=str(shots / "conv_rating_desktop.png"), full_page=True)
    phone_page.tap("#finish")                   # the phone sends it
    expect(phone_page.locator("#ended")).to_be_visible()
    c, _turns = _conversation(store, p)
    assert (c.status, c.rating, c.comment) == ("ended", 5, "Short and fine.")
    assert not errors and not phone_errors, (errors, phone_errors)
    pctx.close()
    ctx.close()
