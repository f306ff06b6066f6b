"""Synthetic data for the trainer tests (plain functions; fixtures live in conftest.py)."""
import json
import random

WORDS = "good bad great awful movie film plot actor scene love hate boring fun the a and is was it this that".split()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def sft_rows(n, seed):
    """A learnable SFT task: the completion repeats the word named in the prompt three times."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(["good", "bad", "fun", "plot", "love"])
        rows.append({"prompt": f"{rng.choice(WORDS)} say {w}:", "completion": f" {w} {w} {w}"})
    return rows


def preference_rows(n, seed):
    """Chosen completions contain 'great' 1-3 times, rejected ones never: a learnable signal."""
    rng = random.Random(seed)
    sent = lambda k: [rng.choice([w for w in WORDS if w != "great"]) for _ in range(k)]
    rows = []
    for _ in range(n):
        c = sent(8)
        for j in rng.sample(range(8), rng.randint(1, 3)):
            c[j] = "great"
        rows.append({"prompt": " ".join(sent(4)), "chosen": " " + " ".join(c), "rejected": " " + " ".join(sent(8))})
    return rows
