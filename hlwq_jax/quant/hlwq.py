"""HLWQ quantization (docs/hlwq.md §1) and its plain-XLA matmul.

quantize: pad ``in`` to a multiple of B → per (row, block) norm r (fp16) → u = block / r → ũ = u·R (R = H, H·diag(s)
or I) → z = √B·ũ → code = nearest centroid of a unit-Gaussian Lloyd-Max codebook. No calibration data.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.quant import hadamard, packing
from hlwq_jax.quant.array import ROTATIONS, HLWQArray
from hlwq_jax.quant.lloyd_max import VARIANTS, lloyd_max_codebook, uniform_codebook

CODEBOOKS = VARIANTS + ("uniform",)
_FP16_MAX = 65504.0


def codebook_values(bits: int, codebook) -> np.ndarray:
    """The float64 ascending grid for a codebook name (Lloyd-Max variants, or "uniform" on [−1, 1]), or an explicit
    array of 2**bits strictly ascending values (checked)."""
    if not isinstance(codebook, str):
        cb = np.asarray(codebook, np.float64)
        if cb.shape != (1 << bits,) or not np.all(np.isfinite(cb)) or not np.all(np.diff(cb) > 0):
            raise ValueError(f"an explicit codebook must be {1 << bits} finite strictly ascending values, got shape {cb.shape}")
        return cb
    if codebook == "uniform":
        return uniform_codebook(bits)
    return lloyd_max_codebook(bits, codebook)


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "weight"


def check_weight(w, name: str | None, ndims=(2, 3), check_finite: bool = True) -> None:
    """Raise ValueError for wrong rank, empty dimensions or (optionally) non-finite values, naming the tensor."""
    if w.ndim not in ndims:
        raise ValueError(f"{_label(name)}: expected a matrix [out, in] or stacked experts [E, out, in], got shape {tuple(w.shape)}")
    if w.shape[-1] == 0 or w.shape[-2] == 0:
        raise ValueError(f"{_label(name)}: empty dimension in shape {tuple(w.shape)}")
    if check_finite and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"{_label(name)} contains NaN or Inf values")


def _check_args(bits: int, block_size: int, codebook: str, rotation: str) -> None:
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    hadamard.check_block_size(block_size)
    if isinstance(codebook, str) and codebook not in CODEBOOKS:
        raise ValueError(f"unknown codebook {codebook!r}; expected one of {CODEBOOKS}")
    if rotation not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotation!r}; expected one of {ROTATIONS}")


@functools.partial(jax.jit, static_argnames=("bits", "block_size", "uniform", "rotate"))
def _quantize_jit(w, codebook, signs, *, bits: int, block_size: int, uniform: bool, rotate: bool):
    """w [*lead, out, in] → (packed uint8 [*lead, out, bytes], norms fp16 [*lead, out, n_blocks],
    finite: bool[] — w had no NaN/Inf, status: bool[] — every stored scale fits float16)."""
    *lead, out, n_in = w.shape
    finite = jnp.all(jnp.isfinite(w))
    n_blocks = -(-n_in // block_size)
    wf = w.astype(jnp.float32)
    if n_blocks * block_size != n_in:
        wf = jnp.pad(wf, [(0, 0)] * (len(lead) + 1) + [(0, n_blocks * block_size - n_in)])
    if rotate:  # u·R_k = (u ⊙ s_k)·H; the rotation commutes with the per-block norm, so rotate the raw rows.
        wf = hadamard.blockwise_rotate(wf, block_size, signs)
    blocks = wf.reshape(*lead, out, n_blocks, block_size)
    r = jnp.sqrt(jnp.sum(blocks * blocks, axis=-1))  # [*lead, out, n_blocks]
    z = blocks * (math.sqrt(block_size) / jnp.maximum(r, 1e-10))[..., None]  # Σ z² = B per block
    scale = r
    if uniform:  # absmax grid on [−a, a]: fold a into the stored scale
        a = jnp.max(jnp.abs(z), axis=-1)
        z = z / jnp.maximum(a, 1e-30)[..., None]
        scale = r * a
    codes = nearest_code(z, codebook, bits)
    packed = packing.pack_codes(codes.reshape(*lead, out, n_blocks * block_size), bits)
    norms = scale.astype(jnp.float16)
    return packed, norms, finite, jnp.all(jnp.isfinite(norms))


def nearest_code(z: jax.Array, codebook: jax.Array, bits: int) -> jax.Array:
    """Index of the nearest entry of an ascending ``codebook`` [2^bits] for every element of z → uint8.

    Counts the Voronoi boundaries below z: all at once for ≤ 5 bits (fast), by a bits-step binary search above.
    """
    boundaries = 0.5 * (codebook[1:] + codebook[:-1])
    if bits <= 5:
        return jnp.searchsorted(boundaries, z, side="left", method="compare_all").astype(jnp.uint8)
    idx = jnp.zeros(z.shape, jnp.int32)
    for step in reversed(range(bits)):
        cand = idx + (1 << step)
        idx = jnp.where(z > boundaries[cand - 1], cand, idx)
    return idx.astype(jnp.uint8)


def quantize(w, bits: int = 5, block_size: int = 128, codebook: str = "converged", rotation: str = "hadamard",
             seed: int = 0, name: str | None = None) -> HLWQArray:
    """Quantize a weight [out, in] or stacked experts [E, out, in] with HLWQ.

    Args:
      w: float array (numpy or jax), PyTorch layout (y = x @ W.T). ``in`` need not be a multiple of block_size.
      bits: 2..8.  block_size: a power of two (blocks run along ``in`` inside each row).
      codebook: "converged" (default) | "polarengine" | "polarengine-torch" | "uniform" (absmax uniform grid after
        the rotation: the Hadamard-only ablation; its norms then hold r·max|z|) | an explicit ascending array of
        2**bits values for z-space (stored as codebook_name "custom").
      rotation: "hadamard" | "random-hadamard" (seeded ±1 signs before H) | "none" (Lloyd-Max-only ablation).
      seed: signs seed for "random-hadamard" (stored).
      name: tensor name used in error messages.
    Returns:
      HLWQArray (see its invariant).
    Under tracing (inside ``jit`` or ``jax.eval_shape``) the NaN/Inf and fp16-range checks cannot run and are
    skipped; called eagerly, they raise ``ValueError`` naming the tensor.
    """
    _check_args(bits, block_size, codebook, rotation)
    w = jnp.asarray(w)
    check_weight(w, name, check_finite=False)  # finiteness is checked inside the jitted pass (one sync)
    cb = codebook_values(bits, codebook).astype(np.float32)
    n_pad = -(-w.shape[-1] // block_size) * block_size
    signs = jnp.asarray(hadamard.random_signs(n_pad, seed)) if rotation == "random-hadamard" else None
    packed, norms, finite, norms_ok = _quantize_jit(
        w, jnp.asarray(cb), signs, bits=bits, block_size=block_size,
        uniform=(isinstance(codebook, str) and codebook == "uniform"), rotate=(rotation != "none"))
    if isinstance(finite, jax.core.Tracer):  # inside jit / eval_shape: values are unknown, checks are the caller's
        return _array(packed, norms, cb, bits, block_size, w.shape, rotation, seed, codebook)
    finite, norms_ok = jax.device_get((finite, norms_ok))
    if not finite:
        raise ValueError(f"{_label(name)} contains NaN or Inf values")
    if not norms_ok:
        raise ValueError(f"{_label(name)}: a block norm exceeds the float16 range ({_FP16_MAX}); rescale the weight")
    return _array(packed, norms, cb, bits, block_size, w.shape, rotation, seed, codebook)


def _array(packed, norms, cb, bits, block_size, shape, rotation, seed, codebook) -> HLWQArray:
    return HLWQArray(packed=packed, norms=norms, codebook=jnp.asarray(cb), bits=bits, block_size=block_size,
                     shape=tuple(int(d) for d in shape), rotation=rotation, seed=seed,
                     codebook_name=codebook if isinstance(codebook, str) else "custom")


def rotate_activations(x: jax.Array, w: HLWQArray) -> jax.Array:
    """x [..., in] → x̃ [..., padded_in]: zero-pad, then per block x_k ↦ H (s_k ⊙ x_k) (identity for "none")."""
    pad = w.padded_in - x.shape[-1]
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    if w.rotation == "none":
        return x
    return hadamard.blockwise_rotate(x, w.block_size, w.signs())


def hlwq_matmul(x: jax.Array, w: HLWQArray, *, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """y = x @ Ŵᵀ without applying H to the weight: rotate x blockwise, contract with norms · codebook[codes] / √B.

    Args:
      x: [..., in].  w: HLWQArray of shape [out, in].
    Returns:
      [..., out] in x.dtype (accumulated in at least float32).
    """
    if w.ndim != 2:
        raise ValueError(f"hlwq_matmul needs a 2-D HLWQArray [out, in], got shape {w.shape}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, weight expects {w.in_features}")
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xr = rotate_activations(x.astype(acc), w)  # [..., padded_in]
    vals = w.rotated_values(acc)  # [out, padded_in]
    y = jnp.einsum("...i,oi->...o", xr, vals, precision=precision)
    return y.astype(x.dtype)
