#!/usr/bin/env bash
# Issue 6's timing targets on the H200 in ONE device call, each with the host's drift cancelled inside its run:
#   configs/offload_h200_permiss_q5.toml  the Q5 per-miss cost paired per cache size (~2 min)
#   configs/offload_h200_nomiss_q5.toml   the chain's no-miss speed paired with the all-resident segmented model,
#                                         7 pairs with a bootstrap interval (~1.5 min); *_nomiss_bf16.toml: bf16 bank
# Run on the device machine from the repo root with CONFIG[:TIMEOUT_S] arguments (default: the two Q5 configs):
#   bash scripts/gpu_offload_targets.sh configs/offload_h200_nomiss_q5.toml:200 configs/offload_h200_nomiss_bf16.toml:300
# Each config's rows go to $OUT/<config name>.jsonl, the log to $OUT/gpu_offload_targets.log.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG=$OUT/gpu_offload_targets.log
[ $# -gt 0 ] || set -- configs/offload_h200_permiss_q5.toml:280 configs/offload_h200_nomiss_q5.toml:230
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
for arg in "$@"; do
  cfg=${arg%%:*}; t=${arg#*:}; [ "$t" = "$arg" ] && t=300
  name=$(basename "$cfg" .toml)
  echo "=== $(date -u +%T) $cfg (limit ${t} s)" | tee -a "$LOG"
  timeout "$t" python3 experiments/bench_offload.py --config "$cfg" --out "$OUT/$name.jsonl" >>"$LOG" 2>&1
  echo "=== rc=$?" | tee -a "$LOG"
done
grep -E "ms/tok|ms/miss|=== " "$LOG" | tail -40
