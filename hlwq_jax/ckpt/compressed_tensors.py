"""CompressedTensors "pack-quantized" export: symmetric INT4, one scale per group of g inputs (vLLM / llm-compressor).

Per linear module M (weight ``M.weight`` [out, in], in a multiple of g):
  ``M.weight_packed`` int32 [out, in/8]  — q + 8 (q ∈ [−8, 7]) as 4-bit fields, element j of a row at bits
                                          [4(j mod 8), 4(j mod 8) + 4) of word j // 8 (LSB first, little-endian)
  ``M.weight_scale``  [out, in/g] in the source dtype (bf16 usually) — s = max|w_group| / 7 rounded to that dtype
  ``M.weight_shape``  int64 [2]
  with q = clamp(round_half_even(w / s), −8, 7) computed against the stored (rounded) s, and the decompression
  Ŵ = (q · s) evaluated in the scale dtype — exactly what ``compressed_tensors``' PackedQuantizationCompressor does.
The weight w is either the source weight or, by default, its HLWQ dequantization ("HLWQ then INT4", hlwq.md §5).
``quantization_config`` lists one config group per group size, each targeting its modules by regex, and the modules
kept unquantized under ``ignore``.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hlwq_jax.quant import packing

SCALE_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
                "float32": np.dtype(np.float32)}
QMIN, QMAX = -8, 7


def module_name(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise ValueError(f"tensor {weight_name!r}: CompressedTensors export needs a Linear weight named '*.weight'")
    return weight_name[: -len(".weight")]


def group_size_for(n_in: int, group_size: int) -> int:
    """``group_size`` if it divides ``in``, else the largest power of two ≥ 32 that does (CT requires divisibility)."""
    g = group_size
    while g >= 32:
        if n_in % g == 0:
            return g
        g //= 2
    raise ValueError(f"in_features {n_in} is not divisible by any group size in 32..{group_size}")


def entry_meta(name: str, shape, choice: dict, group_size: int, src_dtype: str) -> dict:
    """Export settings of one weight: HLWQ stage (bits …, ``source``), INT4 group size, keys."""
    if len(shape) != 2:
        raise ValueError(f"tensor {name!r}: CompressedTensors export handles 2-D weights, got shape {list(shape)}")
    if src_dtype not in SCALE_DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported scale dtype {src_dtype!r}")
    m = module_name(name)
    return {"bits": choice["bits"], "block_size": choice["block_size"], "codebook": choice["codebook"],
            "rotation": choice["rotation"], "seed": choice["seed"], "source": choice.get("source", "hlwq"),
            "group_size": group_size_for(int(shape[1]), group_size), "scale_dtype": src_dtype,
            "shape": [int(s) for s in shape],
            "keys": {"weight_packed": f"{m}.weight_packed", "weight_scale": f"{m}.weight_scale",
                     "weight_shape": f"{m}.weight_shape"}}


def entry_specs(meta: dict):
    out, n_in = meta["shape"]
    k = meta["keys"]
    return [(k["weight_packed"], np.dtype(np.int32), (out, n_in // 8)),
            (k["weight_scale"], SCALE_DTYPES[meta["scale_dtype"]], (out, n_in // meta["group_size"])),
            (k["weight_shape"], np.dtype(np.int64), (2,))]


@functools.partial(jax.jit, static_argnames=("group_size",))
def _group_absmax(w, *, group_size: int):
    rows, n_in = w.shape
    return jnp.max(jnp.abs(w.reshape(rows, n_in // group_size, group_size)), axis=-1)


@functools.partial(jax.jit, static_argnames=("group_size",))
def _int4_codes(w, scale, *, group_size: int):
    """w float32 [rows, in], scale float32 [rows, in/g] → packed int32 [rows, in/8]."""
    rows, n_in = w.shape
    g = w.reshape(rows, n_in // group_size, group_size)
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero group: q = 0 whatever the scale
    q = jnp.clip(jnp.round(g / safe[..., None]), QMIN, QMAX).astype(jnp.int32)
    u = (q + 8).astype(jnp.uint8).reshape(rows, n_in)
    b = packing.pack_codes(u, 4).astype(jnp.uint32).reshape(rows, n_in // 8, 4)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return jax.lax.bitcast_convert_type(word, jnp.int32)


def quantize_int4(w, group_size: int = 128, scale_dtype: str = "bfloat16") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 pack-quantized encoding of w [rows, in] (in % group_size == 0). Returns (packed, scale).

    The scale max|w|/7 is divided on the host (IEEE float32; XLA CPU's division is not correctly rounded)."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2 or w.shape[1] % group_size or w.shape[1] % 8:
        raise ValueError(f"INT4 g{group_size} needs [rows, in] with in divisible by {group_size}, got {w.shape}")
    amax = np.asarray(_group_absmax(w, group_size=group_size))
    s = (amax / np.float32(QMAX)).astype(SCALE_DTYPES[scale_dtype])
    packed = _int4_codes(w, jnp.asarray(s.astype(np.float32)), group_size=group_size)
    return np.asarray(packed), s


@jax.jit
def _dequantize_f32(w):
    return w.dequantize(jnp.float32)


def int4_from_hlwq(w, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The export of one chunk: ``w`` is an HLWQArray (source "hlwq") or a float array (source "weights")."""
    dense = _dequantize_f32(w) if hasattr(w, "dequantize") else w
    return quantize_int4(dense, meta["group_size"], meta["scale_dtype"])


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, shape) -> np.ndarray:
    """numpy reference decompression: (q · s) in the scale dtype, [out, in]."""
    out, n_in = (int(v) for v in shape)
    words = np.ascontiguousarray(packed, np.int32).view(np.uint32)
    shifts = np.arange(8, dtype=np.uint32) * 4
    q = ((words[..., None] >> shifts) & 0xF).astype(np.int32).reshape(out, -1)[:, :n_in] - 8
    g = n_in // scale.shape[1]
    s = np.repeat(np.asarray(scale).astype(np.float32), g, axis=1)
    return (q.astype(np.float32) * s).astype(scale.dtype)


def _generalize(name: str) -> str:
    return "re:^" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) + "$"


def _targets(modules: list[str], others: list[str]) -> list[str]:
    """Regex targets covering ``modules`` (layer/expert indices generalised) and matching none of ``others``."""
    pats = sorted({_generalize(m) for m in modules})
    compiled = [re.compile(p[3:]) for p in pats]
    if any(c.match(o) for c in compiled for o in others):
        return sorted("re:^" + re.escape(m) + "$" for m in modules)
    return pats


def quantization_config(groups: dict[int, list[str]], ignore: list[str], version: str = "0.12.0") -> dict:
    """``config.json`` ``quantization_config`` for INT4 pack-quantized weights.

    groups: {group_size: [module names]}; ignore: Linear modules left unquantized.
    """
    cfg_groups = {}
    all_mods = {g: mods for g, mods in groups.items() if mods}
    for i, (g, mods) in enumerate(sorted(all_mods.items(), reverse=True)):
        others = [m for h, ms in all_mods.items() if h != g for m in ms] + list(ignore)
        cfg_groups[f"group_{i}"] = {
            "targets": _targets(mods, others), "format": "pack-quantized",
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": g,
                        "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
                        "block_structure": None},
            "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": cfg_groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}, "version": version}
