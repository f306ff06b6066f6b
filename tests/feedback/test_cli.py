"""`alignloop feedback ...` with click's CliRunner (standalone group)."""
import json
import os

import pytest
from click.testing import CliRunner

from alignloop.cli.feedback import feedback


def run(*args, input=None, env=None):
    return CliRunner().invoke(feedback, [str(a) for a in args], input=input, env=env)


def test_full_cli_flow(tmp_path):
    db = tmp_path / "f.db"
    g = tmp_path / "g.md"
    g.write_text("# Guidelines\nBe fair.")
    r = run("create", "--db", db, "--project", "hh", "--task-type", "pairwise", "--overlap-k", 2, "--guidelines", g)
    assert r.exit_code == 0 and "created project hh" in r.output
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n"
                    + json.dumps({"prompt": "q", "completion": "x"}) + "\n"
                    + json.dumps({"prompt": "q", "completion": "y"}) + "\n")
    r = run("import", "--db", db, "--project", "hh", data)
    assert r.exit_code == 0 and "2 prompts, 4 completions, 2 items" in r.output
    r = run("add-labeler", "--db", db, "ann", input="pass word 1\npass word 1\n")
    assert r.exit_code == 0 and "added labeler ann" in r.output
    r = run("add-labeler", "--db", db, "boss", "--role", "admin", "--password-env", "PW", env={"PW": "secret pass"})
    assert r.exit_code == 0 and "added admin boss" in r.output
    from alignloop.feedback.store import Store
    s = Store(str(db))
    p = s.get_project("hh")
    assert p.guidelines_md.startswith("# Guidelines")
    lab = s.authenticate("ann", "pass word 1")
    while (a := s.next_assignment(p.id, lab.id)) is not None:
        s.submit(a.id, lab.id, {"choice": "left", "strength": "better"}, f"cli-key-{a.id}")
    r = run("stats", "--db", db, "--project", "hh")
    assert r.exit_code == 0 and "ann" in r.output and "fleiss_kappa" in r.output
    r = run("stats", "--db", db, "--project", "hh", "--json")
    st = json.loads(r.output)
    assert st["labelers"]["ann"]["n"] == 2
    out = tmp_path / "o.jsonl"
    r = run("export", "--db", db, "--project", "hh", "--out", out, "--mode", "all", "--include-flagged")
    assert r.exit_code == 0 and "wrote 2 preference rows" in r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {"prompt", "chosen", "rejected", "margin", "pair_weight", "group", "labeler", "labeler_attributes",
            "comment", "flags", "time_spent_ms"} == set(rows[0])  # mode all: each judgement's labeler context


@pytest.mark.parametrize("args, message", [
    (["create", "--project", "x", "--overlap-k", "0"], "overlap k"),
    (["import", "--project", "nope", "missing.jsonl"], "missing.jsonl: no such file"),
    (["stats", "--project", "nope"], "no project"),
    (["export", "--project", "nope", "--out", "o.jsonl"], "no project"),
    (["add-labeler", "bad name", "--password-env", "PW"], "username"),
    (["create", "--project", "x", "--guidelines", "nope.md"], "no such file"),
    (["create", "--project", "x", "--settings", "{bad"], "not valid JSON"),
])
def test_user_errors_exit_2(tmp_path, args, message):
    db = tmp_path / "f.db"
    run("create", "--db", db)
    r = CliRunner().invoke(feedback, [args[0], "--db", str(db), *args[1:]], env={"PW": "long enough pw"})
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_out_needs_a_suffix_the_data_module_writes(tmp_path):
    db = tmp_path / "f.db"
    run("create", "--db", db, "--project", "hh")
    r = run("export", "--db", db, "--project", "hh", "--out", tmp_path / "o.txt")
    assert r.exit_code == 2 and "--out" in r.output and ".jsonl" in r.output and not (tmp_path / "o.txt").exists()
    r = run("sample", "--db", db, "--project", "hh", "--prompts", tmp_path / "p.jsonl", "--model", tmp_path / "m",
            "--out", tmp_path / "s.txt")
    assert r.exit_code == 2 and "--out" in r.output  # refused before loading a model


def test_import_reports_bad_line(tmp_path):
    db = tmp_path / "f.db"
    run("create", "--db", db, "--project", "hh")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p", "completions": ["a", "b"]}\n{"prompt": 3, "completions": ["a"]}\n')
    r = run("import", "--db", db, "--project", "hh", bad)
    assert r.exit_code == 2 and "line 2" in r.output and "'prompt' must be" in r.output


def test_sample_with_tiny_model(tmp_path):
    from alignloop.models.tiny import SIMPLE_CHAT_TEMPLATE, build_tiny_checkpoint, default_corpus, train_tokenizer

    tok = train_tokenizer(default_corpus(200), vocab_size=300, chat_template=SIMPLE_CHAT_TEMPLATE)
    model = build_tiny_checkpoint(tmp_path / "m", tokenizer=tok, n_layer=1, n_embd=32, n_head=2)
    db = tmp_path / "f.db"
    run("create", "--db", db, "--project", "hh", "--task-type", "rank")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "the movie was"}) + "\n" + json.dumps(
        {"prompt": [{"role": "user", "content": "a plot"}, {"role": "assistant", "content": "fun"},
                    {"role": "user", "content": "more"}]}) + "\n")
    r = run("sample", "--db", db, "--project", "hh", "--prompts", prompts, "--model", model, "-n", 3,
            "--max-new-tokens", 5, "--out", tmp_path / "s.jsonl")
    assert r.exit_code == 0, r.output
    assert "sampled 6 completions for 2 prompts: 2 items" in r.output
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rows[0]["completions"][0]["params"]["max_new_tokens"] == 5
    r = run("sample", "--db", db, "--project", "hh", "--prompts", prompts, "--model", tmp_path / "nomodel")
    assert r.exit_code == 2 and "cannot load model" in r.output


def test_generate_texts_groups_completions_of_prompts_of_different_lengths(tmp_path):
    """(It once tested a fallback to transformers' generate; sampling has one home now, alignloop.rollout.)"""
    from alignloop.feedback.sampling import generate_texts
    from alignloop.models.tiny import default_corpus, tiny_causal_lm, train_tokenizer

    tok = train_tokenizer(default_corpus(200), vocab_size=300)
    lm = tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2)
    outs = generate_texts(lm, tok, ["the movie", "a very long prompt about the film plot"], n=2, max_new_tokens=4)
    assert len(outs) == 2 and all(len(o) == 2 and all(isinstance(t, str) for t in o) for o in outs)


def test_commands_other_than_serve_do_not_load_the_web_app(tmp_path):
    """create, import, add-labeler, stats and export run without FastAPI / the app in the process."""
    import subprocess
    import sys

    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n")
    db = str(tmp_path / "f.db")
    commands = [["create", "--db", db, "--project", "hh"], ["import", "--db", db, "--project", "hh", str(data)],
                ["add-labeler", "--db", db, "ann", "--password-env", "PW"],
                ["stats", "--db", db, "--project", "hh"], ["stats", "--db", db, "--project", "hh", "--json"],
                ["export", "--db", db, "--project", "hh", "--out", str(tmp_path / "o.jsonl"), "--allow-empty"]]
    code = ("import json, sys\n"
            "from alignloop.cli.feedback import feedback\n"
            f"for args in {commands!r}:\n"
            "    feedback.main(args, standalone_mode=False)\n"
            "web = ('fastapi', 'starlette', 'uvicorn', 'alignloop.feedback.app', 'alignloop.feedback.web')\n"
            "print(json.dumps(sorted(m for m in web if m in sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PW": "pw 12345"})
    assert r.returncode == 0, r.stderr
    assert "wrote 0 preference rows" in r.stdout
    assert json.loads(r.stdout.splitlines()[-1]) == []


def test_root_cli_registers_feedback():
    root = pytest.importorskip("alignloop.cli")
    r = CliRunner().invoke(root.cli, ["feedback", "--help"])
    assert r.exit_code == 0 and "export" in r.output and "serve" in r.output


@pytest.mark.slow
def test_serve_starts_a_server(tmp_path):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    db = tmp_path / "f.db"
    run("create", "--db", db, "--project", "hh")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from alignloop.cli.feedback import feedback; feedback()", "serve",
                             "--db", str(db), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("server did not start")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5) as r:
            assert "Sign in" in r.read().decode()
        assert (tmp_path / "feedback-secret.key").exists()  # generated next to the database
    finally:
        proc.terminate()
        proc.wait(10)


def test_sample_into_a_steps_project_leaves_out_empty_samples(tmp_path, monkeypatch):
    """A small model often samples an empty answer: into a steps project it is left out and counted, the others
    are imported (one item each); all empty is a clear error with nothing imported."""
    import alignloop.feedback.sampling as sampling

    scripted = [{"prompt": "Q: 2+3", "completions": ["2+3=5\nAnswer: 5\n", "   \n", "2+3=6\nAnswer: 6"]}]
    monkeypatch.setattr(sampling, "sample_records", lambda rows, *a, **k: scripted)
    db = tmp_path / "f.db"
    run("create", "--db", db, "--project", "st", "--task-type", "steps")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Q: 2+3"}) + "\n")
    r = run("sample", "--db", db, "--project", "st", "--prompts", prompts, "--model", tmp_path / "m", "-n", 3)
    assert r.exit_code == 0, r.output
    assert "2 items" in r.output and "(1 empty samples left out)" in r.output
    scripted[0]["completions"] = ["", "\n\n"]
    r = run("sample", "--db", db, "--project", "st", "--prompts", prompts, "--model", tmp_path / "m", "-n", 2)
    assert r.exit_code == 2 and "every one of the 2 samples is empty" in r.output
