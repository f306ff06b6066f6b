"""Fake generation backends for tests ("gen_fakes:echo" etc.; this folder is on sys.path under pytest, and the
generation child process gets the parent's sys.path, so they import there too).

    echo    instant: "A: <last user message>" / "B: <last user message>"
    slow    the echo texts streamed word by word over params["fake_seconds"] (default 2) seconds
    fail    raises RuntimeError("model exploded")
    hang    sleeps forever (the timeout test) unless params["hang"] is False, then echoes
    crash   the process exits with code 3 (a native crash) unless params["crash"] is False, then echoes
    threads "torch threads: N" (torch imported first, as a model backend does)
    slowload  echo after loading its "model" for params["load_seconds"] (default 2) seconds, once per process: in
              `prepare(job)`, or (a worker that does not call prepare) in the first `generate`
"""
from __future__ import annotations

import os
import time


def _texts(job) -> list[str]:
    msg = job.context[-1]["content"]
    return [f"A: {msg}", f"B: {msg}"]


def _candidates(job, texts: list[str]) -> list[dict]:
    return [{"text": t, "model": job.models[min(i, len(job.models) - 1)], "params": dict(job.params),
             "stopped": True} for i, t in enumerate(texts)]


class Echo:
    def generate(self, job, emit):
        texts = _texts(job)
        for i, t in enumerate(texts):
            emit(i, t)
        return _candidates(job, texts)


class Slow:
    def generate(self, job, emit):
        texts = _texts(job)
        words = [t.split(" ") for t in texts]
        steps = max(len(w) for w in words)
        pause = float(job.params.get("fake_seconds", 2)) / steps
        for k in range(1, steps + 1):
            time.sleep(pause)
            for i, w in enumerate(words):
                emit(i, " ".join(w[:k]))
        return _candidates(job, texts)


class Fail:
    def generate(self, job, emit):
        emit(0, "A: half")
        raise RuntimeError("model exploded")


class Hang(Echo):
    def generate(self, job, emit):
        while job.params.get("hang", True):
            time.sleep(3600)
        return super().generate(job, emit)


class Crash(Echo):
    def generate(self, job, emit):
        if job.params.get("crash", True):
            os._exit(3)
        return super().generate(job, emit)


class Threads:
    def __init__(self):
        import torch

        self.torch = torch

    def generate(self, job, emit):
        text = f"torch threads: {self.torch.get_num_threads()}"
        return _candidates(job, [text, text])


class SlowLoad(Echo):
    def __init__(self):
        self.loaded = False

    def prepare(self, job):
        if not self.loaded:
            time.sleep(float(job.params.get("load_seconds", 2)))
            self.loaded = True

    def generate(self, job, emit):
        self.prepare(job)
        return super().generate(job, emit)


def slowload():
    return SlowLoad()


def threads():
    return Threads()


def echo():
    return Echo()


def slow():
    return Slow()


def fail():
    return Fail()


def hang():
    return Hang()


def crash():
    return Crash()
