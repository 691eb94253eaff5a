"""Batch-1 decode through host-offloaded expert caches vs all-resident experts (Nemotron-H shapes, random weights).

    PYTHONPATH=. python3 experiments/bench_offload.py --config configs/offload_h200.toml --out $OUT/offload.jsonl \
        --trace $OUT/offload_trace.jsonl                                     # H200, MoE layers only, < 4 min
    PYTHONPATH=. python3 experiments/bench_offload.py --config configs/offload_h200_full.toml --out $OUT/full.jsonl
                                                                            # H200, full 52-layer model
    python -m experiments.bench_offload --out results/offload.jsonl --plot results/offload.png --plot-only
    python -m experiments.bench_offload --tiny --out /tmp/offload_tiny.jsonl    # CPU smoke (add --model full)

Two models (``model`` in the config):
- ``moe_only``: the 23 MoE layers of Nemotron-3-Nano-30B-A3B at real shapes (128 experts, up 1856×2688 + down
  2688×1856, relu², sigmoid top-6 router, scale 2.5) with pre-RMS-norm residuals — no Mamba/attention/shared
  expert: isolates the cache. All-resident baselines: one jitted call per token (primary) and the cached loop's
  per-layer calls without the cache ("eager", the bit-exact reference).
- ``full``: the whole hybrid model (``models.nemotron_h``, random weights, KV + SSM caches) driven through
  ``offload.nemotron.OffloadedNemotronH``; all-resident baseline: the same segmented forward with every expert on the
  device (``offload=None``; the bit-exact reference); with ``full_one_jit`` also ``models.nemotron_h.forward`` as one
  jit (primary then; compiling the 52-layer model twice per bank precision takes minutes).
``speculative`` (sweepable, default [false]): the cached loop runs all MoE layers of a token in one jitted call and
reads routing once per token. moe_only: rolling back at the first layer that missed, pipelined by one token (the next
token's call is dispatched before this token's routing is read; ``offload.moe_stack``); full: the forward dispatched
as a chain of the per-layer path's own calls with no read in between, resumed on the per-layer path at the first MoE
layer that missed, pipelined by one token through ``OffloadedNemotronH.decode``, backing off to the per-layer path
after missed chains (``OffloadConfig.speculative_backoff``, default cap 64; ``offload.nemotron``: exact by
construction); rows carry
``speculative``, ``host_reads_per_token``, ``spec_accepts`` / ``spec_rollbacks`` / ``spec_discarded`` (in-flight
next-token calls thrown away after a rollback). The ``nomiss`` row is the one the 10%-of-all-resident target is about
(``resident_over_cached`` ≥ 0.9): routing restricted to C experts per layer, all of them preloaded into every layer
before the warm-up (``OffloadedMoE.preload``, the caches' install path), and the run raises unless its timed window
had zero misses, rollbacks and discarded calls (``check_miss_free``), for the per-layer and the speculative loop
alike. Its moe_only speculative row also carries ``spec_pass_ms``, the same passes chained with no host read or
policy work (the loop's device-side floor: the gap to ``ms_per_token`` is host time not hidden, the gap to the
resident one-jit is the pass's own device cost). With random routing nearly every token misses somewhere and
speculation costs wasted passes. Resident rows carry ``variants_exact``: whether each all-resident variant equals the
reference bit for bit (the one-jit fuses across layers; where it does not match, fusion changed rounding on that
device).
``transfer`` (sweepable, default ["stacked-jit"]; ``--transfer rows|stacked-jit|both``): the banks' host→device path
(``offload.bank``): "rows" = one ``device_put`` of per-expert host rows + one jitted install per layer with misses;
"stacked-jit" = each layer's bank as ONE pinned-host [E, expert_nbytes] array, misses copied and installed by ONE
jitted, donated program (in-jit dynamic_slice + device_put per miss). Banks are rebuilt per transfer (same bytes; one
set of pinned banks at a time); every nomiss / decode / transfer_probe row carries ``transfer`` (resident and replay
rows: null, they move nothing). Per transfer a ``transfer_probe`` row first times the miss path alone on layer 0's
bank: ``ensure`` of top_k experts that all miss, waited for, median over 2×tokens calls (``ms_per_miss``), next to
``contiguous_ms_per_expert``: one device_put of a contiguous pinned buffer of the same bytes (the bandwidth floor
measured in the same run). Before JAX takes the device, a subprocess runs a small stacked-jit check
(``--preflight-stacked``: every padded length on a 4-slot cache, slot bytes vs numpy), so an XLA abort cannot kill the
run. A transfer other than "rows" whose preflight, bank build or probe fails (e.g. XLA cannot compile the in-jit host
gather on this backend) gets a probe row with ``ok: false`` and the error, is skipped, and the run exits with status 1
after finishing the others. Rows are appended as they are measured (a time limit loses none already taken). Expected on the H200: stacked-jit's
``eff_ms_per_miss`` (C = 8 decode rows) and probe ``ms_per_miss`` closer to the raw PCIe time than rows' (target
≤ 1.3× raw: 0.165 ms per Q5 expert). Unknown until then: whether XLA GPU copies each dynamic slice of the host array
with a DMA or reads it with a kernel over PCIe (slower per byte; compare with ``contiguous_ms_per_expert``).
Timing: per variant, ``warmup`` tokens, then ``tokens`` tokens timed as one decode run waited for at its end
(ms/token = wall / tokens); in the MoE-only model each token's input carries the previous token's output
(``moe_stack.token_input``: its fixed random embedding + rms(previous output) / 16 — a real dependency that keeps
routing as random as independent tokens), so loops that do not sync per token (all-resident one jit, pipelined
speculative) overlap host dispatch with device work, and the pipelined loop cannot run ahead of the data.
The host banks hold ``unique_experts`` distinct random expert tensors repeated over all layer×expert entries (same
bytes moved per miss; generating 58.75 GB of distinct random numbers would take minutes).

Noise: the segmented loops are host-dispatch-heavy, and on the H200's host their ms/token moves by up to 2× between
runs; ``resident_repeats`` times the all-resident baselines and the no-miss rows that many times (fresh caches each
time) and reports the median (``ms_per_token_repeats`` holds all); the first transfer path's no-miss repeats are each
preceded by a timing of the restricted all-resident loop, and their ``resident_over_cached`` is the median of those
paired ratios (``paired_resident_ms``, ``paired_ratios``), with ``ratio_ci95``: a percentile-bootstrap 95% interval of
that median (``median_ci``; null under 3 pairs). Decode rows: ``decode_repeats`` timings (fresh caches each), the
median run reported; with ``paired_decode`` each is preceded by a no-miss run of the same loop at the SAME cache size
(restricted routing, preloaded, checked miss-free), and ``eff_ms_per_miss_paired`` is the median over repeats of
(decode − its no-miss) / misses per token (``eff_ms_per_miss_pairs``, ``paired_nomiss_ms``, and its ``_ci95``) — the
per-miss cost with the host's drift between rows cancelled, where ``eff_ms_per_miss`` subtracts the one no-miss row of
the smallest C timed minutes earlier. Every timed row also carries ``host_ms_per_token``: host time until the decode
loop returned, before waiting for the device (≈ ms/token: host-bound).

Each run appends JSON lines (resolved config, git SHA, jax version, device, metrics) to ``--out``. Every cached run
checks that its outputs equal the all-resident reference bit for bit (``exact``). Derived: effective cost per miss = (ms/token at cache C −
ms/token of the same cached loop with no misses) / misses per token, next to the raw PCIe time of one expert.

What random-weight hit rates mean: a random router spreads tokens nearly uniformly over experts, so LRU hits ≈ C/E
— the pessimistic end. They do NOT predict hit rates on real text, where routing is skewed and temporally local
(published real-trace LRU hit rates at C = E/2 are ~70–80%, Belady 5–12 points higher). The timings per miss and the
no-miss overhead are what transfer to real models; for real hit rates, record a trace from a trained model and
replay it (python -m experiments.replay_trace).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from typing import NamedTuple

import jax
import numpy as np

from hlwq_jax.offload import policy as P
from hlwq_jax.offload.bank import TRANSFERS
from hlwq_jax.offload.expert_cache import LayerCache
from hlwq_jax.offload import trace as T
from hlwq_jax.offload.harness import FullModelHarness, MoEOnlyHarness
from hlwq_jax.provenance import code_version

CAVEAT = ("random weights route near-uniformly: hit rates here are ~C/E (pessimistic) and do not represent real-text "
          "routing; per-miss cost and no-miss overhead do transfer to real models")
RAW_PCIE_MS = {"bf16": 0.37, "q5": 0.127}  # measured one-expert host->device times on the H200 (docs/offload.md)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "moe_only"  # "moe_only" | "full"
    layers: int = 23  # moe_only: MoE layers; full: taken from the model config
    experts: int = 128
    hidden: int = 2688
    inter: int = 1856
    top_k: int = 6
    tiny_model: bool = False  # full: a tiny Nemotron-H config instead of Nano-30B (CPU smoke)
    full_one_jit: bool = False  # full: also time models.nemotron_h.forward as one jit (slow to compile) as baseline
    slots: tuple[int, ...] = (8, 16, 32, 64)
    banks: tuple[str, ...] = ("bf16", "q5")
    policies: tuple[str, ...] = ("lru",)
    prefetch: tuple[bool, ...] = (False,)
    speculative: tuple[bool, ...] = (False,)  # one speculative call + one host read per token
    transfer: tuple[str, ...] = ("stacked-jit",)  # host->device path of the banks (bank.TRANSFERS)
    prompt: int = 8  # full: prefill length before decoding
    tokens: int = 32
    warmup: int = 16
    unique_experts: int = 8
    q_block: int = 128
    replay_policies: tuple[str, ...] = P.POLICIES
    resident_repeats: int = 1  # all-resident and no-miss rows: timed this many times, median reported (noisy loops)
    decode_repeats: int = 1  # decode rows: timed this many times (fresh caches), the median run reported
    paired_decode: bool = False  # before each decode repeat, a no-miss run at the same C: paired per-miss estimates
    seed: int = 0

    @classmethod
    def tiny(cls, model: str = "moe_only") -> "BenchConfig":
        return cls(model=model, layers=2, experts=8, hidden=64, inter=48, top_k=2, tiny_model=True, slots=(2, 4),
                   prompt=3, tokens=4, warmup=2, unique_experts=3, q_block=32)

    @classmethod
    def load(cls, path: str) -> "BenchConfig":
        with open(path, "rb") as f:
            d = tomllib.load(f)
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - fields)
        if bad:
            raise ValueError(f"{path}: unknown key(s) {bad}; known: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def device_memory() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def time_run(run, warmup: int, tokens: int, at_warm=None, timing: dict | None = None):
    """Decode ``warmup`` tokens (compiles, warms the caches), call ``at_warm()``, then time ``tokens`` more as ONE
    run waited for at its end (batch-1 decode: each token depends on the previous one; loops that do not sync per
    token overlap host and device work, as a real decode loop does). Returns ms/token over the timed run and its
    outputs (host numpy); ``timing`` (a dict) receives ``host_ms_per_token``: the host time until the run returned,
    before waiting for the device (close to ms/token: the loop is host-bound; well below: device-bound)."""
    jax.block_until_ready(run(0, warmup))
    if at_warm is not None:
        at_warm()
    t0 = time.perf_counter()
    outs = run(warmup, tokens)
    t1 = time.perf_counter()
    outs = jax.block_until_ready(outs)
    ms = (time.perf_counter() - t0) * 1e3 / tokens
    if timing is not None:
        timing["host_ms_per_token"] = (t1 - t0) * 1e3 / tokens
    return ms, [np.asarray(o) for o in outs]


def median_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile-bootstrap interval [lo, hi] of the median of ``values`` (None for fewer than 3 values)."""
    v = np.asarray(values, np.float64)
    if v.size < 3:
        return None
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, (n_boot, v.size))], axis=1)
    a = (1 - level) / 2
    return [float(np.quantile(meds, a)), float(np.quantile(meds, 1 - a))]


def time_resident(run, cfg):
    """``time_run`` of an all-resident variant ``cfg.resident_repeats`` times (each from the start: prefill and
    warm-up again); → (median ms/token, outputs, {"ms_per_token_repeats": [...], "host_ms_per_token": median})."""
    ms, hosts, outs = [], [], None
    for _ in range(cfg.resident_repeats):
        timing = {}
        m, outs = time_run(run, cfg.warmup, cfg.tokens, timing=timing)
        ms.append(m)
        hosts.append(timing["host_ms_per_token"])
    return float(np.median(ms)), outs, {"ms_per_token_repeats": ms, "host_ms_per_token": float(np.median(hosts))}


class Measured(NamedTuple):
    """One timed decode run of a cached model (``measure_cached``)."""
    ms: float  # ms/token
    outs: list  # host logits per timed token
    stats: list  # per-layer LayerStats of the timed tokens
    spec: object  # the stack's SpecStats of the timed tokens
    memory: dict  # device memory after the run
    host_ms: float  # host ms/token until the run returned


def cached_ready(h, slots, policy, prefetch, restricted=False, speculative=False):
    """``h.cached(...)`` with the install program compiled and, ``restricted``, the routable experts preloaded into
    every layer (through the caches' install path, so that no token can miss) → (run, OffloadedMoE)."""
    run, moe = h.cached(slots, policy, prefetch, restricted, speculative)
    moe.caches[0].precompile()  # install shapes are shared by all layers
    if restricted:
        moe.preload(h.restricted_experts)
    return run, moe


def measure_cached(h, cfg, slots, policy, prefetch, restricted=False, speculative=False) -> Measured:
    """Warm up, then time ``cfg.tokens`` decode tokens of a fresh ``cached_ready`` model; stats (per layer, and the
    stack's ``SpecStats``) cover the timed tokens only. The model is dropped on return: each holds C slots per layer
    on the device (3.7 GB for bf16 at C = 8), and repeats must not pile them up."""
    run, moe = cached_ready(h, slots, policy, prefetch, restricted, speculative)
    t_warm, timing = [], {}
    ms, outs = time_run(run, cfg.warmup, cfg.tokens,
                        at_warm=lambda: t_warm.extend([moe.stats(), dataclasses.replace(moe.spec)]), timing=timing)
    end = moe.stats()
    st = [dataclasses.replace(b, **{f.name: getattr(b, f.name) - getattr(a, f.name)
                                    for f in dataclasses.fields(b)}) for a, b in zip(t_warm[0], end)]
    return Measured(ms, outs, st, moe.spec.minus(t_warm[1]), device_memory(), timing["host_ms_per_token"])


def spec_fields(speculative, sp, tokens) -> dict:
    """Row fields of the stack counters: host reads per token, speculative accepts / rollbacks / discarded in-flight
    calls."""
    return {"speculative": speculative, "host_reads": sp.host_reads, "host_reads_per_token": sp.host_reads / tokens,
            "read_s": sp.read_s, "spec_accepts": sp.accepts, "spec_rollbacks": sp.rollbacks,
            "spec_resumed_layers": sp.resumed_layers, "spec_discarded": sp.discarded}


def check_miss_free(what: str, stats, sp) -> None:
    """Raise RuntimeError unless a no-miss run really had no miss, no rollback and no discarded call (per-layer
    stats and ``SpecStats`` of its timed window; a miss there would bill a transfer, and for speculative decode a
    rollback with ~L host reads, to the 'no-miss' row)."""
    miss = sum(s.misses for s in stats)
    if miss or sp.rollbacks or sp.discarded or sp.resumed_layers:
        raise RuntimeError(f"{what}: the no-miss run was not miss-free in its timed window ({miss} misses, "
                           f"{sp.rollbacks} rollbacks, {sp.discarded} discarded calls, {sp.resumed_layers} resumed "
                           "layers): the restricted routing left the preloaded experts")


def exact(outs, ref) -> bool:
    return len(outs) == len(ref) and all(np.array_equal(a, b) for a, b in zip(outs, ref))


def max_abs_diff(outs, ref) -> float:
    """Largest |out − ref| over all outputs (float32): how far from bit-exact a run that is not exact is."""
    return max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))) for a, b in zip(outs, ref))


def transfer_probe(h, cfg, precision) -> dict:
    """The miss path alone on layer 0's bank (current transfer): a fresh C = min(slots) LRU cache, ``ensure`` of
    m = min(top_k, C) experts that all miss (disjoint groups cycling through E), each call waited for; median ms per
    call over 2×tokens calls after 3 warm calls. Also the bandwidth floor: one device_put of one contiguous pinned
    host buffer of m experts' bytes, median over as many calls."""
    bank, c = h.banks[0], min(cfg.slots)
    m = min(h.top_k, c)
    groups = [list(range(i, i + m)) for i in range(0, h.n_experts - m + 1, m)]
    if (len(groups) - 1) * m < c:
        raise ValueError(f"transfer probe: {h.n_experts} experts too few for all-miss groups of {m} on {c} slots")
    cache = LayerCache(bank, c, "lru")
    cache.precompile()
    n, times = 2 * cfg.tokens, []
    for i in range(3 + n):
        t0 = time.perf_counter()
        cache.ensure(groups[i % len(groups)])
        jax.block_until_ready(cache.buffers)
        times.append(time.perf_counter() - t0)
    if cache.stats.misses != (3 + n) * m:
        raise RuntimeError(f"transfer probe: {cache.stats.misses} misses, expected {(3 + n) * m}")
    host = jax.sharding.SingleDeviceSharding(bank.device, memory_kind=bank.memory_kind)
    flat = jax.device_put(np.zeros((m, bank.expert_nbytes), np.uint8), host)
    floor = []
    for _ in range(3 + n):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(flat, bank.device_sharding))
        floor.append(time.perf_counter() - t0)
    ms = float(np.median(times[3:])) * 1e3
    return {"kind": "transfer_probe", "bank": precision, "transfer": bank.transfer, "slots": c, "misses_per_call": m,
            "calls": n, "ms_per_call": ms, "ms_per_miss": ms / m, "transfers": cache.stats.transfers,
            "pad_rows": cache.stats.pad_rows,
            "contiguous_ms_per_expert": float(np.median(floor[3:])) * 1e3 / m,
            "raw_pcie_ms_per_miss": RAW_PCIE_MS.get(precision), "expert_bytes": bank.expert_nbytes, "ok": True}


def preflight_stacked() -> None:
    """End-to-end check of the stacked-jit path at small shapes on this backend: a bank of 8 random bf16 experts, a
    4-slot cache, every padded length 1..4 through ``ensure`` and a prefetch; slot bytes against the numpy rows
    (``expert_row``). Raises RuntimeError on a mismatch."""
    import jax.numpy as jnp

    from hlwq_jax.offload.bank import HostBank, expert_row

    rng = np.random.default_rng(0)
    w = {"up_proj": rng.standard_normal((8, 16, 32)), "down_proj": rng.standard_normal((8, 32, 16))}
    w = {k: np.asarray(jnp.asarray(v, jnp.bfloat16)) for k, v in w.items()}
    bank = HostBank(w, transfer="stacked-jit")
    want = [expert_row([w["down_proj"][e], w["up_proj"][e]]) for e in range(8)]  # fields in sorted leaf order
    cache = LayerCache(bank, 4, "lru")
    cache.precompile()
    for step in ([0, 1, 2], [3, 4, 5, 6], [7], [0, 1]):
        cache.ensure(step)
    cache.prefetch([5])
    cache.ensure([5])
    got = np.concatenate([np.asarray(b).view(np.uint8).reshape(4, -1) for b in cache.buffers], axis=1)
    bad = [e for e, s in cache.slot_of.items() if not np.array_equal(got[s], want[e])]
    if bad or cache.stats.misses != 11 or cache.stats.prefetched != 1:
        raise RuntimeError(f"stacked-jit preflight: wrong slot bytes for experts {bad} ({cache.stats})")
    print(f"stacked-jit preflight ok on {jax.devices()[0].device_kind}", flush=True)


def run_preflight_stacked() -> str | None:
    """Run ``preflight_stacked`` in a subprocess (an abort inside XLA cannot take the benchmark down; no GPU memory
    preallocated); None if it passed, else its exit status and output."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    try:
        p = subprocess.run([sys.executable, "-m", "experiments.bench_offload", "--preflight-stacked"], cwd=repo,
                           env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        return f"preflight timed out after {e.timeout} s"
    print(p.stdout.strip(), flush=True)
    return None if p.returncode == 0 else f"exit status {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-6000:]}"


def bench_precision(cfg, precision, key, meta, recorder, failed: list):
    """All rows of one bank precision, yielded in batches as they are measured (the caller appends each batch to
    the results file, so a later crash keeps them): the resident baselines, then per transfer path its probe, no-miss
    and decode rows. A non-"rows" transfer whose bank build or probe raises is recorded (``ok: false``), skipped and
    appended to ``failed``."""
    rows, t0 = [], time.perf_counter()
    h = (MoEOnlyHarness if cfg.model == "moe_only" else FullModelHarness)(cfg, precision, key, cfg.transfer[0])
    pinned = sum(b.nbytes for b in h.banks)
    ebytes = h.banks[0].expert_nbytes
    n_layers = len(h.banks)
    print(f"[{precision}] {n_layers} banks: {pinned / 1e9:.2f} GB pinned host, {ebytes / 1e6:.2f} MB/expert, "
          f"setup {time.perf_counter() - t0:.1f} s", flush=True)
    ref, paired = {}, []
    for restricted in (False, True):
        name = "restricted" if restricted else "random"
        variants, vouts, extra = {}, {}, {}
        for vname, run, is_ref in h.resident(restricted):
            variants[vname], vouts[vname], extra[vname] = time_resident(run, cfg)
            if is_ref:
                ref[name] = vouts[vname]
            if restricted and not paired:
                paired.append(run)  # the primary restricted baseline, re-timed beside each no-miss repeat
        primary = next(iter(variants))
        rows.append({**meta, "kind": "resident", "bank": precision, "routing": name, "baseline": primary,
                     "transfer": None,
                     "ms_per_token": variants[primary], "tok_s": 1e3 / variants[primary],
                     "ms_per_token_variants": variants,
                     "variants_exact": {v: exact(o, ref[name]) for v, o in vouts.items()},
                     "ms_per_token_repeats": extra[primary]["ms_per_token_repeats"],
                     "host_ms_per_token": extra[primary]["host_ms_per_token"],
                     "device_memory": device_memory(), "pinned_host_bytes": pinned})
        del vouts
        print(f"[{precision}] all-resident {name}: " + ", ".join(
            f"{k} {v:.2f} ms/tok (repeats {', '.join(f'{m:.2f}' for m in extra[k]['ms_per_token_repeats'])}; host "
            f"{extra[k]['host_ms_per_token']:.2f})" for k, v in variants.items()),
              flush=True)
    del run
    if recorder is not None:
        h.record(recorder)
    res = rows[1]["ms_per_token"]
    yield rows
    for transfer in cfg.transfer:
        t1 = time.perf_counter()
        try:
            h.use_transfer(transfer)
            probe = transfer_probe(h, cfg, precision)
        except Exception as e:  # noqa: BLE001 — recorded, reported, and the run exits 1 (never hidden)
            if transfer == "rows":
                raise
            failed.append(f"{precision}/{transfer}")
            print(f"[{precision}] TRANSFER {transfer} FAILED, skipped: {type(e).__name__}: {str(e)[:1000]}",
                  flush=True)
            yield [{**meta, "kind": "transfer_probe", "bank": precision, "transfer": transfer, "ok": False,
                    "error": f"{type(e).__name__}: {e}"[:4000]}]
            continue
        print(f"[{precision}] transfer {transfer}: banks + probe {time.perf_counter() - t1:.1f} s; miss path "
              f"{probe['ms_per_miss']:.3f} ms/miss ({probe['misses_per_call']} misses per call), contiguous "
              f"device_put {probe['contiguous_ms_per_expert']:.3f} ms/expert, raw {RAW_PCIE_MS.get(precision)}",
              flush=True)
        yield [{**meta, **probe}]
        yield from bench_transfer(h, cfg, precision, meta, ref, res, paired)
        paired.clear()  # the first transfer's no-miss rows are paired; the all-resident experts are freed after them
        h.drop_resident()
        gc.collect()


def time_decode(h, cfg, precision, slots, policy, prefetch, spec):
    """``cfg.decode_repeats`` decode timings (fresh caches each), each after a no-miss run at the same C when
    ``cfg.paired_decode`` (module docstring). Returns (the median run's ``Measured``, row fields:
    ``ms_per_token_repeats`` and the paired estimates)."""
    runs, base = [], []
    for _ in range(cfg.decode_repeats):
        if cfg.paired_decode:
            b = measure_cached(h, cfg, slots, policy, prefetch, restricted=True, speculative=spec)
            check_miss_free(f"[{precision}] paired C={slots}", b.stats, b.spec)
            base.append(b.ms)
        runs.append(measure_cached(h, cfg, slots, policy, prefetch, speculative=spec))
    rep_ms = [r.ms for r in runs]
    fields = {"ms_per_token_repeats": rep_ms}
    if cfg.paired_decode:
        pairs = [(r.ms - b) / (sum(x.misses for x in r.stats) / cfg.tokens) for r, b in zip(runs, base)
                 if sum(x.misses for x in r.stats)]
        fields.update(paired_nomiss_ms=base, eff_ms_per_miss_pairs=pairs,
                      eff_ms_per_miss_paired=float(np.median(pairs)) if pairs else float("nan"),
                      eff_ms_per_miss_paired_ci95=median_ci(pairs))
    return runs[int(np.argsort(rep_ms)[len(runs) // 2])], fields


def bench_transfer(h, cfg, precision, meta, ref, res, paired=()):
    """The no-miss and decode rows of one bank precision on ``h``'s current transfer path, yielded one by one as
    they are measured (one-row lists: the caller appends each, so a time limit loses none already taken; ``ref``:
    reference outputs per routing; ``res``: resident ms/token with restricted routing; ``paired``: [the restricted all-resident run] or
    empty — if given, each no-miss repeat is preceded by a timing of it, and ``resident_over_cached`` is the median
    of the per-repeat ratios, so that slow drifts of the host's speed cancel)."""
    rows, c0, nomiss, transfer = [], min(cfg.slots), {}, h.transfer
    pinned, ebytes, n_layers, top_k = sum(b.nbytes for b in h.banks), h.banks[0].expert_nbytes, len(h.banks), h.top_k
    for spec in cfg.speculative:
        reps, ratios, paired_ms = [], [], []  # repeated like the resident baseline (fresh caches), median reported
        if paired:  # untimed: in 6 of 7 H200 runs the first no-miss timing after the resident runs was the slowest
            measure_cached(h, cfg, c0, "lru", False, restricted=True, speculative=spec)
        for _ in range(cfg.resident_repeats):
            if paired:
                paired_ms.append(time_run(paired[0], cfg.warmup, cfg.tokens)[0])
            reps.append(measure_cached(h, cfg, c0, "lru", False, restricted=True, speculative=spec))
            if paired:
                ratios.append(paired_ms[-1] / reps[-1].ms)
            check_miss_free(f"[{precision}] C={c0}{' speculative' if spec else ''}", reps[-1].stats, reps[-1].spec)
        order = np.argsort([r.ms for r in reps])
        nomiss[spec], outs, st, sp, mem, host_ms = reps[int(order[len(reps) // 2])]
        rep_ms = [r.ms for r in reps]
        del reps
        miss = sum(s.misses for s in st)
        floor = {}
        if spec and cfg.model == "moe_only":  # device-only floor: the same passes chained, no reads / policies
            _, moe = cached_ready(h, c0, "lru", False, restricted=True, speculative=spec)
            floor["spec_pass_ms"], pass_outs = time_run(h.speculative_pass(moe), cfg.warmup, cfg.tokens)
            floor["spec_pass_exact"] = exact(pass_outs, ref["restricted"])
            del moe
        rows.append({**meta, "kind": "nomiss", "bank": precision, "transfer": transfer, "slots": c0,
                     "ms_per_token": nomiss[spec], "tok_s": 1e3 / nomiss[spec], "host_ms_per_token": host_ms,
                     "ms_per_token_repeats": rep_ms, "misses": miss,
                     "exact": exact(outs, ref["restricted"]), "max_abs_diff": max_abs_diff(outs, ref["restricted"]),
                     "resident_over_cached": float(np.median(ratios)) if ratios else res / nomiss[spec],
                     "paired_resident_ms": paired_ms, "paired_ratios": ratios, "ratio_ci95": median_ci(ratios),
                     "device_memory": mem,
                     "pinned_host_bytes": pinned, **floor, **spec_fields(spec, sp, cfg.tokens)})
        print(f"[{precision}] {transfer} cached C={c0}{' speculative' if spec else ''}, no misses ({miss}): "
              f"{nomiss[spec]:.2f} ms/tok (host {host_ms:.2f}), {sp.host_reads / cfg.tokens:.1f} host reads/tok; "
              f"resident / cached = "
              f"{rows[-1]['resident_over_cached']:.3f}"
              + (" (95% CI {:.3f}–{:.3f})".format(*rows[-1]["ratio_ci95"]) if rows[-1]["ratio_ci95"] else "")
              + (f" (bare speculative passes: {floor['spec_pass_ms']:.2f} ms/tok)" if floor else ""), flush=True)
        yield [rows[-1]]
    for slots, policy, prefetch, spec in ((c, p, f, s) for c in cfg.slots for p in cfg.policies for f in cfg.prefetch
                                          for s in cfg.speculative):
        if not top_k <= slots <= h.n_experts:
            continue
        (ms, outs, st, sp, mem, host_ms), paired_fields = time_decode(h, cfg, precision, slots, policy, prefetch,
                                                                      spec)
        acc = sum(s.hits + s.misses for s in st)
        miss = sum(s.misses for s in st)
        mpt = miss / cfg.tokens
        cost = (ms - nomiss[spec]) / mpt if mpt else float("nan")
        rows.append({**meta, "kind": "decode", "bank": precision, "transfer": transfer, "slots": slots,
                     "policy": policy,
                     "prefetch": prefetch, "ms_per_token": ms, "tok_s": 1e3 / ms, "host_ms_per_token": host_ms,
                     "accesses": acc, "misses": miss, "hit_rate": 1 - miss / acc, "misses_per_token": mpt,
                     "bytes_moved": sum(s.bytes_moved for s in st),
                     "transfers": sum(s.transfers for s in st), "wait_s": sum(s.wait_s for s in st),
                     "prefetched": sum(s.prefetched for s in st), "pad_rows": sum(s.pad_rows for s in st),
                     "exact": exact(outs, ref["random"]),
                     "eff_ms_per_miss": cost, "raw_pcie_ms_per_miss": RAW_PCIE_MS.get(precision),
                     "expert_bytes": ebytes, "slot_bytes": n_layers * slots * ebytes,
                     "device_memory": mem, "pinned_host_bytes": pinned, "note": CAVEAT, **paired_fields,
                     **spec_fields(spec, sp, cfg.tokens)})
        r = rows[-1]
        print(f"[{precision}] {transfer} C={slots:>3} {policy}{' +prefetch' if prefetch else ''}"
              f"{' +speculative' if spec else ''}: {ms:7.2f} ms/tok "
              f"({1e3 / ms:6.1f} tok/s), hit {r['hit_rate']:.3f}, {mpt:.1f} misses/tok, {cost:.3f} ms/miss "
              + (f"(paired {r['eff_ms_per_miss_paired']:.3f}"
                 + (" CI {:.3f}–{:.3f}".format(*r["eff_ms_per_miss_paired_ci95"])
                    if r["eff_ms_per_miss_paired_ci95"] else "") + ") " if cfg.paired_decode else "")
              + f"(raw {RAW_PCIE_MS.get(precision)}), exact={r['exact']}"
              + (f", accepts {sp.accepts} / rollbacks {sp.rollbacks} / discarded {sp.discarded}" if spec else ""),
              flush=True)
        yield [r]


def replay_rows(cfg, records, meta) -> list[dict]:
    """Hit rates of every policy on the recorded trace, counted over the timed tokens only (the prompt and the
    warm-up tokens warm the caches), like the measured rows."""
    rows = []
    start = cfg.warmup + (cfg.prompt if cfg.model == "full" else 0)
    k = max(len(r.experts) for r in records)
    for slots in cfg.slots:
        for policy in cfg.replay_policies:
            if slots < k:
                continue
            layers = T.replay_records(records, policy, slots, count_from_pos=start)
            acc = sum(r.accesses for r in layers)
            mis = sum(r.misses for r in layers)
            rows.append({**meta, "kind": "replay", "transfer": None, "slots": slots, "policy": policy,
                         "accesses": acc, "misses": mis, "hit_rate": 1 - mis / acc, "note": CAVEAT})
    return rows


# ---- output --------------------------------------------------------------------------------------------------------
def append_jsonl(path: str, rows: list[dict]) -> None:
    """Append atomically: old content + new rows to a temp file, then os.replace."""
    old = open(path).read() if os.path.exists(path) else ""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench-", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(old + "".join(json.dumps(r) + "\n" for r in rows))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def plot(path_jsonl: str, path_png: str) -> None:
    """Tokens/s and hit rate vs cache size from the JSON lines (decode, resident and replay rows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(path_jsonl) if line.strip()]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for bank in sorted({r["bank"] for r in rows if r["kind"] == "decode"}):
        for r in rows:
            if r["kind"] == "resident" and r["bank"] == bank and r["routing"] == "random":
                a1.axhline(r["tok_s"], ls="--", lw=1, color="k" if bank == "bf16" else "gray",
                           label=f"all-resident {bank} ({r['config']['model']}, {r['baseline']})")
        def key(r):  # rows written before the transfer option have none: they used "rows"
            return r["policy"], r["prefetch"], r.get("speculative", False), r.get("transfer") or "rows"

        for k in sorted({key(r) for r in rows if r["kind"] == "decode"}):
            pol, pf, sp, tr = k
            d = sorted((r for r in rows if r["kind"] == "decode" and r["bank"] == bank and key(r) == k),
                       key=lambda r: r["slots"])
            lab = f"{bank} {pol}{' +prefetch' if pf else ''}{' +speculative' if sp else ''}" \
                  f"{'' if tr == 'rows' else ' [' + tr + ']'}"
            a1.plot([r["slots"] for r in d], [r["tok_s"] for r in d], "o--" if pf or sp else "o-", label=lab)
            if not pf and not sp and tr == "rows":  # hit rates do not depend on the transfer path
                a2.plot([r["slots"] for r in d], [r["hit_rate"] for r in d], "o-", label=f"measured {lab}")
    for pol in sorted({r["policy"] for r in rows if r["kind"] == "replay"}):
        d = sorted((r for r in rows if r["kind"] == "replay" and r["policy"] == pol), key=lambda r: r["slots"])
        a2.plot([r["slots"] for r in d], [r["hit_rate"] for r in d], ".:", label=f"replay {pol}")
    a1.set(xlabel="cache slots per layer", ylabel="decode tokens/s (batch 1)")
    a2.set(xlabel="cache slots per layer", ylabel="hit rate (random weights!)")
    slots = sorted({r["slots"] for r in rows if r["kind"] == "decode"})
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(slots, [str(c) for c in slots])
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle("Expert offload at Nemotron-H shapes, random weights (hit rates ~C/E, not real-text rates)",
                 fontsize=9)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path_png))
    fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=d)
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path_png)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="TOML file with BenchConfig fields (configs/offload_*.toml)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke shapes (overrides --config)")
    ap.add_argument("--model", choices=("moe_only", "full"), help="override the config's model")
    ap.add_argument("--speculative", choices=("false", "true", "both"), help="override the config's speculative")
    ap.add_argument("--transfer", choices=(*TRANSFERS, "both"), help="override the config's transfer")
    ap.add_argument("--decode-repeats", type=int, help="override the config's decode_repeats")
    ap.add_argument("--paired-decode", action="store_true", help="set the config's paired_decode")
    ap.add_argument("--out", help="JSON-lines results file (appended; required unless --preflight-stacked)")
    ap.add_argument("--trace", help="write the routing trace (first bank precision, all tokens) here")
    ap.add_argument("--plot", help="draw tokens/s and hit rate vs cache size from --out into this PNG")
    ap.add_argument("--plot-only", action="store_true", help="only draw --plot from an existing --out")
    ap.add_argument("--preflight-stacked", action="store_true",
                    help="only run the small stacked-jit check on this backend (main runs it in a subprocess)")
    a = ap.parse_args(argv)
    if a.preflight_stacked:
        preflight_stacked()
        return 0
    if not a.out:
        ap.error("--out is required")
    if a.plot_only:
        if not a.plot:
            raise ValueError("--plot-only needs --plot")
        plot(a.out, a.plot)
        return 0
    cfg = BenchConfig.tiny() if a.tiny else (BenchConfig.load(a.config) if a.config else BenchConfig())
    if a.model:
        cfg = dataclasses.replace(cfg, model=a.model)
    if a.speculative:
        cfg = dataclasses.replace(cfg, speculative={"false": (False,), "true": (True,), "both": (False, True)}
                                  [a.speculative])
    if a.transfer:
        cfg = dataclasses.replace(cfg, transfer=TRANSFERS if a.transfer == "both" else (a.transfer,))
    if a.decode_repeats is not None:
        cfg = dataclasses.replace(cfg, decode_repeats=a.decode_repeats)
    if a.paired_decode:
        cfg = dataclasses.replace(cfg, paired_decode=True)
    if not cfg.transfer or len(set(cfg.transfer)) != len(cfg.transfer) or set(cfg.transfer) - set(TRANSFERS):
        raise ValueError(f"config: transfer must be a non-empty list of distinct names from {list(TRANSFERS)}, got "
                         f"{cfg.transfer}")
    if not cfg.speculative:
        raise ValueError(f"config: speculative must be a non-empty list of booleans, got {cfg.speculative}")
    if cfg.model not in ("moe_only", "full") or min(cfg.unique_experts, cfg.tokens, cfg.warmup,
                                                    cfg.resident_repeats, cfg.decode_repeats) < 1:
        raise ValueError("config: model must be moe_only|full; unique_experts, tokens, warmup, resident_repeats and "
                         f"decode_repeats >= 1 (got {cfg})")
    requested = cfg
    preflight_error = run_preflight_stacked() if "stacked-jit" in cfg.transfer else None  # before JAX takes the GPU
    if preflight_error is not None:
        cfg = dataclasses.replace(cfg, transfer=tuple(t for t in cfg.transfer if t != "stacked-jit"))
        print(f"TRANSFER stacked-jit FAILED its preflight, skipped:\n{preflight_error[-3000:]}", flush=True)
    meta = {"config": dataclasses.asdict(requested), **code_version(), "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind), "model": cfg.model, "command": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"bench_offload on {meta['device']}: {cfg}\nnote: {CAVEAT}", flush=True)
    key = jax.random.PRNGKey(cfg.seed)
    recorder = T.TraceRecorder() if (a.trace or cfg.replay_policies) else None
    t0 = time.perf_counter()
    failed: list[str] = []
    if preflight_error is not None:
        failed.append("preflight/stacked-jit")
        append_jsonl(a.out, [{**meta, "kind": "transfer_probe", "bank": None, "transfer": "stacked-jit", "ok": False,
                              "preflight": True, "error": preflight_error[-4000:]}])
        if not cfg.transfer:
            print("nothing left to run", flush=True)
            return 1
    for i, precision in enumerate(cfg.banks):
        key, kp = jax.random.split(key)
        for batch in bench_precision(cfg, precision, kp, meta, recorder if i == 0 else None, failed):
            append_jsonl(a.out, batch)
        gc.collect()  # release this precision's pinned bank and device slots before the next one
    if recorder is not None and recorder.records():
        if a.trace:
            recorder.write(a.trace)
        append_jsonl(a.out, replay_rows(cfg, recorder.records(), meta))
    if a.plot:
        plot(a.out, a.plot)
    print(f"done in {time.perf_counter() - t0:.1f} s -> {a.out}", flush=True)
    print(f"note: {CAVEAT}", flush=True)
    if failed:
        print(f"FAILED transfer paths (probe rows with ok=false in {a.out}): {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
