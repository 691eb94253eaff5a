"""Grouped matmul through `jax.lax.ragged_dot` (portable; on this jaxlib's GPU backend it lowers to a padded dense dot
and is ~125x slower than the useful FLOPs justify — use the mosaic_gpu implementation there).

    grouped_matmul_xla(x [M, K], w [G, N, K], group_sizes int [G]) -> [M, N] in x dtype
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_xla(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    y = jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
