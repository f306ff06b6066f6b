#!/usr/bin/env bash
# Peer and alignloop on the same workloads, same machine, same run; prints both JSON lines and the ratios.
#   bash benchmarks/compare.sh [OUTDIR] [tiny|small] [rm dpo kto ppo grpo]   (default: rm dpo kto ppo)
# MP=no|bf16 overrides our precision (default: the peer's, see run.py).
# kto's peer script is ours (benchmarks/trl_kto.py: TRL 1.16's KTOTrainer on the dpo workload's pairs, unpaired).
# grpo's is the peers' trl_grpo.py (TRL 1.16's GRPOTrainer), ours alignloop's GRPOTrainer (benchmarks/grpo_bench.py).
# Needs ../shared/peers (beside the checkout, or PEERS=path). Run on an otherwise idle machine: with more runnable
# processes than cores, multi-threaded PyTorch slows down by an order of magnitude and the figures mean nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
peers=${PEERS:-$repo/../shared/peers}
out=${1:-/tmp/peer-workloads}; size=${2:-tiny}; shift $(( $# > 2 ? 2 : $# ))
workloads=${*:-rm dpo kto ppo}
cache=${PEERS_CACHE:-$HOME/.cache/peers}
py=${PYTHON:-$repo/.venv/bin/python}
# the peer venvs (installed once by the peers' run.sh) and the workload folder (make_models.py, deterministic)
# (trl-0.29 only when ppo is asked for: grpo, rm, dpo and kto run with trl-1.16)
need="trl-1.16"; case " $workloads " in *" ppo "*) need="$need trl-0.29" ;; esac
for v in $need; do
  [ -x "$cache/$v/bin/python" ] || { bash "$peers/run.sh" "$out" "$size" >/dev/null; break; }
done
[ -f "$out/$size/pairs.jsonl" ] || "$cache/trl-1.16/bin/python" "$peers/make_models.py" "$out/$size" --size "$size" >/dev/null
for w in $workloads; do
  if [ "$w" = ppo ]; then
    peer=$("$cache/trl-0.29/bin/python" "$peers/trl_ppo.py" "$out/$size" 2>/dev/null | tail -n 1)
  elif [ "$w" = grpo ]; then
    peer=$("$cache/trl-1.16/bin/python" "$peers/trl_grpo.py" "$out/$size" 2>/dev/null | tail -n 1)
  elif [ "$w" = kto ]; then
    peer=$("$cache/trl-1.16/bin/python" "$here/trl_kto.py" "$out/$size" 2>/dev/null | tail -n 1)
  else
    peer=$("$cache/trl-1.16/bin/python" "$peers/trl_offline.py" "$out/$size" "$w" 2>/dev/null | tail -n 1)
  fi
  ours=$("$py" "$repo/benchmarks/run.py" "$out/$size" "$w" --mixed-precision "${MP:-peer}" 2>/dev/null | tail -n 1)
  echo "$peer"
  echo "$ours"
  "$py" - "$peer" "$ours" "$size" <<'PY'
import json, sys
p, o = json.loads(sys.argv[1]), json.loads(sys.argv[2])
key = "episodes_per_sec" if "episodes_per_sec" in p else "pairs_per_sec"
print(json.dumps({"size": sys.argv[3], "workload": p["workload"], key + "_ratio": round(o[key] / p[key], 2)}))
PY
done
