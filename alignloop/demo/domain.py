"""The demo's toy domain: short movie reviews, generated from templates, and a hidden gold scorer.

Everything is generated locally and deterministically from a seed (no downloads):

    corpus = pretraining_corpus(3000, seed=0)           # text rows: "Review of The Silent River (drama): ..."
    demos = demonstrations(800, seed=1)                 # SFT rows: {"prompt": "Review of X (genre):", "completion"}
    train_prompts, eval_prompts = prompt_split(seed=0)  # prompt strings, disjoint
    gold_score("the plot was great .")                  # the hidden gold scorer (no training stage sees it)

The vocabulary is a few hundred words. Reviews mix positive, negative and neutral sentences with a review-level
sentiment drawn uniformly, so the SFT model writes reviews of every sentiment; the gold scorer prefers positive,
well-formed reviews of a reasonable length. Preferences come only from the simulated labelers (noisy judges of the
gold scorer); the reward model, PPO, DPO, best-of-N and rejection sampling never call `gold_score`.
"""
from __future__ import annotations

import random
import re

TITLE_ADJ = ("silent last hidden broken golden little lost bright cold dark quiet wild red empty secret long "
             "final northern distant frozen").split()
TITLE_NOUN = ("river city garden road house winter summer star island forest letter mirror bridge storm harbor "
              "train kingdom night ocean mountain").split()
GENRES = "drama comedy thriller romance western horror musical documentary".split()
ASPECTS = ("acting plot music ending story cast dialogue pacing script characters soundtrack effects direction "
           "camera humor lead villain score setting finale").split()
POSITIVE = ("great wonderful beautiful brilliant charming moving fun clever delightful superb lovely fresh warm "
            "gripping funny touching excellent smart").split()
NEGATIVE = ("boring awful dull weak messy silly slow bland terrible clumsy flat tedious poor cheap confusing "
            "lazy stiff forgettable").split()
NEUTRAL = "long quiet simple dark strange loud short odd familiar busy".split()
POS_VERBS = "loved enjoyed liked admired adored".split()
NEG_VERBS = "hated disliked regretted endured".split()
INTENS = ["very", "really", "quite", "so", "rather"]
POS_CLOSERS = ["i would watch it again .", "a real treat .", "highly recommended .", "worth every minute ."]
NEG_CLOSERS = ["i want my money back .", "a waste of time .", "skip this one .", "not worth the ticket ."]
NEU_CLOSERS = ["it is what it is .", "some will like it .", "see it if you are curious ."]

POSITIVE_SET = frozenset(POSITIVE) | frozenset(POS_VERBS)
NEGATIVE_SET = frozenset(NEGATIVE) | frozenset(NEG_VERBS)
POSITIVE_PHRASES = tuple(POS_CLOSERS)
NEGATIVE_PHRASES = tuple(NEG_CLOSERS)


def titles() -> list[str]:
    return [f"The {a.capitalize()} {n.capitalize()}" for a in TITLE_ADJ for n in TITLE_NOUN]


def prompt_for(title: str, genre: str) -> str:
    return f"Review of {title} ({genre}):"


def _sentence(rng: random.Random, polarity: str) -> str:
    aspect = rng.choice(ASPECTS)
    if polarity == "neutral":
        adj = rng.choice(NEUTRAL)
        return rng.choice([f"the {aspect} was {adj} .", f"the {aspect} felt {adj} .", f"it is a {adj} film ."])
    adj = rng.choice(POSITIVE if polarity == "pos" else NEGATIVE)
    verb = rng.choice(POS_VERBS if polarity == "pos" else NEG_VERBS)
    inten = rng.choice(INTENS)
    return rng.choice([f"the {aspect} was {adj} .", f"the {aspect} was {inten} {adj} .", f"i {verb} the {aspect} .",
                       f"the {aspect} felt {adj} .", f"a {adj} {aspect} ."])


def review(rng: random.Random, p_pos: float | None = None) -> str:
    """A review of 2-4 sentences; each sentence positive with probability p_pos (drawn uniformly when None),
    sometimes neutral, and an optional closing line that matches the overall tone."""
    p_pos = rng.random() if p_pos is None else p_pos
    out = []
    for _ in range(rng.randint(2, 4)):
        u = rng.random()
        pol = "neutral" if u < 0.2 else ("pos" if rng.random() < p_pos else "neg")
        out.append(_sentence(rng, pol))
    if rng.random() < 0.4:
        u = rng.random()
        out.append(rng.choice(POS_CLOSERS if u < p_pos - 0.15 else NEG_CLOSERS if u > p_pos + 0.15 else NEU_CLOSERS))
    return " ".join(out)


def all_prompts() -> list[str]:
    return [prompt_for(t, g) for t in titles() for g in GENRES]


def prompt_split(n_train: int = 256, n_eval: int = 64, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint train / eval prompt lists."""
    ps = all_prompts()
    random.Random(seed).shuffle(ps)
    return ps[:n_train], ps[n_train:n_train + n_eval]


def pretraining_corpus(n: int = 3000, seed: int = 0) -> list[dict]:
    """`text` rows: a prompt followed by a review (the base model learns the language and the format)."""
    rng = random.Random(seed)
    ps = all_prompts()
    return [{"text": f"{rng.choice(ps)} {review(rng)}"} for _ in range(n)]


def demonstrations(n: int = 800, seed: int = 1) -> list[dict]:
    """SFT rows `{"prompt", "completion"}`: reviews of every sentiment (the SFT model is not yet aligned)."""
    rng = random.Random(seed)
    ps = all_prompts()
    return [{"prompt": rng.choice(ps), "completion": " " + review(rng)} for _ in range(n)]


_WORD = re.compile(r"[a-z]+|\.")


def gold_score(text: str) -> float:
    """The hidden gold scorer of a review (the completion only): sentiment with diminishing returns, minus
    penalties for degenerate text. Roughly in [-5, 5].

    + 1 per positive word, - 1 per negative word, each distinct word counted at most twice (no reward for
      repeating "great great great");
    + 1.5 for a positive closing line, - 1.5 for a negative one;
    - 2 if the review has fewer than 2 sentences (too short), - 0.25 per word beyond 40 (rambling)."""
    words = _WORD.findall(text.lower())
    counts: dict[str, int] = {}
    s = 0.0
    for w in words:
        if w in POSITIVE_SET or w in NEGATIVE_SET:
            counts[w] = counts.get(w, 0) + 1
            if counts[w] <= 2:
                s += 1.0 if w in POSITIVE_SET else -1.0
    low = " ".join(words)
    s += 1.5 * sum(1 for p in POSITIVE_PHRASES if p in low) - 1.5 * sum(1 for p in NEGATIVE_PHRASES if p in low)
    n_sent = words.count(".")
    n_words = len(words) - n_sent
    if n_sent < 2:
        s -= 2.0
    s -= 0.25 * max(0, n_words - 40)
    return float(s)


def gold_scores(prompts, responses) -> list[float]:
    """`f(prompts, responses) -> list[float]`: the gold scorer in the reward-function form (for `alignloop eval
    --gold alignloop.demo.domain:gold_scores` and for PPO's monitoring-only gold reward)."""
    return [gold_score(r) for r in responses]
