"""The `ppo` peer workload (../shared/peers/README.md) with alignloop's PPOTrainer.

    python benchmarks/run.py WORKLOAD_DIR ppo          (or: python benchmarks/ppo_bench.py WORKLOAD_DIR)

PPO of policy/ against reward/ (scalar-head reward model), frozen reference copy, value head on the policy trunk
(the project's design); 8 updates × 16 prompts, ≤ 48 new tokens, temperature 0.7, stop at EOS, 4 PPO epochs,
1 minibatch, KL coefficient 0.05; float32 by default, as the peer (its script passes bf16=False). Only `train()` is
timed (model loading and trainer construction are not).
Prints the peer script's fields plus the time split (generate / score / train) summed over the updates.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

BATCH, UPDATES, RESPONSE_LEN = 16, 8, 48


def run_ppo(workload_dir: str, mixed_precision: str = "no") -> dict:
    import torch

    from alignloop.models import CausalLMWithValueHead, RewardModel, load_tokenizer
    from alignloop.trainers.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    d = Path(workload_dir)
    tok = load_tokenizer(str(d / "policy"), padding_side="left")
    with open(d / "prompts.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    policy = CausalLMWithValueHead.from_pretrained(str(d / "policy"))
    reward = RewardModel.from_pretrained(str(d / "reward"))
    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig(output_dir=out, rollout_batch_size=BATCH, total_updates=UPDATES, max_new_tokens=RESPONSE_LEN,
                        temperature=0.7, num_ppo_epochs=4, num_mini_batches=1, kl_coef=0.05, learning_rate=3e-6,
                        tensorboard=False, progress=False, save_final=False, sample_every=0, seed=0,
                        mixed_precision=mixed_precision)
        trainer = PPOTrainer(model=policy, reward=reward, args=cfg, train_dataset=prompts, tokenizer=tok)
        t = time.perf_counter()
        history = trainer.train()
        wall = time.perf_counter() - t
    split = {k: round(sum(m[f"time/{k}"] for m in history), 3) for k in ("generate", "score", "train")}
    return {"peer": "alignloop", "workload": "ppo", "episodes": BATCH * UPDATES, "seconds": round(wall, 2),
            "episodes_per_sec": round(BATCH * UPDATES / wall, 2), "time_split_s": split,
            "mean_response_len": round(sum(m["response/length_mean"] for m in history) / len(history), 1),
            "mixed_precision": mixed_precision}


if __name__ == "__main__":
    print(json.dumps(run_ppo(sys.argv[1])))
