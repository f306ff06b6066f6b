"""The demo's constitution and the pretraining documents that teach its tiny model to critique, revise and judge.

A model learns to follow critique and comparison prompts in pretraining; the demo's model is pretrained from scratch
on generated text, so the generated corpus shows it both skills for the toy domain, exactly as the constitution's
plain-text templates render them (`Constitution.critique_prompt / revision_prompt / comparison_prompt`, no chat
template):

    c = demo_constitution()                                           # parse_constitution(DEMO_CONSTITUTION)
    critique_documents(1000, seed=1, exclude_prompts=eval_prompts)    # text rows: review, critique, revision
    comparison_documents(3000, seed=2, exclude_prompts=eval_prompts)  # text rows: two reviews, question, answer

A response is the completion text exactly as the demo samples it, with its leading space (" the plot was great .");
the templates put it right after "Review:" or the "(A)" / "(B)" marker. They leave the prompt out (the hidden rules
ignore the film's title and genre; it would cost ~15 of the model's 128 positions per copy, and a critique document
that began like a corpus review taught the base model to go on after a review with a critique request). A critique
document is

    revision_prompt(prompt, response, " " + critique, principle) + " " + revision

which starts with `critique_prompt(prompt, response, principle) + " " + critique + "\n\n"`: a model continuing a
critique prompt writes " <critique>" then a blank line (cut there; the text goes on verbatim, its leading space
kept, after "Critique:" in the revision prompt, as `ai_feedback.cai` does); continuing a revision prompt it writes
" <revised review>" then EOS (the revised review is the new completion, leading space included). A comparison
document is `comparison_prompt(...) + answer`, the answer " (A)" or " (B)": the review with the higher hidden gold
score with probability σ(Δgold / τ) (noisy labels, as people's).

Critiques and revisions come from the domain's hidden rules (`domain.gold_score`): "positive" names the negative
sentences, "well_formed" flags a one-sentence or rambling review, "closing" a missing, lukewarm or negative closing
line; the revision fixes what the critique names (negative words swapped for positive ones, sentences added or
dropped, a recommendation at the end) and the other principles' faults too. A few critiques miss something and a
few revisions leave something unfixed (noise). No document uses an excluded prompt (the demo's evaluation prompts;
only a constitution whose templates contain {prompt} shows prompts at all).

Measured (benchmarks/ai_feedback_corpus.py; 4000 corpus reviews + 1000 critique + 3000 comparison documents,
packed rows of 128 tokens, 12 rows x 800 steps, two seeds): the base model judges pairs of its own samples for the
evaluation prompts right 83-91% of the time (both orders; 91-99% when the gold gap is >= 2), with no position bias,
and its revisions raise the gold score from about 0 to 3.3 (sampled) or 4.0 (greedy). At 500 steps the judge was at
60-75%; the skill appears between 500 and 800 steps.
"""
from __future__ import annotations

import math
import random
import re

from alignloop.ai_feedback import Constitution, Principle, parse_constitution
from alignloop.demo import domain

# Short templates: a comparison of two reviews plus its answer fits the demo model's 128 positions (~75 tokens with
# the demo's tokenizer; two 40-token samples: ~100), and so does nearly every whole critique document (~90).
DEMO_CONSTITUTION = {
    "name": "demo-reviews",
    "comparison": "Which review is better?",
    "answers": [" (A)", " (B)"],
    "templates": {
        "critique": "Review:{response}\n\n{request}\n\nCritique:",
        "revision": "Review:{response}\n\n{critique_request}\n\nCritique:{critique}\n\n{request}\n\nRevision:",
        "comparison": "{question}\n(A){first}\n(B){second}",
        "answer_prefix": "Answer:",
        "cot_prefix": "Reasons:",
    },
    "principles": [
        {"name": "positive",
         "critique": "Point out the negative remarks.",
         "revision": "Rewrite the review to be positive.",
         "comparison": "Which review is more positive?"},
        {"name": "well_formed",
         "critique": "Is the review too short or too long?",
         "revision": "Rewrite it in two to four sentences.",
         "comparison": "Which review is better written?"},
        {"name": "closing",
         "critique": "Does it end with a recommendation?",
         "revision": "Rewrite it to end with a recommendation.",
         "comparison": "Which review recommends the film more?"},
    ],
}

# how often each principle is drawn for a critique document (the positive one is the most useful and varied)
CRITIQUE_WEIGHTS = {"positive": 0.5, "well_formed": 0.25, "closing": 0.25}
NOISE = 0.1          # share of critiques that miss something, and of revisions that leave something unfixed
TAU = 1.0            # comparison answers: P(the better review) = σ(Δgold / TAU)
_NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_SENT = re.compile(r"(?<=\.)\s+")
_WORDS = re.compile(r"[a-z]+")


def demo_constitution() -> Constitution:
    return parse_constitution(DEMO_CONSTITUTION, "the demo constitution")


# ------------------------------------------------------------------------------------------------ reviews
def sentences(text: str) -> list[str]:
    """The sentences of a review ("the plot was dull ." ...), closing lines included."""
    return [s for s in _SENT.split(text.strip()) if s]


def _negative(s: str) -> bool:
    return s in domain.NEGATIVE_PHRASES or any(w in domain.NEGATIVE_SET for w in _WORDS.findall(s))


def _closer(s: str) -> str | None:
    if s in domain.POS_CLOSERS:
        return "pos"
    if s in domain.NEG_CLOSERS:
        return "neg"
    if s in domain.NEU_CLOSERS:
        return "neu"
    return None


def _positive_sentence(s: str, rng: random.Random) -> str:
    """The sentence with its negative words (or negative closing line) swapped for positive ones."""
    if s in domain.NEG_CLOSERS:
        return rng.choice(domain.POS_CLOSERS)
    out = []
    for w in s.split(" "):
        if w in domain.NEGATIVE:
            w = rng.choice(domain.POSITIVE)
        elif w in domain.NEG_VERBS:
            w = rng.choice(domain.POS_VERBS)
        out.append(w)
    return " ".join(out)


def _n_words(text: str) -> int:
    return len(_WORDS.findall(text))


def varied_review(rng: random.Random, p_pos: float | None = None, short: float = 0.15, long: float = 0.05) -> str:
    """A review like `domain.review` (2-4 sentences, optional closing line); with probability `short` cut to one
    sentence (too short), with probability `long` run on past 40 words (rambling), as sampled reviews can be."""
    text = domain.review(rng, p_pos)
    u = rng.random()
    if u < short:
        return sentences(text)[0]
    if u < short + long:
        parts = sentences(text)
        while _n_words(" ".join(parts)) <= 40:
            parts += sentences(domain.review(rng, p_pos))
        return " ".join(parts)
    return text


def _prompts(exclude_prompts) -> list[str]:
    excluded = set(exclude_prompts or ())
    ps = [p for p in domain.all_prompts() if p not in excluded]
    if not ps:
        raise ValueError("exclude_prompts leaves no prompt to write documents for")
    return ps


# ------------------------------------------------------------------------------------------------ critiques
def critique_and_revision(principle: str, review: str, rng: random.Random, noise: float = NOISE,
                          fix_all: bool = True) -> tuple[str, str]:
    """(critique, revised review) of `review` (no leading space) under a principle of DEMO_CONSTITUTION, from the
    domain's hidden rules; with probability `noise` the critique or the revision is imperfect. The critique is the
    principle's; the revision fixes what the critique names and, with `fix_all`, what the other principles would
    (every revision is then a positive, well-formed review that ends with a recommendation: a model that has not
    learnt to copy the review still revises towards that, instead of writing any review)."""
    critique, revision = _principle_critique(principle, review, rng, noise)
    if fix_all and rng.random() >= noise:
        for other in CRITIQUE_WEIGHTS:
            if other != principle:
                revision = _principle_critique(other, revision, rng, 0.0)[1]
    return critique, revision


def _principle_critique(principle: str, review: str, rng: random.Random, noise: float) -> tuple[str, str]:
    sents = sentences(review)
    if principle == "positive":
        bad = [i for i, s in enumerate(sents) if _negative(s)]
        if bad and rng.random() < noise:                   # an imperfect critique: one negative remark missed
            bad.remove(rng.choice(bad))
        if not bad:
            return "none, it is positive.", review
        critique = "negative: " + " ".join(sents[i] for i in bad)
        fix = list(bad)
        if len(fix) > 1 and rng.random() < noise:          # an imperfect revision: one remark left as it was
            fix.remove(rng.choice(fix))
        return critique, " ".join(_positive_sentence(s, rng) if i in fix else s for i, s in enumerate(sents))
    if principle == "well_formed":
        n, words = len(sents), _n_words(review)
        if n < 2:
            extra = [_sentence_like(rng) for _ in range(rng.randint(1, 2))]
            if rng.random() < noise:                       # an imperfect revision: still one sentence
                extra = []
            return "too short: only one sentence.", " ".join(sents + extra)
        if words > 40:
            keep = sents[:rng.randint(2, 4)]
            closing = [s for s in sents if _closer(s) == "pos"][:1]
            return f"too long: {_NUMBERS[min(n, 10)]} sentences.", " ".join(keep + closing)
        return f"fine: {_NUMBERS[min(n, 10)]} sentences.", review
    if principle == "closing":
        kind = _closer(sents[-1]) if sents else None
        new_close = rng.choice(domain.POS_CLOSERS)
        if kind == "pos":
            return "yes, it ends with a recommendation.", review
        if rng.random() < noise:                           # an imperfect critique and revision
            return "yes, it ends with a recommendation.", review
        if kind == "neg":
            return f"no, it ends badly: {sents[-1]}", " ".join(sents[:-1] + [new_close])
        if kind == "neu":
            return f"no, it ends lukewarm: {sents[-1]}", " ".join(sents[:-1] + [new_close])
        return "no, it has no recommendation.", " ".join(sents + [new_close])
    raise ValueError(f"unknown principle {principle!r}")


def _sentence_like(rng: random.Random) -> str:
    """One sentence of a mostly positive review (what a revision adds to a one-sentence review)."""
    return sentences(domain.review(rng, p_pos=0.9))[0]


def critique_documents(n: int, seed: int = 0, exclude_prompts=None, constitution: Constitution | None = None,
                       noise: float = NOISE, fix_all: bool = True) -> list[dict]:
    """`n` text rows, each a review, a critique request, the critique, a revision request and the revised review,
    rendered by the constitution's templates (`revision_prompt(prompt, review, critique, principle) + revision`,
    the review, the critique and the revision as generated text: with their leading space)."""
    c = constitution or demo_constitution()
    rng = random.Random(seed)
    prompts = _prompts(exclude_prompts)
    names, weights = zip(*CRITIQUE_WEIGHTS.items(), strict=True)
    rows = []
    for _ in range(n):
        principle = c.principle(rng.choices(names, weights)[0])
        # lean negative for the positive principle (there is something to fix), any tone otherwise
        p_pos = rng.random() * (0.7 if principle.name == "positive" else 1.0)
        if principle.name == "well_formed":
            review = varied_review(rng, p_pos, short=0.35, long=0.1)
        else:
            review = varied_review(rng, p_pos, short=0.1, long=0.0)
        critique, revision = critique_and_revision(principle.name, review, rng, noise, fix_all)
        rows.append({"text": critique_document(c, rng.choice(prompts), " " + review, " " + critique, " " + revision,
                                               principle)})
    return rows


def critique_document(c: Constitution, prompt: str, response: str, critique: str, revision: str,
                      principle: Principle) -> str:
    """One critique document: revision_prompt + revision (`response`, `critique` and `revision` as generated text,
    with their leading space)."""
    return c.revision_prompt(prompt, response, critique, principle) + revision


# ------------------------------------------------------------------------------------------------ comparisons
def comparison_pair(rng: random.Random) -> tuple[str, str]:
    """Two reviews (no leading space) of the kinds a judge sees: independent tones (large gaps), one shared tone
    (two samples of one policy), or both positive (an aligned policy: small gaps)."""
    u = rng.random()
    if u < 0.4:
        return varied_review(rng, long=0.0), varied_review(rng, long=0.0)
    p = rng.random() if u < 0.75 else rng.uniform(0.7, 1.0)
    return varied_review(rng, p, long=0.0), varied_review(rng, p, long=0.0)


def noisy_choice(gold_first: float, gold_second: float, rng: random.Random, tau: float = TAU) -> int:
    """0 (the first) or 1 (the second): the better review by gold with probability σ(Δgold / tau)."""
    p_first = 1.0 / (1.0 + math.exp(-(gold_first - gold_second) / tau))
    return 0 if rng.random() < p_first else 1


def comparison_documents(n: int, seed: int = 0, exclude_prompts=None, constitution: Constitution | None = None,
                         tau: float = TAU) -> list[dict]:
    """`n` text rows: comparison_prompt(prompt, first, second, principle) + the answer (" (A)" / " (B)"), a noisy
    judge of the gold score; the principle's question is drawn at random, the order of the two reviews too."""
    c = constitution or demo_constitution()
    rng = random.Random(seed)
    prompts = _prompts(exclude_prompts)
    rows = []
    for _ in range(n):
        first, second = comparison_pair(rng)
        pick = noisy_choice(domain.gold_score(first), domain.gold_score(second), rng, tau)
        text = c.comparison_prompt(rng.choice(prompts), " " + first, " " + second, c.sample(rng))
        rows.append({"text": text + c.answers[pick]})
    return rows


def ai_feedback_documents(n_critiques: int, n_comparisons: int, seed: int = 0, exclude_prompts=None) -> list[dict]:
    """Both kinds of document for the demo's pretraining corpus (critiques first; the trainer shuffles)."""
    return (critique_documents(n_critiques, seed=seed + 1, exclude_prompts=exclude_prompts)
            + comparison_documents(n_comparisons, seed=seed + 2, exclude_prompts=exclude_prompts))
