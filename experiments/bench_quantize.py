"""Benchmark: HLWQ quantization throughput (weights/s) on the current JAX backend.

    .venv/bin/python -m experiments.bench_quantize --out results/bench_quantize_cpu.jsonl      # CPU (2 cores here)
    PYTHONPATH=. python3 experiments/bench_quantize.py --out $OUT/bench_quantize_gpu.jsonl   # H200

For each shape and bit width it times, on device-resident bf16 weights:
  * ``quantize`` end to end (argument checks, NaN/Inf scan, the jitted core, the fp16-overflow check);
  * the jitted core alone;
  * the same-run baseline: one fused elementwise pass over the weights (read bf16, write bf16), the memory-bound
    floor any quantizer must pay; the ratio says how far from it quantization is.
Median of ``--iters`` timed runs after a warm-up, rotating among 3 input tensors. Prints a table last and appends one
JSON line per case (command, date, machine, jax version, device) to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hlwq_jax.quant import hlwq  # noqa: E402

# Real Nemotron-H shapes: Mamba in_proj, attention q_proj, a stack of 16 routed experts (up), lm_head.
SHAPES = {
    "in_proj 10304x2688": (10304, 2688),
    "q_proj 4096x2688": (4096, 2688),
    "experts.up 16x1856x2688": (16, 1856, 2688),
    "lm_head 131072x2688": (131072, 2688),
}
SMALL_SHAPES = {"in_proj 10304x2688": (10304, 2688), "q_proj 4096x2688": (4096, 2688)}


def append_jsonl_atomic(path: str, records: list[dict]) -> None:
    """Append JSON lines by writing old + new content to a temp file, then renaming it over ``path``."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old = open(path).read() if os.path.exists(path) else ""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(old + "".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def timed(fn, inputs, iters: int) -> float:
    """Median seconds of fn(x) over ``iters`` runs, rotating inputs, after one warm-up per input."""
    for x in inputs:
        jax.block_until_ready(fn(x))
    times = []
    for i in range(iters):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(label: str, shape, bits: int, iters: int) -> dict:
    key = jax.random.PRNGKey(0)
    inputs = [jax.random.normal(k, shape, jnp.bfloat16) for k in jax.random.split(key, 3)]
    n = int(np.prod(shape))
    cb = jnp.asarray(hlwq.codebook_values(bits, "converged").astype(np.float32))
    core = lambda w: hlwq._quantize_jit(w, cb, None, bits=bits, block_size=128, uniform=False, rotate=True)
    full = lambda w: (lambda q: (q.packed, q.norms))(hlwq.quantize(w, bits=bits))
    copy = jax.jit(lambda w: w * jnp.bfloat16(1.0) + jnp.bfloat16(0.0))
    t_full, t_core, t_copy = timed(full, inputs, iters), timed(core, inputs, iters), timed(copy, inputs, iters)
    return {
        "case": label, "shape": list(shape), "bits": bits, "weights": n,
        "quantize_s": t_full, "core_s": t_core, "copy_s": t_copy,
        "quantize_wps": n / t_full, "core_wps": n / t_core,
        "core_over_copy": t_core / t_copy,
        "nemotron_30b_seconds_at_core_rate": 31.6e9 / (n / t_core),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench_quantize.jsonl")
    p.add_argument("--bits", default="4,5,8")
    p.add_argument("--iters", type=int, default=0, help="timed runs per case (default: 10 on GPU, 3 on CPU)")
    p.add_argument("--small", action="store_true", help="only the two smaller shapes (CPU default)")
    args = p.parse_args(argv)

    backend = jax.default_backend()
    iters = args.iters or (10 if backend == "gpu" else 3)
    shapes = SMALL_SHAPES if (args.small or backend == "cpu") else SHAPES
    meta = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "experiments.bench_quantize", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind), "backend": backend,
    }
    rows = [bench_case(label, shape, int(b), iters) for label, shape in shapes.items() for b in args.bits.split(",")]
    append_jsonl_atomic(args.out, [{**meta, **r} for r in rows])
    print(f"\n{meta['device']} ({backend}), jax {meta['jax']}, median of {iters}")
    print(f"{'case':26s} {'bits':>4s} {'quantize Gw/s':>14s} {'core Gw/s':>10s} {'core/copy':>10s} {'30B in s':>9s}")
    for r in rows:
        print(f"{r['case']:26s} {r['bits']:4d} {r['quantize_wps'] / 1e9:14.3f} {r['core_wps'] / 1e9:10.3f} "
              f"{r['core_over_copy']:10.1f} {r['nemotron_30b_seconds_at_core_rate']:9.1f}")


if __name__ == "__main__":
    main()
