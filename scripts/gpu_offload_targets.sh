#!/usr/bin/env bash
# Issue 6's two timing targets on the H200 in ONE device call (~8 min with the machine's start), each with its
# host drift cancelled inside the run: the Q5 per-miss cost paired per cache size (configs/offload_h200_permiss_q5.toml)
# and the chain's no-miss speed paired with the all-resident segmented model, 7 pairs with a bootstrap interval
# (configs/offload_h200_nomiss_q5.toml). Run on the device machine from the repo root:
#   bash scripts/gpu_offload_targets.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG=$OUT/gpu_offload_targets.log
run() { local t=$1; shift; echo "=== $(date -u +%T) $*" | tee -a "$LOG"; timeout "$t" "$@" >>"$LOG" 2>&1; echo "=== rc=$?" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
run 280 python3 experiments/bench_offload.py --config configs/offload_h200_permiss_q5.toml \
    --out "$OUT/offload_h200_permiss_q5.jsonl"
run 230 python3 experiments/bench_offload.py --config configs/offload_h200_nomiss_q5.toml \
    --out "$OUT/offload_h200_nomiss_q5.jsonl"
grep -E "ms/tok|ms/miss|=== rc" "$LOG" | tail -40
