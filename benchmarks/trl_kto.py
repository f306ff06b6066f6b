"""Peer figure for the `kto` workload, measured with TRL 1.16's KTOTrainer (run it with the peers' trl-1.16 venv:
~/.cache/peers/trl-1.16/bin/python benchmarks/trl_kto.py WORKLOAD_DIR -> one JSON line; benchmarks/compare.sh does).

The workload (../shared/peers/README.md's `dpo` workload, unpaired): the first 160 rows of pairs.jsonl split into 320
unpaired rows (chosen -> label true, rejected -> label false), in one fixed shuffled order (`kto_rows`, the same
for both sides); KTO (loss "kto", beta 0.1) of WORKLOAD/policy against a frozen copy of itself; 16 rows (the rows of
8 pairs, the dpo workload's batch) per step, 20 steps, 1 epoch, max length 128, lr 1e-4; everything else TRL's
default, as trl_offline.py leaves it (bf16=True, which on a CPU runs each step under bf16 autocast; reference
log-probs on the fly, precompute_ref_log_probs=False; gradient checkpointing on). The figure is pairs_per_sec =
160 pairs / the wall time of `train()`, to set beside the dpo workload's.
"""
import json
import os
import sys
import time

os.environ.setdefault("WANDB_DISABLED", "true")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from datasets import Dataset
from kto_rows import BATCH_ROWS, STEPS, kto_rows
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer

d = sys.argv[1]
torch.manual_seed(0)
torch.set_num_threads(os.cpu_count())
rows, pairs = kto_rows(d)
tok = AutoTokenizer.from_pretrained(os.path.join(d, "policy"))
model = AutoModelForCausalLM.from_pretrained(os.path.join(d, "policy"))
args = KTOConfig(output_dir="/tmp/peer_trl_kto_out", per_device_train_batch_size=BATCH_ROWS, num_train_epochs=1,
                 report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(), learning_rate=1e-4,
                 disable_tqdm=True, logging_steps=STEPS, max_length=128, beta=0.1)
tr = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
t = time.perf_counter()
tr.train()
wall = time.perf_counter() - t
print(json.dumps({"peer": "trl", "workload": "kto", "pairs": pairs, "rows": len(rows), "seconds": round(wall, 2),
                  "pairs_per_sec": round(pairs / wall, 2)}))
