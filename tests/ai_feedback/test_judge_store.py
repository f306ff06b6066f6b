"""The AI labeler in the feedback store through `alignloop judge` / `alignloop feedback judge`: judgements of kind
"ai" beside people's, rank items through pairs, statistics and export by labeler kind."""
import json

import pytest
import torch

from alignloop.ai_feedback import load_constitution
from alignloop.ai_feedback.judge import FunctionJudge, judge_project
from alignloop.cli import main
from alignloop.feedback.store import Store
from alignloop.models.tiny import build_tiny_checkpoint, default_corpus

ROWS = [{"prompt": f"the movie {i}", "completions": ["good fun", "a very boring plot and bad acting", "ok"]}
        for i in range(3)]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("judge") / "m", default_corpus(200), vocab_size=300,
                                     n_layer=1, n_embd=32, n_head=2, n_positions=256))


def _db(tmp_path, task="pairwise"):
    db = str(tmp_path / "f.db")
    store = Store(db)
    store.create_project("p", task, overlap_k=2)
    store.import_records("p", ROWS)
    return db, store


def longer_is_better(prompts, firsts, seconds, questions):
    return [0.9 if len(f) > len(s) else 0.1 for f, s in zip(firsts, seconds, strict=True)]


def test_cli_judges_every_pair_into_the_store_as_kind_ai(tmp_path, lm, capsys):
    db, store = _db(tmp_path)
    main(["judge", "--db", db, "--project", "p", "--judge", lm, "--batch-size", "4"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["items"] == out["pairs"] == out["judgements_written"] == 9 and out["both_orders"] is True
    assert out["labeler"].startswith("ai-judge") and out["labeler"].endswith("-m")   # ai-<parent>-<folder>
    recs = store.current_judgements(store.get_project("p").id)
    assert len(recs) == 9 and {r["labeler_kind"] for r in recs} == {"ai"}
    assert all(r["choice"] in ("a", "b", "tie") and len(r["details"]["p_orders"]) == 2 for r in recs)
    # AI judgements take no person's slot: people still get every item
    alice = store.add_labeler("alice", "correct-horse-battery")
    assert store.next_assignment(store.get_project("p").id, alice.id) is not None
    # `feedback judge` is the same command; a second AI labeler, one order
    main(["feedback", "judge", "--db", db, "--project", "p", "--judge", lm, "--labeler", "quick", "--single-order"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["labeler"] == "quick" and out["both_orders"] is False and out["order_consistency"] is None
    recs = store.current_judgements(store.get_project("p").id)
    assert sum(r["labeler"] == "quick" for r in recs) == 9
    assert all(len(r["details"]["p_orders"]) == 1 for r in recs if r["labeler"] == "quick")
    store.dispose()


def test_rank_items_are_ranked_through_their_pairs(tmp_path):
    _, store = _db(tmp_path, "rank")
    judge = FunctionJudge(longer_is_better, load_constitution())
    s = judge_project(store, "p", judge, labeler="lengthy")
    assert s["items"] == 3 and s["pairs"] == 9
    recs = store.current_judgements(store.get_project("p").id)
    # completions: "good fun" (8 chars), "a very boring..." (33), "ok" (2): longer is better
    assert [r["ranking"] for r in recs] == [[2, 1, 3]] * 3
    store.dispose()


def test_position_bias_is_reported_before_and_after(tmp_path):
    _, store = _db(tmp_path)
    s = judge_project(store, "p", FunctionJudge(lambda p, f, s_, q: [0.8] * len(p), load_constitution()),
                      labeler="firsty")
    assert s["position_bias_before"] == 1.0 and s["ties"] == 9 and s["position_bias_after"] is None
    assert s["order_consistency"] == 0.0
    store.dispose()


def test_judge_errors_exit_2(tmp_path, lm):
    db, store = _db(tmp_path, "thumbs")
    store.dispose()
    for args, _ in ((["--project", "p"], "thumbs"), (["--project", "nope"], "nope")):
        with pytest.raises(SystemExit) as e:
            main(["judge", "--db", db, "--judge", lm, *args])
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["judge", "--db", db, "--project", "p", "--judge", "no_such_mod_xyz:f"])
    assert e.value.code == 2
