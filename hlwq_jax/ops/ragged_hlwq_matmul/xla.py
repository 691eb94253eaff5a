"""Grouped HLWQ matmul in XLA: rotate x once, dequantise every expert in the rotated domain, ``lax.ragged_dot``.

Reads (and writes) every expert's weight whatever the routing; on this JAX build ragged_dot lowers to a padded dense
dot (docs/gpu.md). It is the portable baseline, not the fast path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hlwq_jax.ops.hlwq_matmul.rotate import rotate_activations
from hlwq_jax.ops.ragged_hlwq_matmul.reference import check_args


def ragged_hlwq_matmul_xla(x_sorted: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """x_sorted [T, in], w [E, out, in], group_sizes int [E] → [T, out] (rows past Σ group_sizes are zero)."""
    check_args(x_sorted, w, group_sizes)
    dot_dtype = jnp.float32 if jnp.dtype(x_sorted.dtype).itemsize >= 4 else x_sorted.dtype
    xr = rotate_activations(x_sorted, w).astype(dot_dtype)  # [T, padded_in]
    w_rot = jnp.swapaxes(w.rotated_values(dot_dtype), 1, 2)  # [E, padded_in, out]
    y = jax.lax.ragged_dot(xr, w_rot, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32,
                           precision=jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None)
    return y.astype(x_sorted.dtype)
