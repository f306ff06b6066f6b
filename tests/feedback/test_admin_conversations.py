"""The admin's conversations pages (`web/admin_conversations.py`): the list of a conversation project's conversations
(newest first, filtered open / ended) and one conversation's transcript with both candidates of every turn, their
models, the A/B order, the 8-point choice and the chosen one, failures; admins only, every text escaped, 404s for
huge ids, another project's conversation and projects of other task types."""
from __future__ import annotations

import html
import re

import pytest
from fb_helpers import PASSWORD

from alignloop.feedback import conversations as conv
from alignloop.feedback.models import ConversationTurn

XSS = "<script>alert(1)</script>"


def _turn(store, turn_id: int, shown_order: list[int]) -> None:
    with store.write() as s:  # the A/B order is a seeded draw: fixed here so the test knows which side is which
        s.get(ConversationTurn, turn_id).shown_order = shown_order


@pytest.fixture
def chats(store):
    """Project "cv" (two models) with ann's ended conversation (two chosen turns, the first candidate an XSS text) and
    bob's open one (a turn failed twice); project "cv2" with one conversation of ann's; a demonstration project."""
    store.add_labeler("boss", PASSWORD, role="admin")
    ann = store.add_labeler("ann", PASSWORD)
    bob = store.add_labeler("bob", PASSWORD)
    store.create_project("cv", "conversation", overlap_k=2, settings={"models": ["m-alpha", "m-beta"]})
    store.import_records("cv", [{"prompt": [{"role": "system", "content": "Be brief & kind."},
                                            {"role": "user", "content": "hello <there>"}]}])
    store.create_project("cv2", "conversation", overlap_k=1, settings={"models": ["m"]})
    store.import_records("cv2", [{"prompt": "elsewhere"}])
    store.create_project("demos", "demonstration", overlap_k=1)
    p, p2 = store.get_project("cv"), store.get_project("cv2")

    c, t0 = conv.take_conversation(store, p.id, ann.id)
    _turn(store, t0.id, [1, 0])  # m-beta's candidate shown as A
    assert conv.turn_generated(store, t0.id, [{"text": XSS, "model": "m-alpha", "stopped": "eos"},
                                              {"text": "beta says hi", "model": "m-beta"}], 1234)
    st = conv.conversation_state(store, c.id, ann.id)
    assert conv.choose(store, c.id, ann.id, 0, 2, st["revision"]).chosen == 1  # "A is better": m-beta's
    t1 = conv.add_message(store, c.id, ann.id, "tell me <more>", conv.conversation_state(store, c.id, ann.id)
                          ["revision"])
    _turn(store, t1.id, [0, 1])
    assert conv.turn_generated(store, t1.id, [{"text": "alpha goes on", "model": "m-alpha"},
                                              {"text": "beta goes on", "model": "m-beta"}], 800)
    st = conv.conversation_state(store, c.id, ann.id)
    assert conv.choose(store, c.id, ann.id, 1, 8, st["revision"]).chosen == 1  # "B is much better": m-beta's
    st = conv.conversation_state(store, c.id, ann.id)
    conv.end_conversation(store, c.id, ann.id, 6, "nice & <b>bold</b>", st["revision"])

    b, bt = conv.take_conversation(store, p.id, bob.id)
    assert conv.turn_failed(store, bt.id, "model exploded")
    conv.retry_turn(store, b.id, bob.id, 0)
    assert conv.turn_failed(store, bt.id, "boom <twice>", attempt=2)

    other, ot = conv.take_conversation(store, p2.id, ann.id)
    assert conv.turn_generated(store, ot.id, [{"text": "x", "model": "m"}, {"text": "y", "model": "m"}], 1)
    return {"p": p, "p2": p2, "demos": store.get_project("demos"), "ann": ann, "bob": bob, "ended": c, "open": b,
            "other": other}


def _admin(make_client):
    return make_client("boss")


def _section(page: str, anchor: str) -> str:
    """The HTML of the element with id `anchor` up to its first closing </section> or </tr>."""
    start = page.index(f'id="{anchor}"')
    ends = [i for i in (page.find("</section>", start), page.find("</tr>", start)) if i != -1]
    return page[start:min(ends)]


def _texts(fragment: str, cls: str = "text") -> list[str]:
    """The unescaped contents of every <div class="text"> in `fragment`."""
    return [html.unescape(m) for m in re.findall(rf'<div class="{cls}">(.*?)</div>', fragment, re.S)]


def test_the_list_shows_each_conversation_newest_first(chats, make_client):
    p, ended, open_ = chats["p"], chats["ended"], chats["open"]
    c = _admin(make_client)
    page = c.get(f"/admin/p/{p.id}/conversations")
    assert page.status_code == 200, page.text
    text = page.text
    assert "2 conversations" in text
    assert text.index(f'id="c{open_.id}"') < text.index(f'id="c{ended.id}"')  # newest first
    assert f'id="c{chats["other"].id}"' not in text  # another project's
    row = _section(text, f"c{ended.id}")
    assert f'href="/admin/p/{p.id}/conversations/{ended.id}"' in row
    assert f"ann <span class=\"hint\">({chats['ann'].public_id})</span>" in row
    assert '<td class="conv-status">ended</td>' in row
    assert '<td class="conv-chosen">2 of 2</td>' in row
    assert '<td class="conv-rating">6/7</td>' in row
    assert "nice &amp; &lt;b&gt;bold&lt;/b&gt;" in row and "<b>bold</b>" not in text
    assert ended.created_at.strftime("%Y-%m-%d %H:%M") in row
    row = _section(text, f"c{open_.id}")
    assert f"bob <span class=\"hint\">({chats['bob'].public_id})</span>" in row
    assert '<td class="conv-status">open</td>' in row and '<td class="conv-chosen">0 of 1</td>' in row
    assert '<td class="conv-rating">–</td>' in row
    # the project nav links the page on conversation projects only
    assert f'href="/admin/p/{p.id}/conversations" id="nav-conversations"' in text
    assert 'id="nav-demonstrations"' not in text
    demos = c.get(f"/admin/p/{chats['demos'].id}/demonstrations").text
    assert 'id="nav-conversations"' not in demos and 'id="nav-demonstrations"' in demos


def test_the_filter(chats, make_client):
    p, ended, open_ = chats["p"], chats["ended"], chats["open"]
    c = _admin(make_client)
    only_open = c.get(f"/admin/p/{p.id}/conversations?show=open").text
    assert f'id="c{open_.id}"' in only_open and f'id="c{ended.id}"' not in only_open
    assert "1 conversation," in only_open
    only_ended = c.get(f"/admin/p/{p.id}/conversations?show=ended").text
    assert f'id="c{ended.id}"' in only_ended and f'id="c{open_.id}"' not in only_ended
    both = c.get(f"/admin/p/{p.id}/conversations?show=all").text
    assert f'id="c{ended.id}"' in both and f'id="c{open_.id}"' in both
    assert 'href="?show=ended" aria-current="page"' in only_ended
    r = c.get(f"/admin/p/{p.id}/conversations?show=bogus")
    assert r.status_code == 422 and "show: one of all, open, ended" in r.text
    empty = c.get(f"/admin/p/{chats['p2'].id}/conversations?show=ended").text
    assert 'id="convs-empty"' in empty


def test_the_transcript_names_models_choices_and_the_chosen(chats, make_client):
    p, ended = chats["p"], chats["ended"]
    c = _admin(make_client)
    page = c.get(f"/admin/p/{p.id}/conversations/{ended.id}")
    assert page.status_code == 200, page.text
    text = page.text
    assert f"ann <span class=\"hint\">({chats['ann'].public_id})</span>" in text
    assert '<td id="conv-status">ended</td>' in text and '<td id="conv-rating">6/7</td>' in text
    assert '<td id="conv-chosen">2 of 2</td>' in text
    assert '<td id="conv-comment" class="prompt-cell">nice &amp; &lt;b&gt;bold&lt;/b&gt;</td>' in text
    assert _texts(_section(text, "conv-opening")) == ["Be brief & kind."]

    t0 = _section(text, "turn-0")
    assert _texts(t0) == ["hello <there>", "beta says hi", XSS]  # the user's message, then A, then B
    a, b = re.findall(r'<article class="completion candidate( active chosen)?" data-side="(.)" data-canonical="(\d)">'
                      r'\s*<div class="head">(.*?)</div>\s*<div class="hint">(.*?)</div>', t0)
    assert a[:3] == (" active chosen", "A", "1") and "model m-beta" in a[3] and "✓ chosen" in a[3]
    assert b[:3] == ("", "B", "0") and "model m-alpha" in b[3] and "chosen" not in b[3]
    assert (a[4], b[4]) == ("candidate 1", "candidate 0 · stopped: eos")
    assert "Choice: <strong>2 · A is better</strong>" in t0
    assert "(strength better; the conversation continued from A)" in t0
    assert t0.count("✓ chosen") == 1
    assert "generated in 1.2 s" in t0 and "attempt: 1" in t0

    t1 = _section(text, "turn-1")
    assert _texts(t1) == ["tell me <more>", "alpha goes on", "beta goes on"]
    assert 'data-side="A" data-canonical="0"' in t1 and 'data-side="B" data-canonical="1"' in t1
    assert re.search(r'candidate active chosen" data-side="B" data-canonical="1">\s*<div class="head"><span>'
                     r'Shown as B · model m-beta</span><span class="chosen-mark[^"]*">✓ chosen', t1)
    assert t1.count("✓ chosen") == 1
    assert "Choice: <strong>8 · B is much better</strong>" in t1
    assert "(strength significantly better; the conversation continued from B)" in t1
    assert "generated in 0.8 s" in t1
    assert 'id="turn-2"' not in text


def test_a_failed_turn_shows_its_error_and_attempts(chats, make_client):
    p, open_ = chats["p"], chats["open"]
    text = _admin(make_client).get(f"/admin/p/{p.id}/conversations/{open_.id}").text
    t0 = _section(text, "turn-0")
    assert "failed · attempts: 2" in t0
    assert "Generation failed: boom &lt;twice&gt;" in t0 and "<twice>" not in t0
    assert "<article" not in t0 and "Choice:" not in t0
    assert '<td id="conv-status">open</td>' in text and '<td id="conv-rating">–</td>' in text


def test_every_text_is_escaped(chats, make_client):
    p, ended = chats["p"], chats["ended"]
    c = _admin(make_client)
    for path in (f"/admin/p/{p.id}/conversations", f"/admin/p/{p.id}/conversations/{ended.id}"):
        text = c.get(path).text
        for raw in (XSS, "<b>bold</b>", "<there>", "<more>"):
            assert raw not in text, (path, raw)
    text = c.get(f"/admin/p/{p.id}/conversations/{ended.id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "hello &lt;there&gt;" in text


def test_labelers_get_403(chats, make_client):
    p, ended = chats["p"], chats["ended"]
    ann = make_client("ann")
    for path in (f"/admin/p/{p.id}/conversations", f"/admin/p/{p.id}/conversations/{ended.id}"):
        r = ann.get(path)
        assert r.status_code == 403 and "admins only" in r.text and "beta says hi" not in r.text
    anon = make_client()
    r = anon.get(f"/admin/p/{p.id}/conversations/{ended.id}", follow_redirects=False)
    assert r.status_code in (303, 401, 403) and "beta says hi" not in r.text


def test_huge_missing_and_other_projects_ids_are_404(chats, make_client):
    p, p2 = chats["p"], chats["p2"]
    c = _admin(make_client)
    demos = chats["demos"]
    for path in (f"/admin/p/{p.id}/conversations/{2**63}", f"/admin/p/{p.id}/conversations/{2**63 - 1}",
                 f"/admin/p/{p.id}/conversations/{2**64 + 5}", f"/admin/p/{p.id}/conversations/{10**40}",
                 f"/admin/p/{2**63}/conversations", f"/admin/p/{2**63}/conversations/{chats['ended'].id}",
                 f"/admin/p/{p.id}/conversations/{chats['other'].id}",   # cv2's conversation under cv
                 f"/admin/p/{p2.id}/conversations/{chats['ended'].id}",  # and the other way round
                 f"/admin/p/{p.id}/conversations/999999",
                 f"/admin/p/{demos.id}/conversations", f"/admin/p/{demos.id}/conversations/{chats['ended'].id}"):
        r = c.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text[:300])
        assert "beta says hi" not in r.text
    assert c.get(f"/admin/p/{p2.id}/conversations/{chats['other'].id}").status_code == 200


def test_the_list_is_capped_newest_first(chats, store):
    from alignloop.feedback.web.admin_conversations import PAGE_ROWS, conversation_rows

    assert PAGE_ROWS == 500
    rows, total = conversation_rows(store, chats["p"].id, "all", limit=1)
    assert total == 2 and [r["id"] for r in rows] == [chats["open"].id]
    rows, total = conversation_rows(store, chats["p"].id, "ended")
    assert total == 1 and [(r["labeler"], r["chosen"], r["turns"], r["rating"], r["comment"]) for r in rows] == [
        ("ann", 2, 2, 6, "nice & <b>bold</b>")]
