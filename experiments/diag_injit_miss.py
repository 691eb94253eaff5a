"""Can a decode step handle its cache misses inside ONE jitted program? Costs of the pieces, measured.

    PYTHONPATH=. python3 experiments/diag_injit_miss.py --out $OUT/diag_injit_miss.jsonl      # H200
    PYTHONPATH=. python3 experiments/diag_injit_miss.py --small                               # CPU, functional

Why: the per-layer path reads each MoE layer's routed ids to the host (23 syncs per token) and the speculative chain
dispatches ~48 jitted calls per token; on the H200's host every call costs ~0.1 ms, so both are host-bound. A step
that keeps the slot maps and an LRU clock on the device, and copies a layer's misses from the pinned-host bank inside
the same program (``bank.gather_host_rows``: one in-jit host→device copy per row), needs no host work per layer. Its
costs are what this script times, per precision (row bytes of one Nemotron expert: bf16 19.96 MB, Q5 6.39 MB):

- ``copy_k``: a jitted, donated install of k rows (k = 1, 2, 4, 6) from a pinned-host uint8 [E, nbytes] bank into a
  device slot buffer [C, nbytes] → ms per row (compare with the raw PCIe time, 0.37 / 0.127 ms);
- ``switch_n``: the same inside ``lax.switch`` on a device miss count n (branch n copies the first n rows; n = 0
  copies nothing) → the cost of the conditional itself (n = 0) and of the copies under it;
- ``layers``: a 23-layer program, per layer a [1, D] × [D, F] bf16 matmul whose input depends on the layer's slot
  buffer, with and without a ``lax.switch`` per layer (n = 0 everywhere, or n = 1: one row per layer) → the
  per-token cost of 23 conditionals and of 23 in-jit single-row misses, blocked per call and pipelined (20 calls,
  then one block).

Each variant runs in a subprocess per ``XLA_FLAGS`` setting (default; command buffers also for conditionals;
command buffers off), so a flag this XLA does not know fails only its own rows. One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.offload.bank import gather_host_rows

FLAG_SETS = {
    "default": "",
    "cmdbuf_cond": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE",
    "cmdbuf_off": "--xla_gpu_enable_command_buffer=",
}


def _time(fn, reps: int) -> float:
    """Median ms of ``fn()`` (each call blocked)."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


def _install(buf, bank, ids, sl):
    """buf [C, nbytes] with the rows ``ids`` of the host ``bank`` written to slots ``sl`` (in-jit copies)."""
    return buf.at[sl].set(gather_host_rows(bank, ids))


def _switch_install(buf, bank, ids, sl, n):
    """``_install`` of the first n of ``ids`` (n ≤ 6, a device int32: ``lax.switch`` over 7 branches; branch 0
    copies nothing)."""
    branches = [lambda b: b] + [(lambda m: lambda b: _install(b, bank, ids[:m], sl[:m]))(m) for m in range(1, 7)]
    return jax.lax.switch(n, branches, buf)


def _time_copies(prec, bank, buf, ids_all, sl_all, reps, emit):
    """``copy_k`` and ``switch_n`` rows (module docstring) on one slot buffer; returns the buffer."""
    install, install_d = jax.jit(_install), jax.jit(_install, donate_argnums=(0,))
    switch_d = jax.jit(_switch_install, donate_argnums=(0,))
    got = np.asarray(install(buf, bank, ids_all[:2], sl_all[:2]))  # correctness once: rows land where asked
    ok = bool((got[np.asarray(sl_all[:2])] == np.asarray(bank)[np.asarray(ids_all[:2])]).all())
    state = {"b": buf}
    for k in (1, 2, 4, 6):
        def step(k=k):
            state["b"] = install_d(state["b"], bank, ids_all[:k], sl_all[:k])
            state["b"].block_until_ready()

        step()
        ms = _time(step, reps)
        emit({"what": "copy_k", "bank": prec, "k": k, "ms": ms, "ms_per_row": ms / k, "rows_ok": ok})
    for n in range(7):
        def step(nn=jnp.int32(n)):
            state["b"] = switch_d(state["b"], bank, ids_all, sl_all, nn)
            state["b"].block_until_ready()

        step()
        emit({"what": "switch_n", "bank": prec, "n": n, "ms": _time(step, reps)})
    return state["b"]


def _time_layers(prec, bank, nbytes, dims, ids_all, sl_all, reps, emit):
    """``layers`` rows: a program of ``n_layers`` bf16 [1, D] × [D, F] → [F, D] MLPs, each reading its layer's slot
    buffer, without and with a ``lax.switch`` install per layer (n = 0 or 1 rows), blocked and pipelined."""
    n_layers, slots, d, f = dims
    dev = jax.devices()[0]
    rng = np.random.default_rng(1)
    w = jax.device_put((rng.standard_normal((n_layers, d, f)) / np.sqrt(d)).astype(np.float32), dev).astype(jnp.bfloat16)
    w2 = jax.device_put((rng.standard_normal((n_layers, f, d)) / np.sqrt(f)).astype(np.float32), dev).astype(jnp.bfloat16)
    bufs = tuple(jax.device_put(np.zeros((slots, nbytes), np.uint8), dev) for _ in range(n_layers))

    def layers(x, bufs, bank, ns, cond: bool):
        new = []
        for l in range(n_layers):
            b = _switch_install(bufs[l], bank, ids_all, sl_all, ns[l]) if cond else bufs[l]
            new.append(b)
            dep = b[l % slots, :8].astype(jnp.bfloat16).sum() * 0  # the matmul waits for the layer's buffer
            h = jnp.maximum(x @ w[l] + dep, 0)
            x = x + (h @ w2[l]).astype(x.dtype)
        return x, tuple(new)

    fwd = {c: jax.jit(lambda x, bufs, bank, ns, c=c: layers(x, bufs, bank, ns, c), donate_argnums=(1,))
           for c in (False, True)}
    x0 = jnp.ones((1, d), jnp.bfloat16)
    state = {"b": bufs}
    for cond, n in ((False, 0), (True, 0), (True, 1)):
        ns = jnp.full((n_layers,), n, jnp.int32)

        def one(cond=cond, ns=ns):
            x, state["b"] = fwd[cond](x0, state["b"], bank, ns)
            return x

        one().block_until_ready()
        blocked = _time(lambda: one().block_until_ready(), reps)
        t0 = time.perf_counter()
        for _ in range(20):
            x = one()
        x.block_until_ready()
        emit({"what": "layers", "bank": prec, "cond": cond, "n": n, "layers": n_layers, "ms_blocked": blocked,
              "ms_pipelined": 1e3 * (time.perf_counter() - t0) / 20})


def worker(small: bool, reps: int) -> None:
    """Runs the measurements, printing one ``ROW {json}`` line per measurement as soon as it is taken."""
    dev = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    n_rows, slots, n_layers, d, f = (16, 8, 23, 2688, 1856) if not small else (8, 4, 3, 64, 32)
    sizes = {"bf16": 2 * 9_977_856, "q5": 6_391_938} if not small else {"bf16": 4096, "q5": 1312}
    t_start = time.perf_counter()

    def emit(row):
        _emit({**row, "t_s": round(time.perf_counter() - t_start, 2), "jax": jax.__version__,
               "device": dev.device_kind})

    def stage(what):  # progress, shown when a worker fails or hangs
        print(f"stage {what} t={time.perf_counter() - t_start:.1f}s", flush=True)

    ids_all = jnp.arange(6, dtype=jnp.int32) + 3
    sl_all = jnp.arange(6, dtype=jnp.int32) % slots
    for prec, nbytes in sizes.items():
        stage(f"{prec} copies")
        bank = jax.device_put(np.random.default_rng(0).integers(0, 255, (n_rows, nbytes), np.uint8), host)
        buf = _time_copies(prec, bank, jax.device_put(np.zeros((slots, nbytes), np.uint8), dev), ids_all, sl_all,
                           reps, emit)
        del buf
        stage(f"{prec} layers")
        _time_layers(prec, bank, nbytes, (n_layers, slots, d, f), ids_all, sl_all, reps, emit)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU: functional only)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None, help="append JSON lines here (atomically)")
    ap.add_argument("--flags", default=",".join(FLAG_SETS), help="XLA_FLAGS sets to run: " + ",".join(FLAG_SETS))
    ap.add_argument("--timeout-s", type=float, default=150, help="per flag set")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.small, args.reps)
        return
    rows = []  # the parent never initialises a backend (it would take the GPU's memory from the workers)
    stamp = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "command": "python3 experiments/diag_injit_miss.py " + " ".join(argv or sys.argv[1:])}
    for name in args.flags.split(","):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FLAG_SETS[name]).strip())
        cmd = [sys.executable, "-m", "experiments.diag_injit_miss", "--worker", "--reps", str(args.reps)] + \
            (["--small"] if args.small else [])
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = []
        watchdog = threading.Timer(args.timeout_s, p.kill)  # a hung worker is killed; its rows so far are kept
        watchdog.start()
        try:
            for ln in p.stdout:  # streamed: rows taken before a hang or a crash are kept
                if ln.startswith("ROW "):
                    rows.append({**stamp, "flags": name, **json.loads(ln[4:])})
                    print(f"[{name}] {ln[4:].strip()}", flush=True)
                else:
                    tail = (tail + [ln])[-40:]
            rc = p.wait()
        finally:
            watchdog.cancel()
        if rc:
            rows.append({**stamp, "flags": name, "error": f"rc {rc}: " + "".join(tail)[-2000:]})
            print(f"[{name}] failed ({rc}): {''.join(tail)[-800:]}", flush=True)
        if args.out:  # after every flag set, so a later hang loses nothing
            from experiments.bench_offload import append_jsonl
            append_jsonl(args.out, [r for r in rows if r["flags"] == name])
    for r in rows:
        if "error" in r:
            continue
        keys = {k: r[k] for k in ("k", "n", "cond") if k in r}
        vals = {k: round(r[k], 4) for k in ("ms", "ms_per_row", "ms_blocked", "ms_pipelined") if k in r}
        print(f"{r['flags']:12s} {r['what']:9s} {r['bank']:5s} {keys} {vals}")


if __name__ == "__main__":
    main()
