"""Generation for conversation tasks: two candidate next messages per turn, made off the web server's request path.

    worker = GenerationWorker(max_queue=8, timeout_s=120, on_done=save)   # save(job, candidates, error, gen_ms)
    worker.start()
    worker.submit(GenerationJob("turn7.0", 7, context, ["path/to/policy"], {"max_new_tokens": 64}, seed=7))
    worker.status("turn7.0")  # {"state": "running", "position": 0, "partial": ["Hel", ""], "error": None}
    worker.stop()

Why a child process: sampling is Python-heavy (a decoding step is many small torch calls), so a generation thread
inside the web server would take the GIL from the request handlers and every labeler would wait on it. The child
(multiprocessing "spawn": no forked copy of the server's threads and locks) owns the models; the server keeps only a
small table of job states. The parent side is cheap on purpose: `submit` and `status` are called from the event loop
and only take a lock held for a few dictionary operations; they never wait on the child.

- Jobs wait in the parent (at most `max_queue` queued + running; more is `QueueFull` at once, never a wait) and go
  to the child one at a time, so a killed child takes no other job with it.
- A listener thread in the parent blocks on the child's event queue (no polling loop: it wakes for a message, a
  running job's deadline, or once a second to see whether the child still lives). It updates the table with the
  partial texts the child streams (at most every `_PARTIAL_EVERY_S` per job, so a fast model does not flood it) and
  calls `on_done(job, candidates, error, gen_ms)` exactly once per accepted job, in that thread (never the event
  loop): candidates are 2 dicts {"text", "model", "params", "stopped"} in canonical order, or error is a message.
  An `on_done` that may take long (storing on a busy database) hands its work to a thread of its own: while it runs,
  the listener reads no partials or results of the next jobs. `on_finish(job)`, when set, is called the moment a
  job finishes, under the worker's lock, before `status` can say "done" or "failed" (a caller that stores results
  marks the job as being stored there; it must only do that: a few set operations, never a wait).
- Loading the job's models is not generation: the child says when they are loaded ("loaded", at once when they
  already are), and only then does the job's `timeout_s` start. Loading has its own, generous limit (`load_timeout_s`,
  10 minutes by default; a few-GB checkpoint on CPU, a first download); past it the job fails with "the model was
  still loading after N s". A job running longer than `timeout_s` fails with "generation took longer than N s". In
  both cases the child is killed and a fresh one serves the next jobs. A child that dies (out of memory, a crash in
  native code) fails its job the same way, with its exit code.
- A child that cannot be restarted (out of processes or memory) is tried again after a pause that doubles (1 s, 2 s,
  4 s, ... at most `_SPAWN_BACKOFF_MAX_S`); after `_SPAWN_FAILURES` failed starts in a row the queued jobs fail with
  the reason (the labeler retries), and so do jobs queued while it keeps failing.
- `stop()` fails what has not finished ("the generation worker stopped"), ends the child (killed if it does not exit
  within a second) and joins the listener: no process or thread is left behind.
- `in_process=True` runs the backend in a thread of this process (tests with fakes; a hung thread cannot be killed,
  so a timeout abandons it and starts another).

The backend is "module:function"; the function returns an object with `generate(job, emit) -> list[dict]`, where
`emit(candidate_index, text_so_far)` streams. `hf_backend` serves Hugging Face causal LMs (below);
`generate_candidates` is the same generation without a worker (the pipeline, tests). A backend may also have
`prepare(job)`, which loads the job's models (the time it takes is loading, not generation).

Blindness: with two models, both candidates are sampled at the same time (a thread per model, each with its own
seeded RNG), so neither side fills first because of its model. Error texts may name a model (useful to admins, who
see the stored text); `public_error(error, models)` is the text a labeler may see, the names replaced.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import multiprocessing
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "alignloop.feedback.generation:hf_backend"
GEN_DEFAULTS = {"max_new_tokens": 128, "temperature": 0.8, "top_p": 1.0, "top_k": 0}
_PARTIAL_EVERY_S = 0.05     # the child sends a job's partial texts at most this often
_CHECK_CHILD_S = 1.0        # the listener looks at the child at least this often
_KEEP_FINISHED = 512        # finished jobs remembered for status() (the newest)
_KEEP_FINISHED_S = 3600.0   # ... and for at most this long
_SPAWN_FAILURES = 3         # failed child starts in a row after which the queued jobs fail
_SPAWN_BACKOFF_MAX_S = 30.0  # the longest pause between two tries to start the child
DEFAULT_LOAD_TIMEOUT_S = 600.0


@dataclass
class GenerationJob:
    job_id: str                 # unique among the jobs not yet finished, e.g. f"turn{turn_id}.{attempts}"
    turn_id: int
    context: list[dict]         # the messages so far, the last one the user's
    models: list[str]           # 1 model: two different samples; 2 models: one candidate from each
    params: dict = field(default_factory=dict)   # max_new_tokens, temperature, top_p, top_k (GEN_DEFAULTS)
    seed: int = 0


class QueueFull(Exception):
    """Too many generations wait; the caller shows the message and the labeler retries."""


OnDone = Callable[[GenerationJob, "list[dict] | None", "str | None", int], None]


class GenerationWorker:
    def __init__(self, backend: str | None = DEFAULT_BACKEND, max_queue: int = 8, timeout_s: float = 120.0,
                 threads: int = 1, in_process: bool = False, on_done: OnDone | None = None,
                 load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S):
        """`backend`: "module:function" (None: `hf_backend`); `threads`: torch threads of the child; `timeout_s`: a
        job's generation at most (model loading not counted); `load_timeout_s`: loading a job's models at most."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if load_timeout_s <= 0:
            raise ValueError(f"load_timeout_s must be > 0, got {load_timeout_s}")
        self.load_timeout_s = float(load_timeout_s)
        self.backend, self.max_queue, self.timeout_s = backend or DEFAULT_BACKEND, max_queue, float(timeout_s)
        self.threads, self.in_process, self.on_done = max(1, int(threads)), in_process, on_done
        self.on_finish: Callable[[GenerationJob], None] | None = None   # see the module's docstring
        self._lock = threading.Lock()
        self._state = "new"                                   # new -> started -> stopped
        self._status: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._finished: collections.OrderedDict[str, float] = collections.OrderedDict()   # job_id -> when
        self._pending: collections.deque[GenerationJob] = collections.deque()
        self._running: GenerationJob | None = None
        self._deadline: float | None = None                   # set when the child takes the running job
        self._loading = False                                 # the running job's models are being loaded
        self._spawn_failures = 0                              # failed child starts in a row
        self._wake = threading.Event()                        # set by stop(): ends a pause between starts
        self._child = None                                    # a Process, or a Thread (in_process)
        self._jobs = self._events = None                      # the child's job and event queues
        self._ready = False                                   # the child takes jobs (False while it is replaced)
        self._listener: threading.Thread | None = None

    # -- the event loop's side: cheap, never waits on the child ------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._state != "new":
                return
            self._state = "started"
        try:
            self._spawn()
        except Exception:  # e.g. out of processes: the listener tries again (pausing) and fails the queued jobs
            log.exception("could not start the generation process")
        self._listener = threading.Thread(target=self._listen, name="generation-listener", daemon=True)
        self._listener.start()

    def submit(self, job: GenerationJob) -> None:
        """Queue `job` (starting the worker on first use). Raises QueueFull, without waiting, when `max_queue` jobs
        are queued or running; ValueError when a job with the same id has not finished."""
        if self._state == "new":
            self.start()
        with self._lock:
            if self._state != "started":
                raise RuntimeError("the generation worker is stopped")
            old = self._status.get(job.job_id)
            if old is not None and old["state"] in ("queued", "running"):
                raise ValueError(f"generation job {job.job_id!r} is already {old['state']}")
            waiting = len(self._pending) + (self._running is not None)
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} generations are already waiting (the most this server queues); "
                                f"try again in a moment")
            self._finished.pop(job.job_id, None)
            self._status.pop(job.job_id, None)
            self._status[job.job_id] = {"state": "queued", "partial": ["", ""], "error": None}
            self._pending.append(job)
            self._dispatch_locked()

    def status(self, job_id: str) -> dict | None:
        """{"state": "queued"|"running"|"done"|"failed", "position": jobs ahead of it (0 once running), "partial":
        [text A, text B] so far (the final texts once done), "error": message or None}; None for an unknown job
        (never submitted, or finished long ago)."""
        with self._lock:
            st = self._status.get(job_id)
            if st is None:
                return None
            position = 0
            if st["state"] == "queued":
                ids = [j.job_id for j in self._pending]
                position = ids.index(job_id) + (self._running is not None) if job_id in ids else 0
            return {"state": st["state"], "position": position, "partial": list(st["partial"]), "error": st["error"]}

    def stop(self) -> None:
        """Fail the unfinished jobs, end the child and the listener (a second or so at most)."""
        with self._lock:
            if self._state != "started":
                self._state = "stopped"
                return
            self._state = "stopped"
            events = self._events
        self._wake.set()
        # wakes the listener, which fails what is left and returns (a queue closed because its child was just
        # replaced raises: the listener sees the state within a second anyway)
        with contextlib.suppress(ValueError, OSError, AttributeError):
            events.put(("stop",))
        if self._listener is not None:
            self._listener.join(timeout=30)
        self._end_child()

    # -- the listener thread --------------------------------------------------------------------------------------
    def _listen(self) -> None:
        while True:
            with self._lock:
                events, child, deadline = self._events, self._child, self._deadline
            wait = _CHECK_CHILD_S if deadline is None else min(_CHECK_CHILD_S, max(0.0, deadline - time.monotonic()))
            try:
                msg = events.get(timeout=wait) if events is not None else None
            except queue.Empty:
                msg = None
            except (EOFError, OSError, ValueError):     # a queue broken by a killed child: treated as its death
                msg = None
            if (msg is not None and msg[0] == "stop") or self._state != "started":
                break
            finished, restart = [], None
            with self._lock:
                if msg is not None:
                    finished += self._handle_locked(msg)
                elif self._running is not None and self._deadline is not None and time.monotonic() >= self._deadline:
                    restart = (f"the model was still loading after {self.load_timeout_s:g} s (the most loading may "
                               f"take; generation itself may take {self.timeout_s:g} s): check the model, or give "
                               f"loading more time" if self._loading
                               else f"generation took longer than {self.timeout_s:g} s")
                elif child is None:
                    restart = "the generation process is not running"
                elif not child.is_alive():
                    restart = self._death_message(child)
                if restart is not None:
                    self._ready = False      # the next job waits for the new child
                if restart is not None and self._running is not None:
                    finished.append(self._finish_locked(self._running, None, restart, 0))
            if restart is not None and self._state == "started":
                self._end_child(kill=True)
                self._call_on_done(finished)
                finished = []
                self._respawn()
            self._call_on_done(finished)
        with self._lock:      # stopping: whatever has not finished fails, and each caller hears of it once
            jobs = ([self._running] if self._running is not None else []) + list(self._pending)
            self._pending.clear()
            finished = [self._finish_locked(j, None, "the generation worker stopped", 0) for j in jobs]
        self._call_on_done(finished)

    def _respawn(self) -> None:
        """Start a new child; when that fails (out of processes, memory), try again after a pause that doubles, and
        after `_SPAWN_FAILURES` failures in a row fail the queued jobs with the reason. Returns when a child runs or
        the worker stops."""
        while self._state == "started":
            try:
                self._spawn()
            except Exception as e:  # any failure to start is retried, then told to the jobs
                self._spawn_failures += 1
                log.exception("could not start the generation process (%d failures in a row)", self._spawn_failures)
                if self._spawn_failures >= _SPAWN_FAILURES:
                    why = (f"the generation process could not be started ({error_message(e)}; "
                           f"{self._spawn_failures} tries); retry in a while")
                    with self._lock:
                        jobs = list(self._pending)
                        self._pending.clear()
                        failed = [self._finish_locked(j, None, why, 0) for j in jobs]
                    self._call_on_done(failed)
                self._wake.wait(min(_CHECK_CHILD_S * 2 ** (self._spawn_failures - 1), _SPAWN_BACKOFF_MAX_S))
                continue
            self._spawn_failures = 0
            with self._lock:
                self._dispatch_locked()
            return

    def _handle_locked(self, msg: tuple) -> list[tuple]:
        kind, job_id = msg[0], msg[1]
        job = self._running
        if job is None or job.job_id != job_id:      # a message about a job already failed (timeout): ignore
            return []
        if kind == "start":           # loading the job's models: their own limit
            self._deadline, self._loading = time.monotonic() + self.load_timeout_s, True
        elif kind == "loaded":        # the generation's time starts now
            self._deadline, self._loading = time.monotonic() + self.timeout_s, False
        elif kind == "partial":
            self._status[job_id]["partial"] = list(msg[2])
        elif kind == "done":
            return [self._finish_locked(job, msg[2], None, msg[3])]
        elif kind == "failed":
            return [self._finish_locked(job, None, msg[2], msg[3])]
        return []

    def _finish_locked(self, job: GenerationJob, candidates, error, gen_ms) -> tuple:
        st = self._status.setdefault(job.job_id, {"state": "queued", "partial": ["", ""], "error": None})
        if self.on_finish is not None:   # before the state says finished: no caller sees it done and not storing
            try:
                self.on_finish(job)
            except Exception:  # a failing hook must not stop the worker
                log.exception("generation on_finish failed for job %s", job.job_id)
        st["state"] = "failed" if error is not None else "done"
        st["error"] = error
        if candidates is not None:
            st["partial"] = [c["text"] for c in candidates]
        if job is self._running:
            self._running, self._deadline, self._loading = None, None, False
            self._dispatch_locked()
        now = time.monotonic()
        self._finished[job.job_id] = now
        while self._finished and (len(self._finished) > _KEEP_FINISHED
                                  or next(iter(self._finished.values())) < now - _KEEP_FINISHED_S):
            old, _ = self._finished.popitem(last=False)
            self._status.pop(old, None)
        return job, candidates, error, int(gen_ms)

    def _call_on_done(self, finished: list[tuple]) -> None:
        if self.on_done is None:
            return
        for args in finished:
            try:
                self.on_done(*args)
            except Exception:  # a failing callback must not stop the worker serving the next jobs
                log.exception("generation on_done failed for job %s", args[0].job_id)

    def _dispatch_locked(self) -> None:
        if self._running is None and self._pending and self._ready and self._state == "started":
            self._running = self._pending.popleft()
            self._status[self._running.job_id]["state"] = "running"
            self._jobs.put(self._running)          # mp.Queue.put hands the pickling to its feeder thread

    # -- the child ---------------------------------------------------------------------------------------------------
    def _spawn(self) -> None:
        if self.in_process:
            jobs, events = queue.Queue(), queue.Queue()
            child = threading.Thread(target=serve_jobs, args=(self.backend, jobs, events, None),
                                     name="generation-backend", daemon=True)
        else:
            ctx = multiprocessing.get_context("spawn")
            jobs, events = ctx.Queue(), ctx.Queue()
            child = ctx.Process(target=_child_main, args=(self.backend, jobs, events, self.threads, list(sys.path)),
                                name="alignloop-generation", daemon=True)
        child.start()
        with self._lock:
            self._child, self._jobs, self._events, self._ready = child, jobs, events, True

    def _end_child(self, kill: bool = False) -> None:
        with self._lock:
            child, jobs, events = self._child, self._jobs, self._events
            self._ready = False         # nothing is dispatched until a new child is there
        if child is None:
            return
        if isinstance(child, threading.Thread):   # a hung thread cannot be killed: it is abandoned (a daemon)
            jobs.put(None)
            if not kill:
                child.join(timeout=1.0)
            return
        if not kill:
            jobs.put(None)
            child.join(timeout=1.0)
        if child.is_alive():
            child.kill()
        child.join(timeout=10.0)       # reaps it: no zombie
        for q in (jobs, events):
            q.cancel_join_thread()     # data for a dead child is dropped, never waited on
            q.close()

    @staticmethod
    def _death_message(child) -> str:
        code = getattr(child, "exitcode", None)
        return (f"the generation process exited unexpectedly (exit code {code}); it was restarted, retry"
                if code is not None else "the generation thread ended unexpectedly; retry")


def _child_main(backend: str, jobs, events, threads: int, path: list[str]) -> None:
    """The child process: the parent's import path (so tests' fakes import), `threads` torch threads."""
    sys.path[:] = path
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    serve_jobs(backend, jobs, events, threads)


def serve_jobs(backend: str, jobs, events, threads: int | None) -> None:
    """Take jobs until None: ("start", id), ("loaded", id) once the job's models are loaded (the backend built on
    the first job, then its `prepare(job)` if it has one), then ("partial", id, [a, b])..., then ("done", id,
    candidates, ms) or ("failed", id, message, ms) (ms: the generation's, loading not counted). A failure to build
    the backend or load a model is that job's error."""
    gen = None
    while True:
        job = jobs.get()
        if job is None:
            return
        events.put(("start", job.job_id))
        t0 = time.monotonic()
        try:
            if gen is None:
                gen = load_backend(backend)
            torch = sys.modules.get("torch")      # imported by the backend (OMP_NUM_THREADS set before that)
            if threads is not None and torch is not None and torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            prepare = getattr(gen, "prepare", None)
            if prepare is not None:
                prepare(job)
            events.put(("loaded", job.job_id))
            t0 = time.monotonic()
            emit = _Partials(events, job.job_id)
            candidates = check_candidates(gen.generate(job, emit), job)
            events.put(("done", job.job_id, candidates, int((time.monotonic() - t0) * 1000)))
        except Exception as e:  # noqa: BLE001 - any backend failure becomes the job's message, the child serves on
            events.put(("failed", job.job_id, error_message(e), int((time.monotonic() - t0) * 1000)))


class _Partials:
    """`emit(i, text)` for a backend: keeps the newest text of each candidate, sends both at most every
    `_PARTIAL_EVERY_S` (a token-by-token stream would cost the parent's listener a message per token)."""

    def __init__(self, events, job_id: str):
        self.events, self.job_id, self.texts, self.sent = events, job_id, ["", ""], 0.0
        self.lock = threading.Lock()     # two models' samplers emit from two threads

    def __call__(self, index: int, text: str) -> None:
        with self.lock:
            self.texts[index] = text
            now = time.monotonic()
            if now - self.sent < _PARTIAL_EVERY_S:
                return
            self.sent = now
            texts = list(self.texts)
        self.events.put(("partial", self.job_id, texts))


def load_backend(spec: str):
    """"module:function" -> the backend object the function returns."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"generation backend must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)()


def check_candidates(candidates: Any, job: GenerationJob) -> list[dict]:
    if not isinstance(candidates, list) or len(candidates) != 2 or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) for c in candidates):
        raise ValueError(f"the generation backend returned {type(candidates).__name__}, not 2 candidates "
                         f"{{'text': ...}}")
    return [{"text": c["text"], "model": str(c.get("model", job.models[min(i, len(job.models) - 1)])),
             "params": dict(c.get("params", job.params)), "stopped": bool(c.get("stopped", True))}
            for i, c in enumerate(candidates)]


def error_message(e: BaseException) -> str:
    text = str(e).strip()
    return text if text else type(e).__name__


_QUOTED_MODEL = re.compile(r"""\bmodel (?:'[^']*'|"[^"]*")""")
# a name counts only as a whole: not inside a word or a longer name (a path may go on after it with "/": a file in
# the model's folder; a name may end a path: a hub id in a URL)
_NAME_BEFORE, _NAME_AFTER = r"(?<![\w.\-])", r"(?![\w\-]|\.\w)"
_THE_MODEL = "the model"


def _model_names(models) -> set[str]:
    """The names `public_error` replaces for `models`: each as given, its absolute and real path, and its last two
    path parts ("org/name", "checkpoints/model"); its last part alone only when it is not a plain word ("gpt2",
    "policy-v3", "Qwen"; not "model", "final", "out", "memory", which an error's own words may be)."""
    names: set[str] = set()
    for m in models or ():
        if not isinstance(m, str) or not m.strip():
            continue
        m = m.strip()
        names |= {m, os.path.abspath(m), os.path.realpath(m)}
        parts = [x for x in re.split(r"[/\\]", m) if x]
        if len(parts) >= 2:
            names.add("/".join(parts[-2:]))
        if parts and len(parts[-1]) >= 3 and not re.fullmatch(r"[a-z]+", parts[-1]):
            names.add(parts[-1])
    return {n for n in names if n.strip(" ./\\")}


def public_error(error: str | None, models: list[str] | tuple[str, ...] = ()) -> str | None:
    """The text of a generation error that a labeler may see: every name or path of `models` in it (`_model_names`:
    the name as given, its absolute path, its last two path parts, its last part when not a plain word) and a
    quoted name after "model" (this module's "could not load model '...'") replaced by "the model", so that an error
    never tells which model is behind a side. Only whole names are replaced (not a part of a word or of a longer
    name: "out of memory" stays as it is for a model "org/out"), with a "the" before or a "model" after the name
    taken in ("the gpt2 model" -> "the model"), and a "the model" already written is left as it is (no "the the
    model"). The full text stays in the store for admins. None stays None."""
    if error is None:
        return None
    text = _QUOTED_MODEL.sub(_THE_MODEL, str(error))
    names = sorted(_model_names(models), key=len, reverse=True)   # the longest first: a path before its tail
    if not names:
        return text
    pattern = re.compile(r"(?P<keep>\b[Tt]he model" + _NAME_AFTER + r"(?!/))|(?P<the>\b[Tt]he\s+)?" + _NAME_BEFORE
                         + "(?:" + "|".join(map(re.escape, names)) + ")" + _NAME_AFTER + r"(?:\s+model\b)?")

    def repl(m: re.Match) -> str:
        if m.group("keep"):
            return m.group("keep")
        return (m.group("the")[:3] + " model") if m.group("the") else _THE_MODEL

    return pattern.sub(repl, text)


# -- Hugging Face causal LMs ------------------------------------------------------------------------------------------
def hf_backend() -> HFBackend:
    return HFBackend()


class HFBackend:
    """Serves candidates from Hugging Face causal LMs, each model loaded once (the newest `max_models` kept)."""

    def __init__(self, max_models: int = 3):
        self.max_models = max_models
        self.models: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def prepare(self, job: GenerationJob) -> None:
        """Load the job's models (the worker counts this as loading, not as the generation's time)."""
        for name in job.models:
            self.load(name)

    def generate(self, job: GenerationJob, emit: Callable[[int, str], None]) -> list[dict]:
        return generate_candidates(job.models, job.context, job.params, job.seed, emit=emit, backend=self)

    def load(self, name: str) -> tuple:
        """(model, tokenizer) of a path or hub id: on CUDA when there is one, in eval mode; a tokenizer without a
        chat template gets the plain one."""
        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        import torch  # noqa: PLC0415 - torch only in the generation child, not in the web server

        from alignloop.data.chat import ensure_chat_template  # noqa: PLC0415 - same: torch behind alignloop.data
        from alignloop.models import load_causal_lm, load_tokenizer  # noqa: PLC0415 - same: torch behind it

        try:
            tok = ensure_chat_template(load_tokenizer(name, padding_side="left"))
            model = load_causal_lm(name)
        except Exception as e:  # any loading failure is the job's message, naming the model
            raise RuntimeError(f"could not load model {name!r}: {error_message(e)}") from e
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        while len(self.models) >= self.max_models:
            self.models.popitem(last=False)
        self.models[name] = (model, tok)
        return model, tok


def sampling_params(params: dict | None) -> dict:
    """The project's generation settings with defaults (GEN_DEFAULTS)."""
    out = dict(GEN_DEFAULTS)
    out.update({k: v for k, v in (params or {}).items() if k in GEN_DEFAULTS and v is not None})
    return out


def generate_candidates(models: list[str], context: list[dict], params: dict | None, seed: int,
                        emit: Callable[[int, str], None] | None = None,
                        backend: HFBackend | None = None) -> list[dict]:
    """Two candidate next assistant messages for `context` (messages, the last one the user's), as dicts {"text",
    "model", "params", "stopped"}. One model: two samples in one batch (seed `seed`; B is sampled again, with other
    seeds, when it comes out the same as A); two models: one sample from each (seeds `seed`, `seed + 1`), both loaded
    first and then sampled at the same time, a thread each with its own RNG (blindness: neither side streams first
    because of its model; torch releases the GIL in its ops). Rendered
    with the tokenizer's chat template or the plain one (`alignloop.data.chat`); a reply ends at EOS (or the model's
    other end-of-turn tokens) and, in the plain format, where the next user turn would start. `emit(i, text)`
    streams candidate i's text so far (always a prefix of its final text). temperature 0 = greedy. `backend`: an
    `HFBackend` whose loaded models are reused (pass the same one to several calls; None loads them for this call)."""
    if not models or len(models) > 2:
        raise ValueError(f"a conversation needs 1 or 2 models, got {len(models or [])}")
    backend = backend if backend is not None else HFBackend()
    p = sampling_params(params)
    emit = emit if emit is not None else (lambda i, text: None)
    if len(models) == 1:
        model, tok = backend.load(models[0])
        replies = _sample(model, tok, context, p, 2, seed, emit)
        for attempt in range(2):   # two equal candidates compare nothing (greedy ones always are)
            if replies[0][0] != replies[1][0] or float(p["temperature"]) <= 0:
                break
            replies[1] = _sample(model, tok, context, p, 1, seed + 1000 + attempt, lambda _k, t: emit(1, t))[0]
        names = [models[0], models[0]]
    else:
        loaded = [backend.load(name) for name in models]
        replies = _sample_together(loaded, context, p, seed, emit)
        names = list(models)
    for i, (text, _) in enumerate(replies):
        emit(i, text)
    return [{"text": text, "model": name, "params": dict(p), "stopped": stopped}
            for (text, stopped), name in zip(replies, names, strict=True)]


def _sample_together(loaded: list[tuple], context: list[dict], p: dict, seed: int,
                     emit: Callable[[int, str], None]) -> list[tuple[str, bool]]:
    """One reply from each (model, tokenizer) of `loaded`, sampled at the same time in a thread each (seed `seed + i`
    in a generator of its own, so the replies do not depend on how the threads interleave), both streaming."""
    import torch  # noqa: PLC0415 - torch only in the generation child

    results: list = [None] * len(loaded)

    def run(i: int) -> None:
        model, tok = loaded[i]
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        try:
            results[i] = _sample(model, tok, context, p, 1, seed + i, lambda _k, t: emit(i, t),
                                 generator=torch.Generator(device=device))[0]
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), name=f"generation-model-{i}", daemon=True)
               for i in range(len(loaded))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _sample(model, tok, context: list[dict], p: dict, n: int, seed: int,
            emit: Callable[[int, str], None], generator=None) -> list[tuple[str, bool]]:
    """n replies to `context` from one model: [(text, stopped)], streamed to emit(k, visible text so far).
    `generator`: a torch.Generator of this sampling's own (seeded with `seed`; the sampler then leaves torch's thread
    count as it is), for samplings running at once in several threads; None: torch's global RNG."""
    from alignloop.data.chat import chat_stop_strings, render_prompt  # noqa: PLC0415 - torch behind alignloop.data
    from alignloop.models import context_length  # noqa: PLC0415 - torch: generation child only
    from alignloop.rollout import HFSampler, SamplingParams, sample_completions  # noqa: PLC0415 - generation child

    stops = chat_stop_strings(tok)
    greedy = float(p["temperature"]) <= 0
    sp = SamplingParams(max_new_tokens=int(p["max_new_tokens"]), temperature=1.0 if greedy else float(p["temperature"]),
                        top_k=1 if greedy else int(p["top_k"]), top_p=float(p["top_p"]),
                        stop_token_ids=end_of_turn_ids(model), stop_strings=stops)
    sp.max_new_tokens, max_prompt = reply_budget(context_length(model, tok), sp.max_new_tokens)
    (group,) = sample_completions(
        model, tok, [render_prompt(context, tok)], n, sp, seed=seed, max_prompt_length=max_prompt,
        stream=lambda k, text: emit(k, visible_text(text, stops)), stream_every_s=_PARTIAL_EVERY_S,
        generator=generator,
        sampler=HFSampler(model, tok, cpu_threads=None, generator=generator) if generator is not None else None)
    return [(reply_text(c.text, stops), bool(c.stopped)) for c in group]


def reply_budget(limit: int | None, max_new_tokens: int) -> tuple[int, int | None]:
    """(max_new_tokens, max_prompt_length) so that prompt + reply fit the model's `limit` positions (None: no
    limit). The reply gets at most half of them: a reply budget of the whole context would leave the conversation
    one token and the model would answer out of context; past the other half the conversation's oldest tokens give
    way (left truncation)."""
    if not limit:
        return max_new_tokens, None
    new = max(1, min(max_new_tokens, limit // 2))
    return new, limit - new


def end_of_turn_ids(model) -> list[int]:
    """The ids the model's generation config ends a turn with (several for some chat models), besides EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return [int(x) for x in ids if isinstance(x, int)]


def reply_text(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """A sampled continuation as the reply it is: cut where a stop string starts, spaces around it removed, and a
    character cut in half at the end (a reply cut at max_new_tokens mid-character decodes it as U+FFFD) too."""
    for s in stops:
        if s in text:
            text = text[:text.index(s)]
    return text.strip().rstrip("\ufffd").strip()


def visible_text(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """What to show of a continuation still being sampled, so that it is always a prefix of the final reply: cut at
    a stop string, without a tail that may be a stop string's beginning, an unfinished UTF-8 character (decoded as
    U+FFFD) or trailing spaces."""
    text = reply_text(text, stops)
    for s in stops:
        for k in range(min(len(s), len(text)), 0, -1):
            if text.endswith(s[:k]):
                text = text[:-k]
                break
    return text.rstrip("\ufffd").strip()
