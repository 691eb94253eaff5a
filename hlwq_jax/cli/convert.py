"""Streaming checkpoint conversion: HF safetensors → hlwq format or CompressedTensors INT4, tensor by tensor.

Memory: each tensor is read, quantized and written in row chunks of ≈ ``chunk_bytes`` (first axis: output rows of
a matrix, experts of a stacked [E, out, in] tensor), three at a time in a pipeline (read / quantize / write), so host
memory is bounded by a few chunks plus constants, never the model. Every output shard is laid out up front from the
plan (shapes follow from the source header), written through ``StreamWriter`` into ``*.partial`` and renamed when
complete. The plan (source headers + options) is fingerprinted; a re-run on the same DST skips shards already final
and produces byte-identical files (quantization is deterministic). ``hlwq_manifest.json`` is written last and marks
the output complete.

Pipeline: ``plan_conversion`` (pure: names, shapes, dtypes → shards) → ``convert_checkpoint`` (does the work).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hlwq_jax.ckpt import compressed_tensors as ct
from hlwq_jax.ckpt import hlwq_format as hfmt
from hlwq_jax.ckpt.streaming import (PARTIAL_SUFFIX, CheckpointIndex, StreamWriter, TensorInfo, read_header,
                                     read_rows, rows_per_chunk, write_json_atomic)
from hlwq_jax.quant.array import HLWQArray
from hlwq_jax.quant.hlwq import codebook_values, quantize

PLAN_FILE = ".hlwq_plan.json"
_PHASES = ("read", "put", "dispatch", "wait", "write", "close", "finish")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring event of one XLA compilation
EXPORTS = ("hlwq", "compressed-tensors")
DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_SKIP_COPY = {"config.json", "model.safetensors.index.json", hfmt.CONFIG_FILE, hfmt.MANIFEST_FILE, PLAN_FILE}


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What to produce. ``select(name, shape) -> dict | None`` picks the quantized tensors and their settings
    ({bits, block_size, codebook, rotation, seed}); None keeps a tensor in its source dtype."""
    select: Callable
    recipe: str = "nemotron-h"
    export: str = "hlwq"
    shard_bytes: int = 4 << 30
    chunk_bytes: int = 16 << 20
    ct_group_size: int = 128

    def describe(self) -> dict:
        return {"recipe": self.recipe, "export": self.export, "shard_bytes": self.shard_bytes,
                "ct_group_size": self.ct_group_size}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One source tensor and what becomes of it: ``meta`` (hlwq or CT settings) or None (copied)."""
    name: str
    info: TensorInfo
    meta: dict | None
    specs: tuple  # ((key, dtype, shape), ...) written for this tensor


@dataclasses.dataclass(frozen=True)
class Plan:
    shards: tuple  # ((file name, (Entry, ...)), ...)
    fingerprint: str

    @property
    def entries(self):
        return [e for _, es in self.shards for e in es]


def _entry(name: str, info: TensorInfo, opts: ConvertOptions) -> Entry:
    choice = opts.select(name, info.shape) if info.dtype in DTYPE_NAMES and len(info.shape) >= 2 else None
    if choice is None:
        return Entry(name, info, None, ((name, info.np_dtype, info.shape),))
    src_dtype = DTYPE_NAMES[info.dtype]
    if opts.export == "hlwq":
        meta = hfmt.entry_meta(name, info.shape, choice["bits"], choice["block_size"], choice["codebook"],
                             choice["rotation"], choice["seed"], src_dtype)
        return Entry(name, info, meta, tuple(hfmt.entry_specs(meta)))
    meta = ct.entry_meta(name, info.shape, choice, opts.ct_group_size, src_dtype)
    return Entry(name, info, meta, tuple(ct.entry_specs(meta)))


def plan_conversion(index: CheckpointIndex, opts: ConvertOptions) -> Plan:
    """Deterministic output layout: entries in source order, greedily packed into shards of ≤ shard_bytes."""
    if opts.export not in EXPORTS:
        raise ValueError(f"unknown export {opts.export!r}; expected one of {EXPORTS}")
    groups, cur, size = [], [], 0
    for name, info in index.tensors.items():
        e = _entry(name, info, opts)
        nb = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, d, s in e.specs)
        if cur and size + nb > opts.shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += nb
    groups.append(cur)
    n = len(groups)
    shards = tuple((f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups))
    desc = {"options": opts.describe(),  # source files by name, size and mtime: a rewritten source is a new plan
            "sources": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in index.files],
            "entries": [[e.name, e.info.file.name, e.info.dtype, list(e.info.shape), e.info.start, e.meta]
                        for e in (x for _, g in shards for x in g)]}
    return Plan(shards, hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest())


# ---- per-tensor work ------------------------------------------------------------------------------------------------
# Chunks of a quantized tensor run as a pipeline across the whole shard: a reader thread reads chunk i+1 (source dtype,
# e.g. bf16; the float32 cast happens on the device) and starts its host→device copy while the main thread dispatches
# chunk i (asynchronously, with its device→host copies started at once) and then waits for, checks and writes chunk
# i−1. Chunk row counts come from a small fixed set per (trailing shape, dtype), so the compiled programs are shared by
# every tensor of the same input width: see ``chunk_spans``.

def padded_rows(k: int, full: int) -> int:
    """The row count a chunk of ``k`` rows is zero-padded to: k rounded up to a quarter octave (8, 10, 12, 14, 16, 20,
    24, 28, 32, 40, …), capped at ``full``. Padding ≤ 25 %, and at most four programs per octave of chunk sizes."""
    step = 1 << max(0, k.bit_length() - 3)
    return min(full, max(8, -(-k // step) * step))


def chunk_spans(info: TensorInfo, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """[(start, stop, padded rows)] over the first axis. ``full = rows_per_chunk`` (a float32 working copy of
    ≈ chunk_bytes; it depends on the trailing shape only); the n rows are split into m = ⌈n / full⌉ near-equal chunks,
    all padded to the same ``padded_rows(⌈n / m⌉, full)``: one program per tensor, shared by every tensor whose
    trailing shape, dtype and padded row count agree (a few per input width), and ≤ 25 % padding."""
    full, n = rows_per_chunk(info.shape, 4, chunk_bytes), info.shape[0]
    m = -(-n // full)
    rows = padded_rows(-(-n // m), full)
    return [(s, min(s + rows, n), rows) for s in range(0, n, rows)]


_N_STAGING = 3  # host read buffers, used round-robin: the chunk being read, the one in flight, the one being written


def _load_chunk(info: TensorInfo, s: int, e: int, rows: int, counters: dict, staging: list, slot: int) -> jax.Array:
    """Rows [s, e) zero-padded to ``rows`` rows, in the source dtype, on the default device (runs in the reader thread,
    so the read and the host→device copy overlap compute). The rows are read into ``staging[slot]`` (a byte buffer,
    grown on demand and reused: no fresh pages to fault in per chunk). Reuse is safe: when slot i is read again, the
    chunk read into it three loads earlier has been computed and written, even if the device aliased the buffer."""
    t0 = time.perf_counter()
    nbytes = rows * (info.nbytes // info.shape[0])
    if staging[slot] is None or staging[slot].nbytes < nbytes:
        staging[slot] = None  # drop the old buffer before allocating the larger one
        staging[slot] = np.empty(nbytes, np.uint8)
    x = staging[slot][:nbytes].view(info.np_dtype).reshape(rows, *info.shape[1:])
    x[e - s:] = 0
    read_rows(info, s, e, out=x)
    t1 = time.perf_counter()
    out = jax.device_put(x)
    counters["h2d_bytes"] += x.nbytes
    counters["read_seconds"] += t1 - t0
    counters["put_seconds"] += time.perf_counter() - t1
    return out


# GPU compiles of this small program are dominated by XLA's autotuning of its fusions and of the rotation's dot
# (~4 s per program on the H200; a conversion compiles a few); the untuned defaults are as fast for this memory-bound
# program (experiments/bench_convert.py reports compile_seconds). CPU ignores the option.
NO_AUTOTUNE = {"xla_gpu_autotune_level": 0}


@functools.partial(jax.jit, static_argnames=("bits", "block_size", "codebook", "rotation", "seed"),
                   compiler_options=NO_AUTOTUNE)
def _quantize_program(x, *, bits, block_size, codebook, rotation, seed):
    """``quantize`` of one chunk plus its checks as device outputs, so nothing waits on the host:
    → (packed, norms, all finite(x), all finite(norms))."""
    q = quantize(x, bits=bits, block_size=block_size, codebook=codebook, rotation=rotation, seed=seed)
    return q.packed, q.norms, jnp.all(jnp.isfinite(x)), jnp.all(jnp.isfinite(q.norms))


def _quantize_chunk(x: jax.Array, meta: dict, name: str, info: TensorInfo) -> tuple:
    """Dispatch the quantization of one chunk (asynchronous) and start copying its outputs to the host."""
    try:  # argument errors surface while tracing
        out = _quantize_program(x, bits=meta["bits"], block_size=meta["block_size"], codebook=meta["codebook"],
                                rotation=meta["rotation"], seed=meta["seed"])
    except ValueError as err:
        raise ValueError(f"{info.file}: tensor {name!r}: {err}") from None
    for a in out:
        a.copy_to_host_async()
    return out


@dataclasses.dataclass
class _Chunk:
    """One dispatched chunk: rows [s, stop) of entry ``e``; ``out`` = _quantize_chunk's result, or the source rows
    for CompressedTensors from the source weights."""
    e: Entry
    s: int
    stop: int
    out: tuple


def _dispatch(e: Entry, x: jax.Array, s: int, stop: int) -> _Chunk:
    if e.meta.get("source", "hlwq") == "hlwq":
        return _Chunk(e, s, stop, _quantize_chunk(x, e.meta, e.name, e.info))
    return _Chunk(e, s, stop, (x,))


def _finalize(w: StreamWriter, c: _Chunk, opts: ConvertOptions, bar, counters: dict) -> None:
    """Wait for chunk ``c``'s outputs, check them (errors name file and tensor) and write its real rows."""
    e, info, k = c.e, c.e.info, c.stop - c.s
    t0_wait = time.perf_counter()
    jax.block_until_ready(c.out)
    t0 = time.perf_counter()
    counters["wait_seconds"] += t0 - t0_wait
    first = c.s == 0
    if e.meta.get("source", "hlwq") == "hlwq":
        packed, norms, finite, norms_ok = c.out
        if not bool(finite):
            raise ValueError(f"{info.file}: tensor {e.name!r} contains NaN or Inf values")
        if not bool(norms_ok):
            raise ValueError(f"{info.file}: tensor {e.name!r}: a block norm exceeds the float16 range "
                             f"({np.finfo(np.float16).max}); rescale the weight")
        cb = codebook_values(e.meta["bits"], e.meta["codebook"]).astype(np.float32)
    else:
        q = c.out[0].astype(jnp.float32)
        if not bool(jnp.all(jnp.isfinite(q))):
            raise ValueError(f"{info.file}: tensor {e.name!r} contains NaN or Inf values")
    if opts.export == "hlwq":
        keys = e.meta["keys"]
        w.write(keys["packed"], np.asarray(packed)[:k])
        w.write(keys["norms"], np.asarray(norms)[:k])
        if first:
            w.write(keys["codebook"], cb)
            if "signs" in keys:
                w.write(keys["signs"], hfmt.signs_array(e.meta))
    else:
        if e.meta.get("source", "hlwq") == "hlwq":
            m = e.meta
            q = HLWQArray(packed=packed, norms=norms, codebook=jnp.asarray(cb), bits=m["bits"],
                          block_size=m["block_size"], shape=(packed.shape[0], *info.shape[1:]),
                          rotation=m["rotation"], seed=m["seed"], codebook_name=m["codebook"])
        packed_ct, scale = ct.int4_from_hlwq(q, e.meta)
        w.write(e.meta["keys"]["weight_packed"], packed_ct[:k])
        w.write(e.meta["keys"]["weight_scale"], scale[:k])
        if first:
            w.write(e.meta["keys"]["weight_shape"], np.asarray(info.shape, np.int64))
    counters["write_seconds"] += time.perf_counter() - t0  # includes the host copies the wait did not cover
    bar.update(k * info.nbytes // info.shape[0])


def _copy_entry(w: StreamWriter, e: Entry, opts: ConvertOptions, bar) -> None:
    """An unquantized tensor: copied in its source dtype, in row chunks."""
    info = e.info
    n = info.shape[0] if info.shape else 1  # a scalar is one "row"
    rows = rows_per_chunk(info.shape, info.np_dtype.itemsize, opts.chunk_bytes) if info.shape else 1
    for s in range(0, max(n, 1), rows):
        chunk = read_rows(info, s, min(s + rows, n))
        w.write(e.name, chunk)
        bar.update(chunk.nbytes)


def _write_entries(w: StreamWriter, entries, opts: ConvertOptions, bar, counters: dict) -> None:
    """Write every entry of one shard: copies directly, quantized chunks through the read/dispatch/finalize pipeline
    (host memory: ≤ 3 chunks in flight — being read, being quantized, being written)."""
    work = []
    for e in entries:
        if e.meta is None:
            _copy_entry(w, e, opts, bar)
        else:
            work += [(e, *span) for span in chunk_spans(e.info, opts.chunk_bytes)]
    if not work:
        return
    pending, staging = None, [None] * _N_STAGING
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(_load_chunk, work[0][0].info, *work[0][1:], counters, staging, 0)
        try:
            for i, (e, s, stop, _) in enumerate(work):
                x = nxt.result()
                if i + 1 < len(work):  # chunk i−2, the last user of this slot, was finalized in the previous step
                    nxt = pool.submit(_load_chunk, work[i + 1][0].info, *work[i + 1][1:], counters, staging,
                                      (i + 1) % _N_STAGING)
                bar.set_postfix_str(e.name[-40:], refresh=False)
                t0 = time.perf_counter()
                cur = _dispatch(e, x, s, stop)
                counters["dispatch_seconds"] += time.perf_counter() - t0
                del x
                if pending is not None:
                    _finalize(w, pending, opts, bar, counters)
                pending = cur
            _finalize(w, pending, opts, bar, counters)
        finally:
            nxt.cancel()


def _shard_is_final(path: pathlib.Path, entries, fingerprint: str) -> bool:
    if not path.exists():
        return False
    try:
        infos, meta = read_header(path)
    except ValueError:
        return False
    want = {k: (d, tuple(s)) for e in entries for k, d, s in e.specs}
    got = {k: (i.np_dtype, i.shape) for k, i in infos.items()}
    return meta.get("hlwq_plan") == fingerprint and got == want


def _check_plan_file(dst: pathlib.Path, plan: Plan) -> None:
    p = dst / PLAN_FILE
    if p.exists():
        old = json.loads(p.read_text()).get("fingerprint")
        if old != plan.fingerprint:
            raise ValueError(f"{dst} holds a conversion with a different source or options (plan {old[:12]}… vs "
                             f"{plan.fingerprint[:12]}…); remove it or choose another destination")
    elif any(dst.glob("*.safetensors")):
        raise ValueError(f"{dst} already contains safetensors files not produced by this conversion")
    write_json_atomic(p, {"fingerprint": plan.fingerprint})


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """glibc only: serve allocations ≥ ``threshold`` bytes by mmap (returned to the OS on free) and freeze the dynamic
    threshold, so chunk buffers freed by the reader thread do not pile up as heap fragments. The CLIs call this once;
    it measurably lowers peak RSS (tests/ckpt/test_memory.py). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, threshold))


@contextlib.contextmanager
def count_compiles():
    """Yields {"compiles", "compile_seconds", "h2d_bytes", "<phase>_seconds"}: XLA backend compilations (any function,
    this process) while the context is open, counted through ``jax.monitoring``; the converter fills in the bytes sent
    to the device and the time of each phase (_PHASES; read and put run in the reader thread, in parallel)."""
    counters = {"compiles": 0, "compile_seconds": 0.0, "h2d_bytes": 0, **{f"{k}_seconds": 0.0 for k in _PHASES}}

    def listen(event, seconds, **_):
        if event == _COMPILE_EVENT:
            counters["compiles"] += 1
            counters["compile_seconds"] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counters
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, opts: ConvertOptions,
                       progress: bool = True) -> dict:
    """Convert SRC (HF safetensors dir) into DST. Resumable; returns stats {seconds, input_bytes, skipped_shards,
    compiles, compile_seconds (XLA programs built during the conversion), h2d_bytes (bytes sent to the device),
    <phase>_seconds (see ``count_compiles``)}."""
    t0 = time.perf_counter()
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    index = CheckpointIndex(src)  # validates every header: truncation is reported before any output
    plan = plan_conversion(index, opts)
    dst.mkdir(parents=True, exist_ok=True)
    manifest = dst / hfmt.MANIFEST_FILE
    if manifest.exists() and json.loads(manifest.read_text()).get("plan") == plan.fingerprint:
        return {"seconds": time.perf_counter() - t0, "input_bytes": 0, "skipped_shards": len(plan.shards)}
    manifest.unlink(missing_ok=True)
    _check_plan_file(dst, plan)
    for stale in dst.glob("*" + PARTIAL_SUFFIX):
        stale.unlink()
    total = sum(e.info.nbytes for e in plan.entries)
    skipped, done_bytes, hashes = 0, 0, {}
    # each final shard is hashed for the manifest in a background thread (hashlib releases the GIL) while the next
    # shards are converted, instead of re-reading the whole output at the end
    with count_compiles() as counters, ThreadPoolExecutor(max_workers=1) as hasher, \
            tqdm(total=total, unit="B", unit_scale=True, desc="hlwq-quantize", disable=not progress) as bar:
        for fname, entries in plan.shards:
            path = dst / fname
            if _shard_is_final(path, entries, plan.fingerprint):
                skipped += 1
                bar.update(sum(e.info.nbytes for e in entries))
                hashes[fname] = hasher.submit(hfmt.sha256_file, path)
                continue
            specs = [s for e in entries for s in e.specs]
            with StreamWriter(path, specs, {"format": "pt", "hlwq_plan": plan.fingerprint}) as w:
                _write_entries(w, entries, opts, bar, counters)
                t1 = time.perf_counter()
            counters["close_seconds"] += time.perf_counter() - t1  # completeness check, fsync, rename
            hashes[fname] = hasher.submit(hfmt.sha256_file, path)
            done_bytes += sum(e.info.nbytes for e in entries)
        t1 = time.perf_counter()
        _finish(src, dst, plan, opts, {f: h.result() for f, h in hashes.items()})
        counters["finish_seconds"] += time.perf_counter() - t1  # the last shards' hashes, index, configs, manifest
    return {"seconds": time.perf_counter() - t0, "input_bytes": done_bytes, "skipped_shards": skipped, **counters}


def _finish(src: pathlib.Path, dst: pathlib.Path, plan: Plan, opts: ConvertOptions, hashes: dict[str, str]) -> None:
    extra = []
    for p in sorted(src.iterdir()):  # tokenizer, generation config, ...: copied atomically
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in _SKIP_COPY:
            tmp = dst / (p.name + PARTIAL_SUFFIX)
            shutil.copyfile(p, tmp)
            os.replace(tmp, dst / p.name)
            extra.append(p.name)
    hf_cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    shard_files = [f for f, _ in plan.shards]
    weight_map = {k: f for f, es in plan.shards for e in es for k, _, _ in e.specs}
    quantized = {e.name: e.meta for e in plan.entries if e.meta is not None}
    if opts.export == "hlwq":
        hfmt.finish(dst, shard_files, weight_map, quantized, hf_cfg, extra, {"plan": plan.fingerprint}, hashes)
        return
    total = sum((dst / f).stat().st_size for f in shard_files)
    write_json_atomic(dst / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    ignore = [e.name[: -len(".weight")] for e in plan.entries
              if e.meta is None and len(e.info.shape) == 2 and e.name.endswith(".weight")]
    groups: dict[int, list[str]] = {}
    for e in plan.entries:
        if e.meta is not None:
            groups.setdefault(e.meta["group_size"], []).append(ct.module_name(e.name))
    hf_cfg["quantization_config"] = ct.quantization_config(groups, ignore)
    write_json_atomic(dst / "config.json", hf_cfg)
    hfmt.write_manifest(dst, [*shard_files, "model.safetensors.index.json", "config.json", *extra],
                      {"plan": plan.fingerprint, "export": "compressed-tensors"}, hashes)
