"""The generation worker (a child process, a bounded queue, streaming, timeouts, crashes, stop) with the fake
backends of gen_fakes.py, and the Hugging Face backend with a tiny local model (never downloaded)."""
from __future__ import annotations

import itertools
import json
import os
import threading
import time

import pytest

from alignloop.feedback.generation import (
    GenerationJob,
    GenerationWorker,
    QueueFull,
    generate_candidates,
    public_error,
    reply_text,
    visible_text,
)

CTX = [{"role": "user", "content": "hello there world"}]


class Recorder:
    """on_done: every call, with the thread it came in."""

    def __init__(self):
        self.calls, self.event = [], threading.Event()

    def __call__(self, job, candidates, error, gen_ms):
        self.calls.append((job.job_id, candidates, error, gen_ms, threading.current_thread().name))
        self.event.set()

    def of(self, job_id):
        return [c for c in self.calls if c[0] == job_id]


def job(job_id, params=None, context=CTX, models=("m",), seed=0):
    return GenerationJob(job_id, 1, list(context), list(models), dict(params or {}), seed)


def wait_for(worker, job_id, states=("done", "failed"), timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = worker.status(job_id)
        if st is not None and st["state"] in states:
            return st
        time.sleep(0.02)
    raise AssertionError(f"{job_id} not {states} after {timeout} s: {worker.status(job_id)}")


@pytest.fixture
def make_worker():
    workers = []

    def make(backend, **kw):
        w = GenerationWorker(backend, **kw)
        w.start()
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.stop()


def test_streams_partials_then_calls_on_done_once(make_worker):
    done = Recorder()
    w = make_worker("gen_fakes:slow", on_done=done)
    w.submit(job("j1", {"fake_seconds": 1.5}))
    partials = []
    while (st := w.status("j1"))["state"] != "done":
        assert st["state"] in ("queued", "running"), st
        if st["state"] == "running" and any(st["partial"]):
            partials.append(st["partial"])
        time.sleep(0.02)
    assert partials, "no partial text seen before the job finished"
    final = ["A: hello there world", "B: hello there world"]
    assert all(p[i] == "" or final[i].startswith(p[i]) for p in partials for i in (0, 1))
    assert any(p != final for p in partials)
    assert st == {"state": "done", "position": 0, "partial": final, "error": None}
    assert done.event.wait(5)
    time.sleep(0.2)
    (call,) = done.calls
    job_id, candidates, error, gen_ms, thread = call
    assert job_id == "j1" and error is None and 1000 <= gen_ms < 10000
    assert [c["text"] for c in candidates] == final
    assert candidates[0] == {"text": final[0], "model": "m", "params": {"fake_seconds": 1.5}, "stopped": True}
    assert thread == "generation-listener"          # not the caller's thread (the event loop's)
    assert w._child.pid != os.getpid()


def test_failure_is_a_clear_message(make_worker):
    done = Recorder()
    w = make_worker("gen_fakes:fail", on_done=done)
    w.submit(job("f1"))
    st = wait_for(w, "f1")
    assert st["state"] == "failed" and st["error"] == "model exploded"
    assert done.event.wait(5)
    assert done.of("f1")[0][1:3] == (None, "model exploded")
    w.submit(job("f1"))                    # a finished job id may be retried
    assert wait_for(w, "f1")["state"] == "failed"
    assert done.event.wait(5) and len(done.calls) == 2


def test_unknown_backend_fails_the_job_not_the_server(make_worker):
    w = make_worker("gen_fakes:nothing_here")
    w.submit(job("u1"))
    st = wait_for(w, "u1")
    assert st["state"] == "failed" and "nothing_here" in st["error"]


def test_queue_full_without_waiting(make_worker):
    w = make_worker("gen_fakes:slow", max_queue=2)
    w.submit(job("q1", {"fake_seconds": 3}))
    w.submit(job("q2", {"fake_seconds": 0.1}))
    assert w.status("q2")["state"] == "queued" and w.status("q2")["position"] == 1
    t0 = time.perf_counter()
    with pytest.raises(QueueFull, match="2 generations are already waiting"):
        w.submit(job("q3"))
    assert time.perf_counter() - t0 < 0.010
    assert w.status("q3") is None
    with pytest.raises(ValueError, match="already"):
        w.submit(job("q1"))
    t0 = time.perf_counter()
    for _ in range(100):
        w.status("q2")
    assert (time.perf_counter() - t0) / 100 < 0.002


def test_timeout_kills_the_child_and_the_next_job_runs(make_worker):
    done = Recorder()
    w = make_worker("gen_fakes:hang", timeout_s=1.5, on_done=done)
    w.submit(job("h1"))
    w.submit(job("h2", {"hang": False}))
    first = w._child
    assert w.status("h2")["position"] == 1
    st = wait_for(w, "h1", timeout=30)
    assert st["state"] == "failed" and st["error"] == "generation took longer than 1.5 s"
    first.join(5)
    assert not first.is_alive() and first.exitcode is not None     # killed and reaped: no zombie
    st = wait_for(w, "h2", timeout=30)
    assert st["state"] == "done" and st["partial"] == ["A: hello there world", "B: hello there world"]
    assert w._child is not first and w._child.is_alive()
    assert [c[2] for c in done.calls] == ["generation took longer than 1.5 s", None]


def test_loading_the_model_does_not_count_in_the_generation_timeout(make_worker):
    """Review 17 F5: a model that takes longer to load than `timeout_s` used to fail every job (the child killed
    mid-load, the next job loading from scratch); the timeout starts once the child says the models are loaded."""
    done = Recorder()
    w = make_worker("gen_fakes:slowload", timeout_s=1.0, on_done=done)
    w.submit(job("l1", {"load_seconds": 2.5}))
    st = wait_for(w, "l1", timeout=30)
    assert st == {"state": "done", "position": 0, "partial": ["A: hello there world", "B: hello there world"],
                  "error": None}
    assert done.event.wait(5) and done.calls[0][2] is None and done.calls[0][3] < 1000   # gen_ms: no loading


def test_loading_has_its_own_limit_with_a_clear_message(make_worker):
    done = Recorder()
    w = make_worker("gen_fakes:slowload", timeout_s=30.0, load_timeout_s=1.0, on_done=done)
    w.submit(job("l1", {"load_seconds": 60}))
    w.submit(job("l2", {"load_seconds": 0}))
    st = wait_for(w, "l1", timeout=30)
    assert st["state"] == "failed"
    assert st["error"].startswith("the model was still loading after 1 s")
    assert wait_for(w, "l2", timeout=30)["state"] == "done"        # a fresh child serves the next job


def test_a_child_that_cannot_be_restarted_backs_off_and_fails_the_queued_jobs(make_worker):
    """Review 17 F6: when the child cannot be started again the listener used to spin (a closed queue raises at once)
    and the queued jobs stayed queued for ever; now it pauses between tries (1 s, 2 s, ...) and after 3 failed tries
    fails the queued jobs with the reason; once a start works again, jobs run."""
    done = Recorder()
    w = make_worker("gen_fakes:crash", on_done=done)
    tries = []

    def cannot_start():
        tries.append(time.monotonic())
        raise OSError("out of processes")

    w._spawn = cannot_start
    w.submit(job("c1"))
    w.submit(job("c2", {"crash": False}))
    assert "exit code 3" in wait_for(w, "c1", timeout=30)["error"]
    st = wait_for(w, "c2", timeout=30)
    assert st["state"] == "failed"
    assert st["error"] == ("the generation process could not be started (out of processes; 3 tries); retry in a "
                           "while")
    assert len(tries) == 3 and tries[2] - tries[0] >= 2.5          # paused 1 s, then 2 s: no busy loop
    time.sleep(0.5)
    assert len(tries) == 3
    assert sorted((c[0], c[2] is None) for c in done.calls) == [("c1", False), ("c2", False)]
    del w._spawn                                                    # the machine recovers: the next try works
    w.submit(job("c3", {"crash": False}))
    assert wait_for(w, "c3", timeout=30)["state"] == "done"


def test_a_crashed_child_fails_its_job_and_is_restarted(make_worker):
    w = make_worker("gen_fakes:crash")
    w.submit(job("c1"))
    w.submit(job("c2", {"crash": False}))
    st = wait_for(w, "c1", timeout=30)
    assert st["state"] == "failed" and "exited unexpectedly (exit code 3)" in st["error"]
    assert wait_for(w, "c2", timeout=30)["state"] == "done"


def test_the_child_uses_the_given_torch_threads(make_worker):
    w = make_worker("gen_fakes:threads", threads=2)
    w.submit(job("n1"))
    assert wait_for(w, "n1")["partial"] == ["torch threads: 2", "torch threads: 2"]


def test_stop_ends_everything_and_fails_unfinished_jobs():
    done = Recorder()
    w = GenerationWorker("gen_fakes:hang", on_done=done)
    w.start()
    w.submit(job("s1"))
    w.submit(job("s2"))
    wait_for(w, "s1", states=("running",))
    child, listener = w._child, w._listener
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 5
    assert not child.is_alive() and child.exitcode is not None
    assert not listener.is_alive()
    assert sorted((c[0], c[2]) for c in done.calls) == [("s1", "the generation worker stopped"),
                                                        ("s2", "the generation worker stopped")]
    with pytest.raises(RuntimeError, match="stopped"):
        w.submit(job("s3"))
    w.stop()                                             # twice is fine


def test_in_process_mode_and_a_bounded_status_table(make_worker, monkeypatch):
    import alignloop.feedback.generation as generation

    monkeypatch.setattr(generation, "_KEEP_FINISHED", 3)
    done = Recorder()
    w = make_worker("gen_fakes:echo", in_process=True, on_done=done)
    for i in range(5):
        w.submit(job(f"e{i}", context=[{"role": "user", "content": f"m{i}"}]))
        assert wait_for(w, f"e{i}")["partial"] == [f"A: m{i}", f"B: m{i}"]
    assert [w.status(f"e{i}") is None for i in range(5)] == [True, True, False, False, False]
    assert len(w._status) == 3 and len(done.calls) == 5


def test_visible_text_is_a_prefix_of_the_reply():
    stops = ("\n\nUser:",)
    final = "Fine, thanks."
    full = " Fine, thanks.\n\nUser: and you?"
    for k in range(len(full) + 1):
        shown = visible_text(full[:k], stops)
        assert final.startswith(shown), (k, shown)
    assert visible_text(" Fine\n\nUs", stops) == "Fine"
    assert visible_text(" caf\ufffd", stops) == "caf"
    # a reply cut at max_new_tokens in the middle of a character: the half character is not part of the reply
    assert reply_text(" caf\ufffd", stops) == "caf" and reply_text(" a\ufffdb ", stops) == "a\ufffdb"


# -- the Hugging Face backend with a tiny local model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    from alignloop.models.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("gen_models")
    return (str(build_tiny_checkpoint(root / "a", n_layer=1, n_embd=32, n_head=2, n_positions=512, seed=1)),
            str(build_tiny_checkpoint(root / "b", n_layer=1, n_embd=32, n_head=2, n_positions=512, seed=2)))


CHAT = [{"role": "user", "content": "good movie"}, {"role": "assistant", "content": "the plot"},
        {"role": "user", "content": "boring"}]


def test_plain_template_renders_prefixes_consistently(tiny_paths):
    from alignloop.data.chat import (
        PLAIN_CHAT_TEMPLATE,
        assistant_spans,
        chat_stop_strings,
        ensure_chat_template,
        render_completion,
        render_prompt,
    )
    from alignloop.models import load_tokenizer

    tok = load_tokenizer(tiny_paths[0])
    assert not tok.chat_template and chat_stop_strings(tok) == ("\n\nUser:",)   # rendered in the plain format
    ensure_chat_template(tok)
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE and chat_stop_strings(tok) == ("\n\nUser:",)
    prompt = render_prompt(CHAT, tok)
    assert prompt == "User: good movie\n\nAssistant: the plot<|endoftext|>\n\nUser: boring\n\nAssistant:"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_stop_strings(tok) == ()                                       # a template of its own: EOS only
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    assert render_completion(CHAT, [{"role": "assistant", "content": "fun"}], tok) == " fun<|endoftext|>"
    start = prompt.index(" the plot")
    assert assistant_spans(CHAT, tok, prompt) == [(start, start + len(" the plot<|endoftext|>"))]


def test_generate_candidates_one_model_two_models(tiny_paths):
    streamed: dict[int, list[str]] = {0: [], 1: []}
    cands = generate_candidates([tiny_paths[0]], CHAT, {"max_new_tokens": 24}, seed=4,
                                emit=lambda i, t: streamed[i].append(t))
    assert len(cands) == 2 and cands[0]["text"] != cands[1]["text"]
    assert [c["model"] for c in cands] == [tiny_paths[0]] * 2
    assert cands[0]["params"] == {"max_new_tokens": 24, "temperature": 0.8, "top_p": 1.0, "top_k": 0}
    assert all(isinstance(c["stopped"], bool) for c in cands)
    for i in (0, 1):
        assert len(streamed[i]) >= 2 and streamed[i][-1] == cands[i]["text"]     # a first step, the end
        assert all(cands[i]["text"].startswith(t) for t in streamed[i])
    again = generate_candidates([tiny_paths[0]], CHAT, {"max_new_tokens": 24}, seed=4)
    assert [c["text"] for c in again] == [c["text"] for c in cands]          # seeded
    two = generate_candidates(list(tiny_paths), CHAT, {"max_new_tokens": 8, "temperature": 0}, seed=4)
    assert [c["model"] for c in two] == list(tiny_paths)
    assert two[0]["text"] != two[1]["text"]
    greedy = generate_candidates([tiny_paths[0]], CHAT, {"max_new_tokens": 8, "temperature": 0}, seed=9)
    assert greedy[0]["text"] == greedy[1]["text"]           # temperature 0: greedy, the same reply twice
    with pytest.raises(ValueError, match="1 or 2 models"):
        generate_candidates([], CHAT, {}, seed=0)


def test_two_models_stream_at_the_same_time(tiny_paths, monkeypatch):
    """Review 17 F4 (blindness): with two models, model 0 used to stream to its end before model 1 started, so the
    side that filled first was always models[0]. Both are sampled at once now: each side's text grows while the
    other's does, and the replies stay seeded (each thread has its own RNG)."""
    import alignloop.feedback.generation as generation

    monkeypatch.setattr(generation, "_PARTIAL_EVERY_S", 0.0)
    lock, log = threading.Lock(), []

    def emit(i, text):
        with lock:
            log.append(i)

    cands = generate_candidates(list(tiny_paths), CHAT, {"max_new_tokens": 60, "temperature": 1.0}, seed=1,
                                emit=emit)
    partial = log[:-2]                                  # the last two emits are the final texts, 0 then 1
    assert partial.count(0) >= 10 and partial.count(1) >= 10, partial
    first = {i: partial.index(i) for i in (0, 1)}
    last = {i: len(partial) - 1 - partial[::-1].index(i) for i in (0, 1)}
    assert first[1] < last[0] and first[0] < last[1], partial      # the two streams overlap
    switches = sum(a != b for a, b in itertools.pairwise(partial))
    assert switches >= 3, partial
    again = generate_candidates(list(tiny_paths), CHAT, {"max_new_tokens": 60, "temperature": 1.0}, seed=1)
    assert [c["text"] for c in again] == [c["text"] for c in cands]
    assert [c["model"] for c in cands] == list(tiny_paths)


def test_public_error_names_no_model():
    """Review 17 F4: an error a labeler sees must not say which model is behind a side; the stored text keeps it."""
    models = ["/srv/models/secret-policy-v3", "org/other-model"]
    full = ("could not load model '/srv/models/secret-policy-v3': no file /srv/models/secret-policy-v3/config.json; "
            "org/other-model answered; secret-policy-v3 ran out of memory")
    text = public_error(full, models)
    assert text == ("could not load the model: no file the model/config.json; the model answered; the model ran out "
                    "of memory")
    assert public_error('could not load model "it\'s": gone', []) == "could not load the model: gone"
    assert public_error("generation took longer than 120 s", models) == "generation took longer than 120 s"
    assert public_error(None, models) is None


def test_hf_backend_streams_from_the_child_process(make_worker, tiny_paths):
    done = Recorder()
    w = make_worker("alignloop.feedback.generation:hf_backend", on_done=done, timeout_s=120)
    w.submit(job("t1", {"max_new_tokens": 400, "temperature": 1.0}, context=CHAT, models=[tiny_paths[0]], seed=1))
    seen = []
    while (st := w.status("t1"))["state"] in ("queued", "running"):
        seen.append(st["partial"])
        time.sleep(0.01)
    assert st["state"] == "done", st
    assert done.event.wait(5)
    (_, cands, error, gen_ms, _), = done.calls
    assert error is None and gen_ms > 0
    assert len(cands) == 2 and cands[0]["text"] != cands[1]["text"]
    assert st["partial"] == [c["text"] for c in cands]
    assert all(cands[i]["text"].startswith(p[i]) for p in seen for i in (0, 1))
    assert any(p != ["", ""] and p != st["partial"] for p in seen)          # streamed: text before the end
    w.submit(job("t2", {"max_new_tokens": 4}, context=CHAT, models=["/no/such/model"]))
    st = wait_for(w, "t2")
    assert st["state"] == "failed" and "/no/such/model" in st["error"]


def test_the_parent_is_not_starved_while_the_child_generates(make_worker, tiny_paths):
    """What protects labelers' latency: while the child samples, the web server's process stays nearly idle (its
    listener thread blocks on the queue) and small Python work in it runs at full speed."""
    w = make_worker("alignloop.feedback.generation:hf_backend", timeout_s=120)
    w.submit(job("warm", {"max_new_tokens": 2}, context=CHAT, models=[tiny_paths[0]]))
    wait_for(w, "warm")                                  # the child has loaded the model
    row = {f"k{i}": [i, str(i), {"x": i}] for i in range(30)}
    times, cpu, wall = [], 0.0, 0.0
    for n in range(30):
        w.submit(job(f"g{n}", {"max_new_tokens": 480, "temperature": 1.0}, context=CHAT, models=[tiny_paths[0]],
                     seed=n))
        wait_for(w, f"g{n}", states=("running", "done", "failed"))
        while w.status(f"g{n}")["state"] == "running":
            if wall < 1.0:                               # the parent idle: what does its listener thread cost?
                c0, t0 = time.process_time(), time.perf_counter()
                time.sleep(0.1)
                if w.status(f"g{n}")["state"] == "running":
                    cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - t0
            elif len(times) < 300:                       # small Python work, as a request handler's
                t = time.perf_counter()
                time.sleep(0.002)                        # releases the GIL, as waiting on I/O does
                for _ in range(5):
                    json.dumps(row)
                times.append((time.perf_counter() - t) * 1000 - 2)
            else:
                break
        wait_for(w, f"g{n}")
        if len(times) >= 300:
            break
    assert len(times) >= 300 and wall >= 1.0
    # (sampling in a thread of this process instead: 76% of a core)
    assert cpu / wall < 0.10, f"the parent used {cpu / wall:.0%} of a core while the child generated"
    times.sort()
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    # the bound leaves room for a shared CI machine (other processes preempt ours); a GIL held by sampling in this
    # process shows as the interpreter's 5 ms switch interval on many iterations
    assert p50 < 2.0 and p99 < 30.0, (p50, p99)


def test_a_reply_longer_than_the_model_takes_is_cut_not_a_crash(tiny_paths):
    long_chat = [{"role": "user", "content": "good movie " * 300}]          # more tokens than the 512 positions
    for max_new in (16, 4096):                 # the prompt alone would overflow; then the reply alone could
        cands = generate_candidates([tiny_paths[0]], long_chat, {"max_new_tokens": max_new}, seed=1)
        assert len(cands) == 2 and all(isinstance(c["text"], str) for c in cands)


def test_the_reply_gets_at_most_half_of_the_models_positions():
    """128 positions, max_new_tokens 128: the reply gets 64 and the conversation keeps its last 64 tokens (before,
    the reply took 127 and the model answered a conversation cut to 1 token). 1024 positions, 128 new: unchanged
    (128, 896). No limit: (128, None). A budget of 0 positions is no limit; 3 positions: (1, 2)."""
    from alignloop.feedback.generation import reply_budget

    assert reply_budget(128, 128) == (64, 64)
    assert reply_budget(1024, 128) == (128, 896)
    assert reply_budget(None, 128) == (128, None)
    assert reply_budget(0, 128) == (128, None)
    assert reply_budget(3, 50) == (1, 2)
