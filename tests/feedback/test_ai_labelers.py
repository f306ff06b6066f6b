"""AI labelers in the feedback store: the schema (migration 0003), `Store.add_ai_labeler`,
`Store.record_ai_judgements`, their judgements in `current_judgements`, quality (`labeler_stats`,
`ai_human_agreement`), export by labeler kind, and the CLI."""
import json
import time

import pytest
from click.testing import CliRunner
from fb_helpers import PASSWORD
from sqlalchemy import func, insert, select

from alignloop.cli.feedback import feedback
from alignloop.errors import UserError
from alignloop.feedback import db as dbmod
from alignloop.feedback import quality
from alignloop.feedback.errors import ValidationError
from alignloop.feedback.export import ExportOptions, export_records
from alignloop.feedback.models import Assignment, Completion, Item, Judgement, Labeler, Prompt
from alignloop.feedback.security import hash_password
from alignloop.feedback.store import Store

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# Everyone's judgements kept in the export tests (the people here answer in milliseconds: "not reading")
KEEP_ALL = quality.Thresholds(min_items=10 ** 6, min_gold_items=10 ** 6)


def _project(store, name="ai", n_items=4, k=3, task_type="pairwise", n_completions=2):
    store.create_project(name, task_type, overlap_k=k)
    store.import_records(name, [{"prompt": f"p{i}", "completions": [f"{name}{i}-{c}" for c in "abcd"[:n_completions]]}
                                for i in range(n_items)])
    p = store.get_project(name)
    with store.read() as s:
        items = list(s.scalars(select(Item).where(Item.project_id == p.id).order_by(Item.id)))
    return p, [it.id for it in items]


def _label(store, p, lab, canonical: dict[int, str]) -> int:
    """`lab` labels every item it is given with the canonical choice `canonical[item_id]` (a | b | tie)."""
    n = 0
    while (a := store.next_assignment(p.id, lab.id)) is not None:
        c = canonical[a.item_id]
        if c == "tie":
            fields = {"choice": "tie"}
        else:
            pos = a.shown_order.index("ab".index(c))
            fields = {"choice": "left" if pos == 0 else "right", "strength": "better"}
        store.submit(a.id, lab.id, fields, f"h-{lab.id}-{a.id}-key")
        n += 1
    return n


def _ai(item_id, choice, shown_order=(0, 1), **extra):
    return {"item_id": item_id, "shown_order": list(shown_order), "choice": choice,
            "strength": None if choice == "tie" else "slightly_better", **extra}


def _counts(store):
    with store.read() as s:
        return (s.scalar(select(func.count()).select_from(Judgement)),
                s.scalar(select(func.count()).select_from(Assignment)),
                [(i.n_active, i.n_done) for i in s.scalars(select(Item).order_by(Item.id))])


# -- schema ------------------------------------------------------------------------------------------------------
def test_a_0002_database_upgrades_in_place_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    engine = dbmod.open_engine(str(path))
    dbmod.upgrade(engine, "0002")
    now = "2026-01-01 00:00:00.000000"
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO projects (id, name, task_type, guidelines_md, overlap_k, gold_rate, settings, "
                          "created_at) VALUES (1, 'old', 'pairwise', '', 3, 0.0, '{}', ?)", (now,))
        c.exec_driver_sql("INSERT INTO labelers (id, username, password_hash, role, active, created_at) "
                          "VALUES (1, 'ann', ?, 'labeler', 1, ?)", (hash_password(PASSWORD), now))
        c.exec_driver_sql("INSERT INTO prompts (id, project_id, messages, is_chat, meta) "
                          "VALUES (1, 1, '[{\"role\": \"user\", \"content\": \"hi\"}]', 0, '{}')")
        c.exec_driver_sql("INSERT INTO completions (id, prompt_id, text, model, params) VALUES "
                          "(1, 1, 'x', NULL, '{}'), (2, 1, 'y', NULL, '{}')")
        c.exec_driver_sql("INSERT INTO items (id, project_id, prompt_id, completion_ids, is_gold, n_active, n_done, "
                          "created_at) VALUES (1, 1, 1, '[1, 2]', 0, 1, 1, ?)", (now,))
        c.exec_driver_sql("INSERT INTO assignments (id, item_id, labeler_id, project_id, status, is_gold, "
                          "shown_order, created_at, completed_at) VALUES (1, 1, 1, 1, 'done', 0, '[1, 0]', ?, ?)",
                          (now, now))
        c.exec_driver_sql("INSERT INTO judgements (assignment_id, item_id, labeler_id, version, shown_order, choice, "
                          "strength, picked_position, flags, comment, time_spent_ms, idempotency_key, created_at) "
                          "VALUES (1, 1, 1, 1, '[1, 0]', 'b', 'better', 0, '[]', '', 3000, 'old-key-0001', ?)",
                          (now,))
    engine.dispose()
    store = Store(str(path))  # upgrades to head
    try:
        assert dbmod.stored_revision(store.engine) == dbmod.HEAD
        (rec,) = store.current_judgements(1)
        assert (rec["labeler"], rec["labeler_kind"], rec["labeler_model"], rec["details"]) == ("ann", "human", None,
                                                                                              None)
        assert (rec["choice"], rec["strength"], rec["picked_position"], rec["time_spent_ms"]) == ("b", "better", 0,
                                                                                                  3000)
        assert store.authenticate("ann", PASSWORD).kind == "human"  # the person still signs in
        assert _counts(store) == (1, 1, [(1, 1)])
    finally:
        store.dispose()


# -- AI labelers --------------------------------------------------------------------------------------------------
def test_add_ai_labeler_is_get_or_create_and_never_signs_in(store):
    judge = store.add_ai_labeler("judge-1", MODEL)
    assert (judge.kind, judge.model, judge.username) == ("ai", MODEL, "judge-1")
    assert store.add_ai_labeler("judge-1", MODEL).id == judge.id
    assert [lab.username for lab in store.list_labelers()] == ["judge-1"]
    for password in ("", "judge-1", judge.password_hash, PASSWORD):
        assert store.authenticate("judge-1", password) is None
    with pytest.raises(UserError, match="already exists"):  # a person cannot take the AI labeler's name
        store.add_labeler("judge-1", PASSWORD)
    store.add_labeler("ann", PASSWORD)
    assert store.authenticate("ann", PASSWORD).kind == "human"
    with pytest.raises(ValidationError, match="'ann' is a human labeler") as e:
        store.add_ai_labeler("ann", MODEL)
    assert set(e.value.errors) == {"name"}
    with pytest.raises(ValidationError, match="model") as e:
        store.add_ai_labeler("judge-1", "another/model")
    assert set(e.value.errors) == {"model"}
    with pytest.raises(ValidationError, match="name"):
        store.add_ai_labeler("bad name!", MODEL)
    with pytest.raises(ValidationError, match="model"):
        store.add_ai_labeler("judge-2", " ")
    assert store.get_labeler(judge.id).kind == "ai" and len(store.list_labelers()) == 2


def test_an_ai_labeler_cannot_sign_in_through_the_api(store, make_client):
    store.add_ai_labeler("judge-1", MODEL)
    r = make_client().post("/api/login", json={"username": "judge-1", "password": PASSWORD})
    assert r.status_code != 200


def test_ai_judgements_take_no_slot_and_people_still_get_k(store):
    p, items = _project(store, n_items=4, k=3)
    judge = store.add_ai_labeler("judge-1", MODEL)
    before = _counts(store)
    n = store.record_ai_judgements(p.name, judge.id, [_ai(i, "a", details={"rationale": f"item {i}"}) for i in items])
    assert n == 4
    n_j, n_a, slots = _counts(store)
    assert (n_j, n_a) == (4, 4) and slots == before[2] == [(0, 0)] * 4  # n_active / n_done untouched
    with store.read() as s:
        assert {a.status for a in s.scalars(select(Assignment))} == {"done"}
    recs = store.current_judgements(p.id)
    assert {(r["labeler_kind"], r["labeler_model"], r["labeler"]) for r in recs} == {("ai", MODEL, "judge-1")}
    assert [r["details"] for r in recs] == [{"rationale": f"item {i}"} for i in items]
    assert {(r["choice"], r["picked_position"], r["strength"]) for r in recs} == {("a", 0, "slightly_better")}
    assert store.project_summary(p.id)["complete_items"] == 0  # AI labels never complete an item
    # three people still each get every item; k counts people only; a fourth person gets nothing
    people = [store.add_labeler(f"h{n}", PASSWORD) for n in range(4)]
    assert store.progress(p.id, people[0].id)["remaining"] == 4
    for lab in people[:3]:
        assert _label(store, p, lab, dict.fromkeys(items, "b")) == 4
    assert store.next_assignment(p.id, people[3].id) is None
    assert _counts(store)[2] == [(3, 3)] * 4
    summary = store.project_summary(p.id)
    assert (summary["complete_items"], summary["judgement_rows"], summary["ai_judgement_rows"]) == (4, 16, 4)
    # judging later (items now complete) changes nothing either
    assert store.record_ai_judgements(p.id, judge.id, [_ai(items[0], "b")]) == 1
    assert _counts(store)[2] == [(3, 3)] * 4


def test_judging_again_appends_a_version(store):
    p, items = _project(store, n_items=2, k=1)
    judge = store.add_ai_labeler("judge-1", MODEL)
    store.record_ai_judgements(p.id, judge.id, [_ai(items[0], "a"), _ai(items[1], "tie")])
    # the same item twice in one call: two versions, the later one current
    assert store.record_ai_judgements(p.id, judge.id, [_ai(items[0], "b", (1, 0)), _ai(items[0], "tie")]) == 2
    with store.read() as s:
        aid = s.scalar(select(Assignment.id).where(Assignment.item_id == items[0]))
        assert s.scalar(select(func.count()).select_from(Assignment)) == 2  # still one per (item, AI labeler)
    hist = store.judgement_history(aid)
    assert [(j.version, j.choice, j.shown_order) for j in hist] == [(1, "a", [0, 1]), (2, "b", [1, 0]),
                                                                     (3, "tie", [0, 1])]
    assert hist[1].picked_position == 0  # "b" shown first: derived from shown_order
    cur = {r["item_id"]: r for r in store.current_judgements(p.id)}
    assert (cur[items[0]]["choice"], cur[items[0]]["version"]) == ("tie", 3)
    assert (cur[items[1]]["choice"], cur[items[1]]["picked_position"], cur[items[1]]["strength"]) == ("tie", None,
                                                                                                      None)
    with store.engine.connect() as conn:  # no details, no ranking: SQL NULL, as the other paths store it
        assert conn.exec_driver_sql("SELECT count(*) FROM judgements WHERE details IS NOT NULL "
                                    "OR ranking IS NOT NULL").scalar() == 0


def test_numpy_integers_are_integers(store):
    np = pytest.importorskip("numpy")
    p, items = _project(store, n_items=1, k=1)
    judge = store.add_ai_labeler("judge-1", MODEL)
    order = np.array([1, 0])
    assert store.record_ai_judgements(p.id, judge.id, [{"item_id": np.int64(items[0]), "shown_order": list(order),
                                                        "choice": "a", "picked_position": np.int64(1)}]) == 1
    (rec,) = store.current_judgements(p.id)
    assert (rec["item_id"], rec["shown_order"], rec["picked_position"], rec["strength"]) == (items[0], [1, 0], 1, None)


def test_rank_judgements_in_canonical_ranks(store):
    p, items = _project(store, name="rk", n_items=1, k=2, task_type="rank", n_completions=3)
    judge = store.add_ai_labeler("judge-1", MODEL)
    store.record_ai_judgements("rk", judge.id, [{"item_id": items[0], "shown_order": [2, 0, 1], "ranking": [3, 1, 3],
                                                "details": {"scores": [0.1, 0.8, 0.1]}}])
    (rec,) = store.current_judgements(p.id)
    assert rec["ranking"] == [2, 1, 2] and rec["shown_order"] == [2, 0, 1]  # competition ranks, as for people
    with pytest.raises(ValidationError, match="ranking"):
        store.record_ai_judgements("rk", judge.id, [{"item_id": items[0], "shown_order": [0, 1, 2],
                                                    "ranking": [2, 2, 3]}])


@pytest.mark.parametrize("bad, where", [
    ({"choice": "c"}, "choice"),
    ({"item_id": 99_999}, "item_id"),
    ({"item_id": "1"}, "item_id"),
    ({"strength": "much_better"}, "strength"),
    ({"choice": "tie", "strength": "better"}, "strength"),
    ({"shown_order": [0, 0]}, "shown_order"),
    ({"picked_position": 1}, "picked_position"),  # "a" was shown first (shown_order [0, 1])
    ({"details": "because"}, "details"),
    ({"details": {"raw_picks": [0, 2]}}, "details"),
    ({"ranking": [1, 2]}, "fields"),  # not a pairwise field
])
def test_a_bad_judgement_names_the_item_and_writes_nothing(store, bad, where):
    p, items = _project(store, n_items=3, k=3)
    judge = store.add_ai_labeler("judge-1", MODEL)
    before = _counts(store)
    batch = [_ai(items[0], "a"), {**_ai(items[1], "a"), **bad}, _ai(items[2], "b")]
    with pytest.raises(ValidationError) as e:
        store.record_ai_judgements(p.name, judge.id, batch)
    (key,) = e.value.errors
    assert key.endswith(where) and "judgements[1]" in key
    if where != "item_id":
        assert f"item {items[1]} " in key
    assert _counts(store) == before  # nothing written, not even the valid ones


def test_record_refuses_people_unknown_labelers_and_projects(store):
    p, items = _project(store, n_items=1)
    ann = store.add_labeler("ann", PASSWORD)
    with pytest.raises(ValidationError, match="'ann', a human labeler"):
        store.record_ai_judgements(p.id, ann.id, [_ai(items[0], "a")])
    with pytest.raises(UserError, match="no labeler"):
        store.record_ai_judgements(p.id, 12345, [_ai(items[0], "a")])
    judge = store.add_ai_labeler("judge-1", MODEL)
    with pytest.raises(UserError, match="no project"):
        store.record_ai_judgements("nope", judge.id, [_ai(items[0], "a")])
    _, other_items = _project(store, name="other", n_items=1)
    with pytest.raises(ValidationError, match="no item"):  # an item of another project
        store.record_ai_judgements(p.id, judge.id, [_ai(other_items[0], "a")])
    assert store.record_ai_judgements(p.id, judge.id, []) == 0


def _bulk_items(store, n: int) -> tuple:
    """A pairwise project with `n` items, written straight into the tables (importing rows one by one is slower)."""
    p = store.create_project("bulk", "pairwise", overlap_k=3)
    with store.write() as s:
        s.execute(insert(Prompt), [{"id": i + 1, "project_id": p.id, "messages": [{"role": "user", "content": f"p{i}"}],
                                    "is_chat": False, "meta": {}} for i in range(n)])
        s.execute(insert(Completion), [{"id": 2 * i + 1 + c, "prompt_id": i + 1, "text": f"c{i}-{c}", "params": {}}
                                       for i in range(n) for c in (0, 1)])
        s.execute(insert(Item), [{"id": i + 1, "project_id": p.id, "prompt_id": i + 1,
                                  "completion_ids": [2 * i + 1, 2 * i + 2], "is_gold": False, "n_active": 0,
                                  "n_done": 0} for i in range(n)])
    return p, list(range(1, n + 1))


def test_thousands_of_judgements_in_one_call(store):
    p, items = _bulk_items(store, 3000)
    judge = store.add_ai_labeler("judge-1", MODEL)
    batch = [_ai(i, "ab"[i % 2], (i % 2, 1 - i % 2), details={"p_first": [0.6, 0.4], "raw_picks": [0, 1]})
             for i in items]
    t0 = time.perf_counter()
    assert store.record_ai_judgements(p.id, judge.id, batch) == 3000
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert store.record_ai_judgements(p.id, judge.id, batch) == 3000  # again: 3000 second versions
    again = time.perf_counter() - t0
    assert first < 10 and again < 10, (first, again)  # 0.4-0.8 s each here
    recs = store.current_judgements(p.id)
    assert len(recs) == 3000 and {r["version"] for r in recs} == {2}


# -- quality --------------------------------------------------------------------------------------------------------
# The hand-built example: 3 people and 1 AI labeler on 4 pairwise items (canonical labels).
#
#   item   h1   h2   h3    people's majority   AI   AI shown_order -> picked_position   details.raw_picks
#   0      a    a    b     a                   a    [0, 1] -> 0                          [0, 0]
#   1      b    b    b     b                   b    [0, 1] -> 1                          [0, 1]
#   2      a    b    tie   (tied: skipped)     a    [1, 0] -> 1                          [0, 0]
#   3      b    b    a     b                   a    [0, 1] -> 0                          [1, 0]
HUMANS = {"h1": "abab", "h2": "abbb", "h3": "bbta"}
AI_LABELS = "abaa"
AI_SHOWN = ([0, 1], [0, 1], [1, 0], [0, 1])
AI_RAW = ([0, 0], [0, 1], [0, 0], [1, 0])


@pytest.fixture
def mixed(store):
    p, items = _project(store, n_items=4, k=3)
    for name, labels in HUMANS.items():
        lab = store.add_labeler(name, PASSWORD)
        _label(store, p, lab, {i: {"t": "tie"}.get(c, c) for i, c in zip(items, labels, strict=True)})
    judge = store.add_ai_labeler("judge-1", MODEL)
    store.record_ai_judgements(p.name, judge.id, [
        _ai(i, c, shown, details={"raw_picks": raw}, time_spent_ms=40)
        for i, c, shown, raw in zip(items, AI_LABELS, AI_SHOWN, AI_RAW, strict=True)])
    return store, p, items


def test_ai_human_agreement_of_a_hand_built_example(mixed):
    """Worked out by hand (the table above):

    * majority: items 0, 1, 3 (item 2's people tie 1-1-1, skipped): AI a, b, a against a, b, b -> 2/3 agree.
    * Cohen's kappa against the majority: p_o = 2/3; the AI says a 2/3, b 1/3; the majority a 1/3, b 2/3, so
      p_e = 2/3 * 1/3 + 1/3 * 2/3 = 4/9 and kappa = (2/3 - 4/9) / (1 - 4/9) = (2/9) / (5/9) = 0.4.
    * each person: item 0 agrees with 2 of 3, item 1 with 3, item 2 with 1 (h1), item 3 with 1 (h3) -> 7/12;
      h1 3/4, h2 2/4, h3 2/4.
    * people among themselves, pairs per item: 1/3, 3/3, 0/3, 1/3 -> 5/12 over 12 pairs.
    * position: raw picks 0,0, 0,1, 0,0, 1,0 -> before 6/8 = 0.75; final picked positions 0, 1, 1, 0 -> after 0.5.
    * leave-one-out agreement of the AI (labeler_stats): items 0, 1: 1; item 2: the others tie a/b/tie -> 1/3;
      item 3: 0 -> (1 + 1 + 1/3 + 0) / 4 = 7/12.
    """
    store, p, _items = mixed
    recs = store.current_judgements(p.id)
    got = quality.ai_human_agreement(recs, "pairwise")
    assert got["humans"] == {"agreement": pytest.approx(5 / 12), "pairs": 12, "items": 4}
    ai = got["ai"]["judge-1"]
    assert ai["model"] == MODEL
    assert (ai["n"], ai["n_majority"], ai["human_comparisons"]) == (4, 3, 12)
    assert ai["majority_agreement"] == pytest.approx(2 / 3)
    assert ai["majority_kappa"] == pytest.approx(0.4)
    assert ai["human_agreement"] == pytest.approx(7 / 12)
    assert {w: d["agreement"] for w, d in ai["per_human"].items()} == {"h1": 0.75, "h2": 0.5, "h3": 0.5}
    assert ai["position"] == {"before": 0.75, "n_before": 8, "after": 0.5, "n_after": 4}
    assert set(got["ai"]) == {"judge-1"}

    stats = quality.labeler_stats(recs, "pairwise")
    assert (stats["judge-1"]["kind"], stats["judge-1"]["model"], stats["h1"]["kind"]) == ("ai", MODEL, "human")
    assert stats["judge-1"]["agreement"] == pytest.approx(7 / 12)
    assert stats["judge-1"]["left_share"] == 0.5 and stats["judge-1"]["median_seconds"] == 0.04
    assert ("h1", "judge-1") in quality.pairwise_cohen_kappa(quality.annotations_from_records("pairwise", recs))
    flags = quality.flag_labelers(stats, quality.Thresholds(min_items=1, min_agreement=0.0))
    assert not any("median" in r for r in flags["judge-1"])  # 0.04 s per item is fine for an AI labeler ...
    assert any("median" in r for r in flags["h1"])            # ... not for a person
    assert quality.ai_human_agreement([r for r in recs if r["labeler_kind"] == "human"], "pairwise")["ai"] == {}


def test_position_before_is_skipped_without_raw_picks():
    recs = [{"item_id": 1, "labeler": "j", "labeler_kind": "ai", "choice": "a", "picked_position": 1,
             "is_gold": False, "details": None},
            {"item_id": 1, "labeler": "h", "choice": "b", "picked_position": 0, "is_gold": False}]
    ai = quality.ai_human_agreement(recs, "pairwise")["ai"]["j"]
    assert ai["position"] == {"before": None, "n_before": 0, "after": 0.0, "n_after": 1}
    assert (ai["n"], ai["majority_agreement"], ai["majority_kappa"]) == (1, 0.0, pytest.approx(-0.0))


# -- export -------------------------------------------------------------------------------------------------------
def _chosen(rows):
    return sorted(r["chosen"] for r in rows)


def test_export_by_labeler_kind(mixed):
    store, p, _items = mixed
    # one row per judgement: 12 people's (h3's tie dropped) + 4 AI ones
    for who, n_judgements, n_rows in (("all", 16, 15), ("human", 12, 11), ("ai", 4, 4)):
        rows, s = export_records(store, p.id, ExportOptions(mode="all", labelers=who, thresholds=KEEP_ALL))
        assert (s["judgements"], s["used"], len(rows)) == (n_judgements, n_judgements, n_rows), who
        assert s["other_labelers_judgements"] == 16 - n_judgements and s["labelers"] == who
    # consensus: people alone decide items 0, 1, 3 (item 3: b); the AI alone every item (item 3: a); together item 3
    # ties 2-2 (dropped) and item 2 goes to a (h1 + AI)
    rows, _ = export_records(store, p.id, ExportOptions(labelers="human", thresholds=KEEP_ALL))
    assert _chosen(rows) == ["ai0-a", "ai1-b", "ai3-b"]
    # (one AI label per item: below the project's min_labels of 2, so asked for explicitly)
    rows, _ = export_records(store, p.id, ExportOptions(labelers="ai", thresholds=KEEP_ALL, min_labels=1))
    assert _chosen(rows) == ["ai0-a", "ai1-b", "ai2-a", "ai3-a"]
    rows, s = export_records(store, p.id, ExportOptions(thresholds=KEEP_ALL))
    assert _chosen(rows) == ["ai0-a", "ai1-b", "ai2-a"] and s["dropped"] == {"no_consensus": 1}
    with pytest.raises(UserError, match="export labelers 'robots'"):
        export_records(store, p.id, ExportOptions(labelers="robots"))


# -- CLI and dashboard ----------------------------------------------------------------------------------------------
def _run(*args):
    return CliRunner().invoke(feedback, [str(a) for a in args])


def test_cli_export_labelers_and_stats(tmp_path, mixed):
    store, p, _items = mixed
    db = store.url
    out = tmp_path / "o.jsonl"
    r = _run("export", "--db", db, "--project", p.name, "--out", out, "--mode", "all", "--include-flagged",
             "--labelers", "human")
    assert r.exit_code == 0, r.output
    assert "wrote 11 preference rows" in r.output and "(people only)" in r.output
    assert len(out.read_text().splitlines()) == 11
    r = _run("export", "--db", db, "--project", p.name, "--out", out, "--mode", "all", "--include-flagged",
             "--labelers", "ai")
    assert r.exit_code == 0 and "wrote 4 preference rows" in r.output and len(out.read_text().splitlines()) == 4
    r = _run("export", "--db", db, "--project", p.name, "--out", out, "--labelers", "robots")
    assert r.exit_code == 2 and "Traceback" not in r.output and "--labelers" in r.output, r.output
    r = _run("stats", "--db", db, "--project", p.name)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("judge-1"))
    assert " ai " in line and MODEL in line
    assert "AI labelers vs people" in r.output and "42% pairwise agreement over 12 pairs" in r.output
    assert "(4 by AI labelers)" in r.output
    r = _run("stats", "--db", db, "--project", p.name, "--json")
    st = json.loads(r.output)
    assert st["labelers"]["judge-1"]["kind"] == "ai" and st["labelers"]["h1"]["kind"] == "human"
    assert st["ai_human_agreement"]["ai"]["judge-1"]["majority_kappa"] == pytest.approx(0.4)
    assert st["summary"]["ai_judgement_rows"] == 4


def test_dashboard_shows_the_kind_and_the_ai_block(mixed, make_client):
    store, p, _items = mixed
    store.add_labeler("boss", PASSWORD, role="admin")
    page = make_client("boss").get(f"/admin/p/{p.name}")
    assert page.status_code == 200
    assert f"AI ({MODEL})" in page.text and "AI labelers vs people" in page.text and 'id="ai-table"' in page.text


def test_stats_of_a_project_without_ai_has_no_ai_block(store):
    p, items = _project(store, n_items=2, k=1)
    _label(store, p, store.add_labeler("ann", PASSWORD), dict.fromkeys(items, "a"))
    r = _run("stats", "--db", store.url, "--project", p.name)
    assert r.exit_code == 0 and "AI labelers vs people" not in r.output
    assert json.loads(_run("stats", "--db", store.url, "--project", p.name, "--json").output)[
        "ai_human_agreement"] is None
    with store.read() as s:
        assert s.scalar(select(Labeler.kind)) == "human"
