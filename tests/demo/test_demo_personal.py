"""`alignloop demo --personal`: the two golds and the simulated populations by hand (fast), and the quick demo end
to end (slow): its files, and a personalized reward model beating the single one on the group it leaves behind."""
from __future__ import annotations

import json
import math
import random

import pytest

from alignloop.demo import personal as pd

BALANCED = "the plot was great . the acting was dull ."
GUSHING = "the plot was very great . i loved the acting . highly recommended ."


def test_golds_by_hand():
    # critic: aspects plot + acting (2), praise and criticism in different sentences (+2), one criticism word (+0.5),
    # one praise word (no gushing penalty)
    assert pd.critic_score(BALANCED) == 4.5
    # warm: great (+1), dull (-1)
    assert pd.warm_score(BALANCED) == 0.0
    # critic: 2 aspects, no balance, praise words great + loved (-1 beyond the first), a warm closer (-1.5), "very"
    # (-0.5)
    assert pd.critic_score(GUSHING) == -1.0
    # warm: great + loved (+2), the closer (+1.5)
    assert pd.warm_score(GUSHING) == 3.5
    # one sentence: -2 for both; critic's one praise word costs nothing, warm's earns 1
    assert pd.critic_score("great .") == -2.0
    assert pd.warm_score("great .") == -1.0
    # at most 4 aspects count; the same criticism word counts once for the critic (warm: at most twice)
    five = "the plot was dull . the acting was dull . the music was dull . the ending was dull . the cast was great ."
    assert pd.critic_score(five) == 4 + 2 + 0.5
    assert pd.warm_score(five) == -2 + 1
    # rambling: 44 words in 11 sentences -> 4 words beyond 40 cost 1 for both
    long = " ".join(["the plot was quiet ."] * 11)
    assert pd.critic_score(long) == 1 - 1.0
    assert pd.warm_score(long) == -1.0
    assert pd.gold_scores("critic", [BALANCED, GUSHING]) == [4.5, -1.0]


def test_golds_are_opposed():
    # the two orders agree on a pair of these two reviews never; on the domain's reviews, about a quarter of the time
    assert pd.gold_agreement_rate([BALANCED, GUSHING]) == 0.0
    rng = random.Random(0)
    rate = pd.gold_agreement_rate([pd.domain.review(rng) for _ in range(2000)])
    assert 0.15 < rate < 0.35


def test_populations():
    labelers = pd.population(3, 2)
    assert [(x.name, x.group) for x in labelers] == [("warm-1", "warm"), ("warm-2", "warm"), ("warm-3", "warm"),
                                                     ("critic-1", "critic"), ("critic-2", "critic")]
    assert [x.temperature for x in labelers] == [0.7, 1.0, 1.3, 0.7, 1.0]
    new = pd.new_users(2, seed=0)
    assert [x.name for x in new] == ["new-warm-1", "new-warm-2", "new-critic-1", "new-critic-2"]
    assert not {x.name for x in new} & {x.name for x in labelers}
    assert all(0.7 <= x.temperature <= 1.3 and not x.careless for x in new)


def test_judge_pair_follows_its_group():
    rng = random.Random(0)
    warm = pd.GroupLabeler("w", temperature=1e-3, group="warm")
    critic = pd.GroupLabeler("c", temperature=1e-3, group="critic")
    for _ in range(10):   # near-noiseless judges pick their gold's favourite whatever the shown order
        row = pd.judge_pair(warm, "Review of X (drama):", BALANCED, GUSHING, rng)
        assert (row["chosen"], row["rejected"]) == (GUSHING, BALANCED)
        assert row["labeler"] == "w" and row["labeler_attributes"] == {"group": "warm"}
        row = pd.judge_pair(critic, "Review of X (drama):", BALANCED, GUSHING, rng)
        assert (row["chosen"], row["rejected"]) == (BALANCED, GUSHING)
        assert row["labeler_attributes"] == {"group": "critic"}
    # a noisy judge: gold gap 4.5 (critic) at τ = 1 -> chosen with probability σ(5.5) ≈ 0.996; warm gap 3.5 ->
    # σ(3.5) ≈ 0.97
    noisy = pd.GroupLabeler("n", temperature=1.0, group="warm")
    picks = [pd.judge_pair(noisy, "p", BALANCED, GUSHING, rng)["chosen"] == GUSHING for _ in range(2000)]
    assert sum(picks) / len(picks) == pytest.approx(1 / (1 + math.exp(-3.5)), abs=0.02)
    assert pd.prompt_pairs({"completions": ["a", "b", "c"]}) == [("a", "b"), ("a", "c"), ("b", "c")]


def test_accuracy_and_judgements_needed():
    assert pd.pairwise_accuracy([1.0, -2.0, 0.0, 3.0]) == 2.5 / 4
    assert math.isnan(pd.pairwise_accuracy([]))

    def curve(*accs):
        return {str(k): {"labels": a} for k, a in zip((0, 1, 2, 4), accs, strict=True)}

    ks = [0, 1, 2, 4]
    assert pd.judgements_needed(curve(0.6, 0.55, 0.62, 0.65), ks, "labels") == 2
    assert pd.judgements_needed(curve(0.6, 0.7, 0.58, 0.65), ks, "labels") == 4   # it must stay above
    assert pd.judgements_needed(curve(0.6, 0.7, 0.7, 0.6), ks, "labels") is None
    assert pd.judgements_needed(curve(0.6, 0.61, 0.7, 0.8), ks, "labels") == 1


def test_sizes_reuse_the_default_demo_stages():
    size = pd.PersonalSize.quick()
    demo = size.demo_size()
    assert (demo.corpus, demo.demos, demo.n_embd, demo.pretrain_steps, demo.sft_steps) == (
        size.corpus, size.demos, size.n_embd, size.pretrain_steps, size.sft_steps)
    assert size.fewshot_ks[0] == 0 and size.heldout_prompts < size.label_prompts


# ------------------------------------------------------------------------------------------------ end to end (slow)
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from click.testing import CliRunner

    from alignloop.cli import cli

    out = tmp_path_factory.mktemp("personal") / "run"
    res = CliRunner().invoke(cli, ["demo", "--personal", "--quick", "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.mark.slow
def test_quick_demo_files(run):
    out, output = run
    for f in ("report.md", "report.html", "results.json", "demo.json", "stages.json", "plots/fewshot.png",
              "labels/train.jsonl", "labels/heldout.jsonl", "labels/new_users.jsonl", "rm_single/final/config.json",
              "rm_personal/final/config.json", "rm_eval/scores.jsonl", "fewshot/per_user.jsonl",
              "policy_generic/final/config.json", "policy_personal/final/config.json"):
        assert (out / f).exists(), f
    assert json.loads((out / "demo.json").read_text())["task"] == "personal"
    config = json.loads((out / "rm_personal/final/config.json").read_text())
    assert config["alignloop_heads"]["by"] == "group"
    assert sorted(config["alignloop_heads"]["names"]) == ["critic", "population", "warm"]
    row = json.loads((out / "labels/train.jsonl").read_text().splitlines()[0])
    assert row["labeler_attributes"]["group"] in pd.GROUPS and row["labeler"]
    summary = json.loads(output[output.index('{"run"'):].splitlines()[0])
    assert summary["report"].endswith("report.md") and summary["html"].endswith("report.html")
    assert "held-out accuracy against each group's gold" in output and "mean gold score of each group" in output
    md = (out / "report.md").read_text()
    for section in ("## Reward models: held-out pairwise accuracy per group", "## Few-shot",
                    "## Policies: each group's mean gold score", "alignloop demo --personal --quick"):
        assert section in md
    assert "<table>" in (out / "report.html").read_text()
    # resume: every stage is done already
    from click.testing import CliRunner

    from alignloop.cli import cli

    again = CliRunner().invoke(cli, ["demo", "--personal", "--resume", "--output-dir", str(out)])
    assert again.exit_code == 0, again.output
    assert again.output.count("done already") == 13   # every stage, data to report


@pytest.mark.slow
def test_quick_demo_figures(run):
    out, _ = run
    res = json.loads((out / "results.json").read_text())
    acc = res["reward_models"]
    for model in ("single", "personalized (group head)", "personalized (population head)"):
        for g in pd.GROUPS:
            assert 0.0 <= acc[model][g]["gold"] <= 1.0 and 0.0 <= acc[model][g]["labels"] <= 1.0
    # the single model leaves one group behind; the personalized model's head of that group beats it there
    worst = min(pd.GROUPS, key=lambda g: acc["single"][g]["gold"])
    assert acc["single"][worst]["gold"] < 0.65
    assert acc["personalized (group head)"][worst]["gold"] > acc["single"][worst]["gold"] + 0.1
    few = res["fewshot"]["groups"]
    for g in pd.GROUPS:
        assert set(few[g]) >= {"0", "1", "4", "16", "single", "needed"}
        # k = 0 is the population model: the population head's accuracy on the same test judgements
        assert 0.0 <= few[g]["0"]["labels"] <= 1.0
    # with 16 judgements the disadvantaged group's new users are served better than by the population model
    assert few[worst]["16"]["gold"] > few[worst]["0"]["gold"]
    pol = res["policies"]
    assert set(pol) == {"SFT", "generic policy", "personalized policy <user:warm>", "personalized policy <user:critic>"}
    assert all(math.isfinite(v[f"gold/{g}"]) for v in pol.values() for g in pd.GROUPS)
