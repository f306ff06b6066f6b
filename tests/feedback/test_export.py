"""Export formats and options; the files read back through alignloop.data; export -> `alignloop rm` trains."""
import json

import pytest

from alignloop.data import write_rows as write_jsonl
from alignloop.errors import UserError
from alignloop.feedback.export import ExportOptions, export_records
from alignloop.feedback.quality import Thresholds

PW = "labeler pass 1"


def _judge(store, project, labeler, fields_by_prompt):
    """Have `labeler` label everything available; fields_by_prompt(prompt_text, assignment) -> screen fields."""
    p = store.get_project(project)
    n = 0
    while (a := store.next_assignment(p.id, labeler.id)) is not None:
        view = store.item_view(a.item, a.shown_order)
        store.submit(a.id, labeler.id, fields_by_prompt(view, a), f"k-{labeler.id}-{a.id}-exp")
        n += 1
    return n


def _prefer(text):
    """Screen fields that pick the completion whose text is `text` as better."""
    def f(view, a):
        shown = [c["text"] for c in view["completions"]]
        if text not in shown:
            return {"choice": "tie"}
        return {"choice": "left" if shown[0] == text else "right", "strength": "significantly_better"}
    return f


@pytest.fixture
def pairwise(store):
    store.create_project("pw", "pairwise", overlap_k=3)
    store.import_records("pw", [
        {"prompt": "p1", "completions": ["good1", "bad1"]},
        {"prompt": "p2", "completions": ["good2", "bad2"]},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                    {"role": "user", "content": "p3"}], "completions": ["good3", "bad3"]},
    ])
    labs = [store.add_labeler(n, PW) for n in ("a", "b", "c")]
    goods = {"good1", "good2", "good3"}

    def honest(view, a):
        shown = [c["text"] for c in view["completions"]]
        left_good = shown[0] in goods
        return {"choice": "left" if left_good else "right", "strength": "better"}

    def contrarian(view, a):
        shown = [c["text"] for c in view["completions"]]
        if "good2" in shown:
            return {"choice": "tie"}
        return {"choice": "right" if shown[0] in goods else "left", "strength": "slightly_better"}
    _judge(store, "pw", labs[0], honest)
    _judge(store, "pw", labs[1], honest)
    _judge(store, "pw", labs[2], contrarian)
    return store


def test_preference_consensus_margins_and_conversational(pairwise):
    rows, summary = export_records(pairwise, "pw", ExportOptions(format="preference", thresholds=Thresholds(
        min_items=100)))
    assert len(rows) == 3 and summary["used"] == 9
    by_prompt = {json.dumps(r["prompt"]): r for r in rows}
    r1 = by_prompt['"p1"']
    assert (r1["chosen"], r1["rejected"]) == ("good1", "bad1")
    assert r1["margin"] == pytest.approx(2 / 3)  # mean margin of the agreeing labelers ("better")
    conv = next(r for r in rows if isinstance(r["prompt"], list))
    assert conv["prompt"][-1] == {"role": "user", "content": "p3"}
    assert conv["chosen"] == [{"role": "assistant", "content": "good3"}]


def test_preference_all_mode_ties_options(pairwise):
    th = Thresholds(min_items=100)
    rows, s = export_records(pairwise, "pw", ExportOptions(format="preference", mode="all", thresholds=th))
    assert len(rows) == 8 and s["dropped"] == {"tie": 1}
    margins = sorted(r["margin"] for r in rows)
    assert margins == pytest.approx([1 / 3, 1 / 3] + [2 / 3] * 6)
    rows, s = export_records(pairwise, "pw", ExportOptions(format="preference", mode="all", ties="both", thresholds=th))
    ties = [r for r in rows if r["margin"] == 0.0]
    assert len(ties) == 2 and ties[0]["chosen"] == ties[1]["rejected"]


def test_flagged_labelers_left_out(pairwise):
    th = Thresholds(min_items=1, min_agreement=0.5, min_median_seconds=0.0)
    rows, s = export_records(pairwise, "pw", ExportOptions(format="preference", mode="all", thresholds=th))
    assert s["flagged_labelers"] == ["c"] and len(rows) == 6
    rows, s = export_records(pairwise, "pw", ExportOptions(format="preference", mode="all", thresholds=th,
                                                           exclude_flagged=False))
    assert len(rows) == 8


def test_ranking_and_unpaired_from_pairwise(pairwise):
    th = Thresholds(min_items=100)
    rows, _ = export_records(pairwise, "pw", ExportOptions(format="ranking", thresholds=th))
    assert all(r["ranking"] in ([1, 2], [2, 1]) for r in rows) and len(rows) == 3
    rows, _ = export_records(pairwise, "pw", ExportOptions(format="unpaired", thresholds=th))
    assert sorted(r["label"] for r in rows) == [False] * 3 + [True] * 3
    assert all(r["label"] == r["completion"].startswith("good") for r in rows if isinstance(r["completion"], str))


def test_both_bad_option(store):
    store.create_project("bb", "pairwise", overlap_k=1)
    store.import_records("bb", [{"prompt": "p", "completions": ["x", "y"]}])
    lab = store.add_labeler("a", PW)
    _judge(store, "bb", lab, lambda v, a: {"choice": "both_bad"})
    rows, s = export_records(store, "bb", ExportOptions(mode="all"))
    assert rows == [] and s["dropped"] == {"both_bad": 1}
    rows, s = export_records(store, "bb", ExportOptions(mode="all", both_bad="tie", ties="both"))
    assert len(rows) == 2 and all(r["margin"] == 0.0 for r in rows)


def test_rank_project_exports(store):
    store.create_project("rk", "rank", overlap_k=2)
    store.import_records("rk", [{"prompt": "p", "completions": ["best", "mid", "worst"]}])
    order = {"best": 1, "mid": 2, "worst": 3}
    for name in ("a", "b"):
        lab = store.add_labeler(name, PW)
        _judge(store, "rk", lab, lambda v, a: {f"rank_{i}": str(order[c["text"]])
                                               for i, c in enumerate(v["completions"])})
    rows, _ = export_records(store, "rk", ExportOptions(format="ranking"))
    assert [{k: r[k] for k in ("prompt", "completions", "ranking")} for r in rows] == [
        {"prompt": "p", "completions": ["best", "mid", "worst"], "ranking": [1, 2, 3]}]
    assert len(rows[0]["labelers"]) == 2 and rows[0]["comments"] == ["", ""]  # the consensus's labeler context
    rows, _ = export_records(store, "rk", ExportOptions(format="preference"))
    assert {(r["chosen"], r["rejected"]) for r in rows} == {("best", "mid"), ("best", "worst"), ("mid", "worst")}
    rows, _ = export_records(store, "rk", ExportOptions(format="unpaired"))
    assert [{k: r[k] for k in ("prompt", "completion", "label")} for r in rows] == [
        {"prompt": "p", "completion": "best", "label": True}, {"prompt": "p", "completion": "worst", "label": False}]


def test_thumbs_and_likert_unpaired(store):
    store.create_project("th", "thumbs", overlap_k=1)
    store.import_records("th", [{"prompt": "p", "completions": ["nice", "rude"]}])
    lab = store.add_labeler("a", PW)
    _judge(store, "th", lab, lambda v, a: {"thumbs": "up" if v["completions"][0]["text"] == "nice" else "down"})
    rows, _ = export_records(store, "th", ExportOptions(format="unpaired"))
    assert sorted((r["completion"], r["label"]) for r in rows) == [("nice", True), ("rude", False)]
    with pytest.raises(UserError, match="only the unpaired"):
        export_records(store, "th", ExportOptions(format="preference"))
    store.create_project("lk", "likert", overlap_k=1)
    store.import_records("lk", [{"prompt": "p", "completions": ["five", "four"]}])
    _judge(store, "lk", lab, lambda v, a: {"likert": "5" if v["completions"][0]["text"] == "five" else "4"})
    rows, _ = export_records(store, "lk", ExportOptions(format="unpaired", likert_threshold=5))
    assert sorted((r["completion"], r["label"]) for r in rows) == [("five", True), ("four", False)]
    with pytest.raises(UserError):
        ExportOptions(format="csv").check()


def test_dawid_skene_consensus_option(pairwise):
    rows, _ = export_records(pairwise, "pw", ExportOptions(format="preference", consensus="dawid_skene",
                                                           thresholds=Thresholds(min_items=100)))
    assert len(rows) == 3 and all(str(r["chosen"]).find("good") >= 0 for r in rows)


def test_files_read_back_by_the_data_module(pairwise, tmp_path):
    data = pytest.importorskip("alignloop.data")
    th = Thresholds(min_items=100)
    for fmt in ("preference", "ranking"):
        rows, _ = export_records(pairwise, "pw", ExportOptions(format=fmt, thresholds=th))
        path = write_jsonl(rows, tmp_path / f"{fmt}.jsonl")
        groups, _stats = data.load_preferences(str(path))
        assert len(groups) == 3
    rows, _ = export_records(pairwise, "pw", ExportOptions(format="unpaired", thresholds=th))
    recs, _ = data.load_unpaired(str(write_jsonl(rows, tmp_path / "u.jsonl")))
    assert len(recs) == 6


def test_rows_are_what_the_data_contract_reads_back(pairwise, tmp_path):
    """Export -> alignloop.data.write_rows -> load_preferences / load_records / load_unpaired gives back exactly the
    exported rows: plain and conversational prompts, chosen/rejected with the contract's strength margins, rankings
    (with their pairs, ties included), unpaired labels."""
    from alignloop import data
    from alignloop.feedback.models import STRENGTHS

    assert tuple(data.STRENGTH_MARGINS["small"]) == STRENGTHS  # the form's strengths are the contract's names
    th = Thresholds(min_items=100)
    rows, _ = export_records(pairwise, "pw", ExportOptions(format="preference", mode="all", ties="both", thresholds=th))
    groups, _ = data.load_preferences(str(data.write_rows(rows, tmp_path / "p.jsonl")))
    assert [(g.prompt, p.chosen, p.rejected, p.margin) for g in groups for p in g.pairs] == [
        (r["prompt"], r["chosen"], r["rejected"], r["margin"]) for r in rows]
    margins = {data.strength_to_margin("better"), data.strength_to_margin("slightly_better"), 0.0}
    assert {r["margin"] for r in rows} == margins
    rows, _ = export_records(pairwise, "pw", ExportOptions(format="ranking", mode="all", thresholds=th))
    pairwise.create_project("rk", "rank", overlap_k=1)
    pairwise.import_records("rk", [{"prompt": "p", "completions": ["best", "mid", "worst", "also mid"]}])
    order = {"best": 1, "mid": 2, "also mid": 2, "worst": 4}
    _judge(pairwise, "rk", pairwise.add_labeler("r", PW),
           lambda v, a: {f"rank_{i}": str(order[c["text"]]) for i, c in enumerate(v["completions"])})
    rows += export_records(pairwise, "rk", ExportOptions(format="ranking", thresholds=th))[0]
    assert rows[-1]["ranking"] == [1, 2, 4, 2]
    groups, stats = data.load_records(str(data.write_rows(rows, tmp_path / "r.jsonl")))
    assert stats.kind == "ranking"
    assert [(g.prompt, g.completions, g.ranking) for g in groups] == [
        (r["prompt"], r["completions"], r["ranking"]) for r in rows]
    assert all(g.pairs == data.rankings_to_pairs(g.completions, g.ranking) for g in groups)
    assert len(groups[-1].pairs) == 5  # C(4,2) - the tied pair
    rows, _ = export_records(pairwise, "pw", ExportOptions(format="unpaired", mode="all", thresholds=th))
    recs, _ = data.load_unpaired(str(data.write_rows(rows, tmp_path / "u.jsonl")))
    assert [dict(r) for r in recs] == rows


def test_export_then_alignloop_rm_trains(store, tmp_path):
    """Export -> `alignloop rm` (runs when the RM trainer exists)."""
    pytest.importorskip("alignloop.trainers.rm")
    from click.testing import CliRunner

    from alignloop.cli import cli
    from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, train_tokenizer

    store.create_project("loop", "pairwise", overlap_k=2)
    words = default_corpus(40, seed=3)
    store.import_records("loop", [{"prompt": f"review {i}:", "completions": [f"great fun {w}", f"awful boring {w}"]}
                                  for i, w in enumerate(words)])
    for name in ("a", "b"):
        _judge(store, "loop", store.add_labeler(name, PW),
               lambda v, a: {"choice": "left" if v["completions"][0]["text"].startswith("great") else "right",
                             "strength": "better"})
    out = tmp_path / "prefs.jsonl"
    from alignloop.cli.feedback import feedback
    r = CliRunner().invoke(feedback, ["export", "--db", store.url, "--project", "loop", "--out", str(out),
                                     "--include-flagged"])  # fast test labelers trip the time threshold
    assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == 40
    tok = train_tokenizer(default_corpus(300), vocab_size=300)
    model = build_tiny_checkpoint(tmp_path / "base", tokenizer=tok, n_layer=1, n_embd=32, n_head=2)
    r = CliRunner().invoke(cli, ["rm", "--model", str(model), "--train-file", str(out), "--output-dir",
                                 str(tmp_path / "rm"), "--max-steps", "3", "--per-device-batch-size", "8",
                                 "--learning-rate", "0.001", "--max-length", "64", "--no-progress",
                                 "--no-tensorboard"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rm" / "final").is_dir()


# ---------------------------------------------------------------- pairwise groups and weights (issue 11, item 13)
QUALITY = {"good": 3, "fine": 2, "poor": 1}


def _by_quality(view, a):
    """Pick the completion whose text's first word ranks higher in QUALITY."""
    left, right = (QUALITY[c["text"].split()[0]] for c in view["completions"])
    return {"choice": "left" if left > right else "right", "strength": "better"}


def _pairwise_k(store, name, prompts, labelers=("a",)):
    """A pairwise project with 3 completions per prompt (3 items each) and one with 2 (1 item), all labeled."""
    store.create_project(name, "pairwise", overlap_k=len(labelers))
    store.import_records(name, [{"prompt": p, "completions": [f"good {p}", f"fine {p}", f"poor {p}"]} for p in prompts]
                         + [{"prompt": "two", "completions": ["good two", "poor two"]}])
    for who in labelers:
        _judge(store, name, store.add_labeler(f"{name}-{who}", PW), _by_quality)
    return store


@pytest.mark.parametrize("mode", ["consensus", "all"])
def test_pairwise_export_groups_pairs_per_prompt(store, mode):
    """Each prompt's pairs share a `group` (rows adjacent) and weights summing to 1 (1/3 for three pairs, 1/6 for
    three pairs labeled twice in mode all); read back, each prompt is one group with that pair_weight. In mode all
    a group is one prompt's rows *of one labeler* (so a group's rows share their labeler context), the weights
    still 1/(the prompt's rows). Before: flat rows (no group, no pair_weight): 4 groups of weight 1 (8 in mode
    all)."""
    from alignloop import data

    _pairwise_k(store, "pk", ["p1"], labelers=("a", "b"))
    rows, _ = export_records(store, "pk", ExportOptions(format="preference", mode=mode, include_gold=True,
                                                        exclude_flagged=False))
    per_prompt = 3 if mode == "consensus" else 6
    assert len(rows) == per_prompt + per_prompt // 3
    groups = [r["group"] for r in rows]
    assert groups == sorted(groups)  # rows of a group are adjacent
    by_group = {g: [r for r in rows if r["group"] == g] for g in groups}
    prompts = ['"p1"', '"two"'] if mode == "consensus" else ['"p1"', '"two"', '"p1"', '"two"']
    assert [{json.dumps(r["prompt"]) for r in rs} for rs in by_group.values()] == [{q} for q in prompts]
    per_labeler = 1 if mode == "consensus" else 2
    assert [sum(r["pair_weight"] for r in rs) for rs in by_group.values()] == pytest.approx(
        [1 / per_labeler] * len(prompts))
    if mode == "all":
        assert all(len({r["labeler"] for r in rs}) == 1 for rs in by_group.values())
    assert [r["pair_weight"] for r in by_group[groups[0]]] == pytest.approx([1 / per_prompt] * (3))
    read, _ = data.load_preferences(rows)  # (rows of a group with different labeler context read as groups apart)
    for prompt, n_pairs in (("p1", per_prompt), ("two", per_prompt // 3)):
        assert sum(len(g.pairs) for g in read if g.prompt == prompt) == n_pairs
        assert sum(len(g.pairs) * g.pair_weight for g in read if g.prompt == prompt) == pytest.approx(1.0)


def test_rank_project_preference_export_keeps_the_ranking_group(store):
    """A rank project's pairs, exported as preference rows, are one group per ranking weighted 1/C(K,2), as the
    ranking row reads."""
    from alignloop import data

    store.create_project("rk", "rank", overlap_k=1)
    store.import_records("rk", [{"prompt": "p", "completions": ["best", "mid", "worst"]},
                                {"prompt": "q", "completions": ["best", "worst"]}])
    order = {"best": 1, "mid": 2, "worst": 3}

    def rank(view, a):
        texts = sorted((c["text"] for c in view["completions"]), key=order.get)
        return {f"rank_{i}": str(1 + texts.index(c["text"])) for i, c in enumerate(view["completions"])}

    _judge(store, "rk", store.add_labeler("a", PW), rank)
    rows, _ = export_records(store, "rk", ExportOptions(format="preference", exclude_flagged=False))
    assert [(r["prompt"], r["group"]) for r in rows] == [("p", 0)] * 3 + [("q", 1)]
    assert [r["pair_weight"] for r in rows] == pytest.approx([1 / 3] * 3 + [1.0])
    ranked, _ = data.load_preferences(export_records(store, "rk", ExportOptions(format="ranking"))[0])
    read, _ = data.load_preferences(rows)
    assert [(g.prompt, g.pair_weight, set(g.pairs)) for g in read] == [
        (g.prompt, g.pair_weight, set(g.pairs)) for g in ranked]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, train_tokenizer

    tok = train_tokenizer(default_corpus(300), vocab_size=300)
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("rm_base"), tokenizer=tok, n_layer=1, n_embd=32,
                                     n_head=2))


def test_exported_pair_weights_are_the_rm_loss_weights(store, tmp_path, tiny_rm):
    """`alignloop rm` on the export: the first step's loss (one batch, both prompts) is the weighted mean
    [Σ_p1 (1/3)·BT + BT_two] / 2, BT = -log σ(r_chosen - r_rejected - 2/3) from the scores before training.
    Before (flat rows): the plain mean over the 4 pairs (1.5036 against 1.7824 here)."""
    import copy

    import torch
    import torch.nn.functional as F

    from alignloop import data
    from alignloop.models import RewardModel, load_tokenizer
    from alignloop.trainers.rm import RewardConfig, RewardTrainer

    _pairwise_k(store, "pk", ["p1"])
    rows, _ = export_records(store, "pk", ExportOptions(format="preference", exclude_flagged=False))
    path = data.write_rows(rows, tmp_path / "prefs.jsonl")
    tok = load_tokenizer(tiny_rm)
    torch.manual_seed(0)
    model = RewardModel.from_pretrained(tiny_rm)
    before = copy.deepcopy(model).eval()

    def score(prompt, completion):
        (ids,) = data.reward_input_ids(tok, [prompt], [completion])
        with torch.no_grad():
            return before(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()

    bt = {r["chosen"] + r["rejected"]: -F.logsigmoid(torch.tensor(score(r["prompt"], r["chosen"])
                                                                  - score(r["prompt"], r["rejected"]) - 2 / 3)).item()
          for r in rows}
    assert [r["margin"] for r in rows] == pytest.approx([2 / 3] * 4)
    weighted = (sum(v for k, v in bt.items() if "p1" in k) / 3 + bt["good twopoor two"]) / 2
    cfg = RewardConfig(output_dir=str(tmp_path / "rm"), learning_rate=1e-3, num_epochs=1, per_device_batch_size=2,
                       max_length=64, progress=False, tensorboard=False, logging_steps=1)
    res = RewardTrainer(model=model, args=cfg, train_dataset=str(path), tokenizer=tok).train()
    assert res.steps == 1
    assert res[0]["loss/rm"] == pytest.approx(weighted, rel=1e-4)
    assert abs(weighted - sum(bt.values()) / 4) > 1e-3  # the flat mean is another number


def test_held_out_split_keeps_a_prompts_pairs_together(store, tmp_path, tiny_rm):
    """`alignloop rm --eval-fraction 0.5` on a pairwise export of 6 prompts x 3 pairs (+ one of 1 pair): every
    prompt's pairs fall on one side. Before: 19 one-pair groups split at random, prompts on both sides."""
    from alignloop import data
    from alignloop.models import load_tokenizer
    from alignloop.trainers.rm import RewardConfig, RewardTrainer
    from alignloop.training.run import train_and_eval_examples

    prompts = [f"prompt {i}" for i in range(6)]
    _pairwise_k(store, "pk", prompts)
    rows, _ = export_records(store, "pk", ExportOptions(format="preference", exclude_flagged=False))
    path = str(data.write_rows(rows, tmp_path / "prefs.jsonl"))
    tok = load_tokenizer(tiny_rm)
    cfg = RewardConfig(model=tiny_rm, output_dir=str(tmp_path / "rm"), eval_fraction=0.5, max_length=64)
    trainer = RewardTrainer(args=cfg, train_dataset=path, tokenizer=tok)
    train, held, _, _ = train_and_eval_examples(lambda s: trainer._tokenize(s, tok), path, None, cfg, "pairs")

    def prompts_of(examples):
        return [tok.decode(g["input_ids"][0][:g["prompt_length"]]) for g in examples]

    assert sorted(prompts_of(train) + prompts_of(held)) == sorted(prompts + ["two"])  # one example per prompt
    assert not set(prompts_of(train)) & set(prompts_of(held)) and held
