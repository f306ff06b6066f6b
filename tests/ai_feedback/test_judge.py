"""The AI judge: answers scored by their log-probabilities, both orders to cancel position bias, rank items through
pairs, the confidence as a strength, and the win rate."""
import math

import pytest
import torch

from alignloop.ai_feedback import load_constitution
from alignloop.ai_feedback.judge import (
    FunctionJudge,
    LMJudge,
    ai_win_rate,
    judge_pairs,
    load_judge,
    prompt_text,
    ranking_from_pairs,
    strength_of,
)
from alignloop.errors import UserError
from alignloop.models import load_causal_lm, load_tokenizer
from alignloop.models.tiny import build_tiny_checkpoint, default_corpus

CORPUS = default_corpus(300) + ["Which response is better ? Options : (A) good movie (B) bad movie The answer is : (A)",
                                "The answer is: (B)", "The answer is: (A)"] * 20


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("judge") / "lm", CORPUS, vocab_size=300, n_layer=2,
                                     n_embd=32, n_head=2, n_positions=256))


@pytest.fixture(scope="module")
def lm_judge(lm_path):
    return load_judge(lm_path, batch_size=3)


def option_logps(model, tok, text, answers):
    """Independently: the summed log-probability of each answer after `text` (one full forward per option)."""
    out = []
    ctx = tok(text, add_special_tokens=False)["input_ids"]
    for a in answers:
        ans = tok(a, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + ans])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        out.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(ans)))
    return out


def test_lm_judge_probability_is_the_softmax_of_the_answers_logprobs(lm_path, lm_judge):
    model, tok = load_causal_lm(lm_path).eval(), load_tokenizer(lm_path)
    c = lm_judge.constitution
    prompts = ["the movie", "a plot", "the film was"]
    firsts, seconds = ["good fun .", "boring", "great acting and music"], ["awful .", "very fun story", "bad"]
    principles = [c.principles[i % len(c.principles)] for i in range(3)]
    probs, _ = lm_judge.prob_first(prompts, firsts, seconds, principles)
    for p, f, s, q, prob in zip(prompts, firsts, seconds, principles, probs, strict=True):
        la, lb = option_logps(model, tok, c.comparison_prompt(p, f, s, q), c.answers)
        assert prob == pytest.approx(math.exp(la) / (math.exp(la) + math.exp(lb)), abs=1e-5)
    # the decision is the option with the higher log-probability (single order, a shown first)
    verdicts = judge_pairs(lm_judge, prompts, firsts, seconds, both_orders=False, first_shown="aaa", seed=3)
    drawn = [c.principle(v.principle) for v in verdicts]
    probs, _ = lm_judge.prob_first(prompts, firsts, seconds, drawn)
    for v, prob in zip(verdicts, probs, strict=True):
        assert v.raw_picks == [0 if prob > 0.5 else 1] and v.p_a == pytest.approx(prob)
        assert v.choice == ("a" if prob > 0.5 else "b")


def test_both_orders_average_the_two_probabilities(lm_judge):
    verdicts = judge_pairs(lm_judge, ["the movie"] * 2, ["good fun .", "awful"], ["awful .", "good"], seed=1,
                           first_shown="ab")
    for v in verdicts:
        assert len(v.p_orders) == 2 and v.first_shown in (["a", "b"], ["b", "a"])
        assert v.p_a == pytest.approx(sum(v.p_orders) / 2)
        assert v.choice == ("a" if v.p_a > 0.5 else "b") and v.confidence == pytest.approx(max(v.p_a, 1 - v.p_a))


def always_first(prompts, firsts, seconds, questions):
    return [0.9] * len(prompts)


def biased_but_right(prompts, firsts, seconds, questions):
    """Prefers the first shown (+2 logits) but also the longer response (the truth of this test): 2 + 1.5·sign."""
    return [1 / (1 + math.exp(-(2.0 + 1.5 * ((len(f) > len(s)) - (len(f) < len(s))))))
            for f, s in zip(firsts, seconds, strict=True)]


def test_swapping_orders_cancels_a_judge_that_always_prefers_a():
    c = load_constitution()
    judge = FunctionJudge(always_first, c)
    a, b = ["x" * 5, "yy"] * 4, ["z" * 9, "w"] * 4
    one = judge_pairs(judge, ["p"] * 8, a, b, both_orders=False, first_shown="a" * 8)
    assert [v.choice for v in one] == ["a"] * 8                     # one order: the position decides
    both = judge_pairs(judge, ["p"] * 8, a, b, both_orders=True)
    assert [v.choice for v in both] == ["tie"] * 8                 # both orders: nothing left to decide on
    assert all(v.raw_picks == [0, 0] and v.strength is None for v in both)


def test_swapping_recovers_the_signal_under_position_bias():
    """Truth: the longer response is better. One order (always a first) gets it right only when a is the longer
    one (half the pairs); both orders get every pair right. Fails without the swap."""
    judge = FunctionJudge(biased_but_right, load_constitution())
    a = ["long answer here", "s"] * 5
    b = ["s", "long answer here"] * 5
    truth = ["a", "b"] * 5
    one = judge_pairs(judge, ["p"] * 10, a, b, both_orders=False, first_shown="a" * 10)
    both = judge_pairs(judge, ["p"] * 10, a, b, both_orders=True)
    assert sum(v.choice == t for v, t in zip(one, truth, strict=True)) == 5
    assert sum(v.choice == t for v, t in zip(both, truth, strict=True)) == 10
    # debiased probability: ½[σ(3.5) + (1 − σ(0.5))] for a longer a
    s = lambda x: 1 / (1 + math.exp(-x))
    assert both[0].p_a == pytest.approx((s(3.5) + 1 - s(0.5)) / 2)


def test_principles_all_averages_over_every_principle():
    calls = []

    def by_question(prompts, firsts, seconds, questions):
        calls.extend(questions)
        return [0.8 if "harm" in q else 0.4 for q in questions]

    c = load_constitution()
    v = judge_pairs(FunctionJudge(by_question, c), ["p"], ["a"], ["b"], both_orders=False, principles="all",
                    first_shown="a")[0]
    assert len(calls) == len(c.principles) and v.principle == "all"
    k = sum("harm" in p.comparison for p in c.principles)
    assert v.p_a == pytest.approx((0.8 * k + 0.4 * (len(c.principles) - k)) / len(c.principles))


def test_function_judge_output_is_checked():
    judge = FunctionJudge(lambda p, f, s, q: [1.5] * len(p), load_constitution(), name="bad:fn")
    with pytest.raises(UserError, match="bad:fn: must return one probability in"):
        judge_pairs(judge, ["p"], ["a"], ["b"])


def test_strength_and_ranking_by_hand():
    assert [strength_of(c) for c in (0.95, 0.8, 0.65, 0.55)] == [
        "significantly_better", "better", "slightly_better", "negligibly_better"]
    # 3 completions: P(0>1)=0.9, P(0>2)=0.6, P(1>2)=0.2 -> scores 0: 1.5, 1: 0.3, 2: 0.4+0.8=1.2
    assert ranking_from_pairs(3, {(0, 1): 0.9, (0, 2): 0.6, (1, 2): 0.2}) == [1, 3, 2]
    # equal scores share a rank
    assert ranking_from_pairs(3, {(0, 1): 0.5, (0, 2): 0.5, (1, 2): 0.5}) == [1, 1, 1]


def test_cot_judge_reasons_first(lm_path):
    judge = load_judge(lm_path, cot=True, cot_max_new_tokens=6)
    v = judge_pairs(judge, ["the movie"], ["good"], ["bad"], both_orders=True, seed=0)[0]
    assert len(v.rationales) == 2 and all(isinstance(r, str) for r in v.rationales)
    assert 0.0 < v.p_a < 1.0


def test_too_long_prompt_is_a_clear_error(lm_path):
    judge = load_judge(lm_path)
    with pytest.raises(UserError, match="more than the judge's 256 positions"):
        judge_pairs(judge, ["the movie " * 200], ["a"], ["b"])


def test_ai_win_rate_counts_identical_responses_as_half():
    judge = FunctionJudge(biased_but_right, load_constitution())
    res = ai_win_rate(judge, ["p"] * 3, ["long one", "x", "same"], ["x", "long one", "same"])
    assert res["ai/win_rate"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert res["ai/pairs"] == 3


def test_prompt_text_of_conversations():
    assert prompt_text([{"role": "user", "content": "hi"}]) == "hi"
    assert prompt_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "so?"}]) == "Human: hi\n\nAssistant: yo\n\nHuman: so?"


def test_lm_judge_refuses_answers_that_tokenize_alike(lm_path):
    class OneToken:   # a tokenizer that maps every answer to the same token
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5]}

    with pytest.raises(UserError, match="encodes the answers"):
        LMJudge(load_causal_lm(lm_path), OneToken(), load_constitution())
