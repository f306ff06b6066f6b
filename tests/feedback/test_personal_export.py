"""Labeler context: attributes set by an admin (store, CLI, admin page), the pseudonymous export id, migration 0005,
and the export's labeler columns kept through alignloop.data's writers and readers (round trip, every field)."""
import json

import pytest
from click.testing import CliRunner
from fb_helpers import PASSWORD, csrf_of

from alignloop import data
from alignloop.cli.feedback import feedback
from alignloop.errors import UserError
from alignloop.feedback import db as dbmod
from alignloop.feedback.export import ExportOptions, export_records
from alignloop.feedback.store import Store

QUESTIONS = [{"name": "helpful", "question": "Which response is more helpful?"},
             {"name": "harmless", "question": "Which response is more harmless?"}]
META = ("labeler", "labeler_attributes", "comment", "flags", "time_spent_ms", "criterion", "labelers", "comments")


def _cli(*args, input=None, env=None):
    return CliRunner().invoke(feedback, [str(a) for a in args], input=input, env=env)


def _labelers(store, attrs=({"group": "warm", "locale": "en-GB"}, {"group": "warm"}, {}), prefix="lab"):
    return [store.add_labeler(f"{prefix}{i}", PASSWORD, attributes=a) for i, a in enumerate(attrs)]


def _judge_all(store, project, labs, fields_of):
    p = store.get_project(project)
    for lab in labs:
        while (a := store.next_assignment(p.id, lab.id)) is not None:
            store.submit(a.id, lab.id, fields_of(lab, a), f"key-{lab.id}-{a.id}-xyz")


def _two_question_project(store):
    """3 labelers x 2 items (prompt p: 3 completions = 3 items; q: 1), two questions, comments; lab2's answers to
    `harmless` are the opposite of the others'."""
    store.create_project("two", "pairwise", overlap_k=3, settings={"questions": QUESTIONS})
    store.import_records("two", [{"prompt": "p", "completions": ["good p", "fine p", "poor p"]},
                                 {"prompt": "q", "completions": ["good q", "poor q"]}])
    labs = _labelers(store)
    rank = {"good": 0, "fine": 1, "poor": 2}

    def fields(lab, a):
        view = store.item_view(a.item, a.shown_order)
        left, right = (rank[c["text"].split()[0]] for c in view["completions"])
        better, worse = ("left", "right") if left < right else ("right", "left")
        harmless = worse if lab.username == "lab2" else better
        return {"choice_helpful": better, "strength_helpful": "better", "choice_harmless": harmless,
                "strength_harmless": "slightly_better", "comment": f"{lab.username} on <{a.item_id}>"}

    _judge_all(store, "two", labs, fields)
    return labs


# -- attributes and the export id --------------------------------------------------------------------------------
def test_attributes_are_checked_and_set(store):
    lab = store.add_labeler("ann", PASSWORD, attributes={"group": "warm"})
    assert lab.attributes == {"group": "warm"}
    assert lab.public_id.startswith("L") and len(lab.public_id) == 17 and "ann" not in lab.public_id
    other = store.add_labeler("bob", PASSWORD)
    assert other.public_id != lab.public_id and other.attributes == {}
    assert store.set_labeler_attributes("ann", {"locale": "en-GB"}, replace=False).attributes == {
        "group": "warm", "locale": "en-GB"}
    assert store.set_labeler_attributes("ann", {}, replace=False, remove=["group"]).attributes == {"locale": "en-GB"}
    assert store.set_labeler_attributes(lab.id, {"expertise": "film"}).attributes == {"expertise": "film"}
    assert store.get_labeler(lab.id).public_id == lab.public_id  # stable
    for bad, msg in [({"bad key": "x"}, "attribute name 'bad key'"), ({"group": ""}, "attribute group"),
                     ({"group": "a\nb"}, "attribute group"), ({"group": 3}, "attribute group"),
                     ({f"k{i}": "v" for i in range(21)}, "at most 20")]:
        with pytest.raises(UserError, match=msg):
            store.set_labeler_attributes("ann", bad)
    with pytest.raises(UserError, match="no attribute 'nope'"):
        store.set_labeler_attributes("ann", {}, replace=False, remove=["nope"])
    with pytest.raises(UserError, match="no labeler"):
        store.set_labeler_attributes("nobody", {"group": "x"})
    assert store.get_labeler(lab.id).attributes == {"expertise": "film"}  # nothing changed by the refusals


def test_cli_sets_lists_and_refuses_attributes(tmp_path):
    db = tmp_path / "f.db"
    assert _cli("create", "--db", db).exit_code == 0
    r = _cli("add-labeler", "--db", db, "ann", "--attr", "group=warm", "--attr", "locale=en-GB", "--password-env",
             "PW", env={"PW": PASSWORD})
    assert r.exit_code == 0 and "group=warm, locale=en-GB" in r.output, r.output
    r = _cli("set-attributes", "--db", db, "ann", "--attr", "expertise=film", "--remove", "locale")
    assert r.exit_code == 0 and "ann: group=warm, expertise=film" in r.output, r.output
    r = _cli("set-attributes", "--db", db, "ann", "--attr", "group=cold", "--replace")
    assert r.exit_code == 0 and "ann: group=cold" in r.output
    r = _cli("labelers", "--db", db, "--json")
    (row,) = json.loads(r.output)
    assert row["username"] == "ann" and row["attributes"] == {"group": "cold"} and row["export_id"].startswith("L")
    assert "group=cold" in _cli("labelers", "--db", db).output
    for args, msg in [(["set-attributes", "ann", "--attr", "group"], "write NAME=VALUE"),
                      (["set-attributes", "ann", "--attr", "bad key=1"], "attribute name 'bad key'"),
                      (["set-attributes", "ann", "--attr", "a=1", "--attr", "a=2"], "given twice"),
                      (["set-attributes", "ann"], "nothing to change"),
                      (["set-attributes", "nobody", "--attr", "a=1"], "no labeler 'nobody'"),
                      (["add-labeler", "bob", "--attr", "group=", "--password-env", "PW"], "attribute group")]:
        r = _cli(*args[:1], "--db", db, *args[1:], env={"PW": PASSWORD})
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    assert Store(str(db)).list_labelers()[0].attributes == {"group": "cold"}


def test_admin_page_sets_attributes_with_csrf_and_escapes_them(store, make_client):
    store.add_labeler("boss", PASSWORD, role="admin")
    lab = store.add_labeler("ann", PASSWORD, attributes={"group": "warm"})
    admin = make_client("boss")
    page = admin.get("/admin")
    assert page.status_code == 200 and f'action="/admin/labelers/{lab.id}/attributes"' in page.text
    assert "group=warm</textarea>" in page.text and lab.public_id in page.text
    tok = csrf_of(page.text)
    r = admin.post(f"/admin/labelers/{lab.id}/attributes", data={"attributes": "group=cold\nnote=<b>x</b>"})
    assert r.status_code == 403  # no CSRF token
    r = admin.post(f"/admin/labelers/{lab.id}/attributes",
                   data={"attributes": "group=cold\r\nnote=<b>x</b>\n", "csrf_token": tok})
    assert r.status_code == 200 and r.url.path == "/admin"
    assert store.get_labeler(lab.id).attributes == {"group": "cold", "note": "<b>x</b>"}
    assert "note=&lt;b&gt;x&lt;/b&gt;</textarea>" in r.text and "<b>x</b>" not in r.text  # escaped
    r = admin.post(f"/admin/labelers/{lab.id}/attributes", data={"attributes": "no equals sign", "csrf_token": tok})
    assert r.status_code == 422 and "write NAME=VALUE" in r.text and "no equals sign</textarea>" in r.text
    assert store.get_labeler(lab.id).attributes == {"group": "cold", "note": "<b>x</b>"}
    assert admin.post("/admin/labelers/999/attributes", data={"attributes": "a=1", "csrf_token": tok}).status_code \
        == 404
    r = admin.post("/admin/labelers", data={"username": "new", "password": PASSWORD, "role": "labeler",
                                            "attributes": "group=warm", "csrf_token": tok})
    assert r.status_code == 200 and {x.username: x.attributes for x in store.list_labelers()}["new"] == {
        "group": "warm"}
    ann = make_client("ann")  # a labeler can neither see nor post the form
    assert ann.get("/admin").status_code == 403
    r = ann.post(f"/admin/labelers/{lab.id}/attributes",
                 data={"attributes": "group=mine", "csrf_token": csrf_of(ann.get("/").text)})
    assert r.status_code == 403 and store.get_labeler(lab.id).attributes["group"] == "cold"


def test_migration_0005_gives_existing_labelers_an_id_and_keeps_their_judgements(tmp_path):
    """From 0004 with a labeler and a judgement: every labeler gets its own export id and no attributes; nothing is
    lost (no table copy: with foreign keys on, dropping the labelers table would cascade to the judgements)."""
    from alembic import command

    path = tmp_path / "old.db"
    store = Store(str(path))
    store.create_project("hh", "pairwise", overlap_k=1)
    store.import_records("hh", [{"prompt": "p", "completions": ["a", "b"]}])
    labs = [store.add_labeler(n, PASSWORD) for n in ("ann", "bob")]
    a = store.next_assignment(1, labs[0].id)
    store.submit(a.id, labs[0].id, {"choice": "tie"}, "old-key-0001")
    store.dispose()
    engine = dbmod.open_engine(str(path))
    with engine.begin() as conn:
        command.downgrade(dbmod.alembic_config(conn), "0004")
    with engine.connect() as conn:
        assert "public_id" not in [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(labelers)")]
        assert conn.exec_driver_sql("SELECT count(*) FROM judgements").scalar() == 1
    engine.dispose()
    store = Store(str(path))  # upgrades to head
    try:
        assert dbmod.stored_revision(store.engine) == dbmod.HEAD
        ids = [x.public_id for x in store.list_labelers()]
        assert len(set(ids)) == 2 and all(i.startswith("L") and len(i) == 17 for i in ids)
        assert [x.attributes for x in store.list_labelers()] == [{}, {}]
        (rec,) = store.current_judgements(1)
        assert rec["choice"] == "tie" and rec["labeler_public_id"] == ids[0] and rec["answers"] is None
        new = store.add_labeler("cat", PASSWORD)
        assert new.public_id not in ids
    finally:
        store.dispose()


# -- export columns and the round trip ---------------------------------------------------------------------------
def test_mode_all_rows_carry_each_judgements_labeler_context(store):
    labs = _two_question_project(store)
    rows, _ = export_records(store, "two", ExportOptions(mode="all", exclude_flagged=False, criterion="harmless"))
    assert len(rows) == 3 * 4
    by_id = {lab.public_id: lab for lab in labs}
    for r in rows:
        lab = by_id[r["labeler"]]  # the pseudonymous id, never the username
        assert r["labeler_attributes"] == lab.attributes and r["criterion"] == "harmless"
        assert r["comment"].startswith(f"{lab.username} on <") and r["flags"] == []
        assert isinstance(r["time_spent_ms"], int) and r["time_spent_ms"] >= 0
        assert "lab" not in r["labeler"]
        good_first = r["chosen"].startswith("good") or (r["chosen"].startswith("fine") and
                                                         r["rejected"].startswith("poor"))
        assert good_first == (lab.username != "lab2")  # lab2's harmless answers are the opposite ones
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], set()).add(r["labeler"])
    assert all(len(v) == 1 for v in groups.values())  # a group's rows share their labeler


def test_consensus_rows_carry_the_contributing_labelers(store):
    labs = _two_question_project(store)
    rows, _ = export_records(store, "two", ExportOptions(exclude_flagged=False))
    assert len(rows) == 4 and {r["criterion"] for r in rows} == {"helpful"}
    ids = [lab.public_id for lab in labs]
    for r in rows:
        assert r["labelers"] == ids  # in the order they judged
        assert [c.split(" on ")[0] for c in r["comments"]] == ["lab0", "lab1", "lab2"]
        assert r["flags"] == [] and "labeler_attributes" not in r  # the three have different attributes
        assert not {"labeler", "comment", "time_spent_ms"} & set(r)
    store.set_labeler_attributes(labs[2].id, {"group": "warm"})
    store.set_labeler_attributes(labs[0].id, {"group": "warm"})
    rows, _ = export_records(store, "two", ExportOptions(exclude_flagged=False))
    assert all(r["labeler_attributes"] == {"group": "warm"} for r in rows)  # all agree: carried


def _likert_with_flags(store):
    store.create_project("lk", "likert", overlap_k=2)
    store.import_records("lk", [{"prompt": "p", "completions": ["five", "two"]}])
    labs = _labelers(store, ({"group": "warm"}, {"group": "cold"}), prefix="lk")

    def fields(lab, a):
        good = store.item_view(a.item, a.shown_order)["completions"][0]["text"] == "five"
        return {"likert": "5" if good else "2", "flags": [] if good else ["hallucination", "harmful"][:1 + lab.id % 2],
                "comment": "" if good else "made up"}
    _judge_all(store, "lk", labs, fields)


def _meta(row: dict, csv: bool = False) -> dict:
    """The row's labeler columns (in CSV an empty text is an empty cell, which reads back as absent)."""
    return {k: row[k] for k in META if k in row and not (csv and row[k] == "")}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
@pytest.mark.parametrize("mode", ["all", "consensus"])
@pytest.mark.parametrize("fmt", ["preference", "ranking", "unpaired"])
def test_export_round_trip_keeps_every_field(store, tmp_path, fmt, mode, suffix):
    """Rows written with alignloop.data.write_rows read back equal (every column, JSONL), and alignloop.data's
    readers keep every labeler column: a preference group's meta, a ranking's, an unpaired record's keys."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    _two_question_project(store)
    _likert_with_flags(store)
    project = "lk" if fmt == "unpaired" and mode == "all" else "two"
    rows, _ = export_records(store, project, ExportOptions(format=fmt, mode=mode, exclude_flagged=False,
                                                           criterion="all" if project == "two" else None))
    assert rows and all(_meta(r) for r in rows)
    path = data.write_rows(rows, tmp_path / f"rows{suffix}")
    if suffix == ".jsonl":
        assert [dict(r) for r in data.read_rows(path)] == rows  # every field, as written
    if fmt == "unpaired":
        back, _ = data.load_unpaired(path)
        assert [_meta(r) for r in back] == [_meta(r, suffix == ".csv") for r in rows]
        assert [(r["prompt"], r["completion"], r["label"]) for r in back] == [
            (r["prompt"], r["completion"], r["label"]) for r in rows]
        return
    back, _ = data.load_preferences(path)
    read_pairs = [(g.prompt, p.chosen, p.rejected, g.meta) for g in back for p in g.pairs]
    if fmt == "preference":
        want = [(r["prompt"], r["chosen"], r["rejected"], _meta(r, suffix == ".csv")) for r in rows]
    else:
        want = [(r["prompt"], c, d, _meta(r, suffix == ".csv")) for r in rows
                for c, d in [(x.chosen, x.rejected) for x in data.rankings_to_pairs(r["completions"], r["ranking"])]]
    assert sorted(map(repr, read_pairs)) == sorted(map(repr, want))
    if fmt == "preference":  # each criterion's groups apart: no group mixes two criteria
        assert all(len({r["criterion"] for r in rows if r["group"] == g}) == 1 for g in {r["group"] for r in rows})


def test_likert_flags_and_comments_in_unpaired_rows(store):
    _likert_with_flags(store)
    rows, _ = export_records(store, "lk", ExportOptions(format="unpaired", mode="all", exclude_flagged=False))
    bad = [r for r in rows if r["completion"] == "two"]
    assert sorted(tuple(r["flags"]) for r in bad) == [("hallucination",), ("hallucination", "harmful")]
    assert {r["comment"] for r in bad} == {"made up"} and "criterion" not in bad[0]  # no questions named
    rows, _ = export_records(store, "lk", ExportOptions(format="unpaired", exclude_flagged=False))
    (bad,) = [r for r in rows if r["completion"] == "two"]
    assert bad["flags"] == ["hallucination", "harmful"] and bad["comments"] == ["made up", "made up"]
