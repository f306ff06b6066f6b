"""The demo's constitution and its critique / comparison pretraining documents (alignloop.demo.critiques)."""
from __future__ import annotations

import random
import re

import pytest

from alignloop.ai_feedback import parse_constitution
from alignloop.demo import critiques, domain
from alignloop.models.tiny import train_tokenizer

C = critiques.demo_constitution()
_, HELD = domain.prompt_split(seed=0, n_eval=128)
COMPARISON = re.compile(r"(?P<question>[^\n]+)\n\(A\)(?P<first> [^\n]+)\n\(B\)(?P<second> [^\n]+)\nAnswer:"
                        r"(?P<answer> \([AB]\))")
CRITIQUE = re.compile(r"Review:(?P<response> [^\n]+)\n\n(?P<critique_request>[^\n]+)\n\n"
                      r"Critique: (?P<critique>[^\n]+)\n\n(?P<request>[^\n]+)\n\nRevision:(?P<revision> [^\n]+)")


def _comparison_parts(text: str) -> dict:
    m = COMPARISON.fullmatch(text)
    assert m, text
    return m.groupdict()


def _critique_parts(text: str) -> dict:
    m = CRITIQUE.fullmatch(text)
    assert m, text
    return m.groupdict()


def _principle(field: str, text: str):
    return next(p for p in C.principles if getattr(p, field) == text)


def test_demo_constitution_parses():
    c = parse_constitution(critiques.DEMO_CONSTITUTION, "demo")
    assert {p.name for p in c.principles} == {"positive", "well_formed", "closing"}
    assert c.answers == (" (A)", " (B)")
    assert set(critiques.CRITIQUE_WEIGHTS) == {p.name for p in c.principles}


def test_documents_render_the_constitutions_templates_exactly():
    for row in critiques.comparison_documents(200, seed=3, exclude_prompts=HELD):
        d = _comparison_parts(row["text"])
        p = _principle("comparison", d["question"])
        head = C.comparison_prompt("Review of The Quiet Star (drama):", d["first"], d["second"], p)
        assert row["text"] == head + d["answer"] and d["answer"] in C.answers
    for row in critiques.critique_documents(200, seed=3, exclude_prompts=HELD):
        d = _critique_parts(row["text"])
        p = _principle("critique", d["critique_request"])
        assert d["request"] == p.revision
        prompt = "Review of The Quiet Star (drama):"   # the demo's templates have no {prompt}
        assert row["text"].startswith(C.critique_prompt(prompt, d["response"], p) + " " + d["critique"] + "\n\n")
        # the critique goes on verbatim after "Critique:", its leading space kept (as ai_feedback.cai passes it)
        assert row["text"] == C.revision_prompt(prompt, d["response"], " " + d["critique"], p) + d["revision"]
        assert "\n\n" not in d["critique"] and "\n" not in d["revision"]


def test_documents_never_use_excluded_prompts_and_are_deterministic():
    # the demo's templates have no {prompt} (the hidden rules ignore it, and it costs ~15 tokens): a constitution
    # whose templates have one gets prompts that are never excluded ones
    t = C.templates
    with_prompt = parse_constitution(dict(critiques.DEMO_CONSTITUTION, templates={
        "comparison": "{prompt}\n" + t.comparison, "critique": "{prompt}" + t.critique.removeprefix("Review:"),
        "revision": "{prompt}" + t.revision.removeprefix("Review:")}), "with prompts")
    excluded = HELD[:100]
    docs = critiques.critique_documents(500, seed=0, exclude_prompts=excluded, constitution=with_prompt)
    docs += critiques.comparison_documents(500, seed=0, exclude_prompts=excluded, constitution=with_prompt)
    used = {re.match(r"Review of [^:]+:", r["text"]).group(0) for r in docs}
    assert not used & set(excluded) and len(used) > 300
    assert not any(p in r["text"] for r in docs for p in excluded)
    both = critiques.ai_feedback_documents(30, 50, seed=7, exclude_prompts=HELD)
    assert len(both) == 80 and sum("\nAnswer: (" in r["text"] for r in both) == 50
    assert critiques.comparison_documents(20, seed=4) == critiques.comparison_documents(20, seed=4)
    assert critiques.critique_documents(20, seed=4) == critiques.critique_documents(20, seed=4)
    with pytest.raises(ValueError):
        critiques.comparison_documents(1, exclude_prompts=domain.all_prompts())


def test_comparison_answers_follow_gold_with_noise():
    agree = disagree = 0
    answers = []
    for row in critiques.comparison_documents(2000, seed=0):
        d = _comparison_parts(row["text"])
        g1, g2 = domain.gold_score(d["first"]), domain.gold_score(d["second"])
        answers.append(d["answer"])
        if g1 != g2:
            right = " (A)" if g1 > g2 else " (B)"
            agree += d["answer"] == right
            disagree += d["answer"] != right
    share = agree / (agree + disagree)
    assert 0.8 < share < 0.95                       # σ(Δgold / τ) with τ = 1: noisy, but far better than chance
    assert 0.45 < answers.count(" (A)") / len(answers) < 0.55       # no position bias in the data


def test_revisions_raise_gold_most_of_the_time():
    rng = random.Random(0)
    gains = {p.name: [] for p in C.principles}
    for _ in range(600):
        name = rng.choice(list(gains))
        review = critiques.varied_review(rng, rng.random())
        critique, revision = critiques.critique_and_revision(name, review, rng)
        gains[name].append(domain.gold_score(revision) - domain.gold_score(review))
        assert critique and "\n" not in critique and revision
    allg = [g for v in gains.values() for g in v]
    assert sum(g >= 0 for g in allg) / len(allg) > 0.95
    assert sum(g > 0 for g in gains["positive"]) / len(gains["positive"]) > 0.5     # the others had no negative remark
    assert sum(allg) / len(allg) > 1.0


def test_rules_of_the_critiques():
    rng = random.Random(0)

    def one(principle, review):                     # the principle's own fix only, no noise
        return critiques.critique_and_revision(principle, review, rng, noise=0.0, fix_all=False)

    crit, rev = one("positive", "the plot was dull . i loved the cast . skip this one .")
    assert crit == "negative: the plot was dull . skip this one ."
    assert domain.gold_score(rev) > 2 and rev.split(" . ")[1] == "i loved the cast"
    assert one("positive", "a fun plot . the cast was odd .") == ("none, it is positive.",
                                                                  "a fun plot . the cast was odd .")
    crit, rev = one("well_formed", "the plot was dull .")
    assert crit == "too short: only one sentence." and len(critiques.sentences(rev)) >= 2
    crit, rev = one("closing", "a fun plot . a waste of time .")
    assert crit == "no, it ends badly: a waste of time ." and rev.split(" . ")[0] == "a fun plot"
    assert rev.endswith(tuple(domain.POS_CLOSERS))
    # fix_all (the default): the critique is the principle's, the revision fixes every rule
    crit, rev = critiques.critique_and_revision("closing", "the plot was dull .", rng, noise=0.0)
    assert crit == "no, it has no recommendation."
    s = critiques.sentences(rev)
    assert s[0] != "the plot was dull ." and len(s) >= 2 and s[-1] in domain.POS_CLOSERS
    assert domain.gold_score(rev) == 2.5                # "the plot was <positive> . <positive closer> ."


def test_documents_fit_the_demo_models_positions():
    """With the demo's tokenizer (trained on the corpus and the documents), every comparison document and nearly
    every critique document fits the base model's 128 positions."""
    comp = [r["text"] for r in critiques.comparison_documents(600, seed=1, exclude_prompts=HELD)]
    crit = [r["text"] for r in critiques.critique_documents(400, seed=2, exclude_prompts=HELD)]
    corpus = [r["text"] for r in domain.pretraining_corpus(1600, seed=0)]
    tok = train_tokenizer(corpus + comp + crit, vocab_size=600)
    comp_len = [len(ids) for ids in tok(comp)["input_ids"]]
    crit_len = [len(ids) for ids in tok(crit)["input_ids"]]
    assert max(comp_len) < 128
    assert sorted(crit_len)[int(0.9 * len(crit_len))] <= 128
