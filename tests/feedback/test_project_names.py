"""Project names and ids are never confused: the store takes a name (str) or an id (int) by type, the CLI takes
`--project NAME` or `--project-id N`, new names follow a slug rule (not all digits, not "." / ".."), and projects
made before the rule keep working by id."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fb_helpers import PASSWORD

from alignloop.cli.feedback import feedback
from alignloop.errors import UserError
from alignloop.feedback.errors import NotFound
from alignloop.feedback.models import Project, Prompt


def run(*args):
    return CliRunner().invoke(feedback, [str(a) for a in args])


def legacy_project(store, name: str) -> Project:
    """A project whose name the slug rule now refuses, as an older version could create it."""
    with store.write() as s:
        p = Project(name=name, task_type="pairwise", guidelines_md="", overlap_k=1, gold_rate=0.0,
                    settings={"flags": []})
        s.add(p)
        s.flush()
        return p


def prompts_of(store, project_id: int) -> int:
    with store.read() as s:
        return s.query(Prompt).filter(Prompt.project_id == project_id).count()


@pytest.mark.parametrize("name", ["2024", "1", "007", ".", ".."])
def test_new_project_names_not_all_digits_nor_dots(store, name):
    with pytest.raises(UserError, match="project name"):
        store.create_project(name, "pairwise")


@pytest.mark.parametrize("name", ["round-2024", "2024.v2", "hh_1", "a.b"])
def test_slug_names_are_accepted(store, name):
    assert store.create_project(name, "pairwise").name == name


def test_store_takes_names_and_ids_by_type(store):
    alpha = store.create_project("alpha", "pairwise")
    old = legacy_project(store, "2024")
    assert store.get_project("2024").id == old.id           # a str is a name, even all digits
    assert store.get_project(old.id).name == "2024"
    assert store.get_project(alpha.id).name == "alpha"
    with pytest.raises(NotFound, match="no project '1'"):
        store.get_project(str(alpha.id))                     # never parsed as an id
    with pytest.raises(NotFound):
        store.get_project(2**63)                             # out of range: not found, not an OverflowError
    with pytest.raises(TypeError):
        store.get_project(True)


def test_cli_import_project_1_never_writes_into_project_id_1(store, tmp_path):
    alpha = store.create_project("alpha", "pairwise")
    assert alpha.id == 1
    old = legacy_project(store, "2024")
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n")
    db = store.url.removeprefix("sqlite:///")

    r = run("import", "--db", db, "--project", "1", f)       # the issue: this wrote into project id 1, exit 0
    assert r.exit_code == 2 and "no project '1'" in r.output
    assert prompts_of(store, alpha.id) == 0

    r = run("import", "--db", db, "--project", "2024", f)    # the legacy all-digit name is reachable by name
    assert r.exit_code == 0, r.output
    assert "project 2024 (id 2)" in r.output and prompts_of(store, old.id) == 1

    r = run("import", "--db", db, "--project-id", alpha.id, f)
    assert r.exit_code == 0 and "project alpha (id 1)" in r.output
    assert prompts_of(store, alpha.id) == 1


def test_cli_needs_exactly_one_of_project_and_project_id(store, tmp_path):
    store.create_project("alpha", "pairwise")
    db = store.url.removeprefix("sqlite:///")
    out = tmp_path / "o.jsonl"
    for args in ([], ["--project", "alpha", "--project-id", "1"]):
        r = run("stats", "--db", db, *args)
        assert r.exit_code == 2 and "--project NAME or --project-id N" in r.output
    r = run("stats", "--db", db, "--project-id", 1)
    assert r.exit_code == 0 and r.output.startswith("alpha (pairwise")
    r = run("export", "--db", db, "--project-id", 99, "--out", out)
    assert r.exit_code == 2 and "no project with id 99" in r.output
    r = run("create", "--db", db, "--project", "2024")
    assert r.exit_code == 2 and "not only digits" in r.output


def test_web_reaches_a_legacy_project_by_id(store, make_client):
    old = legacy_project(store, "2024")
    dot = legacy_project(store, ".")
    store.add_labeler("boss", PASSWORD, role="admin")
    c = make_client("boss")
    r = c.get(f"/admin/p/{old.id}")
    assert r.status_code == 200 and "2024" in r.text
    assert c.get(f"/admin/p/{dot.id}").status_code == 200
    assert c.get("/admin/p/2024").status_code == 404          # /p/<digits> is an id; there is no project 2024


@pytest.mark.parametrize("name", ["²", "٣", "１"])
def test_non_ascii_digits_in_a_project_url_are_names_not_ids(store, make_client, name):
    """Only ASCII digits make an id: "٣" (Arabic-Indic three) is not project 3, and "²" is a 404, not a 500."""
    store.create_project("alpha", "pairwise")
    store.create_project("beta", "pairwise")
    store.create_project("gamma", "pairwise")
    store.add_labeler("boss", PASSWORD, role="admin")
    c = make_client("boss")
    assert c.get(f"/p/{name}/label").status_code == 404
    assert c.get("/p/3/label").status_code == 200


def test_url_key_is_the_id_for_a_name_that_reads_as_an_id(store):
    assert store.create_project("round-1", "pairwise").url_key == "round-1"
    old, dot = legacy_project(store, "2024"), legacy_project(store, "..")
    assert (old.url_key, dot.url_key) == (str(old.id), str(dot.id))
    odd = [legacy_project(store, n) for n in ("a/b", "what?", "50%", "x#y", "caf\u00e9")]
    assert [p.url_key for p in odd] == [str(p.id) for p in odd]  # no path segment can carry them


def test_a_final_newline_is_not_part_of_a_valid_name(store):
    import pytest

    from alignloop.errors import UserError
    from alignloop.feedback.projects import check_project_name

    for bad in ("round\n", "round-1\n"):
        with pytest.raises(UserError):
            check_project_name(bad)
    with pytest.raises(UserError):
        store.add_labeler("ann\n", PASSWORD)
