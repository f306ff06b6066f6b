"""The `grpo` peer workload (../shared/peers/README.md, peer script trl_grpo.py) with alignloop's GRPOTrainer.

    python benchmarks/run.py WORKLOAD_DIR grpo         (or: python benchmarks/grpo_bench.py WORKLOAD_DIR)

GRPO (estimator grpo) of policy/ against reward/ (scalar-head reward model), frozen reference copy; 8 updates of 16
prompts × 4 completions, ≤ 48 new tokens, temperature 0.7, stop at EOS, one optimizer step per update over all 64
completions (num_iterations 1, num_mini_batches 1, gradient_accumulation_steps 1), KL coefficient 0.05 as a k3 loss
term (kl_in "loss" = TRL's beta), lr 1e-5, float32, loss aggregation seq-mean-token-mean with std scaling (TRL's
loss_type "grpo"). The dataset is the peer's: the first 16 × 8 = 128 prompts of prompts.jsonl (our trainer draws
them in a seeded shuffled order; the peer in file order: the same prompts, which order does not matter for speed).
Only `train()` is timed (model loading and trainer construction are not), as the peer times `tr.train()`.
Prints the peer script's fields (episodes = completions) plus the time split (generate / score / train) summed over
the updates.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, GROUP, UPDATES, RESPONSE_LEN = 16, 4, 8, 48


def run_grpo(workload_dir: str, mixed_precision: str = "no") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from alignloop.models import RewardModel, load_tokenizer
    from alignloop.trainers.grpo import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    d = Path(workload_dir)
    tok = load_tokenizer(str(d / "policy"), padding_side="left")
    with open(d / "prompts.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f][:PROMPTS * UPDATES]
    policy = AutoModelForCausalLM.from_pretrained(str(d / "policy"))
    reward = RewardModel.from_pretrained(str(d / "reward"))
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, estimator="grpo", num_generations=GROUP, rollout_batch_size=PROMPTS,
                         total_updates=UPDATES, max_new_tokens=RESPONSE_LEN, temperature=0.7, num_iterations=1,
                         num_mini_batches=1, gradient_accumulation_steps=1, kl_coef=0.05, kl_in="loss",
                         learning_rate=1e-5, mixed_precision=mixed_precision, tensorboard=False, progress=False,
                         save_final=False, sample_every=0, seed=0)
        trainer = GRPOTrainer(model=policy, reward=reward, args=cfg, train_dataset=prompts, tokenizer=tok)
        t = time.perf_counter()
        history = trainer.train()
        wall = time.perf_counter() - t
    n = PROMPTS * GROUP * UPDATES
    split = {k: round(sum(m[f"time/{k}"] for m in history), 3) for k in ("generate", "score", "train")}
    return {"peer": "alignloop", "workload": "grpo", "episodes": n, "seconds": round(wall, 2),
            "episodes_per_sec": round(n / wall, 2), "time_split_s": split,
            "mean_response_len": round(sum(m["response/length_mean"] for m in history) / len(history), 1),
            "mixed_precision": mixed_precision}


if __name__ == "__main__":
    print(json.dumps(run_grpo(sys.argv[1])))
