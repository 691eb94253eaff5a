"""Host time per jitted call of the all-resident segmented decode loop and of the chain's no-miss decode loop.

    PYTHONPATH=. python3 experiments/diag_chain_host.py --config configs/offload_h200_nomiss_q5.toml --out $OUT/x.jsonl
    .venv/bin/python -m experiments.diag_chain_host --tiny            # CPU smoke (tiny model, same code path)

Why: both loops are host-bound on the H200 (``bench_offload``'s ``host_ms_per_token`` ≈ ``ms_per_token``), so their
speed is the host time per token: jitted calls × their dispatch cost, plus the chain's host read and policy steps.
For the whole Nemotron-H model of ``--config`` (``model = "full"``, its first bank, C = min(slots), restricted
routing so that no token misses) this script wraps ``offload.nemotron``'s module-level calls (``_segment``,
``routed_call``, ``_chain_codes``) and ``OffloadedMoE.settle`` with ``time.perf_counter`` timers and, for ``--rounds``
rounds alternating resident and chain, times ``--runs`` decode runs of ``tokens`` tokens each (ms/token, waited for
at the end), the timers on. One row per (round, loop): calls per token and host µs per call by name, settle µs per
token, the runs' ms/token. The timers add ~1 µs per call. A profile made this way (cProfile, first version) is what
showed the chain's calls costing 2× the resident loop's per call while the loops had 48 and 47 calls per token
(results/offload_h200_chain_host.txt), before the routed experts moved into the next segment.
Dispatch on the CPU backend differs from the GPU's (a CPU call may run inline); use a GPU run for absolute costs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time

import jax
import numpy as np

from experiments.bench_offload import BenchConfig, append_jsonl
from experiments.diag_offload_host import Timer
from hlwq_jax.offload import moe_stack as MS
from hlwq_jax.offload import nemotron as NM
from hlwq_jax.offload.harness import FullModelHarness
from hlwq_jax.provenance import code_version

CALLS = ("_segment", "routed_call", "_chain_codes")


@contextlib.contextmanager
def instrumented(timers: Timer):
    """Route ``offload.nemotron``'s calls and ``OffloadedMoE.settle`` through ``timers`` (restored on exit)."""
    old = {name: getattr(NM, name) for name in CALLS}
    old_settle = MS.OffloadedMoE.settle
    try:
        for name, fn in old.items():
            setattr(NM, name, timers.wrap(name, fn))
        MS.OffloadedMoE.settle = timers.wrap("settle", old_settle)
        yield
    finally:
        for name, fn in old.items():
            setattr(NM, name, fn)
        MS.OffloadedMoE.settle = old_settle


def measure(run, cfg, runs: int) -> tuple[list[float], Timer]:
    """``runs`` timed decode runs (each from the prefill, ``cfg.warmup`` untimed tokens first) → ms/token each and
    the timers of the timed tokens only."""
    ms, timers = [], Timer()
    for _ in range(runs):
        jax.block_until_ready(run(0, cfg.warmup))
        with instrumented(timers):
            t0 = time.perf_counter()
            jax.block_until_ready(run(cfg.warmup, cfg.tokens))
            ms.append((time.perf_counter() - t0) * 1e3 / cfg.tokens)
    return ms, timers


def row(loop: str, rnd: int, ms: list[float], timers: Timer, tokens: int, meta: dict) -> dict:
    n_tok = tokens * len(ms)
    calls = {k: timers.n[k] / n_tok for k in timers.n if k != "settle"}
    us = {k: timers.t[k] / timers.n[k] * 1e6 for k in timers.n if k != "settle"}
    return {**meta, "loop": loop, "round": rnd, "ms_per_token_runs": ms, "ms_per_token": float(np.median(ms)),
            "calls_per_token": calls, "host_us_per_call": us,
            "host_ms_per_token_in_calls": sum(timers.t[k] for k in calls) * 1e3 / n_tok,
            "settle_us_per_token": timers.t.get("settle", 0.0) * 1e6 / n_tok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="TOML with BenchConfig fields (model must be \"full\")")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU model (overrides --config)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", help="JSON-lines file (appended atomically)")
    a = ap.parse_args(argv)
    if a.tiny:
        cfg = BenchConfig.tiny("full")
    elif a.config:
        cfg = BenchConfig.load(a.config)
    else:
        raise ValueError("diag_chain_host: give --config or --tiny")
    if cfg.model != "full":
        raise ValueError(f"diag_chain_host: config model must be \"full\", got {cfg.model!r}")
    if a.rounds < 1 or a.runs < 1:
        raise ValueError(f"diag_chain_host: --rounds and --runs must be >= 1, got {a.rounds}, {a.runs}")
    bank, slots = cfg.banks[0], min(cfg.slots)
    h = FullModelHarness(cfg, bank, jax.random.PRNGKey(cfg.seed))
    (_, resident, _), = [r for r in h.resident(True) if r[0] == "segmented"]
    chain, moe = h.cached(slots, "lru", False, restricted=True, speculative=True)
    moe.caches[0].precompile()
    moe.preload(h.restricted_experts)
    dev = jax.devices()[0]
    meta = {"kind": "chain_host_diag", "bank": bank, "slots": slots, "tokens": cfg.tokens, **code_version(),
            "jax": jax.__version__, "device": dev.device_kind, "platform": dev.platform,
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    rows = []
    for rnd in range(a.rounds):
        for loop, run in (("resident", resident), ("chain", chain)):
            ms, timers = measure(run, cfg, a.runs)
            rows.append(row(loop, rnd, ms, timers, cfg.tokens, meta))
            r = rows[-1]
            calls = ", ".join(f"{k} {r['calls_per_token'][k]:.0f}×{r['host_us_per_call'][k]:.0f} µs"
                              for k in r["calls_per_token"])
            print(f"[{bank}] round {rnd} {loop:>8}: {r['ms_per_token']:.2f} ms/tok "
                  f"(runs {', '.join(f'{m:.2f}' for m in ms)}); per token {calls}; "
                  f"settle {r['settle_us_per_token']:.0f} µs", flush=True)
    if moe.spec.rollbacks:
        raise RuntimeError(f"diag_chain_host: the no-miss chain missed ({moe.spec})")
    if a.out:
        append_jsonl(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
