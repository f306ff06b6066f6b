"""alignloop's side of the peer benchmarks (../shared/peers/README.md).

    python benchmarks/run.py WORKLOAD_DIR rm|dpo|ppo

WORKLOAD_DIR is a folder built by the peers' make_models.py (policy/, reward/, prompts.jsonl, pairs.jsonl).
Prints one JSON line with the same fields as the peer script, so the two lines divide. Only the training call is
timed, with every core in use, exactly as the peer script does.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in ("rm", "dpo", "ppo"):
        sys.exit("usage: python benchmarks/run.py WORKLOAD_DIR rm|dpo|ppo")
    workload_dir, name = argv
    if not (Path(workload_dir) / "pairs.jsonl").is_file():
        sys.exit(f"{workload_dir}: not a workload folder (no pairs.jsonl); build it with shared/peers/make_models.py")
    import torch

    torch.set_num_threads(os.cpu_count())
    if name == "rm":
        from rm_bench import run_rm as run
    elif name == "dpo":
        from dpo_bench import run_dpo as run
    else:
        from ppo_bench import run_ppo as run
    print(json.dumps(run(workload_dir)))


if __name__ == "__main__":
    main(sys.argv[1:])
