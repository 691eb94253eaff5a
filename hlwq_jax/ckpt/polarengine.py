"""Read and write the ORIGINAL HLWQ ("PolarQuant" / polarengine) checkpoint layouts (docs/hlwq.md §6).

Two families, both safetensors plus (for the first) a JSON config:

1. **Triplets** (``polar_config.json``, ``format`` "polar_engine_v4" | "polar_engine_v5", ``quantization``
   "polarengine"). Per quantized linear with key prefix P (the weight name without ``.weight``):
   ``P.codes`` — int8 [out, in_padded] (unpacked), or uint8 [out, in_padded/2] half-block nibbles (layer flag
   ``packed``, ≤ 4 bits), or uint8 [out, in_padded·5/8] LSB-first 5-bit groups (flag ``packed_q5``, the v5 addition);
   ``P.norms`` fp16 [out, n_blocks]; ``P.ct`` fp32 [2^b] centroids or ``P.ct_scaled`` = ct/√B. Layer metadata:
   in_features, out_features, in_features_padded, n_blocks, bits, block_size, packed, scale_dtype.
2. **hlwq-q5 streams**: per weight W, ``W__packed`` uint8 — one MSB-first stream of all codes of the flattened
   [out, in_padded] tensor (5 bits in hlwq-q5; the same layout exists at 2/3/4/6/8 bits), ``W__norms`` fp16
   [out, n_blocks], ``W__meta`` int64 [out, n_blocks, B, total_codes, in]. No codebook is stored.

Readers return ``{name: HLWQArray | np.ndarray}`` keyed by the weight name (``P.weight``), with numpy leaves, rotation
"hadamard" (the original has no random signs). The codebook is the stored one unless ``codebook=`` names a variant of
``lloyd_max_codebook`` (the files do not always store it; the original hlwq-q5 reader rebuilt "polarengine").
Writers produce exactly these layouts from HLWQArrays (rotation must be "hadamard"), so round trips are testable.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np

from hlwq_jax.ckpt import bitstreams
from hlwq_jax.ckpt.streaming import CheckpointIndex, StreamWriter, read_tensor, write_json_atomic
from hlwq_jax.quant.array import HLWQArray
from hlwq_jax.quant.lloyd_max import VARIANTS, lloyd_max_codebook

TRIPLET_FORMATS = ("polar_engine_v4", "polar_engine_v5")


def _codes_of(w: HLWQArray) -> np.ndarray:
    """uint8 [out, in_padded] codes of a 2-D HLWQArray (host)."""
    if w.ndim != 2:
        raise ValueError(f"original formats store 2-D weights only, got shape {w.shape}")
    if w.rotation != "hadamard":
        raise ValueError(f"original formats have no rotation {w.rotation!r} (only plain Hadamard)")
    return bitstreams.unpack_lsb_rows(np.asarray(w.packed), w.bits, w.padded_in)


def _make(codes: np.ndarray, norms: np.ndarray, codebook: np.ndarray, bits: int, block_size: int,
          in_features: int, codebook_name: str, where: str) -> HLWQArray:
    out, padded = codes.shape
    n_blocks = padded // block_size
    if padded % block_size or tuple(norms.shape) != (out, n_blocks):
        raise ValueError(f"{where}: codes [{out}, {padded}] and norms {list(norms.shape)} disagree with B={block_size}")
    if not (padded - block_size < in_features <= padded):
        raise ValueError(f"{where}: in_features {in_features} does not pad to {padded} with B={block_size}")
    if codebook.shape != (1 << bits,):
        raise ValueError(f"{where}: codebook has shape {list(codebook.shape)}, expected [{1 << bits}] for {bits} bits")
    if int(codes.max(initial=0)) >= (1 << bits):
        raise ValueError(f"{where}: a code {int(codes.max())} does not fit in {bits} bits")
    w = HLWQArray(packed=bitstreams.pack_lsb_rows(codes, bits), norms=np.asarray(norms, np.float16),
                  codebook=np.asarray(codebook, np.float32), bits=bits, block_size=block_size,
                  shape=(out, in_features), rotation="hadamard", seed=0, codebook_name=codebook_name)
    w.validate()
    return w


def _variant_codebook(bits: int, codebook: str, where: str) -> np.ndarray:
    if codebook not in VARIANTS:
        raise ValueError(f"{where}: unknown codebook variant {codebook!r}; expected one of {VARIANTS}")
    return lloyd_max_codebook(bits, codebook).astype(np.float32)


def _weight_name(prefix: str) -> str:
    return prefix + ".weight"


# ---- triplets ---------------------------------------------------------------------------------------------------
def load_polar_triplets(root: str | os.PathLike, codebook: str | None = None) -> dict:
    """Read a ``polar_config.json`` checkpoint. Returns {name: HLWQArray | np.ndarray (unquantized, file dtype)}.

    codebook: None → the stored ``.ct`` / ``.ct_scaled`` (ValueError if absent); a variant name → that Lloyd-Max
    variant regardless of what is stored.
    """
    root = pathlib.Path(root)
    cfg_path = root / "polar_config.json"
    if not cfg_path.exists():
        raise ValueError(f"{root}: no polar_config.json")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") not in TRIPLET_FORMATS or cfg.get("quantization", "polarengine") != "polarengine":
        raise ValueError(f"{cfg_path}: format {cfg.get('format')!r} is not one of {TRIPLET_FORMATS}")
    index = CheckpointIndex(root)
    layers = cfg.get("layers", {})
    used: set[str] = set()
    out: dict = {}
    for prefix, meta in layers.items():
        where = f"{cfg_path} layer {prefix!r}"
        try:
            bits, bsz, in_f = int(meta["bits"]), int(meta["block_size"]), int(meta["in_features"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: needs integer bits, block_size, in_features; got {meta!r}") from None
        keys = {k: f"{prefix}.{k}" for k in ("codes", "norms", "ct", "ct_scaled")}
        for k in ("codes", "norms"):
            if keys[k] not in index.tensors:
                raise ValueError(f"{where}: tensor {keys[k]!r} missing")
        raw = read_tensor(index[keys["codes"]])
        if meta.get("packed_q5"):
            if bits != 5:
                raise ValueError(f"{where}: packed_q5 set but bits = {bits}")
            n = raw.shape[-1] * 8 // 5
            codes = bitstreams.unpack_lsb_rows(raw.view(np.uint8), 5, n)
        elif meta.get("packed"):
            if bits > 4:
                raise ValueError(f"{where}: half-block 'packed' flag with {bits} bits (needs ≤ 4)")
            codes = bitstreams.unpack_half_block(raw.view(np.uint8), bsz)
        else:
            codes = raw.view(np.uint8)  # int8 storage wraps codes ≥ 128 (8 bits); the bit pattern is the code
        norms = read_tensor(index[keys["norms"]])
        used.update(keys[k] for k in ("codes", "norms"))
        if codebook is not None:
            cb, cb_name = _variant_codebook(bits, codebook, where), codebook
        elif keys["ct"] in index.tensors:
            cb, cb_name = read_tensor(index[keys["ct"]]).astype(np.float32), "stored"
        elif keys["ct_scaled"] in index.tensors:
            cs = read_tensor(index[keys["ct_scaled"]]).astype(np.float64)
            cb, cb_name = (cs * math.sqrt(bsz)).astype(np.float32), "stored"
        else:
            raise ValueError(f"{where}: no {keys['ct']!r} or {keys['ct_scaled']!r} stored; pass codebook=<variant>")
        used.update(k for k in (keys["ct"], keys["ct_scaled"]) if k in index.tensors)
        out[_weight_name(prefix)] = _make(codes, norms, cb, bits, bsz, in_f, cb_name, where)
    for name, info in index.tensors.items():
        if name not in used:
            if name in out:
                raise ValueError(f"{info.file}: tensor {name!r} collides with a quantized weight name")
            out[name] = read_tensor(info)
    return out


def save_polar_triplets(root: str | os.PathLike, params: dict, fmt: str = "polar_engine_v5", pack: bool = True,
                        centroids: str = "ct") -> None:
    """Write {name: HLWQArray | array} in the triplet layout (one shard). Quantized names must end in ``.weight``.

    pack: half-block nibbles for ≤ 4 bits and (v5 only) 5-bit groups for 5 bits; False stores int8 codes.
    centroids: "ct" (exact) or "ct_scaled" (c/√B in float32, as the original wrote it).
    """
    if fmt not in TRIPLET_FORMATS:
        raise ValueError(f"unknown triplet format {fmt!r}; expected one of {TRIPLET_FORMATS}")
    if centroids not in ("ct", "ct_scaled"):
        raise ValueError(f"centroids must be 'ct' or 'ct_scaled', got {centroids!r}")
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors, layers = {}, {}
    for name, leaf in params.items():
        if not isinstance(leaf, HLWQArray):
            tensors[name] = np.asarray(leaf)
            continue
        if not name.endswith(".weight"):
            raise ValueError(f"quantized tensor {name!r}: the triplet layout needs a name ending in '.weight'")
        prefix = name[: -len(".weight")]
        codes = _codes_of(leaf)
        meta = {"in_features": leaf.in_features, "out_features": leaf.out_features,
                "in_features_padded": leaf.padded_in, "n_blocks": leaf.n_blocks, "bits": leaf.bits,
                "block_size": leaf.block_size, "packed": False, "scale_dtype": "float16"}
        if pack and leaf.bits <= 4:
            stored, meta["packed"] = bitstreams.pack_half_block(codes, leaf.block_size), True
        elif pack and leaf.bits == 5 and fmt == "polar_engine_v5":
            stored, meta["packed_q5"] = bitstreams.pack_lsb_rows(codes, 5), True
        else:
            stored = codes.view(np.int8)
        cb = np.asarray(leaf.codebook, np.float32)
        tensors[f"{prefix}.codes"] = stored
        tensors[f"{prefix}.norms"] = np.asarray(leaf.norms, np.float16)
        tensors[f"{prefix}.{centroids}"] = cb if centroids == "ct" else (cb / np.float32(math.sqrt(leaf.block_size)))
        layers[prefix] = meta
    _write_one_shard(root / "model.safetensors", tensors)
    write_json_atomic(root / "polar_config.json", {"format": fmt, "quantization": "polarengine",
                                                   "block_size": _common_block(layers), "layers": layers})


def _common_block(layers: dict) -> int | None:
    sizes = {m["block_size"] for m in layers.values()}
    return sizes.pop() if len(sizes) == 1 else None


def _write_one_shard(path: pathlib.Path, tensors: dict) -> None:
    specs = [(k, v.dtype, v.shape) for k, v in sorted(tensors.items())]
    with StreamWriter(path, specs, {"format": "pt"}) as w:
        for k, v in sorted(tensors.items()):
            w.write(k, v)


# ---- hlwq-q5 MSB-first streams ------------------------------------------------------------------------------------
def _infer_bits(nbytes: int, total: int, where: str) -> int:
    hits = [b for b in range(1, 9) if bitstreams.packed_size(total, b) == nbytes]
    if len(hits) != 1:
        raise ValueError(f"{where}: {nbytes} packed bytes do not identify a bit width for {total} codes")
    return hits[0]


def load_hlwq_streams(root: str | os.PathLike, codebook: str = "polarengine", bits: int | None = None) -> dict:
    """Read an hlwq-q5-style checkpoint (``__packed/__norms/__meta``). Returns {name: HLWQArray | np.ndarray}.

    codebook: Lloyd-Max variant to rebuild (none is stored; the original reader used "polarengine").
    bits: None → inferred per tensor from packed size and code count (5 for hlwq-q5).
    """
    index = CheckpointIndex(root)
    out, used = {}, set()
    for key in index.tensors:
        if not key.endswith("__meta"):
            continue
        name = key[: -len("__meta")]
        where = f"{index[key].file} tensor {name!r}"
        meta = read_tensor(index[key]).astype(np.int64).reshape(-1)
        if meta.shape != (5,):
            raise ValueError(f"{where}: __meta must hold [out, n_blocks, B, total_codes, in], got {meta.tolist()}")
        n_out, n_blocks, bsz, total, n_in = (int(v) for v in meta)
        if total != n_out * n_blocks * bsz:
            raise ValueError(f"{where}: total_codes {total} != out·n_blocks·B = {n_out * n_blocks * bsz}")
        for suf in ("__packed", "__norms"):
            if name + suf not in index.tensors:
                raise ValueError(f"{where}: tensor {name + suf!r} missing")
        packed = read_tensor(index[name + "__packed"]).view(np.uint8).reshape(-1)
        b = bits if bits is not None else _infer_bits(packed.size, total, where)
        codes = bitstreams.unpack_msb_flat(packed, b, total).reshape(n_out, n_blocks * bsz)
        norms = read_tensor(index[name + "__norms"]).reshape(n_out, n_blocks)
        cb = _variant_codebook(b, codebook, where)
        out[name] = _make(codes, norms, cb, b, bsz, n_in, codebook, where)
        used.update(name + s for s in ("__meta", "__packed", "__norms"))
    for name, info in index.tensors.items():
        if name not in used:
            out[name] = read_tensor(info)
    return out


def save_hlwq_streams(root: str | os.PathLike, params: dict) -> None:
    """Write {name: HLWQArray | array} in the ``__packed/__norms/__meta`` MSB-first layout (one shard).

    The codebook is NOT stored (as in the original); record which variant you used.
    """
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, leaf in params.items():
        if not isinstance(leaf, HLWQArray):
            tensors[name] = np.asarray(leaf)
            continue
        codes = _codes_of(leaf)
        tensors[name + "__packed"] = bitstreams.pack_msb_flat(codes, leaf.bits)
        tensors[name + "__norms"] = np.asarray(leaf.norms, np.float16)
        tensors[name + "__meta"] = np.array([leaf.out_features, leaf.n_blocks, leaf.block_size, codes.size,
                                             leaf.in_features], np.int64)
    _write_one_shard(root / "model.safetensors", tensors)
