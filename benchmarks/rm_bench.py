"""The `rm` workload of ../shared/peers/README.md: Bradley-Terry reward model on the first 160 rows of pairs.jsonl,
batch 8 pairs, 1 epoch, max length 128, lr 1e-4; bf16 autocast by default, as the peer (TRL 1.16's RewardConfig
defaults to bf16=True, which on a CPU runs the step under bf16 autocast). Timed: `train()` only (it includes our
tokenisation; the peer's tokenisation happens before its timer), not model loading."""
from __future__ import annotations

import json
import os
import tempfile
import time

STEPS, BATCH = 20, 8


def run_rm(workload_dir: str, mixed_precision: str = "bf16") -> dict:
    import torch

    from alignloop.models import RewardModel, load_tokenizer
    from alignloop.trainers.rm import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    with open(os.path.join(workload_dir, "pairs.jsonl")) as f:
        rows = [json.loads(line) for line in f][: STEPS * BATCH]
    path = os.path.join(workload_dir, "reward")
    model, tok = RewardModel.from_pretrained(path), load_tokenizer(path)
    out = tempfile.mkdtemp(prefix="alignloop_bench_rm_")
    cfg = RewardConfig(output_dir=out, per_device_batch_size=BATCH, num_epochs=1, learning_rate=1e-4, max_length=128,
                       logging_steps=STEPS, progress=False, tensorboard=False, mixed_precision=mixed_precision)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=rows, tokenizer=tok)
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    return {"peer": "alignloop", "workload": "rm", "pairs": len(rows), "seconds": round(wall, 2),
            "pairs_per_sec": round(len(rows) / wall, 2), "mixed_precision": mixed_precision}


if __name__ == "__main__":
    import sys

    print(json.dumps(run_rm(sys.argv[1])))
