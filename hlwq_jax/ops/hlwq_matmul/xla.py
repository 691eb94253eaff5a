"""HLWQ matmul in plain XLA: rotate the activations, contract against the codes without applying H to the weight.

    x̃ = blockwise H(s ⊙ x)                                   [M, n_blocks, B]   (rotate.py)
    M ≤ config.reduce_max_m:  y[m, o] = Σ_b r[o, b] Σ_k (c[code[o, b, k]] / √B) · x̃[m, b, k]
        one multiply-reduce that XLA fuses with the unpacking and the table lookup (no weight is materialised)
    M > config.reduce_max_m:  Ŵ_rot = r · c[code] / √B in the activation dtype (bf16 for bf16 inputs), then a
        tensor-core dot x̃ · Ŵ_rotᵀ with float32 accumulation (XLA cannot fuse a lookup into a cuBLAS operand), written
        in x.dtype directly.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.ops.hlwq_matmul.layout import HLWQPlanes
from hlwq_jax.ops.hlwq_matmul.rotate import rotate_activations


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    reduce_max_m: int = 8  # token counts up to this use the fused multiply-reduce

    def __post_init__(self):
        if not isinstance(self.reduce_max_m, int) or self.reduce_max_m < 0:
            raise ValueError(f"XlaConfig.reduce_max_m must be an int ≥ 0, got {self.reduce_max_m!r}")


def codes_and_norms(w):
    """(uint8 codes [*lead, out, n_blocks, B], float32 norms [*lead, out, n_blocks]) of an HLWQArray / HLWQPlanes."""
    if isinstance(w, HLWQPlanes):
        codes = w.codes().reshape(*w.shape[:-1], w.n_blocks, w.block_size)
        norms = jnp.swapaxes(w.norms_t, -1, -2)[..., : w.out_features, :]
        return codes, norms.astype(jnp.float32)
    return w.unpack_codes(), w.norms.astype(jnp.float32)


def hlwq_matmul_xla(x: jax.Array, w, *, config: XlaConfig = XlaConfig(), rotated: bool = False) -> jax.Array:
    """x [..., in] (or x̃ [..., padded_in] float32 when ``rotated``), w [out, in] → [..., out] in x.dtype."""
    if len(w.shape) != 2:
        raise ValueError(f"hlwq_matmul needs a 2-D weight [out, in], got shape {w.shape}")
    out_dtype = x.dtype
    lead = x.shape[:-1]
    xr = x if rotated else rotate_activations(x, w)
    xr = xr.reshape(-1, xr.shape[-1]).astype(jnp.float32)
    m = xr.shape[0]
    if m <= config.reduce_max_m:
        codes, norms = codes_and_norms(w)  # [out, nb, B], [out, nb]
        table = w.codebook.astype(jnp.float32) * np.float32(1.0 / math.sqrt(w.block_size))
        vals = table[codes] * norms[..., None]  # fused into the reduction by XLA
        xb = xr.reshape(m, 1, w.n_blocks, w.block_size)
        y = jnp.sum(xb * vals[None], axis=(-2, -1))  # [m, out]
    else:
        dot_dtype = jnp.float32 if jnp.dtype(out_dtype).itemsize >= 4 else out_dtype
        w_rot = w.rotated_values(dot_dtype)
        # bf16 / fp16: the dot accumulates in float32 and writes x.dtype directly (a float32 [M, out] result plus a
        # cast pass cost 1.39x bf16's time at M = 4096 on the H200, results/bench_hlwq_matmul_xla.md)
        y = jnp.einsum("mi,oi->mo", xr.astype(dot_dtype), w_rot, preferred_element_type=dot_dtype,
                       precision=jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None)
    return y.reshape(*lead, -1).astype(out_dtype)
