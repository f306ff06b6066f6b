"""The console of a command: alignloop's own lines; third-party load reports, bars and warnings only with --verbose
(issue 11, item 10). Before: every `alignloop rm` from a causal LM printed transformers' LOAD REPORT (the new score
head as MISSING) and a "Loading weights" and a "Writing model shards" bar."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

NOISE = ("LOAD REPORT", "Loading weights", "Writing model shards", "Warning:")


def _rm(tmp_path, base_model, pref_files, *extra):
    cmd = [sys.executable, "-m", "alignloop.cli", "rm", "--model", str(base_model), "--train-file", str(pref_files[0]),
           "--max-steps", "1", "--per-device-batch-size", "2", "--max-length", "64", "--no-progress",
           "--no-tensorboard", "--output-dir", str(tmp_path / "rm"), *extra]
    env = {k: v for k, v in os.environ.items() if k != "ALIGNLOOP_VERBOSE" and not k.startswith(("HF_", "TRANSF"))}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == 1  # the result line, on stdout only
    return out.stderr


@pytest.mark.slow
def test_third_party_noise_only_with_verbose(tmp_path, base_model, pref_files):
    quiet = _rm(tmp_path, base_model, pref_files)
    assert "[rm] data:" in quiet  # alignloop's own line stays
    assert not [n for n in NOISE if n in quiet], quiet
    loud = _rm(tmp_path, base_model, pref_files, "--verbose")
    assert "[rm] data:" in loud
    assert "LOAD REPORT" in loud and "Loading weights" in loud and "Writing model shards" in loud


def test_verbose_is_an_option_of_every_command():
    from click import Context

    from alignloop.cli import COMMANDS, cli

    ctx = Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None and any(p.name == "verbose" for p in command.params), name
        for sub in getattr(command, "commands", {}).values():
            assert any(p.name == "verbose" for p in sub.params), f"{name} {sub.name}"
