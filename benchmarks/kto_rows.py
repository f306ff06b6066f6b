"""The `kto` workload's data, shared by our side (kto_bench.py) and the peer's (trl_kto.py): the first 160 rows of
pairs.jsonl (the dpo workload's) split into 320 unpaired rows, chosen -> {"label": true}, rejected -> false, in one
fixed shuffled order (seed 0: a pair's two rows are not neighbours, so TRL's rotation by one does not pair a prompt
with its own pair's other completion). Standard library only (it runs in the peer's venv too)."""
from __future__ import annotations

import json
import os
import random

STEPS, BATCH_PAIRS = 20, 8
BATCH_ROWS = 2 * BATCH_PAIRS   # a step trains on the rows of 8 pairs, as a dpo step does


def kto_rows(workload_dir: str) -> tuple[list[dict], int]:
    """(unpaired rows, number of pairs they came from)."""
    with open(os.path.join(workload_dir, "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f][: STEPS * BATCH_PAIRS]
    rows = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in pairs
            for k in ("chosen", "rejected")]
    random.Random(0).shuffle(rows)
    return rows, len(pairs)
