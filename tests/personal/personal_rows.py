"""Synthetic judgements of two labeler groups with opposite tastes (plain functions for the tests here)."""
from __future__ import annotations

import json
import random

WORDS = "good bad movie film plot actor scene love hate boring fun the a and is was it this that".split()


def _sent(rng, k):
    return [rng.choice(WORDS) for _ in range(k)]


def two_group_rows(n, seed, group):
    """Pairs (A, B) where A holds 'great' 1-3 times and B never; group "warm" prefers A, group "cool" prefers B:
    the same kind of pairs, opposite preferences."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = _sent(rng, 8)
        for j in rng.sample(range(8), rng.randint(1, 3)):
            a[j] = "great"
        a, b = " " + " ".join(a), " " + " ".join(_sent(rng, 8))
        chosen, rejected = (a, b) if group == "warm" else (b, a)
        rows.append({"prompt": " ".join(_sent(rng, 3)), "chosen": chosen, "rejected": rejected,
                     "labeler": f"L{group}{rng.randint(0, 4)}", "labeler_attributes": {"group": group}})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
