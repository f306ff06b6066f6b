"""The `kto` workload with alignloop (the workload: trl_kto.py's docstring; the rows: kto_rows.py): KTO (beta 0.1)
of WORKLOAD/policy against its own initial weights on the 320 unpaired rows of the dpo workload's 160 pairs, 16 rows
(8 pairs) per step, 20 steps, 1 epoch, max length 128, lr 1e-4; bf16 autocast by default, as the peer (TRL 1.16's
KTOConfig defaults to bf16=True). Only `train()` is timed; the reference log-probs (rows and mismatched pairs) are
computed inside it.

    python benchmarks/run.py WORKLOAD_DIR kto   (or benchmarks/kto_bench.py WORKLOAD_DIR) -> one JSON line
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from kto_rows import BATCH_ROWS, STEPS, kto_rows


def run_kto(workload_dir: str, mixed_precision: str = "bf16") -> dict:
    import torch

    from alignloop.models import load_causal_lm, load_tokenizer
    from alignloop.trainers.kto import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    rows, pairs = kto_rows(workload_dir)
    policy = os.path.join(workload_dir, "policy")
    with tempfile.TemporaryDirectory() as tmp:
        args = KTOConfig(output_dir=os.path.join(tmp, "out"), beta=0.1, per_device_batch_size=BATCH_ROWS,
                         num_epochs=1, max_length=128, learning_rate=1e-4, save_final=False, progress=False,
                         tensorboard=False, logging_steps=STEPS, mixed_precision=mixed_precision)
        trainer = KTOTrainer(model=load_causal_lm(policy), tokenizer=load_tokenizer(policy), args=args,
                             train_dataset=rows)
        t = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t
    return {"peer": "alignloop", "workload": "kto", "pairs": pairs, "rows": len(rows), "seconds": round(wall, 2),
            "pairs_per_sec": round(pairs / wall, 2), "mixed_precision": mixed_precision}


if __name__ == "__main__":
    print(json.dumps(run_kto(sys.argv[1])))
