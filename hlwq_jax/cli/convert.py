"""Streaming checkpoint conversion: HF safetensors → hlwq format or CompressedTensors INT4, tensor by tensor.

Memory: each tensor is read, quantized and written in row chunks of ≈ ``chunk_bytes`` (first axis: output rows of
a matrix, experts of a stacked [E, out, in] tensor), so host memory is bounded by one chunk plus constants, never the
model. Every output shard is laid out up front from the plan (shapes follow from the source header), written through
``StreamWriter`` into ``*.partial`` and renamed when complete. The plan (source headers + options) is fingerprinted;
a re-run on the same DST skips shards already final and produces byte-identical files (quantization is
deterministic). ``hlwq_manifest.json`` is written last and marks the output complete.

Pipeline: ``plan_conversion`` (pure: names, shapes, dtypes → shards) → ``convert_checkpoint`` (does the work).
"""
from __future__ import annotations

import ctypes
import dataclasses
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
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hlwq_jax.ckpt import compressed_tensors as ct
from hlwq_jax.ckpt import hlwq_format as hfmt
from hlwq_jax.ckpt.streaming import (PARTIAL_SUFFIX, CheckpointIndex, StreamWriter, TensorInfo, read_header,
                                     read_rows, rows_per_chunk, write_json_atomic)
from hlwq_jax.quant.hlwq import quantize

PLAN_FILE = ".hlwq_plan.json"
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
def _chunks(info: TensorInfo, chunk_bytes: int):
    rows = rows_per_chunk(info.shape, 4, chunk_bytes)  # float32 working copy
    n = info.shape[0]
    return rows, [(s, min(s + rows, n)) for s in range(0, n, rows)]


def _load_chunk(info: TensorInfo, s: int, e: int, rows: int, n_chunks: int) -> jax.Array:
    """Rows [s, e) on the default device (runs in the reader thread, so the host→device copy overlaps compute)."""
    x = read_rows(info, s, e)
    if n_chunks > 1 and e - s < rows:  # pad the tail to the common chunk shape: one compiled program per tensor
        x = np.concatenate([x, np.zeros((rows - (e - s), *x.shape[1:]), x.dtype)])
    return jax.device_put(x)


def _quantize_chunk(x: jax.Array, meta: dict, name: str, info: TensorInfo):
    try:
        return quantize(x, bits=meta["bits"], block_size=meta["block_size"], codebook=meta["codebook"],
                        rotation=meta["rotation"], seed=meta["seed"], name=name)
    except ValueError as err:
        raise ValueError(f"{info.file}: {err}") from None


def _write_entry(w: StreamWriter, e: Entry, opts: ConvertOptions, bar) -> None:
    info = e.info
    if e.meta is None:
        n = info.shape[0] if info.shape else 1  # a scalar is one "row"
        rows = rows_per_chunk(info.shape, info.np_dtype.itemsize, opts.chunk_bytes) if info.shape else 1
        for s in range(0, max(n, 1), rows):
            chunk = read_rows(info, s, min(s + rows, n))
            w.write(e.name, chunk)
            bar.update(chunk.nbytes)
        return
    rows, spans = _chunks(info, opts.chunk_bytes)
    first = True
    with ThreadPoolExecutor(max_workers=1) as pool:  # read chunk i+1 while chunk i is quantized
        pending = pool.submit(_load_chunk, info, *spans[0], rows, len(spans))
        for i, (s, stop) in enumerate(spans):
            x = pending.result()
            if i + 1 < len(spans):
                pending = pool.submit(_load_chunk, info, *spans[i + 1], rows, len(spans))
            first = _process_chunk(w, e, opts, x, s, stop, first)
            bar.update((stop - s) * info.nbytes // info.shape[0])


def _process_chunk(w: StreamWriter, e: Entry, opts: ConvertOptions, x: jax.Array, s: int, stop: int,
                   first: bool) -> bool:
    """Quantize rows [s, stop) of entry ``e`` (``x`` may carry zero padding rows) and write them. Returns False."""
    info = e.info
    k = stop - s
    if e.meta.get("source", "hlwq") == "hlwq":
        q = _quantize_chunk(x, e.meta, e.name, info)
    else:
        q = x.astype(jnp.float32)
        if not bool(jnp.all(jnp.isfinite(q))):
            raise ValueError(f"{info.file}: tensor {e.name!r} contains NaN or Inf values")
    if opts.export == "hlwq":
        keys = e.meta["keys"]
        w.write(keys["packed"], np.asarray(q.packed)[:k])
        w.write(keys["norms"], np.asarray(q.norms)[:k])
        if first:
            w.write(keys["codebook"], np.asarray(q.codebook))
            if "signs" in keys:
                w.write(keys["signs"], hfmt.signs_array(e.meta))
    else:
        packed, scale = ct.int4_from_hlwq(q, e.meta)
        w.write(e.meta["keys"]["weight_packed"], packed[:k])
        w.write(e.meta["keys"]["weight_scale"], scale[:k])
        if first:
            w.write(e.meta["keys"]["weight_shape"], np.asarray(info.shape, np.int64))
    return False


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


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, opts: ConvertOptions,
                       progress: bool = True) -> dict:
    """Convert SRC (HF safetensors dir) into DST. Resumable; returns stats {seconds, input_bytes, skipped_shards}."""
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
    skipped, done_bytes = 0, 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="hlwq-quantize", disable=not progress) as bar:
        for fname, entries in plan.shards:
            path = dst / fname
            if _shard_is_final(path, entries, plan.fingerprint):
                skipped += 1
                bar.update(sum(e.info.nbytes for e in entries))
                continue
            specs = [s for e in entries for s in e.specs]
            with StreamWriter(path, specs, {"format": "pt", "hlwq_plan": plan.fingerprint}) as w:
                for e in entries:
                    bar.set_postfix_str(e.name[-40:], refresh=False)
                    _write_entry(w, e, opts, bar)
            done_bytes += sum(e.info.nbytes for e in entries)
    _finish(src, dst, plan, opts)
    return {"seconds": time.perf_counter() - t0, "input_bytes": done_bytes, "skipped_shards": skipped}


def _finish(src: pathlib.Path, dst: pathlib.Path, plan: Plan, opts: ConvertOptions) -> None:
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
        hfmt.finish(dst, shard_files, weight_map, quantized, hf_cfg, extra, {"plan": plan.fingerprint})
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
                      {"plan": plan.fingerprint, "export": "compressed-tensors"})
