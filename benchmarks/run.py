"""alignloop's side of the peer benchmarks (../shared/peers/README.md).

    python benchmarks/run.py WORKLOAD_DIR rm|dpo|kto|ppo|grpo [--mixed-precision peer|no|bf16]

WORKLOAD_DIR is a folder built by the peers' make_models.py (policy/, reward/, prompts.jsonl, pairs.jsonl).
Prints one JSON line with the same fields as the peer script, so the two lines divide. Only the training call is
timed, with every core in use, exactly as the peer script does.

Precision follows the peer by default (`peer`): TRL 1.16's RewardConfig and DPOConfig default to bf16=True, which
on a CPU runs each step under bf16 autocast, so `rm` and `dpo` run under bf16 autocast too (and `kto`: KTOConfig
too defaults to bf16=True; its peer script is benchmarks/trl_kto.py, run with TRL 1.16's venv); the peer's PPO script
passes bf16=False, so `ppo` runs in float32, and so does `grpo` (its peer script, trl_grpo.py, passes bf16=False).
`--mixed-precision no` gives our float32 figure for any workload.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


PEER_PRECISION = {"rm": "bf16", "dpo": "bf16", "kto": "bf16", "ppo": "no", "grpo": "no"}


def main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python benchmarks/run.py", description="alignloop on a peer workload.")
    p.add_argument("workload_dir")
    p.add_argument("workload", choices=["rm", "dpo", "kto", "ppo", "grpo"])
    p.add_argument("--mixed-precision", choices=["peer", "no", "bf16"], default="peer",
                   help="peer (default): what the peer script runs (bf16 autocast for rm/dpo/kto; float32 for ppo, "
                        "grpo)")
    ns = p.parse_args(argv)
    workload_dir, name = ns.workload_dir, ns.workload
    mp = ns.mixed_precision if ns.mixed_precision != "peer" else PEER_PRECISION[name]
    if not (Path(workload_dir) / "pairs.jsonl").is_file():
        sys.exit(f"{workload_dir}: not a workload folder (no pairs.jsonl); build it with shared/peers/make_models.py")
    import torch

    torch.set_num_threads(os.cpu_count())
    if name == "rm":
        from rm_bench import run_rm as run
    elif name == "dpo":
        from dpo_bench import run_dpo as run
    elif name == "kto":
        from kto_bench import run_kto as run
    elif name == "grpo":
        from grpo_bench import run_grpo as run
    else:
        from ppo_bench import run_ppo as run
    print(json.dumps(run(workload_dir, mixed_precision=mp)))


if __name__ == "__main__":
    main(sys.argv[1:])
