"""The `dpo` peer workload (../shared/peers/README.md) with alignloop: DPO (sigmoid, beta 0.1) of WORKLOAD/policy
against its own initial weights, the first 160 rows of pairs.jsonl, batch 8, 1 epoch, max length 128, lr 1e-4;
bf16 autocast by default, as the peer (TRL 1.16's DPOConfig defaults to bf16=True, which on a CPU runs the step under
bf16 autocast).
Only `train()` is timed; the reference log-probs are computed inside it (into a fresh, empty cache folder, so
nothing is reused from an earlier run).

    python benchmarks/run.py WORKLOAD_DIR dpo   (or benchmarks/dpo_bench.py WORKLOAD_DIR) -> one JSON line
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

STEPS, BATCH = 20, 8


def run_dpo(workload_dir: str, mixed_precision: str = "bf16") -> dict:
    import torch

    from alignloop.models import load_causal_lm, load_tokenizer
    from alignloop.trainers.dpo import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    with open(os.path.join(workload_dir, "pairs.jsonl")) as f:
        rows = [json.loads(line) for line in f][: STEPS * BATCH]
    policy = os.path.join(workload_dir, "policy")
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=os.path.join(tmp, "out"), beta=0.1, per_device_batch_size=BATCH, num_epochs=1,
                         max_length=128, learning_rate=1e-4, ref_cache_dir=os.path.join(tmp, "ref_cache"),
                         save_final=False, progress=False, tensorboard=False, logging_steps=STEPS,
                         mixed_precision=mixed_precision)
        trainer = DPOTrainer(model=load_causal_lm(policy), tokenizer=load_tokenizer(policy), args=args,
                             train_dataset=rows)
        t = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t
    return {"peer": "alignloop", "workload": "dpo", "pairs": len(rows), "seconds": round(wall, 2),
            "pairs_per_sec": round(len(rows) / wall, 2), "mixed_precision": mixed_precision}


if __name__ == "__main__":
    print(json.dumps(run_dpo(sys.argv[1])))
