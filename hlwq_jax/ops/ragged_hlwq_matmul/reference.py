"""Plain-jnp reference of the grouped (ragged) HLWQ matmul for MoE experts.

x_sorted [T, in] holds the tokens sorted by expert; expert e owns rows [start_e, start_e + group_sizes[e]) with
start_e = Σ_{e' < e} group_sizes[e']. Rows at or past Σ group_sizes belong to no expert and come out as zeros.

    1. Ŵ = w.dequantize(float32)                 [E, out, in]
    2. for each expert e: Y_e = x_sorted · Ŵ_eᵀ   [T, out], kept only on expert e's rows
    3. y = Σ_e mask_e ⊙ Y_e, cast to x.dtype
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_args(x_sorted, w, group_sizes) -> None:
    if len(w.shape) != 3:
        raise ValueError(f"ragged_hlwq_matmul needs stacked experts [E, out, in], got weight shape {w.shape}")
    if x_sorted.ndim != 2 or x_sorted.shape[1] != w.shape[2]:
        raise ValueError(f"x_sorted must be [T, {w.shape[2]}], got {x_sorted.shape}")
    if group_sizes.ndim != 1 or group_sizes.shape[0] != w.shape[0]:
        raise ValueError(f"group_sizes must be [{w.shape[0]}] (one count per expert), got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integer, got {group_sizes.dtype}")


def ragged_hlwq_matmul_reference(x_sorted: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """x_sorted [T, in], w [E, out, in] (HLWQArray | HLWQPlanes), group_sizes int [E] → [T, out] in x dtype."""
    check_args(x_sorted, w, group_sizes)
    w_hat = w.dequantize(jnp.float32)  # 1.
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    t = jnp.arange(x_sorted.shape[0])
    xf = x_sorted.astype(jnp.float32)
    y = jnp.zeros((x_sorted.shape[0], w.shape[1]), jnp.float32)
    for e in range(w.shape[0]):  # 2.
        mask = (t >= starts[e]) & (t < ends[e])
        y_e = jnp.einsum("ti,oi->to", xf, w_hat[e], precision=jax.lax.Precision.HIGHEST)
        y = y + jnp.where(mask[:, None], y_e, 0.0)
    return y.astype(x_sorted.dtype)  # 3.
