"""Host time of one MoE layer's per-layer-path step (``expert_cache.cached_moe``), split into its pieces.

    PYTHONPATH=. python3 experiments/diag_offload_host.py                      # CPU, small shapes, ~20 s
    PYTHONPATH=. python3 experiments/diag_offload_host.py --real-shapes --out $OUT/diag_offload_host.jsonl  # H200
    PYTHONPATH=. python3 experiments/diag_offload_host.py --profile /tmp/offload_host.prof.txt   # + cProfile text

Why: in the per-layer path the host reads each MoE layer's routed ids (a sync), so the device idles during every
piece of host work that follows until the routed experts are dispatched. This script times those pieces with
``time.perf_counter`` on ONE layer's cache in steady state (cache full, policy ``lru``), for steps with m = 0 (all
hits), 1, 2 and 6 misses out of top_k = 6 routed experts, at C slots in {8, 32, 64}, E = 128, for a bf16 bank and a
Q5 (HLWQ, block 128) bank. Expert shapes: real Nemotron-3-Nano-30B-A3B shapes (up 1856×2688, down 2688×1856) with
``--real-shapes``, else small ones (up 128×256, down 256×128) with the same pytree structure (a plain array per
projection, or an HLWQArray with packed / norms / codebook leaves and the same static metadata) — host dispatch cost
depends on the pytree and the argument count, not on the sizes. Bank contents are valid but not meaningful (one
random expert repeated; Q5: random codes and norms): timing only.

Columns (µs, medians over ``--steps`` steps; after every step the script waits for the device, so each step starts
with an idle device, as after the per-layer path's id read):
- ``policy``: ``EvictionPolicy.access``; ``ensure_book``: the rest of ``LayerCache.ensure`` (slot bookkeeping,
  counters) excluding the install; ``install_prep``: ``LayerCache._gather_install`` minus its jit dispatch (id checks,
  index array); ``install_disp``: the stacked-jit ``_gather_install`` call (returns when dispatched);
- ``weights``: ``LayerCache.weights()`` (rebuilds the weight pytree after an install, ``bank.build``);
- ``slot_ids``: the slot ids of the routed ids (``LayerCache.slot_ids``: host numpy, moved to the device by the
  routed FFN's jit dispatch; ``cached_moe``'s code for it, timed once more by itself on the same state; before the
  change of this column's code it was ``jnp.asarray(slot_map()[ids])``, a separate host→device put);
- ``rest``: the remainder of ``cached_moe`` (argument checks, grouping, the slot ids above, glue);
- ``routed_disp``: the ``routed_experts`` jit dispatch; ``total``: one whole ``cached_moe`` call (host time).
A second pass per step waits for the device after the install (``ensure_ready_ms``: ensure + host→device copy +
scatter) and after the routed FFN (``compute_ready_ms``): the device-side side of the same step, serialized; then
``asarray_us``: a separate ``jnp.asarray`` of the slot ids, waited for (the put the code before this change made per
layer), and ``compute_ready_dev_ids_ms``: the routed FFN again with those device ids (vs ``compute_ready_ms``, which
passes host numpy ids: the cost of moving them inside the jit dispatch).
Device split of the install (``device_split``, unless ``--no-device-split``; ms, each program waited for): the
install program, its dispatch alone, the same in-jit row copies without split/scatter, and one contiguous copy of the
same bytes — on the GPU this separates host time, per-row copy overhead and split/scatter cost (does it grow with C?).
``--dump-hlo DIR`` writes the compiled install program at the largest C per (bank, m) (check the buffers are aliased
and the scatter in place; each dump compiles once more). ``--profile`` runs cProfile during the first pass, which
inflates that pass's pieces: profile in a separate run.
Dispatch costs on the CPU backend differ from the GPU's (no PCIe, no CUDA launches, no pinned staging; and the CPU
client may run a small program inline on the dispatching thread when its inputs are ready, so ``install_disp`` and,
on all-hit steps, ``routed_disp`` can include the execution): use the CPU numbers for before/after comparisons of
host code (``policy``, ``ensure_book``, ``install_prep``, ``weights``, ``slot_ids``, ``rest``), a GPU run for
absolute costs. ``--out`` appends JSON lines
(one per (bank, C, m), with git SHA, jax version, device), atomically.
"""
from __future__ import annotations

import argparse
import cProfile
import contextlib
import datetime
import io
import os
import pstats
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_offload import append_jsonl
from hlwq_jax.offload import expert_cache as X
from hlwq_jax.offload.bank import HostBank, expert_row, split_layer
from hlwq_jax.provenance import code_version
from hlwq_jax.quant import packing
from hlwq_jax.quant.array import HLWQArray

REAL = {"D": 2688, "F": 1856}
SMALL = {"D": 256, "F": 128}
PIECES = ("policy", "ensure_book", "install_prep", "install_disp", "weights", "slot_ids", "rest", "routed_disp",
          "total")
NOTE = ("host time per piece of one cached_moe step; dispatch on the CPU backend differs from the GPU (no PCIe / CUDA "
        "launches / pinned staging): compare CPU runs before/after, take absolute costs from a GPU run")


def one_expert(bank: str, d: int, f: int, rng: np.random.Generator) -> dict:
    """One expert as a stacked [1, ...] layer dict: bf16 arrays or Q5 HLWQArrays (random but finite contents)."""
    if bank == "bf16":
        return {"up_proj": jnp.asarray(rng.standard_normal((1, f, d)) / np.sqrt(d), jnp.bfloat16),
                "down_proj": jnp.asarray(rng.standard_normal((1, d, f)) / np.sqrt(f), jnp.bfloat16)}
    if bank != "q5":
        raise ValueError(f"bank must be 'bf16' or 'q5', got {bank!r}")
    out = {}
    for name, (o, i) in {"up_proj": (f, d), "down_proj": (d, f)}.items():
        nb = -(-i // 128)
        packed = rng.integers(0, 256, (1, o, packing.packed_size(nb * 128, 5)), dtype=np.uint8)
        norms = rng.uniform(0.5, 1.5, (1, o, nb)).astype(np.float16)
        out[name] = HLWQArray(packed=jnp.asarray(packed), norms=jnp.asarray(norms),
                              codebook=jnp.asarray(np.linspace(-2.0, 2.0, 32, dtype=np.float32)), bits=5,
                              block_size=128, shape=(1, o, i), rotation="hadamard", seed=0, codebook_name="converged")
    return out


def make_bank(bank: str, n_experts: int, d: int, f: int) -> HostBank:
    """A stacked-jit pinned-host bank of ``n_experts`` copies of one random expert."""
    specs, arrays, layout, _ = split_layer(one_expert(bank, d, f, np.random.default_rng(0)))
    row = expert_row([a[0] for a in arrays])
    return HostBank.from_stacked(specs, layout, np.tile(row, (n_experts, 1)))


class Timer:
    """Accumulates wall time (``t``) and calls (``n``) per name."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def wrap(self, name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
                self.n[name] = self.n.get(name, 0) + 1
        return timed


@contextlib.contextmanager
def instrumented(cache: X.LayerCache, timer: Timer):
    """Wrap the cache's pieces (instance attributes and the module-level stacked-jit install) with ``timer``."""
    old = X._gather_install
    X._gather_install = timer.wrap("install_disp", old)
    cache.policy.access = timer.wrap("policy", cache.policy.access)
    for name, key in (("ensure", "ensure"), ("_gather_install", "install_call"), ("weights", "weights")):
        setattr(cache, name, timer.wrap(key, getattr(cache, name)))
    try:
        yield
    finally:
        X._gather_install = old
        for name in ("access",):
            delattr(cache.policy, name)
        for name in ("ensure", "_gather_install", "weights"):
            delattr(cache, name)


def slot_ids(cache: X.LayerCache, host_ids: np.ndarray) -> np.ndarray:
    """``cached_moe``'s slot-id step for one group, by itself (host numpy; the routed FFN's jit dispatch moves it)."""
    return cache.slot_ids(host_ids)


def step_ids(cache: X.LayerCache, m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Routed ids [1, k] with exactly m experts not resident in ``cache`` (k - m resident), in random order."""
    resident = sorted(cache.slot_of)
    absent = sorted(set(range(cache.bank.n_experts)) - set(resident))
    ids = list(rng.choice(resident, k - m, replace=False)) + list(rng.choice(absent, m, replace=False))
    rng.shuffle(ids)
    return np.asarray([ids], np.int32)


def fill(cache: X.LayerCache, k: int) -> None:
    """Bring the cache to steady state: every slot holds an expert (installed k at a time)."""
    e = 0
    while len(cache.slot_of) < cache.slots:
        n = min(k, cache.slots - len(cache.slot_of))
        cache.ensure(list(range(e, e + n)))
        e += n
    jax.block_until_ready(cache.buffers)


def measure(bank: HostBank, slots: int, m: int, k: int, steps: int, warmup: int, d: int,
            profile: cProfile.Profile | None) -> dict:
    """Median host µs per piece and device-waited ms of ``steps`` steps with m misses each (after ``warmup``)."""
    rng = np.random.default_rng(1000 * slots + m)
    cache = X.LayerCache(bank, slots, "lru")
    fill(cache, k)
    x = jax.device_put(jnp.asarray(rng.standard_normal((1, d)), jnp.bfloat16), bank.device_sharding)
    w = jax.device_put(jnp.asarray(rng.uniform(0.1, 1.0, (1, k)), jnp.float32), bank.device_sharding)
    rows: dict[str, list[float]] = {p: [] for p in PIECES}
    ready = {"ensure_ready_ms": [], "compute_ready_ms": [], "asarray_us": [], "compute_ready_dev_ids_ms": []}
    timer = Timer()
    routed = timer.wrap("routed_disp", X.routed_experts)
    for i in range(warmup + steps):
        timed = i >= warmup
        # pass 1: host time per piece
        ids = step_ids(cache, m, k, rng)
        timer.t = {}
        with instrumented(cache, timer):
            if timed and profile is not None:
                profile.enable()
            t0 = time.perf_counter()
            y = X.cached_moe(cache, x, ids, w, routed, host_ids=ids)
            total = time.perf_counter() - t0
            if timed and profile is not None:
                profile.disable()
        jax.block_until_ready((y, cache.buffers))
        slot_ids(cache, ids)  # first Python work after a device wait pays thread wake-ups: not counted
        t1 = time.perf_counter()
        for _ in range(10):
            slot_ids(cache, ids)
        sid = (time.perf_counter() - t1) / 10
        t = timer.t
        if timed:
            inst = t.get("install_call", 0.0)
            piece = {"policy": t["policy"], "ensure_book": t["ensure"] - t["policy"] - inst,
                     "install_prep": inst - t.get("install_disp", 0.0), "install_disp": t.get("install_disp", 0.0),
                     "weights": t["weights"], "slot_ids": sid,
                     "rest": total - t["ensure"] - t["weights"] - t["routed_disp"],
                     "routed_disp": t["routed_disp"], "total": total}
            for p in PIECES:
                rows[p].append(piece[p] * 1e6)
        # pass 2: the same kind of step, waited for after the install and after the routed FFN
        ids = step_ids(cache, m, k, rng)
        t0 = time.perf_counter()
        cache.ensure(list(dict.fromkeys(ids.reshape(-1).tolist())))
        jax.block_until_ready(cache.buffers)
        t1 = time.perf_counter()
        jax.block_until_ready(X.routed_experts(x, slot_ids(cache, ids), w, cache.weights()))
        t2 = time.perf_counter()
        sid = jax.block_until_ready(jnp.asarray(slot_ids(cache, ids)))  # the separate put the old code made
        t3 = time.perf_counter()
        jax.block_until_ready(X.routed_experts(x, sid, w, cache.weights()))  # warm: device ids
        t4 = time.perf_counter()
        jax.block_until_ready(X.routed_experts(x, sid, w, cache.weights()))
        t5 = time.perf_counter()
        if timed:
            ready["ensure_ready_ms"].append((t1 - t0) * 1e3)
            ready["compute_ready_ms"].append((t2 - t1) * 1e3)
            ready["asarray_us"].append((t3 - t2) * 1e6)
            ready["compute_ready_dev_ids_ms"].append((t5 - t4) * 1e3)
    if cache.stats.misses != (warmup + steps) * 2 * m + slots:
        raise RuntimeError(f"diag: expected exactly {m} misses per step, cache counted {cache.stats.misses}")
    out = {f"{p}_us": statistics.median(v) for p, v in rows.items()}
    out.update({p: statistics.median(v) for p, v in ready.items()})
    return out


def device_split(bank: HostBank, slots: int, m: int, steps: int, warmup: int, hlo_dir: str | None) -> dict:
    """The install program's device side for m rows, each waited for (median ms): ``install_ms`` the stacked-jit
    ``_gather_install`` (in-jit host slices + copies, split, scatter into the donated [C, ...] buffers; its dispatch
    alone: ``install_disp_ms``), ``gather_ms`` the same host slices + copies without split and scatter
    (``bank.fetch``), ``contig_ms`` one ``device_put`` of m contiguous rows from the same memory kind (the bandwidth
    floor). install − gather = split + scatter (grows with C if the scatter copies the buffers); gather − contig =
    cost of per-row in-jit copies. Uses a throwaway cache (slot contents become garbage); m = 0: nothing."""
    if m == 0:
        return {}
    cache = X.LayerCache(bank, slots, "lru")
    host = jax.sharding.SingleDeviceSharding(bank.device, memory_kind=bank.memory_kind)
    contig = jax.device_put(np.zeros((m, bank.expert_nbytes), np.uint8), host)
    rng = np.random.default_rng(7 * slots + m)
    out = {k: [] for k in ("install_ms", "install_disp_ms", "gather_ms", "contig_ms")}
    for i in range(warmup + steps):
        idx = np.array([rng.choice(bank.n_experts, m, replace=False), rng.choice(slots, m, replace=False)], np.int32)
        t0 = time.perf_counter()
        bufs = X._gather_install(cache.buffers, bank.stacked, idx, specs=cache._specs)
        t1 = time.perf_counter()
        cache.buffers = jax.block_until_ready(bufs)
        t2 = time.perf_counter()
        jax.block_until_ready(bank.fetch(idx[0].tolist()))
        t3 = time.perf_counter()
        jax.block_until_ready(jax.device_put(contig, bank.device_sharding))
        t4 = time.perf_counter()
        if i >= warmup:
            for k, v in zip(out, (t2 - t0, t1 - t0, t3 - t2, t4 - t3)):
                out[k].append(v * 1e3)
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        txt = X._gather_install.lower(cache.buffers, bank.stacked, idx, specs=cache._specs).compile().as_text()
        path = os.path.join(hlo_dir, f"gather_install_{bank.expert_nbytes}B_C{slots}_m{m}.txt")
        with open(path + ".tmp", "w") as fh:
            fh.write(txt)
        os.replace(path + ".tmp", path)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real-shapes", action="store_true", help="Nemotron-H expert shapes (else small, same pytrees)")
    ap.add_argument("--slots", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--misses", type=int, nargs="+", default=[0, 1, 2, 6])
    ap.add_argument("--banks", nargs="+", default=["bf16", "q5"], choices=["bf16", "q5"])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", help="JSON-lines file (appended atomically)")
    ap.add_argument("--profile", help="write a cProfile text profile of all timed cached_moe calls here")
    ap.add_argument("--no-device-split", action="store_true", help="skip the install's device-side split")
    ap.add_argument("--dump-hlo", metavar="DIR", help="write the compiled install programs at the largest C here")
    a = ap.parse_args(argv)
    if any(not 0 <= m <= a.top_k for m in a.misses) or any(not a.top_k <= c <= a.experts for c in a.slots):
        raise ValueError(f"need 0 <= misses <= top_k={a.top_k} and top_k <= slots <= experts={a.experts}")
    shapes = REAL if a.real_shapes else SMALL
    dev = jax.devices()[0]
    meta = {"kind": "host_diag", **code_version(), "jax": jax.__version__, "device": dev.device_kind,
            "platform": dev.platform, "experts": a.experts, "top_k": a.top_k, "shapes": shapes,
            "real_shapes": a.real_shapes, "steps": a.steps, "policy": "lru", "transfer": "stacked-jit", "note": NOTE,
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    prof = cProfile.Profile() if a.profile else None
    t_start = time.perf_counter()
    rows = []
    print(f"# {NOTE}\n# device {dev.device_kind} ({dev.platform}), shapes {shapes}, medians over {a.steps} steps (µs; "
          "ready columns ms)")
    head = ["bank", "C", "m", *PIECES, "ens_rdy_ms", "cmp_rdy_ms", "cmp_dev_ms", "asarray_us"]
    if not a.no_device_split:
        head += ["install_ms", "inst_disp_ms", "gather_ms", "contig_ms"]
    print(" ".join(f"{h:>11}" for h in head))
    for bank_name in a.banks:
        bank = make_bank(bank_name, a.experts, shapes["D"], shapes["F"])
        for c in a.slots:
            for m in a.misses:
                r = measure(bank, c, m, a.top_k, a.steps, a.warmup, shapes["D"], prof)
                if not a.no_device_split:
                    hlo = a.dump_hlo if c == max(a.slots) else None
                    r.update(device_split(bank, c, m, a.steps, a.warmup, hlo))
                rows.append({**meta, "bank": bank_name, "slots": c, "misses_per_step": m,
                             "expert_bytes": bank.expert_nbytes, **r})
                vals = [bank_name, c, m, *(f"{r[p + '_us']:.1f}" for p in PIECES),
                        *(f"{r[k]:.3f}" for k in ("ensure_ready_ms", "compute_ready_ms", "compute_ready_dev_ids_ms")),
                        f"{r['asarray_us']:.1f}"]
                if "install_ms" in r:
                    vals += [f"{r[k]:.3f}" for k in ("install_ms", "install_disp_ms", "gather_ms", "contig_ms")]
                print(" ".join(f"{v:>11}" for v in vals), flush=True)
        del bank
    print(f"# wall {time.perf_counter() - t_start:.1f} s")
    if a.out:
        append_jsonl(a.out, rows)
    if prof is not None:
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("tottime").print_stats(40)
        st.sort_stats("cumulative").print_stats(40)
        tmp = f"{a.profile}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
