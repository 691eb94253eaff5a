"""The project's own HLWQ checkpoint format (spec: docs/format.md).

A directory of safetensors shards plus JSON files; everything needed to dequantize is stored, nothing is assumed:

* per quantized weight W (logical shape [*lead, out, in]):
  ``W.hlwq.packed``   uint8   [*lead, out, ceil(n_blocks·B·b/8)]  LSB-first code stream per row ("lsb-row")
  ``W.hlwq.norms``    float16 [*lead, out, n_blocks]
  ``W.hlwq.codebook`` float32 [2^b]                              ascending centroids (unit-Gaussian domain)
  ``W.hlwq.signs``    int8    [n_blocks·B]                       ±1, only for rotation "random-hadamard"
* every other tensor under its own name, in its source dtype;
* ``hlwq_config.json``: per quantized tensor {bits, block_size, codebook, rotation, seed, shape, dtype, packing,
  keys}; ``model.safetensors.index.json``: the usual HF weight map; ``config.json``: the source config plus
  ``quantization_config`` {quant_method: "polarengine", format: "hlwq", ...}; ``hlwq_manifest.json``: written last,
  lists every file with size and sha256 — a directory without it is incomplete.

Invariant (the HLWQArray one): W[..., o, k·B:(k+1)·B] ≈ norms[..., o, k] · (codebook[codes[..., o, k, :]]/√B) · R_k.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

from hlwq_jax.ckpt.streaming import (CheckpointIndex, StreamWriter, TensorInfo, read_rows, read_tensor,
                                     write_json_atomic)
from hlwq_jax.quant import hadamard
from hlwq_jax.quant.array import HLWQArray
from hlwq_jax.quant.packing import packed_size

FORMAT = "hlwq"
FORMAT_VERSION = 1
PACKING = "lsb-row"
CONFIG_FILE = "hlwq_config.json"
MANIFEST_FILE = "hlwq_manifest.json"
INDEX_FILE = "model.safetensors.index.json"
SUFFIXES = ("packed", "norms", "codebook", "signs")


def tensor_keys(name: str, rotation: str) -> dict[str, str]:
    """Stored safetensors keys of one quantized weight."""
    keys = {s: f"{name}.hlwq.{s}" for s in SUFFIXES}
    if rotation != "random-hadamard":
        del keys["signs"]
    return keys


def entry_meta(name: str, shape, bits: int, block_size: int, codebook: str, rotation: str, seed: int,
               dtype: str) -> dict:
    """hlwq_config.json entry of one quantized weight (``dtype`` = the source dtype, e.g. "bfloat16")."""
    return {"bits": int(bits), "block_size": int(block_size), "codebook": codebook, "rotation": rotation,
            "seed": int(seed), "shape": [int(s) for s in shape], "dtype": dtype, "packing": PACKING,
            "keys": tensor_keys(name, rotation)}


def entry_specs(meta: dict) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(key, dtype, shape) of the stored tensors of one quantized weight, from its metadata alone."""
    *lead, _, n_in = meta["shape"]
    out = meta["shape"][-2]
    b, bsz = meta["bits"], meta["block_size"]
    n_blocks = -(-n_in // bsz)
    keys = meta["keys"]
    specs = [(keys["packed"], np.dtype(np.uint8), (*lead, out, packed_size(n_blocks * bsz, b))),
             (keys["norms"], np.dtype(np.float16), (*lead, out, n_blocks)),
             (keys["codebook"], np.dtype(np.float32), (1 << b,))]
    if "signs" in keys:
        specs.append((keys["signs"], np.dtype(np.int8), (n_blocks * bsz,)))
    return specs


def signs_array(meta: dict) -> np.ndarray:
    n_pad = -(-meta["shape"][-1] // meta["block_size"]) * meta["block_size"]
    return hadamard.random_signs(n_pad, meta["seed"]).astype(np.int8)


def meta_of(name: str, w: HLWQArray, dtype: str) -> dict:
    return entry_meta(name, w.shape, w.bits, w.block_size, w.codebook_name, w.rotation, w.seed, dtype)


def quantization_config(bits: int | None, block_size: int | None) -> dict:
    """The ``config.json`` ``quantization_config`` of an hlwq checkpoint."""
    return {"quant_method": "polarengine", "format": FORMAT, "format_version": FORMAT_VERSION, "bits": bits,
            "block_size": block_size, "config_file": CONFIG_FILE, "packing": PACKING}


def sha256_file(path: pathlib.Path, buf: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(buf):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: pathlib.Path, files: list[str], extra: dict | None = None,
                   hashes: dict[str, str] | None = None) -> None:
    """The completion marker: every listed file with size and sha256 (taken from ``hashes`` where the caller already
    hashed the final file, e.g. while later shards were being written). Written last, atomically."""
    hashes = hashes or {}
    entries = {f: {"bytes": (root / f).stat().st_size, "sha256": hashes.get(f) or sha256_file(root / f)}
               for f in sorted(files)}
    write_json_atomic(root / MANIFEST_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
                                             "files": entries, **(extra or {})})


def verify_manifest(root: str | os.PathLike, check_hashes: bool = False) -> dict:
    """Raise ValueError unless ``root`` holds a complete checkpoint (manifest present, files present, sizes match)."""
    root = pathlib.Path(root)
    path = root / MANIFEST_FILE
    if not path.exists():
        raise ValueError(f"{root}: no {MANIFEST_FILE}: the checkpoint is incomplete (interrupted conversion?)")
    manifest = json.loads(path.read_text())
    for f, info in manifest["files"].items():
        p = root / f
        if not p.exists() or p.stat().st_size != info["bytes"]:
            raise ValueError(f"{p}: missing or wrong size (manifest says {info['bytes']} bytes)")
        if check_hashes and sha256_file(p) != info["sha256"]:
            raise ValueError(f"{p}: sha256 differs from {MANIFEST_FILE}")
    return manifest


class HLWQCheckpoint:
    """Reader of an hlwq checkpoint directory (manifest-verified). Leaves come back as numpy-backed HLWQArrays."""

    def __init__(self, root: str | os.PathLike, check_hashes: bool = False):
        self.root = pathlib.Path(root)
        verify_manifest(self.root, check_hashes)
        cfg = json.loads((self.root / CONFIG_FILE).read_text())
        if cfg.get("format") != FORMAT or cfg.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.root / CONFIG_FILE}: format {cfg.get('format')!r} v{cfg.get('format_version')} "
                             f"is not {FORMAT!r} v{FORMAT_VERSION}")
        self.config = cfg
        self.quantized: dict[str, dict] = cfg["tensors"]
        self.index = CheckpointIndex(self.root)
        stored = {k for m in self.quantized.values() for k in m["keys"].values()}
        missing = sorted(stored - set(self.index.tensors))
        if missing:
            raise ValueError(f"{self.root}: {CONFIG_FILE} lists tensors absent from the shards: {missing[:5]}")
        self.plain = [n for n in self.index.tensors if n not in stored]
        for name, meta in self.quantized.items():
            for key, dtype, shape in entry_specs(meta):
                info = self.index[key]
                if info.np_dtype != dtype or info.shape != shape:
                    raise ValueError(f"{info.file}: tensor {key!r} is {info.dtype}{list(info.shape)}, "
                                     f"{CONFIG_FILE} implies {dtype}{list(shape)}")

    @property
    def names(self) -> list[str]:
        """All logical tensor names (quantized and plain), in storage order."""
        return list(self.quantized) + self.plain

    def info(self, name: str) -> TensorInfo:
        """Storage info of a plain tensor, or of the ``packed`` tensor of a quantized one."""
        if name in self.quantized:
            return self.index[self.quantized[name]["keys"]["packed"]]
        return self.index[name]

    def read(self, name: str, start: int | None = None, stop: int | None = None):
        """Tensor ``name`` (rows [start, stop) of its first axis if given): HLWQArray or np.ndarray."""
        if name not in self.quantized:
            info = self.index[name]
            return read_tensor(info) if start is None else read_rows(info, start, stop)
        meta = self.quantized[name]
        keys = meta["keys"]
        shape = tuple(meta["shape"])
        rd = (lambda k: read_tensor(self.index[k])) if start is None else (lambda k: read_rows(self.index[k], start, stop))
        packed, norms = rd(keys["packed"]), rd(keys["norms"])
        if start is not None:
            shape = (packed.shape[0], *shape[1:])
        codebook = read_tensor(self.index[keys["codebook"]])
        if "signs" in keys:
            got = read_tensor(self.index[keys["signs"]])
            if not np.array_equal(got, signs_array(meta)):
                raise ValueError(f"{self.index[keys['signs']].file}: stored signs of {name!r} differ from "
                                 f"random_signs(seed={meta['seed']}); this reader cannot apply arbitrary signs")
        w = HLWQArray(packed=packed, norms=norms, codebook=codebook, bits=meta["bits"],
                      block_size=meta["block_size"], shape=shape, rotation=meta["rotation"], seed=meta["seed"],
                      codebook_name=meta["codebook"])
        w.validate()
        return w

    def load(self) -> dict:
        """{name: HLWQArray | np.ndarray} of the whole checkpoint."""
        return {n: self.read(n) for n in self.names}


def save_hlwq(root: str | os.PathLike, params: dict, source_dtypes: dict[str, str] | None = None,
              hf_config: dict | None = None, shard_bytes: int = 4 << 30) -> None:
    """Write {name: HLWQArray | array} (in-memory) as an hlwq checkpoint. The streaming converter in
    ``hlwq_jax.cli.convert`` writes the same layout without holding the model in memory."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    tensors, tensor_meta = {}, {}
    for name, leaf in params.items():
        if isinstance(leaf, HLWQArray):
            leaf.validate()
            meta = meta_of(name, leaf, (source_dtypes or {}).get(name, "bfloat16"))
            tensor_meta[name] = meta
            k = meta["keys"]
            tensors[k["packed"]], tensors[k["norms"]] = np.asarray(leaf.packed), np.asarray(leaf.norms)
            tensors[k["codebook"]] = np.asarray(leaf.codebook)
            if "signs" in k:
                tensors[k["signs"]] = signs_array(meta)
        else:
            tensors[name] = np.asarray(leaf)
    shards, cur, size = [], [], 0
    for key in tensors:
        nb = tensors[key].nbytes
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(key)
        size += nb
    shards.append(cur)
    files, weight_map = [], {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with StreamWriter(root / fname, [(k, tensors[k].dtype, tensors[k].shape) for k in keys], {"format": "pt"}) as w:
            for k in keys:
                w.write(k, tensors[k])
        files.append(fname)
        weight_map.update({k: fname for k in keys})
    finish(root, files, weight_map, tensor_meta, hf_config)


def finish(root: pathlib.Path, shard_files: list[str], weight_map: dict, tensor_meta: dict, hf_config: dict | None,
           extra_files: list[str] = (), manifest_extra: dict | None = None,
           hashes: dict[str, str] | None = None) -> None:
    """Write index, hlwq_config.json, config.json, then the manifest (last; ``hashes``: see write_manifest)."""
    total = sum((root / f).stat().st_size for f in shard_files)
    write_json_atomic(root / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    write_json_atomic(root / CONFIG_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                           "quant_method": "polarengine", "packing": PACKING,
                                           "tensors": dict(sorted(tensor_meta.items()))})
    bits = {m["bits"] for m in tensor_meta.values()}
    blocks = {m["block_size"] for m in tensor_meta.values()}
    cfg = dict(hf_config or {})
    cfg["quantization_config"] = quantization_config(bits.pop() if len(bits) == 1 else None,
                                                     blocks.pop() if len(blocks) == 1 else None)
    write_json_atomic(root / "config.json", cfg)
    write_manifest(root, [*shard_files, INDEX_FILE, CONFIG_FILE, "config.json", *extra_files], manifest_extra, hashes)


def load_hlwq(root: str | os.PathLike) -> dict:
    """{name: HLWQArray | np.ndarray} of a complete hlwq checkpoint."""
    return HLWQCheckpoint(root).load()
