"""The conversation task (issue 17): store verbs, the JSON API (generation failure and retry, a full queue, resume
after a reload and after a restart, two tabs), validation, blindness, max_turns, the page, exports."""
from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, SECRET, api_login, csrf_of

from alignloop.data import strength_to_margin
from alignloop.feedback import conversations as conv
from alignloop.feedback.app import create_app
from alignloop.feedback.generation import GenerationWorker
from alignloop.feedback.models import SCALE_STRENGTHS, Assignment, ConversationTurn, Judgement

MODELS = ["secret-model-x", "secret-model-y"]

# Backends this module controls (in-process workers load them by "test_conversations:<name>")
CONTROL = {"fail": False, "gate": threading.Event()}


class Flaky:
    """Echo ("A: <msg>" / "B: <msg>") or, while CONTROL["fail"], RuntimeError("model exploded")."""

    def generate(self, job, emit):
        if CONTROL["fail"]:
            raise RuntimeError("model exploded")
        msg = job.context[-1]["content"]
        texts = [f"A: {msg}", f"B: {msg}"]
        for i, t in enumerate(texts):
            emit(i, t)
        return [{"text": t, "model": job.models[min(i, len(job.models) - 1)], "params": job.params, "stopped": True}
                for i, t in enumerate(texts)]


class Gated(Flaky):
    """Streams a partial text, then waits for CONTROL["gate"] before finishing."""

    def generate(self, job, emit):
        emit(0, "A: thinking")
        CONTROL["gate"].wait(30)
        return super().generate(job, emit)


def flaky():
    return Flaky()


def gated():
    return Gated()


@pytest.fixture(autouse=True)
def _control():
    CONTROL["fail"] = False
    CONTROL["gate"] = threading.Event()
    yield
    CONTROL["gate"].set()  # never leave a worker thread waiting


@pytest.fixture
def project(store):
    store.create_project("cv", "conversation", overlap_k=2, settings={"models": MODELS, "max_turns": 3})
    store.import_records("cv", [{"prompt": "hello there"},
                                {"prompt": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "what is 2+2?"}]}])
    for name in ("ann", "bob"):
        store.add_labeler(name, PASSWORD)
    return store.get_project("cv")


@pytest.fixture
def apps(store):
    """make(backend="flaky", max_queue=8) -> (app, worker); workers stopped at the end."""
    made = []

    def make(backend: str = "flaky", max_queue: int = 8):
        w = GenerationWorker(backend=f"test_conversations:{backend}", max_queue=max_queue, in_process=True,
                             timeout_s=30)
        w.start()
        made.append(w)
        return create_app(store, secret_key=SECRET, generation=w), w

    yield make
    CONTROL["gate"].set()
    for w in made:
        w.stop()


def client_of(app, user="ann"):
    return api_login(lambda: TestClient(app), user)


def api(pid="cv"):
    return f"/api/p/{pid}/conversations"


def wait_turn(c, cid, idx=-1, until=("ready", "failed", "interrupted"), timeout=10.0):
    """Poll the state until turn `idx` leaves "pending": the state."""
    end = time.monotonic() + timeout
    while True:
        st = c.get(f"{api()}/{cid}").json()
        if st["turns"][idx]["status"] in until:
            return st
        assert time.monotonic() < end, st
        time.sleep(0.02)


def turns_of(store, cid):
    with store.read() as s:
        return list(s.query(ConversationTurn).filter_by(conversation_id=cid).order_by(ConversationTurn.idx))


def test_a_conversation_through_the_api(project, apps, store):
    app, _w = apps()
    c, h = client_of(app)
    r = c.post(api(), headers=h)
    assert r.status_code == 201, r.text
    cid = r.json()["conversation_id"]
    st = wait_turn(c, cid)
    t0 = st["turns"][0]
    assert t0["status"] == "ready" and st["opening"][-1]["role"] == "user"
    texts = sorted(x["text"] for x in t0["candidates"])
    msg = st["opening"][-1]["content"]
    assert texts == [f"A: {msg}", f"B: {msg}"]
    r = c.post(f"{api()}/{cid}/turns/0/choose", json={"choice": 2, "revision": st["revision"]}, headers=h)
    assert r.status_code == 200 and r.json()["turns"][0]["chosen_side"] == "A" and r.json()["can_send"]
    shown_a = t0["candidates"][0]["text"]
    r = c.post(f"{api()}/{cid}/messages", json={"text": "  tell me more  ", "revision": r.json()["revision"]},
               headers=h)
    assert r.status_code == 201, r.text
    st = wait_turn(c, cid)
    assert st["turns"][1]["user"] == "tell me more"
    assert sorted(x["text"] for x in st["turns"][1]["candidates"]) == ["A: tell me more", "B: tell me more"]
    t = turns_of(store, cid)
    # the second turn continues from the chosen branch: the context holds what A said
    assert t[1].context[-2:] == [{"role": "assistant", "content": shown_a}, {"role": "user", "content": "tell me more"}]
    r = c.post(f"{api()}/{cid}/turns/1/choose", json={"choice": 8, "revision": st["revision"]}, headers=h)
    assert r.status_code == 200 and r.json()["can_end"]
    r = c.post(f"{api()}/{cid}/end", json={"rating": 6, "comment": " nice ", "revision": r.json()["revision"]},
               headers=h)
    assert r.status_code == 200 and r.json()["status"] == "ended" and r.json()["rating"] == 6
    with store.read() as s:
        j = s.query(Judgement).one()
        a = s.get(Assignment, j.assignment_id)
        assert (j.likert, j.comment, a.status, a.item.n_done) == (6, "nice", "done", 1)
    # the same end again is fine; another rating is a 409 carrying the state
    assert c.post(f"{api()}/{cid}/end", json={"rating": 6, "comment": "nice"}, headers=h).status_code == 200
    r = c.post(f"{api()}/{cid}/end", json={"rating": 2}, headers=h)
    assert r.status_code == 409 and r.json()["state"]["rating"] == 6
    # blind: nothing labeler-facing names a model
    for reply in (c.get(f"{api()}/{cid}"), c.get("/p/cv/converse")):
        assert not any(m in reply.text for m in MODELS)


@pytest.mark.parametrize("shown_order", [[0, 1], [1, 0]])
def test_choice_maps_to_the_canonical_candidate(project, store, shown_order):
    lab = next(x for x in store.list_labelers() if x.username == "ann")
    c, turn = conv.take_conversation(store, project.id, lab.id)
    with store.write() as s:
        s.get(ConversationTurn, turn.id).shown_order = shown_order
    assert conv.turn_generated(store, turn.id, [{"text": "zero"}, {"text": "one"}], 5)
    st = conv.conversation_state(store, c.id, lab.id)
    assert [x["text"] for x in st["turns"][0]["candidates"]] == [["zero", "one"][i] for i in shown_order]
    t = conv.choose(store, c.id, lab.id, 0, 7, st["revision"])  # "B is better": the one shown second
    assert (t.choice, t.chosen) == (7, shown_order[1])
    rows, summary = conv.export_conversation_rows(store, project.id, "preference", include_open=True)
    win = ["zero", "one"][shown_order[1]]
    assert rows == [{"prompt": [{"role": "user", "content": "hello there"}],
                     "chosen": [{"role": "assistant", "content": win}],
                     "rejected": [{"role": "assistant", "content": ["zero", "one"][shown_order[0]]}],
                     "margin": strength_to_margin("better"), "strength": "better", "labeler": lab.public_id,
                     "labeler_attributes": {}, "comment": "", "flags": []}]
    assert summary["pairs"] == 1


def test_generation_failure_and_retry(project, apps):
    app, _w = apps()
    c, h = client_of(app)
    CONTROL["fail"] = True
    cid = c.post(api(), headers=h).json()["conversation_id"]
    st = wait_turn(c, cid)
    assert st["turns"][0]["status"] == "failed" and "model exploded" in st["turns"][0]["error"]
    assert not st["can_send"] and not st["can_end"]
    CONTROL["fail"] = False
    r = c.post(f"{api()}/{cid}/turns/0/retry", headers=h)
    assert r.status_code == 200, r.text
    st = wait_turn(c, cid)
    assert st["turns"][0]["status"] == "ready" and st["turns"][0]["attempts"] == 2 and st["turns"][0]["error"] is None
    # a ready turn is not retried: 409 with the state
    r = c.post(f"{api()}/{cid}/turns/0/retry", headers=h)
    assert r.status_code == 409 and r.json()["state"]["turns"][0]["status"] == "ready"


def test_queue_full_then_retry(project, apps, store):
    app, _w = apps("gated", max_queue=1)
    ann, ha = client_of(app, "ann")
    bob, hb = client_of(app, "bob")
    cid_a = ann.post(api(), headers=ha).json()["conversation_id"]
    st = ann.get(f"{api()}/{cid_a}").json()
    assert st["turns"][0]["status"] == "pending"  # the gate holds it: the queue's one place is taken
    r = bob.post(api(), headers=hb)
    assert r.status_code == 503 and r.headers["Retry-After"]
    body = r.json()
    assert "the model is busy" in body["error"] and "waiting" in body["error"]
    t = body["state"]["turns"][0]
    assert t["status"] == "failed" and "the model is busy" in t["error"]
    CONTROL["gate"].set()  # the queue drains
    wait_turn(ann, cid_a)
    cid_b = body["state"]["conversation_id"]
    r = bob.post(f"{api()}/{cid_b}/turns/0/retry", headers=hb)
    assert r.status_code == 200, r.text
    assert wait_turn(bob, cid_b)["turns"][0]["status"] == "ready"


def test_resume_after_reload_and_restart(project, apps, store, monkeypatch):
    app, _w = apps("gated")
    c, h = client_of(app)
    cid = c.post(api(), headers=h).json()["conversation_id"]
    # streaming: the partial text shows while it generates
    end = time.monotonic() + 5
    while "A: thinking" not in c.get(f"{api()}/{cid}").text:
        assert time.monotonic() < end
        time.sleep(0.02)
    # a reload / another device of the same labeler: the same conversation (the page, the state, start)
    c2, h2 = client_of(app)
    page = c2.get("/p/cv/converse")
    assert f'data-conversation="{cid}"' in page.text
    assert c2.post(api(), headers=h2).json()["conversation_id"] == cid
    # a restart: a new app and worker; the lost job shows "interrupted" and a retry generates it
    monkeypatch.setattr(conv, "INTERRUPTED_GRACE_S", 0.0)
    app2, _w2 = apps("flaky")
    c3, h3 = client_of(app2)
    st = c3.get(f"{api()}/{cid}").json()
    assert st["turns"][0]["status"] == "interrupted" and "retry" in st["turns"][0]["error"]
    r = c3.post(f"{api()}/{cid}/turns/0/retry", headers=h3)
    assert r.status_code == 200, r.text
    assert wait_turn(c3, cid)["turns"][0]["status"] == "ready"


def test_two_tabs(project, apps, store):
    app, _w = apps()
    tab1, h = client_of(app)
    tab2 = TestClient(app)
    tab2.cookies = tab1.cookies  # the same session
    cid = tab1.post(api(), headers=h).json()["conversation_id"]
    stale = wait_turn(tab2, cid)
    r = tab1.post(f"{api()}/{cid}/turns/0/choose", json={"choice": 3, "revision": stale["revision"]}, headers=h)
    assert r.status_code == 200
    r = tab2.post(f"{api()}/{cid}/turns/0/choose", json={"choice": 6, "revision": stale["revision"]}, headers=h)
    assert r.status_code == 409 and r.json()["state"]["turns"][0]["choice"] == 3
    # the same choice twice (a double click) is not an error
    r = tab2.post(f"{api()}/{cid}/turns/0/choose", json={"choice": 3, "revision": stale["revision"]}, headers=h)
    assert r.status_code == 200
    rev = r.json()["revision"]
    # both tabs send a message on the same state: exactly one new turn
    results = []

    def send(client, text):
        results.append(client.post(f"{api()}/{cid}/messages", json={"text": text, "revision": rev}, headers=h))

    threads = [threading.Thread(target=send, args=(cl, f"from tab {i}")) for i, cl in enumerate((tab1, tab2))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(r.status_code for r in results) == [201, 409]
    assert len(turns_of(store, cid)) == 2


def test_validation(project, apps):
    app, _w = apps()
    c, h = client_of(app)
    cid = c.post(api(), headers=h).json()["conversation_id"]
    wait_turn(c, cid)
    for bad in (0, 9, "3", True, 2.0, None):
        r = c.post(f"{api()}/{cid}/turns/0/choose", json={"choice": bad}, headers=h)
        assert r.status_code == 422 and "choice" in r.json()["fields"], bad
    r = c.post(f"{api()}/{cid}/end", json={"rating": 5}, headers=h)  # nothing chosen yet
    assert r.status_code == 422 and "turns" in r.json()["fields"]
    rev = c.post(f"{api()}/{cid}/turns/0/choose", json={"choice": 1}, headers=h).json()["revision"]
    for bad in (0, 8, "5", False):
        r = c.post(f"{api()}/{cid}/end", json={"rating": bad}, headers=h)
        assert r.status_code == 422 and "rating" in r.json()["fields"], bad
    for body in ({"text": ""}, {"text": 5}, {"text": "x" * 20001}):
        r = c.post(f"{api()}/{cid}/messages", json=body, headers=h)
        assert r.status_code == 422 and "text" in r.json()["fields"]
    r = c.post(f"{api()}/{cid}/messages", json={"text": "hi", "revision": "x"}, headers=h)
    assert r.status_code == 422 and "revision" in r.json()["fields"]
    r = c.post(f"{api()}/{cid}/messages", json={"text": "hi", "revision": rev - 1}, headers=h)  # stale
    assert r.status_code == 409 and r.json()["state"]["revision"] == rev
    assert c.post(f"{api()}/{cid}/messages", json={"text": "hi"}).status_code == 403  # no CSRF header
    assert c.post(f"{api()}/{cid}/messages", content=b"{nope", headers=h).status_code == 400


def test_max_turns_and_other_labelers(project, apps):
    app, _w = apps()
    c, h = client_of(app)
    cid = c.post(api(), headers=h).json()["conversation_id"]
    for i in range(3):
        st = wait_turn(c, cid)
        st = c.post(f"{api()}/{cid}/turns/{i}/choose", json={"choice": 4, "revision": st["revision"]},
                    headers=h).json()
        if i < 2:
            assert c.post(f"{api()}/{cid}/messages", json={"text": f"m{i}"}, headers=h).status_code == 201
    assert not st["can_send"] and st["can_end"]
    r = c.post(f"{api()}/{cid}/messages", json={"text": "one more"}, headers=h)
    assert r.status_code == 409 and "3 turns" in r.json()["error"]
    bob, hb = client_of(app, "bob")
    assert bob.get(f"{api()}/{cid}").status_code == 404
    assert bob.post(f"{api()}/{cid}/turns/0/choose", json={"choice": 1}, headers=hb).status_code == 404
    assert bob.post(f"{api()}/{cid}/end", json={"rating": 1}, headers=hb).status_code == 404
    assert c.get(f"{api('nope')}/{cid}").status_code == 404


def test_page_start_and_all_done(project, apps, store):
    app, _w = apps()
    c, _h = client_of(app)
    page = c.get("/p/cv/converse")
    assert page.status_code == 200 and 'id="start-form"' in page.text
    with store.read() as s:
        assert s.query(Assignment).count() == 0  # a GET takes nothing
    r = c.post("/p/cv/converse/start", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/p/cv/converse"
    page = c.get("/p/cv/converse")
    assert 'id="conversation"' in page.text and "/static/conversation.js" in page.text
    assert c.post("/p/cv/converse/start", data={}).status_code == 403  # CSRF
    r = c.get("/p/cv/converse", headers={"HX-Request": "true"})  # a boosted navigation: a full load
    assert r.headers["HX-Redirect"] == "/p/cv/converse"
    store.create_project("empty", "conversation", settings={"models": MODELS})
    assert 'id="all-done"' in c.get("/p/empty/converse").text


def test_exports(project, store):
    ann = next(x for x in store.list_labelers() if x.username == "ann")
    c, t0 = conv.take_conversation(store, project.id, ann.id)
    conv.turn_generated(store, t0.id, [{"text": "c0"}, {"text": "c1"}], 3)
    rev = conv.conversation_state(store, c.id, ann.id)["revision"]
    t0 = conv.choose(store, c.id, ann.id, 0, 1, rev)
    win0 = ["c0", "c1"][t0.chosen]
    t1 = conv.add_message(store, c.id, ann.id, "next?", None)
    conv.turn_generated(store, t1.id, [{"text": "same"}, {"text": "same"}], 3)  # left out of pairs
    conv.choose(store, c.id, ann.id, 1, 5, None)
    rows, summary = conv.export_conversation_rows(store, project.id, "preference")
    assert rows == [] and summary["left_out"] == {"conversation not ended": 1}
    conv.end_conversation(store, c.id, ann.id, 4, "ok", None)
    rows, summary = conv.export_conversation_rows(store, project.id, "preference")
    meta = {"labeler": ann.public_id, "labeler_attributes": {}, "comment": "ok", "flags": []}
    assert rows == [{"prompt": [{"role": "user", "content": "hello there"}],
                     "chosen": [{"role": "assistant", "content": win0}],
                     "rejected": [{"role": "assistant", "content": ["c0", "c1"][1 - t0.chosen]}],
                     "margin": strength_to_margin(SCALE_STRENGTHS[1]), "strength": "significantly_better", **meta}]
    assert summary == {"conversations": 1, "turns": 2, "pairs": 1, "rows": 1,
                       "left_out": {"identical candidates": 1}}
    rows, summary = conv.export_conversation_rows(store, project.id, "sft")
    assert rows == [{"messages": [{"role": "user", "content": "hello there"},
                                  {"role": "assistant", "content": win0},
                                  {"role": "user", "content": "next?"},
                                  {"role": "assistant", "content": "same"}], **meta}]
    with pytest.raises(Exception, match="format must be one of"):
        conv.export_conversation_rows(store, project.id, "csv")


def _ended_conversations(store, project) -> int:
    """Both labelers converse on both items (2 chosen turns each, distinct texts) and end: 4 conversations."""
    n = 0
    for lab in (x for x in store.list_labelers() if x.username in ("ann", "bob")):
        while True:
            c, t = conv.take_conversation(store, project.id, lab.id)
            if c is None:
                break
            for k in range(2):
                if k:
                    t = conv.add_message(store, c.id, lab.id, f"and then {n}?", None)
                conv.turn_generated(store, t.id, [{"text": f"a good reply {n}.{k}"}, {"text": f"meh {n}"}], 1)
                conv.choose(store, c.id, lab.id, k, 1 + (n + k) % 8, None)
            conv.end_conversation(store, c.id, lab.id, 5, "", None)
            n += 1
    return n


@pytest.mark.slow
def test_exports_train_with_rm_and_sft(project, store, tmp_path):
    """The preference export trains `alignloop rm` and the sft export `alignloop sft` (a tiny model whose tokenizer
    gets the plain chat template, saved with it): the trainers read every row and their losses are finite."""
    import json
    import math
    import subprocess
    import sys

    from alignloop.data import write_rows
    from alignloop.data.chat import PLAIN_CHAT_TEMPLATE
    from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, train_tokenizer

    assert _ended_conversations(store, project) == 4
    tok = train_tokenizer(default_corpus(200), vocab_size=200)
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    model = build_tiny_checkpoint(tmp_path / "m", tokenizer=tok, n_layer=1, n_embd=16, n_head=2)
    for fmt, cmd, loss, n_rows in (("preference", "rm", "loss/rm", 8), ("sft", "sft", "loss/sft", 4)):
        rows, summary = conv.export_conversation_rows(store, project.id, fmt)
        assert len(rows) == n_rows and summary["conversations"] == 4
        data = write_rows(rows, tmp_path / f"{fmt}.jsonl")
        out = tmp_path / cmd
        r = subprocess.run([sys.executable, "-m", "alignloop.cli", cmd, "--model", str(model), "--train-file",
                            str(data), "--output-dir", str(out), "--per-device-batch-size", "1", "--max-length", "96",
                            "--no-tensorboard"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert f"rows={n_rows}," in r.stderr + r.stdout
        assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == n_rows  # batch 1, one epoch: a step a row
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(math.isfinite(m[loss]) for m in metrics if loss in m)


def test_open_start(project, apps, store):
    store.create_project("free", "conversation", overlap_k=2, settings={"models": MODELS, "open_start": True})
    app, _w = apps()
    c, h = client_of(app)
    r = c.post(api("free"), json={"first_message": "  my own opener "}, headers=h)
    assert r.status_code == 201, r.text
    cid = r.json()["conversation_id"]
    st = c.get(f"{api('free')}/{cid}").json()
    assert st["opening"] == [{"role": "user", "content": "my own opener"}]
    with store.read() as s:  # its own item, whose slots are all taken for good: nobody else's opening
        a = s.query(Assignment).filter_by(project_id=store.get_project("free").id).one()
        assert a.item.n_active == conv.OPEN_START_SLOTS
    r = c.post(api(), json={"first_message": "hi"}, headers=h)  # cv: open_start is off
    assert r.status_code == 422 and "first_message" in r.json()["fields"]


@pytest.mark.slow
def test_the_app_builds_its_worker_lazily_and_serves_a_tiny_model(store, tmp_path):
    """No worker given: none runs until the first generation; then the default Hugging Face backend (a child
    process) answers with two candidates from a tiny local model; the lifespan stops it."""
    from alignloop.data.chat import PLAIN_CHAT_TEMPLATE
    from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, train_tokenizer

    tok = train_tokenizer(default_corpus(200), vocab_size=200)
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    model = build_tiny_checkpoint(tmp_path / "m", tokenizer=tok, n_layer=1, n_embd=16, n_head=2)
    store.create_project("tiny", "conversation", overlap_k=1,
                         settings={"models": [str(model)], "generation": {"max_new_tokens": 8}})
    store.import_records("tiny", [{"prompt": "hello"}])
    store.add_labeler("ann", PASSWORD)
    app = create_app(store, secret_key=SECRET, generation_queue=2, generation_timeout_s=120)
    with TestClient(app) as raw:
        gen = app.state.generation
        assert not gen.running  # nothing spawned before the first generation
        r = raw.post("/api/login", json={"username": "ann", "password": PASSWORD})
        h = {"X-CSRF-Token": r.json()["csrf_token"]}
        cid = raw.post("/api/p/tiny/conversations", headers=h).json()["conversation_id"]
        assert gen.running
        end = time.monotonic() + 120
        while (st := raw.get(f"/api/p/tiny/conversations/{cid}").json())["turns"][0]["status"] == "pending":
            assert time.monotonic() < end
            time.sleep(0.1)
        t = st["turns"][0]
        assert t["status"] == "ready", t
        assert len(t["candidates"]) == 2 and all(isinstance(x["text"], str) for x in t["candidates"])
        worker = gen._worker
    assert not gen.running and worker._state == "stopped"  # the lifespan stopped what it built


def test_huge_ids_and_other_task_types_are_404(project, apps, store):
    store.create_project("pw", "pairwise")
    app, _w = apps()
    c, h = client_of(app)
    assert c.get("/p/pw/converse").status_code == 404
    assert c.post(api("pw"), headers=h).status_code == 404
    cid = c.post(api(), headers=h).json()["conversation_id"]
    for huge in (str(2**63), str(10**30)):
        assert c.get(f"{api()}/{huge}").status_code == 404
        assert c.post(f"{api()}/{huge}/end", json={"rating": 1}, headers=h).status_code == 404
        assert c.post(f"{api()}/{cid}/turns/{huge}/choose", json={"choice": 1}, headers=h).status_code == 404
        assert c.post(f"{api()}/{cid}/turns/{huge}/retry", headers=h).status_code == 404


def test_end_after_the_assignment_was_skipped_or_expired(project, store):
    """A conversation outlives its assignment's timeout (or a skip through the generic API): ending takes the slot
    back when one is free, else it still ends (rating stored) without counting toward the item's labels."""
    labs = {x.username: x for x in store.list_labelers()}
    ann = labs["ann"]
    c, t = conv.take_conversation(store, project.id, ann.id)
    conv.turn_generated(store, t.id, [{"text": "x"}, {"text": "y"}], 1)
    conv.choose(store, c.id, ann.id, 0, 4, None)
    with store.read() as s:
        aid = s.get(conv.Conversation, c.id).assignment_id
    store.skip(aid, ann.id)
    conv.end_conversation(store, c.id, ann.id, 3, "", None)
    a = store.get_assignment(aid)
    assert a.status == "done" and (a.item.n_active, a.item.n_done) == (1, 1)
    # bob's conversation on the other item expires and the item's two slots go to others meanwhile
    bob = labs["bob"]
    c2, t2 = conv.take_conversation(store, project.id, bob.id)
    conv.turn_generated(store, t2.id, [{"text": "x"}, {"text": "y"}], 1)
    conv.choose(store, c2.id, bob.id, 0, 4, None)
    with store.write() as s:
        a2 = s.get(Assignment, s.get(conv.Conversation, c2.id).assignment_id)
        a2.status = "expired"
        a2.item.n_active = 2  # = overlap_k: no free slot
    conv.end_conversation(store, c2.id, bob.id, 3, "", None)
    assert conv.conversation_state(store, c2.id, bob.id)["status"] == "ended"
    a2 = store.get_assignment(a2.id)
    assert a2.status == "expired" and (a2.item.n_active, a2.item.n_done) == (2, 0)
