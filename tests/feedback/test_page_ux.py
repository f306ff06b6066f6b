"""The labeling page's content (test client, no browser): Markdown rendered safely with a raw-text view, guidelines
beside the item, ties and strength as the project's settings say, the Undo form, "My judgements" with the prompt.

The keyboard, layout and sticky controls need a browser: test_page_browser.py."""
from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fb_helpers import PASSWORD, csrf_of, field_of, label_page

from alignloop.feedback.render import render_markdown

ATTACKS = ['<script>alert("s")</script>', '<img src=x onerror="alert(1)">', "[click](javascript:alert(1))",
           "<b onclick=alert(2)>raw html</b>", '<svg onload="alert(3)"><circle r="4"/></svg>',
           "[data](data:text/html;base64,PHNjcmlwdD4=)", "<a href='javascript:alert(4)'>a</a>",
           "![pixel](https://tracker.example/p.png)", "<iframe src=//evil.example></iframe>"]
MARKDOWN = "**Bold** and `code`:\n\n```python\nprint('<hi>')\n```\n\n[docs](https://docs.example/x)"


class Tags(HTMLParser):
    """Every start tag of a page with its attributes (what a browser would build elements from)."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def assert_inert(html: str) -> None:
    """No element a browser would run or load from the page's content: only the app's own two scripts, no event
    handler attribute, no image/svg/iframe/object, no javascript: or data: link; links to elsewhere are nofollow."""
    tags = Tags(html).tags
    assert [a.get("src") for t, a in tags if t == "script"] == ["/static/htmx.min.js", "/static/app.js"]
    assert not [(t, a) for t, a in tags if any(k.startswith("on") for k in a)]
    assert not [t for t, _ in tags if t in ("img", "svg", "iframe", "object", "embed", "circle")]
    hrefs = [a for t, a in tags if t == "a" and "href" in a]
    assert not [a for a in hrefs if re.match(r"\s*(javascript|data|vbscript):", a["href"], re.I)]
    for a in hrefs:
        if a["href"].startswith("http"):
            assert a.get("rel") == "noopener noreferrer nofollow", a


def _project(store, name, task="pairwise", rows=None, **settings):
    store.create_project(name, task, overlap_k=1, guidelines_md="# Rules\n\nPrefer **honest** answers.",
                         settings=settings or None)
    store.import_records(name, rows or [{"prompt": f"{name} prompt {i}", "completions": [f"x{i}", f"y{i}"]}
                                        for i in range(3)])


@pytest.fixture
def ann(store, make_client):
    store.add_labeler("ann", PASSWORD)
    return make_client("ann")


def _label(client, name):
    """The label page with an item on it (fb_helpers.label_page: POST "Start" when offered)."""
    r = label_page(client, name)
    assert r.status_code == 200 and 'id="judge"' in r.text, r.text
    return r


def _submit(client, name, page, fields):
    aid = re.search(r'action="/p/[^/]+/label/(\d+)"', page.text).group(1)
    return client.post(f"/p/{name}/label/{aid}", data={"csrf_token": csrf_of(page.text), **fields,
                                                       "idempotency_key": field_of(page.text, "idempotency_key")})


def test_render_markdown_attacks_do_not_survive():
    for attack in ATTACKS:
        assert_inert(f'<script src="/static/htmx.min.js"></script><script src="/static/app.js"></script>'
                     f"{render_markdown(attack)}")
    out = render_markdown(MARKDOWN)
    assert "<strong>Bold</strong>" in out and "<code>code</code>" in out
    assert "<pre><code class=\"language-python\">print('&lt;hi&gt;')\n</code></pre>" in out
    assert '<a href="https://docs.example/x" rel="noopener noreferrer nofollow">docs</a>' in out
    assert render_markdown("a\nb") == "<p>a<br>\nb</p>\n"  # a single newline stays a line break


def test_label_page_renders_markdown_safely_with_raw_text(store, ann):
    rows = [{"prompt": "Explain:\n\n" + "\n\n".join(ATTACKS), "completions": [MARKDOWN, "\n\n".join(ATTACKS)]}]
    _project(store, "md", rows=rows)
    html = _label(ann, "md").text
    assert_inert(html)
    assert '<pre><code class="language-python">' in html and "<strong>Bold</strong>" in html
    # the raw text, escaped, for the "Raw text" switch: every answer and prompt turn once rendered, once raw
    assert html.count('class="raw-text"') == html.count('class="text md"') == 3
    assert "<pre class=\"raw-text\">**Bold** and `code`:\n\n```python\nprint(&#39;&lt;hi&gt;&#39;)" in html
    assert "&lt;script&gt;alert(&#34;s&#34;)&lt;/script&gt;" in html
    assert 'id="raw-toggle"' in html


def test_guidelines_beside_the_item(store, ann):
    _project(store, "gl")
    html = _label(ann, "gl").text
    side = html[html.index('<aside class="guidelines-side"'):html.index("</aside>")]
    assert '<details id="guidelines-panel" open>' in side and "<summary>Guidelines</summary>" in side
    assert "<h1>Rules</h1>" in side and "<strong>honest</strong>" in side
    assert 'href="/p/gl/guidelines"' in html  # still reachable on their own page
    store.create_project("nogl", "pairwise", overlap_k=1)
    store.import_records("nogl", [{"prompt": "p", "completions": ["x", "y"]}])
    assert "guidelines-panel" not in _label(ann, "nogl").text  # no empty panel


def test_ties_hidden_when_the_project_refuses_them(store, ann):
    _project(store, "ties")
    _project(store, "noties", allow_ties=False)
    with_ties = _label(ann, "ties").text
    assert 'name="choice" value="tie"' in with_ties and 'name="choice" value="both_bad"' in with_ties
    html = _label(ann, "noties").text
    assert 'value="tie"' not in html and 'value="both_bad"' not in html and "<kbd>T</kbd>" not in html
    assert 'name="choice" value="left"' in html and 'name="choice" value="right"' in html
    _project(store, "rknt", task="rank", rows=[{"prompt": "r", "completions": ["a", "b", "c"]}], allow_ties=False)
    assert "Each rank once: no ties." in _label(ann, "rknt").text


def test_two_keystroke_pairwise_page(store, ann):
    _project(store, "strict")
    _project(store, "quick", strength_required=False)
    strict = _label(ann, "strict").text
    assert 'data-strength-required="1"' in strict and 'id="two-keys"' not in strict
    page = _label(ann, "quick")
    assert 'data-strength-required="0"' in page.text
    assert re.search(r'id="two-keys">Two keys: <kbd>A</kbd> or <kbd>B</kbd>.*then <kbd>Enter</kbd>', page.text)
    assert "How much better? (for A or B; optional)" in page.text


def test_undo_button_posts_the_undo_form(store, ann):
    _project(store, "un")
    first = _label(ann, "un")
    assert 'id="undo"' not in first.text  # nothing to undo yet
    after = _submit(ann, "un", first, {"choice": "tie"})
    assert after.status_code == 200 and "1 done" in after.text
    form = re.search(r'<form method="post" action="/p/un/undo" id="undo-form"[^>]*>\s*'
                     r'<input type="hidden" name="csrf_token" value="([^"]+)">', after.text)
    assert form and form.group(1) == csrf_of(after.text)
    assert re.search(r'<button type="submit" id="undo" form="undo-form" data-key="u"', after.text)
    _project(store, "unth", task="thumbs", rows=[{"prompt": "t", "completions": ["x"]}, {"prompt": "u",
                                                                                        "completions": ["y"]}])
    after = _submit(ann, "unth", _label(ann, "unth"), {"thumbs": "up"})
    assert 'data-key="z"' in after.text  # on a thumbs page U is thumbs up: undo is Z


def test_done_page_offers_undo(store, ann):
    _project(store, "dn", rows=[{"prompt": "only", "completions": ["x", "y"]}])
    done = _submit(ann, "dn", _label(ann, "dn"), {"choice": "both_bad"})
    assert 'id="all-done"' in done.text
    assert 'action="/p/dn/undo" id="undo-form"' in done.text and 'id="undo"' in done.text


def test_history_shows_the_prompt_and_no_gold_tag(store, ann):
    long_prompt = "Summarise <b>this</b> please: " + "word " * 100
    rows = [{"prompt": long_prompt, "completions": ["x", "y"], "gold": {"choice": "a"}},
            {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "first ask"},
                        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second ask"}],
             "completions": ["x", "y"]}]
    # gold placement is a seeded draw: with this seed and rate the labeler gets the gold item (checked below)
    store.create_project("hi", "pairwise", overlap_k=1, gold_rate=0.9, settings={"gold_seed": 7})
    store.import_records("hi", rows)
    page = _label(ann, "hi")
    while 'id="judge"' in page.text:  # judge whatever comes until nothing is left
        page = _submit(ann, "hi", page, {"choice": "tie"})
    uid = next(lab.id for lab in store.list_labelers() if lab.username == "ann")
    judged = store.labeler_history(store.get_project("hi").id, uid)
    assert len(judged) == 2 and sum(r["assignment"].is_gold for r in judged) == 1  # the gold one is listed
    history = ann.get("/p/hi/history").text
    assert "gold" not in history.split("<tbody>")[1].lower()
    assert "<th>Prompt</th>" in history and "<th>Item</th>" not in history
    assert "Summarise &lt;b&gt;this&lt;/b&gt; please: word word" in history and "<b>this</b>" not in history
    cell = re.search(r'<td class="prompt-cell"[^>]*>(Summarise[^<]*)</td>', history).group(1)
    assert cell.endswith("...") and len(cell) < 200  # cut short (the title attribute holds more)
    assert re.search(r'<td class="prompt-cell"[^>]*>second ask</td>', history)  # a chat: its last user turn


def test_start_page_offers_undo(store, ann):
    _project(store, "st")
    uid = next(lab.id for lab in store.list_labelers() if lab.username == "ann")
    pid = store.get_project("st").id
    start = ann.get("/p/st/label").text
    assert 'id="start-form"' in start and 'id="undo"' not in start  # nothing done yet: nothing to undo
    a = store.next_assignment(pid, uid)  # judged outside the page: no item is open afterwards
    store.submit(a.id, uid, {"choice": "tie"}, "k" * 32)
    start = ann.get("/p/st/label").text
    assert 'id="start-form"' in start and 'action="/p/st/undo" id="undo-form"' in start
    assert re.search(r'<button type="submit" id="undo" data-key="u"', start)
