"""Benchmark the full Nemotron-3-Nano-30B-A3B-shaped model (random weights, real shapes) on one GPU.

Command (H200, jax 0.11.2 + CUDA; ~3-5 min, mostly compiles):
    PYTHONPATH=. python3 experiments/bench_model.py --out $OUT/bench_model.json
    PYTHONPATH=. python3 experiments/bench_model.py --variants bf16,hlwq5,hlwq5-pallas \
        --fused-decode bf16,hlwq5,hlwq5-pallas --out $OUT/bench_model_kernels.json    # + the Pallas decode GEMV
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python3 experiments/bench_model.py \
        --variants bf16,hlwq5-pallas-experts,hlwq5-pallas --decode-batches 1 --iters 3 \
        --fused-decode bf16,hlwq5-pallas-experts,hlwq5-pallas --out $OUT/bench_model_experts.json
    (repacking the experts holds bf16 + two Q5 copies for a moment: XLA's default 75 % pool is too small for it)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python3 experiments/bench_model.py --variants "" \
        --paired-decode bf16,hlwq5-pallas-experts --out $OUT/bench_model_paired.json    # only the paired decode
    PYTHONPATH=. python3 experiments/bench_model.py --tiny --out /tmp/bench_model.json      # CPU plumbing check
Measures, for bf16 weights and for HLWQ Q5 (default Mamba-aware recipe, XLA path: hlwq_matmul / dequantize; variant
"hlwq5-pallas": the same weights with the dense projections on impl="pallas-decode" — the Pallas decode GEMV for
one-token steps, XLA otherwise — via ``nn.linear.select_kernels``; "hlwq5-pallas-experts": also the stacked MoE
experts (the Pallas gather GEMV at decode; results/bench_model_experts.json); interpret mode off a GPU):
  * prefill tokens/s at --prefill-len (4096) tokens, batch 1 (filling a KV / SSM cache);
  * decode tokens/s at batch 1, 8, 64 (greedy feedback on device, KV window --context + steps);
  Both run layer by layer (nemotron_h.forward_layerwise: a few small compiles instead of one 52-layer program per
  shape, so the whole run fits in minutes); batch-1 decode of the --fused-decode variants is also timed as one fused
  jitted step with donated caches (no per-layer host dispatch; one long compile).
  * with --paired-decode A,B,…: the fused batch-1 decode of those variants, all resident, timed in alternating rounds
    in one process (``bench_paired_decode``; tokens/s and each variant's time over A's, per round);
  * the MoE layer at prefill (T = --prefill-len tokens, random routing from random router weights): routed experts
    (dropless "capacity" path) and the whole block vs. a dense matmul pair with the same useful FLOPs
    ([T·k, D] @ [D, F] then [T·k, F] @ [F, D]), and the decode-time "gather" path at batch 1.
Random weights are generated on the device (hlwq_jax.models.nemotron_h.init_params). Timing: warm-up, then the
median over --iters runs of block_until_ready'd calls, alternating between two inputs. The JSON (--out, written
atomically, rewritten after every section so a timeout keeps what finished) holds the config, environment and
metrics; the table is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.models import nemotron_h as nh
from hlwq_jax.provenance import code_version
from hlwq_jax.nn.moe import moe, moe_experts, route

TINY_HF = dict(nh.NANO_30B_HF, vocab_size=512, hidden_size=128, hybrid_override_pattern="MEM*EME",
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=16,
               ssm_state_size=16, n_groups=2, chunk_size=16, n_routed_experts=16, num_experts_per_tok=3,
               moe_intermediate_size=64, moe_shared_expert_intermediate_size=96)


def median_time(fn, inputs, iters: int, warmup: int = 2) -> float:
    for i in range(warmup):
        jax.block_until_ready(fn(*inputs[i % len(inputs)]))
    ts = []
    for i in range(iters):
        args = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def bench_prefill(cfg, params, length: int, iters: int, key) -> dict:
    """Batch-1 prefill of `length` tokens into fresh caches, run layer by layer (forward_layerwise)."""
    toks = [jax.random.randint(jax.random.fold_in(key, i), (1, length), 0, cfg.vocab_size, jnp.int32)
            for i in range(2)]
    dtype = params["embeddings"].dtype

    def run(p, t):
        return nh.forward_layerwise(cfg, p, t, nh.init_cache(cfg, 1, length, dtype))[0]

    t0 = time.perf_counter()
    jax.block_until_ready(run(params, toks[0]))
    compile_s = time.perf_counter() - t0
    t = median_time(run, [(params, x) for x in toks], iters)
    return {"seconds": t, "tokens_per_s": length / t, "first_call_s": compile_s}


def decode_step(cfg, fused: bool):
    """(params, tokens [B, 1], cache) → (greedy next tokens [B, 1], cache): one jitted program with the cache donated
    (fused), or forward_layerwise (one jitted call per layer)."""
    def step_fn(p, t, c):
        lg, c = (nh.forward if fused else nh.forward_layerwise)(cfg, p, t, c)
        return jnp.argmax(lg[:, -1:], -1).astype(jnp.int32), c

    return jax.jit(step_fn, donate_argnums=(2,)) if fused else step_fn


def bench_decode(cfg, params, batch: int, context: int, steps: int, key, fused: bool) -> dict:
    """Greedy decode steps over caches of max_len = context + steps (attention reads the whole cache window, so the
    cost does not depend on how much of it a prompt filled; the caches start empty). fused: the whole model as one
    jitted step with the cache donated; else forward_layerwise (one jitted call per layer)."""
    dtype = params["embeddings"].dtype
    cache = nh.init_cache(cfg, batch, context + steps + 1, dtype)
    tok = jax.random.randint(key, (batch, 1), 0, cfg.vocab_size, jnp.int32)

    step = decode_step(cfg, fused)
    t0 = time.perf_counter()
    tok, cache = jax.block_until_ready(step(params, tok, cache))
    compile_s = time.perf_counter() - t0
    for _ in range(2):                                                       # warm-up
        tok, cache = step(params, tok, cache)
    jax.block_until_ready(tok)
    n = steps - 3
    t0 = time.perf_counter()
    for _ in range(n):
        tok, cache = step(params, tok, cache)
    jax.block_until_ready(tok)
    per_step = (time.perf_counter() - t0) / n
    return {"batch": batch, "fused": fused, "step_ms": 1e3 * per_step, "tokens_per_s": batch / per_step,
            "first_call_s": compile_s}


def warm_fused_decode(cfg, params, max_len: int, key, warmup: int = 3):
    """(step, tokens [1, 1], cache) of the fused batch-1 decode step over a KV window of max_len, compiled and run
    ``warmup`` times (profile_decode and the paired decode start from this)."""
    cache = nh.init_cache(cfg, 1, max_len, params["embeddings"].dtype)
    tok = jax.random.randint(key, (1, 1), 0, cfg.vocab_size, jnp.int32)
    step = decode_step(cfg, fused=True)
    for _ in range(warmup):
        tok, cache = step(params, tok, cache)
    jax.block_until_ready(tok)
    return step, tok, cache


def bench_paired_decode(cfg, params_by_variant: dict, context: int, rounds: int, steps: int, key) -> dict:
    """Batch-1 fused decode of several variants in one process, in alternation: each variant's fused step is compiled
    and warmed, then every round times ``steps`` steps of each variant, the order reversed every other round. The
    same code's tokens/s moved 15 % between two processes of one device call (results/eleventh_explore/README.md);
    alternating in one process compares the variants under the same conditions. Every variant's KV window is the
    same (context + rounds · steps + 4), so attention costs the same in each."""
    state = {}
    for name, p in params_by_variant.items():
        step, tok, cache = warm_fused_decode(cfg, p, context + rounds * steps + 4, key)
        state[name] = (step, p, tok, cache)
    names = list(params_by_variant)
    step_ms = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            step, p, tok, cache = state[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                tok, cache = step(p, tok, cache)
            jax.block_until_ready(tok)
            step_ms[name].append(1e3 * (time.perf_counter() - t0) / steps)
            state[name] = (step, p, tok, cache)
    return summarize_paired(step_ms, steps)


def summarize_paired(step_ms: dict, steps: int) -> dict:
    """{variant: [ms per step, one per round]} → medians, ranges, and each variant's time over the first variant's,
    round by round (the pairing that makes the comparison robust to slow phases of the machine)."""
    names = list(step_ms)
    rounds = len(step_ms[names[0]])
    if rounds == 0 or any(len(v) != rounds for v in step_ms.values()):
        raise ValueError(f"summarize_paired: every variant needs the same number (≥ 1) of rounds, got "
                         f"{ {k: len(v) for k, v in step_ms.items()} }")
    base = step_ms[names[0]]
    out = {"rounds": rounds, "steps_per_round": steps, "step_ms": step_ms, "baseline": names[0], "variants": {}}
    for name in names:
        ratios = [a / b for a, b in zip(step_ms[name], base)]
        out["variants"][name] = {
            "tokens_per_s_median": 1e3 / float(np.median(step_ms[name])),
            "step_ms_min": min(step_ms[name]), "step_ms_max": max(step_ms[name]),
            "time_over_baseline_median": float(np.median(ratios)),
            "time_over_baseline_min": min(ratios), "time_over_baseline_max": max(ratios)}
    return out


def bench_moe(cfg, params, length: int, iters: int, key) -> dict:
    li = cfg.layer_types.index("E")
    layer = params["layers"][li]["mixer"]
    mc = cfg.moe
    dtype = params["embeddings"].dtype
    xs = [jax.random.normal(jax.random.fold_in(key, i), (length, cfg.hidden_size), dtype) for i in range(2)]
    w, ids = jax.jit(lambda p, x: route(p, x, mc))(layer, xs[0])
    counts = np.bincount(np.asarray(ids).ravel(), minlength=mc.num_experts)
    routed = jax.jit(lambda p, x: moe_experts(p["experts"], x, *route(p, x, mc)[::-1], impl="capacity",
                                              capacity_factors=mc.capacity_factors))
    block = jax.jit(lambda p, x: moe(p, x, mc, impl="capacity"))
    a = length * mc.top_k
    k1, k2 = jax.random.split(key)
    dense_in = [jax.random.normal(jax.random.fold_in(k1, i), (a, cfg.hidden_size), dtype) for i in range(2)]
    w_up = jax.random.normal(k2, (cfg.hidden_size, mc.expert_dim), dtype) * 0.02
    w_dn = jax.random.normal(k2, (mc.expert_dim, cfg.hidden_size), dtype) * 0.02
    dense = jax.jit(lambda x, u, d: (x @ u) @ d)
    t_routed = median_time(routed, [(layer, x) for x in xs], iters)
    t_block = median_time(block, [(layer, x) for x in xs], iters)
    t_dense = median_time(dense, [(x, w_up, w_dn) for x in dense_in], iters)
    x1 = [x[:1] for x in xs]
    gather = jax.jit(lambda p, x: moe(p, x, mc, impl="gather"))
    t_gather = median_time(gather, [(layer, x) for x in x1], iters)
    useful = 2 * a * cfg.hidden_size * mc.expert_dim * 2
    return {"tokens": length, "routed_ms": 1e3 * t_routed, "block_ms": 1e3 * t_block, "dense_ms": 1e3 * t_dense,
            "routed_over_dense": t_routed / t_dense, "routed_tflops": useful / t_routed / 1e12,
            "decode_gather_b1_ms": 1e3 * t_gather, "max_tokens_per_expert": int(counts.max()),
            "mean_tokens_per_expert": float(counts.mean())}


VARIANTS = "bf16 | hlwq<bits> | hlwq<bits>-pallas | hlwq<bits>-pallas-experts"


def parse_variant(variant: str) -> tuple[str, str]:
    """(bits, kernels) of an HLWQ variant name ("hlwq5-pallas" → ("5", "pallas")); raises on names outside VARIANTS."""
    bits, _, kernels = variant[4:].partition("-")
    if variant != "bf16" and (not variant.startswith("hlwq") or not bits.isdigit()
                              or kernels not in ("", "pallas", "pallas-experts")):
        raise ValueError(f"unknown variant {variant!r} ({VARIANTS})")
    return bits, kernels


def variant_params(params, variant: str):
    """The bf16 params, or their HLWQ version: "hlwq<bits>" (default recipe, impl="xla"), "hlwq<bits>-pallas" (the
    same weights, dense projections on impl="pallas-decode" via ``nn.linear.select_kernels``; interpret mode off a
    GPU) or "hlwq<bits>-pallas-experts" (also the stacked MoE experts: the Pallas gather GEMV at decode). Ready
    (block_until_ready) on return."""
    if variant == "bf16":
        return params
    bits, kernels = parse_variant(variant)
    from hlwq_jax import Recipe, quantize_params
    from hlwq_jax.nn.linear import select_kernels
    p, _ = quantize_params(params, Recipe.default(int(bits)), with_stats=False)
    if kernels:  # the Pallas decode GEMV at M = 1, impl="xla" otherwise
        p = select_kernels(p, "pallas-decode", experts=kernels == "pallas-experts",
                           interpret=jax.default_backend() != "gpu")
    return jax.block_until_ready(p)


def run_info() -> dict:
    """git_sha, source_digest, jax, device and platform of this run (the JSON header of the model benchmarks)."""
    return {**code_version(), "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
            "platform": platform.platform()}


def _write(path: str, obj: dict) -> None:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, p)


def _table(res: dict) -> str:
    batches = res["args"]["decode_batches"]
    rows = [f"{'variant':8} {'weights GB':>10} {'prefill tok/s':>14} " +
            " ".join(f"{'dec b' + str(b) + ' tok/s':>14}" for b in batches) + f" {'dec b1 fused':>13}"]
    for name, v in res["variants"].items():
        dec = {d["batch"]: d["tokens_per_s"] for d in v.get("decode", []) if not d["fused"]}
        fused = [d["tokens_per_s"] for d in v.get("decode", []) if d["fused"]]
        pre = v.get("prefill", {}).get("tokens_per_s", float("nan"))
        rows.append(f"{name:8} {v['weight_bytes'] / 1e9:10.2f} {pre:14.0f} " +
                    " ".join(f"{dec.get(b, float('nan')):14.1f}" for b in batches) +
                    f" {(fused[0] if fused else float('nan')):13.1f}")
    paired = res.get("paired_decode")
    if paired:
        rows.append(f"paired fused b1 decode ({paired['rounds']} alternating rounds × {paired['steps_per_round']} "
                    f"steps; time over {paired['baseline']}, median [min–max] of the rounds):")
        for name, v in paired["variants"].items():
            rows.append(f"  {name:24} {v['tokens_per_s_median']:8.1f} tok/s  {v['time_over_baseline_median']:.3f} "
                        f"[{v['time_over_baseline_min']:.3f}–{v['time_over_baseline_max']:.3f}]")
    for name, v in res["variants"].items():
        m = v.get("moe")
        if m:
            rows.append(f"MoE[{name}] T={m['tokens']}: routed {m['routed_ms']:.3f} ms, block {m['block_ms']:.3f} ms, "
                        f"dense same-FLOPs {m['dense_ms']:.3f} ms -> routed/dense {m['routed_over_dense']:.2f}x; "
                        f"decode gather b1 {m['decode_gather_b1_ms']:.3f} ms")
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny config and sizes (CPU plumbing check)")
    ap.add_argument("--variants", default="bf16,hlwq5")
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--decode-batches", default="1,8,64")
    ap.add_argument("--decode-steps", type=int, default=20)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--fused-decode", default="bf16",
                    help="variants whose batch-1 decode is also timed as one fused jitted step (a long compile)")
    ap.add_argument("--paired-decode", default="",
                    help="variants (the first is the baseline) whose fused batch-1 decode is timed in alternating "
                         "rounds at the end, all resident at once (empty: skip)")
    ap.add_argument("--paired-rounds", type=int, default=8)
    ap.add_argument("--paired-steps", type=int, default=40, help="decode steps per variant and round")
    args = ap.parse_args(argv)
    if args.paired_rounds < 1 or args.paired_steps < 1:
        ap.error("--paired-rounds and --paired-steps must be ≥ 1")
    for name in [n for n in (args.variants + "," + args.paired_decode).split(",") if n]:
        try:
            parse_variant(name)
        except ValueError as exc:
            ap.error(str(exc))
    if args.tiny:
        args.prefill_len, args.decode_batches, args.decode_steps, args.context, args.iters = 64, "1,4", 6, 8, 2
        args.paired_rounds, args.paired_steps = 2, 3
    batches = [int(b) for b in args.decode_batches.split(",")]
    cfg = nh.NemotronHConfig.from_hf(TINY_HF if args.tiny else nh.NANO_30B_HF)
    res = {"bench": "bench_model", "args": {**vars(args), "decode_batches": batches},
           "config": dataclasses.asdict(cfg), **run_info(),
           "param_count": nh.param_count(nh.abstract_params(cfg)), "variants": {}}
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    params = nh.init_params(cfg, key, jnp.bfloat16)
    jax.block_until_ready(params)
    res["init_s"] = time.perf_counter() - t0
    for variant in [v for v in args.variants.split(",") if v]:
        t0 = time.perf_counter()
        p = variant_params(params, variant)
        if p is not params:
            res.setdefault("quantize_s", {})[variant] = time.perf_counter() - t0
        v = res["variants"][variant] = {"weight_bytes": nh.param_bytes(p)}
        print(f"[{variant}] weights {v['weight_bytes'] / 1e9:.2f} GB", flush=True)
        v["prefill"] = bench_prefill(cfg, p, args.prefill_len, args.iters, jax.random.fold_in(key, 1))
        print(f"[{variant}] prefill {v['prefill']}", flush=True)
        _write(args.out, res)
        v["decode"] = []
        fused = [(1, True)] if variant in args.fused_decode.split(",") else []
        for b, f in [(b, False) for b in batches] + fused:
            v["decode"].append(bench_decode(cfg, p, b, args.context, args.decode_steps, jax.random.fold_in(key, b),
                                            fused=f))
            print(f"[{variant}] decode {v['decode'][-1]}", flush=True)
            _write(args.out, res)
        v["moe"] = bench_moe(cfg, p, args.prefill_len, args.iters, jax.random.fold_in(key, 2))
        print(f"[{variant}] moe {v['moe']}", flush=True)
        _write(args.out, res)
        if p is not params:
            del p
    if args.paired_decode:
        names = args.paired_decode.split(",")
        ps = {name: variant_params(params, name) for name in names}
        res["paired_decode"] = bench_paired_decode(cfg, ps, args.context, args.paired_rounds, args.paired_steps,
                                                   jax.random.fold_in(key, 3))
        print(f"paired decode {json.dumps(res['paired_decode']['variants'])}", flush=True)
        _write(args.out, res)
        del ps
    res["table"] = _table(res)
    _write(args.out, res)
    print(res["table"])
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
