"""Plain-jnp grouped matmul: a masked matmul per group (the definition the other implementations are tested against).

    grouped_matmul_reference(x [M, K], w [G, N, K], group_sizes int [G]) -> [M, N] in x dtype
Rows [start_g, start_g + size_g) of x use w[g], start_g = Σ_{j<g} size_j; rows at or past Σ size_g are zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    row = jnp.arange(x.shape[0])
    out = jnp.zeros((x.shape[0], w.shape[1]), jnp.float32)
    for g in range(w.shape[0]):                                       # step 1: each group's rows, masked
        mask = ((row >= starts[g]) & (row < ends[g]))[:, None]
        y = jnp.einsum("mk,nk->mn", x, w[g], preferred_element_type=jnp.float32)   # step 2: x · w_gᵀ
        out = jnp.where(mask, y, out)
    return out.astype(x.dtype)
