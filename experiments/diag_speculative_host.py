"""Where the host time of the speculative no-miss decode loop goes (MoE-only stand-in, C = 8, restricted routing).

    PYTHONPATH=. python3 experiments/diag_speculative_host.py bf16            # H200; run once per XLA_FLAGS setting
    H=128 I=64 PYTHONPATH=. .venv/bin/python experiments/diag_speculative_host.py bf16   # CPU plumbing check

Per bank precision: ``loop_ms`` (the pipelined speculative loop, ms/token), ``pass_ms`` (the same passes chained with
no host read or policy work: the device floor), ``dispatch_us`` (host time of ONE speculative-pass dispatch with
ready inputs: the Python call returns after XLA has launched every kernel of the program) and ``token_input_us``
(one small jitted call, for scale). The loop is host-bound when loop_ms − pass_ms ≈ the host work per token. Uses
16 experts per layer instead of 128 (small banks; the routing is restricted to 8 anyway). Prints one ``RESULT`` JSON
line. Measured: results/diag_speculative_host_h200.log.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from experiments.bench_offload import BenchConfig
from hlwq_jax.offload import moe_stack as ms
from hlwq_jax.offload.harness import MoEOnlyHarness


def median_us(fn, n: int = 30) -> float:
    """Median host time of ``fn()`` (its result waited for after each timing)."""
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = fn()
        ts.append(time.perf_counter() - t0)
        jax.block_until_ready(r)
    return float(np.median(ts)) * 1e6


def diagnose(precision: str) -> dict:
    cfg = dataclasses.replace(BenchConfig(), layers=23, experts=16, hidden=int(os.environ.get("H", 2688)),
                              inter=int(os.environ.get("I", 1856)), top_k=6, slots=(8,), tokens=200, warmup=8,
                              unique_experts=8)
    h = MoEOnlyHarness(cfg, precision, jax.random.PRNGKey(0))
    run, moe = h.cached(8, "lru", False, True, True)
    moe.caches[0].precompile()
    moe.preload(h.restricted_experts)
    jax.block_until_ready(run(0, 8))
    t0 = time.perf_counter()
    outs = jax.block_until_ready(run(8, 64))
    loop = (time.perf_counter() - t0) * 1e3 / 64
    chained = h.speculative_pass(moe)
    jax.block_until_ready(chained(0, 8))
    t0 = time.perf_counter()
    jax.block_until_ready(chained(8, 64))
    passes = (time.perf_counter() - t0) * 1e3 / 64
    routers, x = h._routers(True), outs[-1]
    return dict(loop_ms=loop, pass_ms=passes,
                dispatch_us=median_us(lambda: ms._dispatch(moe, routers, x, cfg.top_k)[:2]),
                token_input_us=median_us(lambda: ms.token_input(x, x)),
                out_checksum=float(np.asarray(outs[-1], np.float32).sum()))


def main() -> None:
    res = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "device": str(jax.devices()[0].device_kind),
           "jax": jax.__version__}
    for precision in (sys.argv[1] if len(sys.argv) > 1 else "bf16").split(","):
        res[precision] = diagnose(precision)
        print(precision, res[precision], flush=True)
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
