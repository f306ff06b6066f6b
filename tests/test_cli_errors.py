"""User mistakes at the command line end in one clear line and exit status 2, before any work is done."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _run(code: str):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_command_without_the_web_extra_says_how_to_install_it():
    """`alignloop pipeline` needs the feedback store (the web extra): without it, a one-line error, no traceback."""
    p = _run("import sys; sys.modules['sqlalchemy'] = None\n"
             "from alignloop.cli import main\nmain(['pipeline', '--help'])")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "pip install 'alignloop[web]'" in p.stderr and "Traceback" not in p.stderr


def test_an_output_file_whose_format_is_unknown_is_refused_first(tmp_path):
    """generate and eval check --output-file / --out before loading any model (the model path here does not
    even exist: the suffix is what is reported)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    for args in (["generate", "--model", str(tmp_path / "nope"), "--prompts-file", str(prompts), "--output-file",
                  str(tmp_path / "out.txt")],
                 ["eval", "--policy", str(tmp_path / "nope"), "--reference", str(tmp_path / "nope"), "--prompts",
                  str(prompts), "--gold", "alignloop.demo.domain:gold_scores", "--out", str(tmp_path / "o.txt")]):
        p = _run(f"from alignloop.cli import main\nmain({args!r})")
        assert p.returncode == 2 and "cannot infer the output format from '.txt'" in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr


def test_a_launched_command_leaves_the_process_group(tmp_path):
    """Under torchrun / accelerate launch the CLI destroys the process group before exiting (a rank exiting with
    gloo's threads alive aborted a finished run), also when the command fails."""
    import torch.distributed as dist

    from alignloop.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit) as e:
            main(["prm", "--config", str(tmp_path / "missing.yaml")])
        assert e.value.code == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
