"""``hlwq-dequantize SRC DST``: any HLWQ checkpoint → plain safetensors that transformers loads as the original model.

SRC may be the project's hlwq format (streamed in row chunks: memory bounded by one chunk), or an original
polarengine checkpoint (``polar_config.json`` triplets, or ``__packed/__norms/__meta`` streams; these are read one
tensor at a time). Quantized weights become ``--dtype`` (bfloat16 by default; float32 for exact comparisons),
other tensors keep their stored dtype. ``config.json`` loses its ``quantization_config``. Output shards are written
atomically and ``hlwq_manifest.json`` (last) marks completion.

    python -m hlwq_jax.cli.dequantize SRC DST [--dtype bfloat16|float16|float32] [--codebook polarengine]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from hlwq_jax.ckpt import hlwq_format as hfmt
from hlwq_jax.ckpt import polarengine
from hlwq_jax.cli.convert import limit_heap_growth
from hlwq_jax.ckpt.streaming import PARTIAL_SUFFIX, CheckpointIndex, StreamWriter, rows_per_chunk, write_json_atomic
from hlwq_jax.quant.array import HLWQArray

OUT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
              "float32": np.dtype(np.float32)}
_SKIP = {"config.json", "model.safetensors.index.json", "polar_config.json", hfmt.CONFIG_FILE, hfmt.MANIFEST_FILE,
         ".hlwq_plan.json"}


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequant(w: HLWQArray, dtype):
    return w.dequantize(jnp.float32).astype(dtype)


def detect_format(src: pathlib.Path) -> str:
    """"hlwq" | "polar-triplets" | "hlwq-streams"."""
    if (src / hfmt.CONFIG_FILE).exists() and json.loads((src / hfmt.CONFIG_FILE).read_text()).get("format") == hfmt.FORMAT:
        return "hlwq"
    if (src / "polar_config.json").exists():
        return "polar-triplets"
    if any(n.endswith("__meta") for n in CheckpointIndex(src).tensors):
        return "hlwq-streams"
    raise ValueError(f"{src}: not an HLWQ checkpoint (no hlwq_config.json, polar_config.json or '__meta' tensors)")


class _Source:
    """Uniform view: names, (shape, out dtype) per name, and chunked reads yielding numpy arrays."""

    def __init__(self, src: pathlib.Path, fmt: str, dtype: np.dtype, codebook: str | None, chunk_bytes: int):
        self.dtype, self.chunk_bytes, self.fmt = dtype, chunk_bytes, fmt
        if fmt == "hlwq":
            self.ck = hfmt.HLWQCheckpoint(src)
            self.names = self.ck.names
        else:
            if fmt == "polar-triplets":  # codebook None → the stored centroids
                self.params = polarengine.load_polar_triplets(src, codebook=codebook)
            else:  # nothing stored: the original reader's variant unless told otherwise
                self.params = polarengine.load_hlwq_streams(src, codebook=codebook or "polarengine")
            self.names = list(self.params)

    def spec(self, name: str):
        if self.fmt == "hlwq":
            if name in self.ck.quantized:
                return self.dtype, tuple(self.ck.quantized[name]["shape"])
            info = self.ck.index[name]
            return info.np_dtype, info.shape
        leaf = self.params[name]
        return (self.dtype, leaf.shape) if isinstance(leaf, HLWQArray) else (leaf.dtype, leaf.shape)

    def chunks(self, name: str):
        dtype, shape = self.spec(name)
        if self.fmt != "hlwq":
            leaf = self.params[name]
            yield np.asarray(_dequant(leaf, dtype)) if isinstance(leaf, HLWQArray) else leaf
            return
        if not shape:
            yield self.ck.read(name)
            return
        rows = rows_per_chunk(shape, 4, self.chunk_bytes)
        for s in range(0, shape[0], rows):
            part = self.ck.read(name, s, min(s + rows, shape[0]))
            yield np.asarray(_dequant(part, dtype)) if isinstance(part, HLWQArray) else part


def dequantize_checkpoint(src, dst, dtype: str = "bfloat16", codebook: str | None = None,
                          shard_bytes: int = 4 << 30, chunk_bytes: int = 16 << 20, progress: bool = True) -> None:
    """Write the dequantized checkpoint of SRC into DST (see module docstring)."""
    if dtype not in OUT_DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; expected one of {list(OUT_DTYPES)}")
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    source = _Source(src, detect_format(src), OUT_DTYPES[dtype], codebook, chunk_bytes)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / hfmt.MANIFEST_FILE).unlink(missing_ok=True)
    groups, cur, size = [], [], 0
    for name in source.names:
        dt, shape = source.spec(name)
        nb = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if cur and size + nb > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nb
    groups.append(cur)
    files, weight_map = [], {}
    total = sum(int(np.prod(source.spec(n)[1], dtype=np.int64)) for n in source.names)
    with tqdm(total=total, unit="w", unit_scale=True, desc="hlwq-dequantize", disable=not progress) as bar:
        for i, names in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            specs = [(n, *source.spec(n)) for n in names]
            with StreamWriter(dst / fname, specs, {"format": "pt"}) as w:
                for n in names:
                    for chunk in source.chunks(n):
                        w.write(n, chunk)
                        bar.update(chunk.size)
            files.append(fname)
            weight_map.update({n: fname for n in names})
    _finish(src, dst, files, weight_map)


def _finish(src: pathlib.Path, dst: pathlib.Path, files: list[str], weight_map: dict) -> None:
    extra = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in _SKIP:
            tmp = dst / (p.name + PARTIAL_SUFFIX)
            shutil.copyfile(p, tmp)
            os.replace(tmp, dst / p.name)
            extra.append(p.name)
    total = sum((dst / f).stat().st_size for f in files)
    write_json_atomic(dst / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    cfg.pop("quantization_config", None)
    write_json_atomic(dst / "config.json", cfg)
    hfmt.write_manifest(dst, [*files, "model.safetensors.index.json", "config.json", *extra], {"dequantized": True})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hlwq-dequantize", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="hlwq / polarengine checkpoint directory")
    p.add_argument("dst", help="output directory (plain safetensors)")
    p.add_argument("--dtype", default="bfloat16", choices=list(OUT_DTYPES))
    p.add_argument("--codebook", default=None,
                   help="Lloyd-Max variant for original files without a stored codebook (e.g. polarengine)")
    p.add_argument("--shard-gb", type=float, default=4.0)
    p.add_argument("--chunk-mb", type=float, default=16.0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    limit_heap_growth()
    try:
        dequantize_checkpoint(a.src, a.dst, a.dtype, a.codebook, int(a.shard_gb * (1 << 30)),
                              int(a.chunk_mb * (1 << 20)), progress=not a.no_progress)
    except ValueError as e:
        print(f"hlwq-dequantize: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
