#!/usr/bin/env bash
# One device call that runs the H200 benchmarks of issues 2, 3, 6 and 7 (each under its own time limit) and leaves
# their outputs in $OUT. Run on the device machine from the repo root:  bash scripts/gpu_bench_all.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG=$OUT/gpu_bench_all.log
run() { local t=$1; shift; echo "=== $(date -u +%T) $*" | tee -a "$LOG"; timeout "$t" "$@" >>"$LOG" 2>&1; echo "=== rc=$?" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
run 80  python3 experiments/bench_quantize.py --out "$OUT/bench_quantize_h200.jsonl" --bits 4,5,8
run 70  python3 experiments/bench_convert.py --gb 2 --chunk-mb 512 --out "$OUT/bench_convert_h200.jsonl"
run 170 python3 experiments/bench_offload.py --config configs/offload_h200.toml --out "$OUT/offload_h200.jsonl"
run 250 python3 experiments/bench_model.py --out "$OUT/bench_model.json" ${BENCH_MODEL_ARGS:-}
grep -E "^(===|[A-Za-z].*[0-9])" "$LOG" | tail -60
