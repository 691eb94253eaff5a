#!/usr/bin/env bash
# Where the H200 host's 2x run-to-run speed swings come from (results/offload_h200_resident_noise.jsonl): prints the
# host's CPU / NUMA / GPU-affinity facts, then runs configs/offload_h200_nomiss_q5.toml four times, alternating
# default and "pinned" (taskset to the GPU's local CPUs, Python's garbage collector off). Run on the device machine
# from the repo root:   bash scripts/gpu_host_noise.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG=$OUT/gpu_host_noise.log
{
  date -u; nproc; cat /proc/loadavg; lscpu | grep -E "Model name|Socket|NUMA|MHz|Thread|Core"
  cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>&1
  nvidia-smi topo -m
  bus=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader | head -1 | tr A-F a-f); bus=${bus: -12}
  echo "gpu $bus local_cpulist $(cat /sys/bus/pci/devices/$bus/local_cpulist 2>&1) numa_node $(cat /sys/bus/pci/devices/$bus/numa_node 2>&1)"
  ps -eo pcpu,comm --sort=-pcpu | head -5
} >>"$LOG" 2>&1
CPUS=$(python3 - <<'PY'
import os, subprocess
bus = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader"], capture_output=True,
                     text=True).stdout.split()[0].lower()[-12:]
try:
    txt = open(f"/sys/bus/pci/devices/{bus}/local_cpulist").read().strip()
    local = set()
    for part in txt.split(","):
        a, _, b = part.partition("-")
        local.update(range(int(a), int(b or a) + 1))
except OSError:
    local = set()
cpus = sorted((local & os.sched_getaffinity(0)) or os.sched_getaffinity(0))
print(",".join(map(str, cpus[1:] if len(cpus) > 2 else cpus)))
PY
)
echo "pinned variant: taskset -c $CPUS, gc disabled" | tee -a "$LOG"
bench() {  # $1 = label, rest = launcher prefix
  local label=$1; shift
  echo "=== $(date -u +%T) $label" | tee -a "$LOG"
  timeout 200 "$@" python3 -c "import gc, runpy, sys
if '$label'.startswith('pinned'): gc.disable()
sys.argv = ['bench_offload', '--config', 'configs/offload_h200_nomiss_q5.toml', '--out', '$OUT/noise_$label.jsonl']
runpy.run_path('experiments/bench_offload.py', run_name='__main__')" >>"$LOG" 2>&1
  echo "=== rc=$?" | tee -a "$LOG"
}
bench default1
bench pinned1 taskset -c "$CPUS"
bench default2
bench pinned2 taskset -c "$CPUS"
grep -E "===|segmented|no misses" "$LOG"
