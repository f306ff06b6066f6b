"""Opt-in switches for checking that the float32 tolerances of the equivalence tests hold on other CPUs.

Unset (the default), nothing changes. Set in the environment of the pytest run:

- ``ALIGNLOOP_TEST_THREADS=N``: ``torch.set_num_threads(N)`` at session start and again just before every test body,
  so it wins over fixtures that pin the thread count. The thread count changes the blocking and reduction order of the
  CPU kernels (oneDNN/MKL), the nearest stand-in on one machine for another CPU.
- ``ALIGNLOOP_TEST_DETERMINISTIC=1``: ``torch.use_deterministic_algorithms(True)`` for the whole session.

Tests that start their own processes (torchrun / accelerate launch) set the threads of those processes themselves.
"""
from __future__ import annotations

import os

import pytest

_THREADS = os.environ.get("ALIGNLOOP_TEST_THREADS", "")
_DETERMINISTIC = os.environ.get("ALIGNLOOP_TEST_DETERMINISTIC", "") not in ("", "0")


def pytest_configure(config):
    if _THREADS or _DETERMINISTIC:
        import torch

        if _THREADS:
            torch.set_num_threads(int(_THREADS))
        if _DETERMINISTIC:
            torch.use_deterministic_algorithms(True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if _THREADS:
        import torch

        torch.set_num_threads(int(_THREADS))
