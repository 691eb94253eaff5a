"""Where one batch-1 decode step of the 30B-shaped Nemotron-H spends its device time: per kernel and per category.

Command (H200, jax 0.11.2 + CUDA; ≈ 1–2 min per variant, mostly random init, quantization and the fused compile):
    PYTHONPATH=. python3 experiments/profile_decode.py --variants bf16,hlwq5-pallas --out $OUT/profile_decode.json
    python -m experiments.profile_decode --tiny --out /tmp/profile_decode.json          # CPU plumbing check
Method: random weights and variants as in bench_model (``variant_params``); the fused decode step (one jitted
program, caches donated, greedy feedback: bench_model's fused decode) is compiled and warmed, then --steps steps run
under ``jax.profiler.trace``. The trace is read back with ``jax.profiler.ProfileData``: every event on the device's
stream lines (GPU kernels, memcpy / memset) is summed by name and divided by the steps. The JSON (--out, written
atomically after each variant) holds per variant the wall time per step (the profiled loop), the busy time per step
(sum of the events: kernels on different streams may overlap, so it can exceed the wall time), events per step,
the time per category (``category``) and the kernels by time; the table printed last compares the variants.
On a machine without a GPU the events are the XLA CPU runtime's (plumbing only).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from experiments.bench_model import TINY_HF, _write, run_info, variant_params, warm_fused_decode
from hlwq_jax.models import nemotron_h as nh

CATEGORIES = (  # (category, substrings of the kernel name), first match wins
    ("pallas gemv", ("hlwq_gemv",)),
    ("pallas other", ("hlwq_",)),
    ("cublas / cutlass", ("gemm", "gemv", "cutlass", "cublas", "xmma")),
    ("xla triton", ("triton",)),
    ("copy / memset", ("memcpy", "memset", "copy")),
    ("xla fusion", ("fusion", "loop_", "input_", "reduce", "scatter", "gather", "transpose", "convert")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def event_lines(profile) -> tuple[str, list]:
    """("gpu", the stream lines of the GPU planes) or, without a GPU plane, ("cpu", the XLA CPU runtime lines)."""
    gpu = [p for p in profile.planes if p.name.startswith("/device:GPU")]
    if gpu:
        lines = [ln for p in gpu for ln in p.lines if "stream" in ln.name.lower()]
        if not lines:
            names = sorted({ln.name for p in gpu for ln in p.lines})
            raise ValueError(f"profile: GPU planes without stream lines (lines: {names})")
        return "gpu", lines
    return "cpu", [ln for p in profile.planes if p.name == "/host:CPU" for ln in p.lines if ln.name.startswith("tf_XLA")]


def kernel_table(xplane_path: str, steps: int, top: int = 40) -> dict:
    """Per-step totals of a trace's device events (module docstring), ``top`` kernels by time."""
    kind, lines = event_lines(jax.profiler.ProfileData.from_file(xplane_path))
    total_ns, calls = collections.Counter(), collections.Counter()
    for ln in lines:
        for ev in ln.events:
            total_ns[ev.name] += ev.duration_ns
            calls[ev.name] += 1
    cats = collections.Counter()
    for name, ns in total_ns.items():
        cats[category(name)] += ns
    return {"events_from": kind, "busy_us_per_step": sum(total_ns.values()) / 1e3 / steps,
            "events_per_step": sum(calls.values()) / steps,
            "categories_us_per_step": {c: ns / 1e3 / steps for c, ns in cats.most_common()},
            "kernels": [{"name": n, "category": category(n), "us_per_step": ns / 1e3 / steps,
                         "calls_per_step": calls[n] / steps} for n, ns in total_ns.most_common(top)]}


def profile_variant(cfg, params, steps: int, context: int, key) -> dict:
    """Compile and warm the fused batch-1 decode step, then trace ``steps`` steps of it."""
    step, tok, cache = warm_fused_decode(cfg, params, context + steps + 4, key)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            for _ in range(steps):
                tok, cache = step(params, tok, cache)
            jax.block_until_ready(tok)
            wall = (time.perf_counter() - t0) / steps
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        table = kernel_table(path, steps)
    return {"wall_ms_per_step": 1e3 * wall, **table}


def _table(res: dict) -> str:
    rows = [f"{'variant':14} {'wall ms':>8} {'busy ms':>8} {'events':>7}  busy ms per category"]
    for name, v in res["variants"].items():
        cats = ", ".join(f"{c} {us / 1e3:.3f}" for c, us in v["categories_us_per_step"].items())
        rows.append(f"{name:14} {v['wall_ms_per_step']:8.3f} {v['busy_us_per_step'] / 1e3:8.3f} "
                    f"{v['events_per_step']:7.0f}  {cats}")
    for name, v in res["variants"].items():
        rows.append(f"[{name}] top kernels: " + "; ".join(
            f"{k['name'][:48]} {k['us_per_step']:.0f} us ×{k['calls_per_step']:.0f}" for k in v["kernels"][:8]))
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU plumbing check)")
    ap.add_argument("--variants", default="bf16,hlwq5,hlwq5-pallas")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be ≥ 1")
    cfg = nh.NemotronHConfig.from_hf(TINY_HF if args.tiny else nh.NANO_30B_HF)
    res = {"bench": "profile_decode", "args": vars(args), **run_info(), "variants": {}}
    key = jax.random.PRNGKey(0)
    params = jax.block_until_ready(nh.init_params(cfg, key, jnp.bfloat16))
    for variant in args.variants.split(","):
        p = variant_params(params, variant)
        res["variants"][variant] = profile_variant(cfg, p, args.steps, args.context, jax.random.fold_in(key, 1))
        print(f"[{variant}] {json.dumps({k: v for k, v in res['variants'][variant].items() if k != 'kernels'})}",
              flush=True)
        _write(args.out, res)
        del p
    res["table"] = _table(res)
    _write(args.out, res)
    print(res["table"])
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
