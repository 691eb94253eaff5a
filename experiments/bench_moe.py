"""Benchmark one Nemotron-H MoE layer at real shapes: dropless prefill formulations against a dense matmul with the
same useful FLOPs, the Mosaic GPU grouped-matmul tile configs, and the batch-1 decode gather (bf16 and HLWQ Q5).

Command (H200, jax 0.11.2; ~3 min, mostly Mosaic compiles):
    PYTHONPATH=. python3 experiments/bench_moe.py --tune --out $OUT/bench_moe_h200.jsonl
    PYTHONPATH=. python3 experiments/bench_moe.py --tokens 64 --experts 8 --hidden 256 --inter 128 --impls capacity,ragged
        (CPU plumbing check)
Sections (one JSON line each, appended atomically; the table is printed last):
  * tune (--tune, GPU): every valid MosaicGroupedConfig on a grid for the up (N=F, K=D) and down (N=D, K=F) shapes,
    timed on the real routed group sizes; the best per shape is what mosaic_gpu.TUNED should hold.
  * prefill: routed experts for T tokens × top-k (router: random weights on random hidden states, so groups are
    uneven) with each --impls formulation, its relative difference to "capacity", and the dense pair
    [T·k, D] @ [D, F] → relu² → [T·k, F] @ [F, D] (the useful FLOPs); ratio = routed / dense (issue 3 target ≤ 3).
  * decode: one token, top-k experts gathered, bf16 and HLWQ Q5 (B = 128) experts (issue 5 target for the grouped
    decode: Q5 ≥ 2.5× faster than bf16).
Timing: warm-up, then the median of --iters block_until_ready'd calls alternating between two inputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_model import median_time
from experiments.ppl_wikitext import append_jsonl
from hlwq_jax.nn.moe import MoEConfig, moe_experts, route
from hlwq_jax.ops.grouped_matmul import MosaicGroupedConfig, grouped_matmul


def make_layer(cfg: MoEConfig, key, dtype):
    ks = jax.random.split(key, 4)
    e, d, f = cfg.num_experts, cfg.hidden, cfg.expert_dim
    return {"router": jax.random.normal(ks[0], (e, d), jnp.float32) * 0.02,
            "router_bias": jnp.zeros((e,), jnp.float32),
            "experts": {"up_proj": (jax.random.normal(ks[1], (e, f, d), jnp.float32) / np.sqrt(d)).astype(dtype),
                        "down_proj": (jax.random.normal(ks[2], (e, d, f), jnp.float32) / np.sqrt(f)).astype(dtype)}}


def tune_configs(n: int, k: int):
    for bm, bn, bk, steps, gbn in itertools.product((64, 128), (64, 128, 256), (64, 128), (2, 4, 6), (1, 2, 3, 7)):
        if n % (bn * gbn) == 0 and k % bk == 0:
            yield MosaicGroupedConfig(block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps, grid_block_n=gbn)


def tune(layer, xs_sorted, sizes, iters: int, budget_s: float) -> list[dict]:
    """Time every config for the up and down grouped matmuls; returns rows sorted by time per shape."""
    up, down = layer["experts"]["up_proj"], layer["experts"]["down_proj"]
    f = up.shape[1]
    hs = [jnp.maximum(x[:, :f], 0) for x in xs_sorted]                    # a [A, F] input for the down shape
    rows, t_end = [], time.time() + budget_s
    for name, w, inputs in (("up", up, xs_sorted), ("down", down, hs)):
        n, k = w.shape[1], w.shape[2]
        for cfg in tune_configs(n, k):
            if time.time() > t_end:
                break
            fn = jax.jit(lambda x, w, g, c=cfg: grouped_matmul(x, w, g, "mosaic_gpu", config=c))
            try:
                t = median_time(fn, [(x, w, sizes) for x in inputs], iters)
            except Exception as e:                                      # SMEM overflow etc.: record and go on
                rows.append({"shape": name, "n": n, "k": k, "config": dataclasses.asdict(cfg),
                             "error": f"{type(e).__name__}: {str(e)[:160]}"})
                continue
            flops = 2.0 * inputs[0].shape[0] * n * k
            rows.append({"shape": name, "n": n, "k": k, "config": dataclasses.asdict(cfg), "ms": 1e3 * t,
                         "tflops": flops / t / 1e12})
            print(f"tune {name} {cfg} {1e3 * t:.3f} ms {flops / t / 1e12:.0f} TFLOP/s", flush=True)
    return rows


def bench_prefill(cfg, layer, xs, impls, iters) -> dict:
    a = xs[0].shape[0] * cfg.top_k
    w, ids = jax.jit(lambda p, x: route(p, x, cfg))(layer, xs[0])
    counts = np.bincount(np.asarray(ids).ravel(), minlength=cfg.num_experts)
    out = {"tokens": xs[0].shape[0], "assignments": a, "max_per_expert": int(counts.max()),
           "mean_per_expert": float(counts.mean()), "empty_experts": int((counts == 0).sum()), "impls": {}}
    ref = None
    for impl in impls:
        fn = jax.jit(lambda p, x, impl=impl: moe_experts(p["experts"], x, *route(p, x, cfg)[::-1], impl=impl,
                                                         capacity_factors=cfg.capacity_factors))
        y = np.asarray(fn(layer, xs[0]), np.float64)
        ref = y if ref is None else ref
        t = median_time(fn, [(layer, x) for x in xs], iters)
        out["impls"][impl] = {"ms": 1e3 * t, "rel_diff_to_first": float(np.linalg.norm(y - ref) / np.linalg.norm(ref))}
        print(f"prefill {impl}: {1e3 * t:.3f} ms", flush=True)
    key = jax.random.PRNGKey(7)
    dt = layer["experts"]["up_proj"].dtype
    dense_in = [jax.random.normal(jax.random.fold_in(key, i), (a, cfg.hidden), dt) for i in range(2)]
    w_up = layer["experts"]["up_proj"][0].T
    w_dn = layer["experts"]["down_proj"][0].T
    dense = jax.jit(lambda x, u, d: jnp.maximum(x @ u, 0).astype(x.dtype) @ d)
    out["dense_ms"] = 1e3 * median_time(dense, [(x, w_up, w_dn) for x in dense_in], iters)
    useful = 2.0 * a * cfg.hidden * cfg.expert_dim * 2
    for impl, r in out["impls"].items():
        r["over_dense"] = r["ms"] / out["dense_ms"]
        r["tflops"] = useful / (r["ms"] * 1e-3) / 1e12
    return out


def bench_decode(cfg, layer, iters) -> dict:
    from hlwq_jax.quant.hlwq import quantize
    key = jax.random.PRNGKey(3)
    xs = [jax.random.normal(jax.random.fold_in(key, i), (1, cfg.hidden), layer["experts"]["up_proj"].dtype)
          for i in range(2)]
    q5 = {k: quantize(v, bits=5, block_size=128) for k, v in layer["experts"].items()}
    out = {}
    for name, experts in (("bf16", layer["experts"]), ("hlwq5", q5)):
        fn = jax.jit(lambda p, e, x: moe_experts(e, x, *route(p, x, cfg)[::-1], impl="gather"))
        out[f"{name}_ms"] = 1e3 * median_time(fn, [(layer, experts, x) for x in xs], iters)
        print(f"decode gather {name}: {out[f'{name}_ms']:.4f} ms", flush=True)
    out["q5_speedup"] = out["bf16_ms"] / out["hlwq5_ms"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2688)
    ap.add_argument("--inter", type=int, default=1856)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--impls", default="capacity,ragged-mgpu")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-budget-s", type=float, default=150.0)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="results/bench_moe.jsonl")
    a = ap.parse_args(argv)
    cfg = MoEConfig(hidden=a.hidden, num_experts=a.experts, top_k=a.top_k, expert_dim=a.inter)
    dev = jax.devices()[0]
    env = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "jax": jax.__version__, "device": dev.device_kind, "platform": dev.platform, "host": platform.node(),
           "shapes": dataclasses.asdict(cfg)}
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    layer = make_layer(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    xs = [jax.random.normal(jax.random.PRNGKey(10 + i), (a.tokens, a.hidden), jnp.bfloat16) for i in range(2)]
    table = []
    if a.tune:
        _, ids = route(layer, xs[0], cfg)
        flat = ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.zeros((a.experts,), jnp.int32).at[flat].add(1)
        xs_sorted = [x[order // a.top_k] for x in xs]
        rows = tune(layer, xs_sorted, sizes, a.iters, a.tune_budget_s)
        for shape in ("up", "down"):
            ok = sorted((r for r in rows if r["shape"] == shape and "ms" in r), key=lambda r: r["ms"])
            best = ok[0] if ok else None
            append_jsonl(out, [{**env, "section": "tune", "shape": shape, "best": best, "rows": rows}])
            table.append(f"tune {shape}: best {best['config'] if best else None} "
                         f"{best['ms'] if best else float('nan'):.3f} ms ({best['tflops'] if best else 0:.0f} TFLOP/s)")
    pre = bench_prefill(cfg, layer, xs, a.impls.split(","), a.iters)
    append_jsonl(out, [{**env, "section": "prefill", **pre}])
    table.append(f"prefill T={pre['tokens']} dense pair {pre['dense_ms']:.3f} ms "
                 f"(max/mean per expert {pre['max_per_expert']}/{pre['mean_per_expert']:.0f})")
    for impl, r in pre["impls"].items():
        table.append(f"  {impl:12s} {r['ms']:.3f} ms = {r['over_dense']:.2f}x dense, {r['tflops']:.0f} TFLOP/s, "
                     f"rel diff {r['rel_diff_to_first']:.1e}")
    dec = bench_decode(cfg, layer, a.iters)
    append_jsonl(out, [{**env, "section": "decode", **dec}])
    table.append(f"decode b1 gather: bf16 {dec['bf16_ms']:.4f} ms, Q5 {dec['hlwq5_ms']:.4f} ms "
                 f"(Q5 speedup {dec['q5_speedup']:.2f}x)")
    print("\n".join(table))


if __name__ == "__main__":
    main()
