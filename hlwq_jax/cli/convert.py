"""Streaming checkpoint conversion: HF safetensors → hlwq format or CompressedTensors INT4, shard by shard.

Memory: quantized tensors are read, quantized and written in row chunks whose float32 copy is ≤ ``chunk_bytes`` (or
one row; rows: the first axis — output rows of a matrix, experts of a stacked [E, out, in] tensor); a chunk holds rows
of one tensor or of several tensors with the same trailing shape and settings (one program dispatch for many small
tensors), three chunks at a time in a pipeline (read / quantize / write), so host memory is bounded by a few chunks
plus constants, never the model. Unquantized tensors are copied in row chunks. Every output shard is laid out up
front from the plan (shapes follow from the source header), written through ``StreamWriter`` into ``*.partial`` and
renamed when complete. The plan (source headers + options) is fingerprinted; a re-run on the same DST skips shards
already final and produces byte-identical files (quantization is deterministic and row-wise, so the files do not
depend on ``chunk_bytes`` either). ``hlwq_manifest.json`` is written last and marks the output complete.

Pipeline: ``plan_conversion`` (pure: names, shapes, dtypes → shards) → ``convert_checkpoint`` (does the work; per
shard, ``plan_chunks`` (pure) packs the quantized tensors' rows into chunks).
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
from hlwq_jax.quant.packing import packed_size

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
    shard_bytes: int = 2 << 30  # 2 GiB: each finished shard's fsync + hash overlaps the next shards' conversion
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


# ---- quantized work: chunks of rows of one or several tensors --------------------------------------------------------
# The quantized entries of one output shard are grouped by everything the compiled program and its outputs depend on
# (``_group_key``: trailing shape, source dtype, quantizer settings); the rows of a group's entries, in source order,
# form one stream that ``plan_chunks`` cuts into chunks of ``full`` rows (the float32 working-copy bound), so a chunk
# holds pieces of several small tensors, or part of a large one, or both. The quantizer is row-wise (blocks run along
# the last axis; the random-Hadamard signs depend on the input width and the seed only), so each row's output is the
# same whatever chunk it lands in, and the files are byte-identical for every chunk size.
# Chunks run as a pipeline across the whole shard: a reader thread reads chunk i+1 (source dtype, e.g. bf16; the
# float32 cast happens on the device) into one staging buffer and starts its host→device copy while the main thread
# dispatches chunk i (asynchronously, with its device→host copies started at once) and then waits for, checks and
# writes chunk i−1, piece by piece at each tensor's own cursor (a tensor's pieces arrive in row order).

def padded_rows(k: int, full: int) -> int:
    """The row count a chunk of ``k`` rows is zero-padded to: k rounded up to a quarter octave (8, 10, 12, 14, 16, 20,
    24, 28, 32, 40, …), capped at ``full``. Padding ≤ 25 %, and at most four programs per octave of chunk sizes."""
    step = 1 << max(0, k.bit_length() - 3)
    return min(full, max(8, -(-k // step) * step))


# meta fields the quantize program or the CompressedTensors export of a chunk depends on (absent ones read as None)
_PROGRAM_META = ("bits", "block_size", "codebook", "rotation", "seed", "source", "group_size", "scale_dtype")


def _group_key(e: Entry) -> str:
    """Entries with equal keys can share one chunk (and one compiled program)."""
    return json.dumps([list(e.info.shape[1:]), e.info.dtype, [e.meta.get(k) for k in _PROGRAM_META]])


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """One program's input: ``pieces`` ((Entry, start, stop), ...) — rows [start, stop) of each entry, concatenated
    along the first axis in this order — zero-padded to ``rows`` rows."""
    pieces: tuple
    rows: int

    def spans(self):
        """(entry, start, stop, offset of the piece's first row in the chunk) per piece."""
        off = 0
        for e, s, stop in self.pieces:
            yield e, s, stop, off
            off += stop - s

    @property
    def real_rows(self) -> int:
        return sum(stop - s for _, s, stop in self.pieces)


def plan_chunks(entries, chunk_bytes: int) -> list[ChunkPlan]:
    """Chunks of the quantized entries (``meta`` not None) of one shard. Per ``_group_key`` group, the entries' rows
    in source order are cut into chunks of ``full = rows_per_chunk(shape, 4, chunk_bytes)`` rows (a float32 working
    copy of ≈ chunk_bytes, as for one tensor); the group's last chunk of k < full rows is padded to
    ``padded_rows(k, full)``. So a program has ``full`` rows (one per group kind) or a quarter-octave size, padding is
    ≤ 25 % of one chunk per group, and the number of chunks is ⌈group rows / full⌉ per group, not one or more per
    tensor. Chunks are listed in the order they fill; a group's chunks (hence each tensor's rows) stay in order."""
    open_groups, done = {}, []  # key → [pieces, rows so far, full] of the group's chunk being filled
    for e in entries:
        if e.meta is None:
            continue
        if 0 in e.info.shape:
            raise ValueError(f"{e.info.file}: tensor {e.name!r}: empty dimension in shape {list(e.info.shape)}")
        key, n, s = _group_key(e), e.info.shape[0], 0
        while s < n:
            cur = open_groups.setdefault(key, [[], 0, rows_per_chunk(e.info.shape, 4, chunk_bytes)])
            take = min(n - s, cur[2] - cur[1])
            cur[0].append((e, s, s + take))
            cur[1], s = cur[1] + take, s + take
            if cur[1] == cur[2]:
                done.append(ChunkPlan(tuple(cur[0]), cur[2]))
                del open_groups[key]
    # the groups' last chunks, in the order they began
    done += [ChunkPlan(tuple(pieces), padded_rows(used, full)) for pieces, used, full in open_groups.values()]
    return done


_N_STAGING = 3  # host read buffers, used round-robin: the chunk being read, the one in flight, the one being written


def _load_chunk(plan: ChunkPlan, counters: dict, staging: list, slot: int) -> jax.Array:
    """The chunk's pieces read one after another into ``staging[slot]``, zero-padded to ``plan.rows`` rows, in the
    source dtype, then put on the default device in one copy (runs in the reader thread, so the read and the
    host→device copy overlap compute). The staging buffer is a byte buffer, grown on demand and reused: no fresh
    pages to fault in per chunk. Reuse is safe: when slot i is read again, the chunk read into it three loads earlier
    has been computed and written, even if the device aliased the buffer."""
    t0 = time.perf_counter()
    info = plan.pieces[0][0].info  # every piece has this trailing shape and dtype (same group)
    nbytes = plan.rows * (info.nbytes // info.shape[0])
    if staging[slot] is None or staging[slot].nbytes < nbytes:
        staging[slot] = None  # drop the old buffer before allocating the larger one
        staging[slot] = np.empty(nbytes, np.uint8)
    x = staging[slot][:nbytes].view(info.np_dtype).reshape(plan.rows, *info.shape[1:])
    for e, s, stop, off in plan.spans():
        read_rows(e.info, s, stop, out=x[off:off + stop - s])
    x[plan.real_rows:] = 0
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
    """``quantize`` of one chunk x [rows, ...] plus its checks, as ONE device output so that one device→host copy
    per chunk suffices (every copy has a fixed host cost; four per chunk, each into a freshly pinned buffer, were a
    third of the converter's dispatch phase on the H200: results/convert_profile_h200.txt)
    → uint8 [rows, P + 2·N + 2]:
    per row its packed codes (P bytes), the bytes of its N float16 norms, and two check bytes (the row of x has no
    NaN/Inf; the row's norms fit float16) — per-row checks let an error name the tensor of the failing piece.
    ``split_output`` takes it apart on the host."""
    q = quantize(x, bits=bits, block_size=block_size, codebook=codebook, rotation=rotation, seed=seed)
    n = x.shape[0]
    rows = lambda a: jnp.all(a.reshape(n, -1), axis=1)
    checks = jnp.stack([rows(jnp.isfinite(x)), rows(jnp.isfinite(q.norms))], axis=1).astype(jnp.uint8)
    norm_bytes = jax.lax.bitcast_convert_type(q.norms, jnp.uint8).reshape(n, -1)
    return jnp.concatenate([q.packed.reshape(n, -1), norm_bytes, checks], axis=1)


def split_output(buf: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host side of ``_quantize_program``'s output uint8 [rows, P + 2·N + 2] → (packed uint8 [rows, *packed
    trailing], norms float16 [rows, *norms trailing], finite bool [rows], norms_ok bool [rows]); trailing shapes
    from the tensor's logical shape and settings in ``meta``."""
    *mid, n_in = meta["shape"][1:]
    n_blocks = -(-n_in // meta["block_size"])
    p_tail = (*mid, packed_size(n_blocks * meta["block_size"], meta["bits"]))
    n_tail = (*mid, n_blocks)
    p, nn = int(np.prod(p_tail)), 2 * int(np.prod(n_tail))
    if buf.shape[1] != p + nn + 2:
        raise AssertionError(f"quantize output row of {buf.shape[1]} bytes, expected {p + nn + 2}")
    rows = buf.shape[0]
    packed = buf[:, :p].reshape(rows, *p_tail)
    norms = np.ascontiguousarray(buf[:, p:p + nn]).view(np.float16).reshape(rows, *n_tail)
    return packed, norms, buf[:, -2].astype(bool), buf[:, -1].astype(bool)


@jax.jit
def _rows_finite(x):
    """bool[rows]: row i of x has no NaN/Inf."""
    return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def program_key(plan: ChunkPlan) -> tuple | None:
    """What the compiled quantize program of a chunk depends on (rows, trailing shape, source dtype, settings), or
    None for a chunk that runs no quantize program (CompressedTensors from the source weights)."""
    e = plan.pieces[0][0]
    if e.meta.get("source", "hlwq") != "hlwq":
        return None
    m = e.meta
    return (plan.rows, tuple(e.info.shape[1:]), e.info.dtype, m["bits"], m["block_size"], m["codebook"],
            m["rotation"], m["seed"])


def _compile_program(key: tuple):
    rows, tail, dtype, bits, block_size, codebook, rotation, seed = key
    x = jax.ShapeDtypeStruct((rows, *tail), np.dtype(DTYPE_NAMES[dtype]))
    return _quantize_program.lower(x, bits=bits, block_size=block_size, codebook=codebook, rotation=rotation,
                                   seed=seed).compile()


def compile_programs(plans, pool: ThreadPoolExecutor) -> dict:
    """Start compiling every distinct quantize program of ``plans`` in ``pool`` → {program_key: Future of the
    compiled executable}. XLA compiles release the GIL, so they run in parallel with each other and with the
    conversion (serially, a 16 GB Nemotron-shaped conversion spent 3–16 s of its main thread compiling 8–14
    programs on the H200: results/bench_convert_h200.jsonl)."""
    keys = dict.fromkeys(k for k in map(program_key, plans) if k is not None)
    return {k: pool.submit(_compile_program, k) for k in keys}


def _quantize_chunk(x: jax.Array, meta: dict, name: str, info: TensorInfo, program) -> tuple:
    """Dispatch the quantization of one chunk (asynchronous; ``program``: the Future of its compiled executable) and
    start its one device→host copy, into pinned host memory (the runtime's pooled host allocator: a plain
    ``copy_to_host_async`` pins a fresh host buffer per call, which cost ≈ 0.7 s per GB of output on the H200).
    ``meta``, ``name`` and ``info`` are those of the chunk's first piece (the settings are the group's)."""
    try:  # argument errors surface while tracing (in the compile thread; re-raised here)
        out = program.result()(x)
    except ValueError as err:
        raise ValueError(f"{info.file}: tensor {name!r}: {err}") from None
    return (jax.device_put(out, out.sharding.with_memory_kind("pinned_host")),)


@dataclasses.dataclass
class _Chunk:
    """One dispatched chunk: ``out`` = _quantize_chunk's result, or (source rows, their finiteness) for
    CompressedTensors from the source weights."""
    plan: ChunkPlan
    out: tuple


def _dispatch(plan: ChunkPlan, x: jax.Array, programs: dict) -> _Chunk:
    e = plan.pieces[0][0]
    key = program_key(plan)
    if key is not None:
        return _Chunk(plan, _quantize_chunk(x, e.meta, e.name, e.info, programs[key]))
    finite = _rows_finite(x)
    finite.copy_to_host_async()
    return _Chunk(plan, (x, finite))


def _check_pieces(plan: ChunkPlan, ok, message: str) -> None:
    """Raise ``message`` naming the file and tensor of the first piece with a False row in ``ok`` (bool[rows])."""
    ok = np.asarray(ok)
    if ok.all():
        return
    for e, s, stop, off in plan.spans():
        if not ok[off:off + stop - s].all():
            raise ValueError(f"{e.info.file}: tensor {e.name!r}{message}")
    raise AssertionError("a padding row failed its check")  # pragma: no cover — zero rows are finite


def _finalize(w: StreamWriter, c: _Chunk, opts: ConvertOptions, bar, counters: dict) -> None:
    """Wait for chunk ``c``'s outputs, check them per piece (errors name file and tensor) and write each piece's rows
    to its tensor; a tensor's codebook, signs or weight_shape are written with its piece that starts at row 0."""
    t0_wait = time.perf_counter()
    jax.block_until_ready(c.out)
    t0 = time.perf_counter()
    counters["wait_seconds"] += t0 - t0_wait
    meta = c.plan.pieces[0][0].meta  # the program's settings: shared by every piece (one group)
    if meta.get("source", "hlwq") == "hlwq":
        packed, norms, finite, norms_ok = split_output(np.asarray(c.out[0]), meta)
        _check_pieces(c.plan, finite, " contains NaN or Inf values")
        _check_pieces(c.plan, norms_ok, f": a block norm exceeds the float16 range ({np.finfo(np.float16).max}); "
                                        "rescale the weight")
        cb = codebook_values(meta["bits"], meta["codebook"]).astype(np.float32)
    else:
        _check_pieces(c.plan, c.out[1], " contains NaN or Inf values")
    if opts.export == "hlwq":
        for e, s, stop, off in c.plan.spans():
            keys = e.meta["keys"]
            w.write(keys["packed"], packed[off:off + stop - s])
            w.write(keys["norms"], norms[off:off + stop - s])
            if s == 0:
                w.write(keys["codebook"], cb)
                if "signs" in keys:
                    w.write(keys["signs"], hfmt.signs_array(e.meta))
    else:
        if meta.get("source", "hlwq") == "hlwq":
            q = HLWQArray(packed=jnp.asarray(packed), norms=jnp.asarray(norms), codebook=jnp.asarray(cb),
                          bits=meta["bits"], block_size=meta["block_size"], shape=(c.plan.rows, *meta["shape"][1:]),
                          rotation=meta["rotation"], seed=meta["seed"], codebook_name=meta["codebook"])
        else:
            q = c.out[0].astype(jnp.float32)
        packed_ct, scale = ct.int4_from_hlwq(q, meta)
        for e, s, stop, off in c.plan.spans():
            w.write(e.meta["keys"]["weight_packed"], packed_ct[off:off + stop - s])
            w.write(e.meta["keys"]["weight_scale"], scale[off:off + stop - s])
            if s == 0:
                w.write(e.meta["keys"]["weight_shape"], np.asarray(e.info.shape, np.int64))
    counters["write_seconds"] += time.perf_counter() - t0  # includes the host copies the wait did not cover
    bar.update(sum((stop - s) * e.info.nbytes // e.info.shape[0] for e, s, stop in c.plan.pieces))


def _copy_entry(w: StreamWriter, e: Entry, opts: ConvertOptions, bar) -> None:
    """An unquantized tensor: copied in its source dtype, in row chunks."""
    info = e.info
    n = info.shape[0] if info.shape else 1  # a scalar is one "row"
    rows = rows_per_chunk(info.shape, info.np_dtype.itemsize, opts.chunk_bytes) if info.shape else 1
    for s in range(0, max(n, 1), rows):
        chunk = read_rows(info, s, min(s + rows, n))
        w.write(e.name, chunk)
        bar.update(chunk.nbytes)


def _write_entries(w: StreamWriter, entries, work: list[ChunkPlan], programs: dict, opts: ConvertOptions, bar,
                   counters: dict) -> None:
    """Write every entry of one shard: copies directly, quantized ones in its ``plan_chunks`` chunks ``work``
    through the read/dispatch/finalize pipeline (host memory: ≤ 3 chunks in flight — being read, being quantized,
    being written); ``programs`` from ``compile_programs``."""
    for e in entries:
        if e.meta is None:
            _copy_entry(w, e, opts, bar)
    if not work:
        return
    pending, staging = None, [None] * _N_STAGING
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(_load_chunk, work[0], counters, staging, 0)
        try:
            for i, plan in enumerate(work):
                x = nxt.result()
                if i + 1 < len(work):  # chunk i−2, the last user of this slot, was finalized in the previous step
                    nxt = pool.submit(_load_chunk, work[i + 1], counters, staging, (i + 1) % _N_STAGING)
                bar.set_postfix_str(plan.pieces[0][0].name[-40:], refresh=False)
                t0 = time.perf_counter()
                cur = _dispatch(plan, x, programs)
                counters["dispatch_seconds"] += time.perf_counter() - t0
                counters["chunks"] += 1
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
    """Yields {"compiles", "compile_seconds", "chunks", "h2d_bytes", "<phase>_seconds"}: XLA backend compilations (any
    function, this process) while the context is open, counted through ``jax.monitoring``; the converter fills in the
    chunks dispatched (one program each), the bytes sent to the device and the time of each phase (_PHASES; read and
    put run in the reader thread, in parallel; close — completeness check, fsync, rename — in the background
    thread that also hashes the shard)."""
    counters = {"compiles": 0, "compile_seconds": 0.0, "chunks": 0, "h2d_bytes": 0,
                **{f"{k}_seconds": 0.0 for k in _PHASES}}

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
    compiles, compile_seconds (XLA programs built during the conversion), chunks (quantized chunks dispatched),
    h2d_bytes (bytes sent to the device), <phase>_seconds (see ``count_compiles``)}."""
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
    final = {fname: _shard_is_final(dst / fname, entries, plan.fingerprint) for fname, entries in plan.shards}
    chunks = {fname: plan_chunks(entries, opts.chunk_bytes) for fname, entries in plan.shards if not final[fname]}
    # every program is compiled ahead, in parallel (``compile_programs``); each written shard is closed (completeness
    # check, fsync, rename) and hashed for the manifest in a background thread (both release the GIL) while the next
    # shards are converted, instead of the main thread waiting for the fsync and re-reading the whole output at the
    # end; two workers, so consecutive shards' tails overlap
    with count_compiles() as counters, ThreadPoolExecutor(max_workers=2) as hasher, \
            ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) - 1))) as compiler, \
            tqdm(total=total, unit="B", unit_scale=True, desc="hlwq-quantize", disable=not progress) as bar:
        programs = compile_programs([c for cs in chunks.values() for c in cs], compiler)
        for fname, entries in plan.shards:
            path = dst / fname
            if final[fname]:
                skipped += 1
                bar.update(sum(e.info.nbytes for e in entries))
                hashes[fname] = hasher.submit(lambda p: (hfmt.sha256_file(p), 0.0), path)
                continue
            specs = [s for e in entries for s in e.specs]
            w = StreamWriter(path, specs, {"format": "pt", "hlwq_plan": plan.fingerprint})
            try:
                _write_entries(w, entries, chunks[fname], programs, opts, bar, counters)
            except BaseException:
                for f in programs.values():
                    f.cancel()
                w.abort()
                raise
            hashes[fname] = hasher.submit(_close_and_hash, w)
            done_bytes += sum(e.info.nbytes for e in entries)
        t1 = time.perf_counter()
        done = {f: h.result() for f, h in hashes.items()}
        counters["close_seconds"] += sum(dt for _, dt in done.values())  # in the background thread
        _finish(src, dst, plan, opts, {f: sha for f, (sha, _) in done.items()})
        counters["finish_seconds"] += time.perf_counter() - t1  # waiting for the last shards' close + hash; index,
        # configs, manifest
    return {"seconds": time.perf_counter() - t0, "input_bytes": done_bytes, "skipped_shards": skipped, **counters}


def _close_and_hash(w: StreamWriter) -> tuple[str, float]:
    """Background: close a written shard (completeness check, fsync, rename to its final name); returns (its sha256,
    seconds the close took)."""
    t0 = time.perf_counter()
    path = w.close()
    return hfmt.sha256_file(path), time.perf_counter() - t0


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
