"""``lane_lookup``: a table lookup from a register tile, lowered to Triton's ``tt.gather`` (warp shuffles).

Pallas-Triton on jax 0.11.2 lowers no gather of a *value*, only pointer loads from a ref (one global/L1 load and
64-bit address arithmetic per code). This module adds one primitive:

    lane_lookup(table, idx, axis)[..., i, ...] = table[..., idx[..., i, ...], ...]      (take_along_axis semantics)

* inside a Pallas-Triton kernel it lowers to ``tt.gather``; Triton's thread-locality pass gives it a layout with the
  gather axis on the 32 lanes of a warp, and when the table has ≤ 32 entries along that axis each lookup is one
  ``shfl.sync.idx`` (gemv_triton.py arranges its tiles so that this layout is also the layout of its code loads);
* anywhere else (interpret mode on the CPU, plain jit) it is ``jnp.take_along_axis`` — the same semantics, which the
  tests check against the GPU lowering's result in the `gpu` tier.

Indices must be in range (the Triton lowering does not check them); ``mode="clip"`` only makes the CPU path total.
This uses JAX's private Pallas-Triton lowering registry (``jax._src.pallas.triton.lowering``), pinned by jax==0.11.2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import mlir
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering as triton_lowering

lane_lookup_p = jax_core.Primitive("hlwq_lane_lookup")


def lane_lookup(table: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
    """table [..., T, ...], int32 idx [..., N, ...] (same shape except along ``axis``) → table.dtype, idx's shape."""
    if table.ndim != idx.ndim:
        raise ValueError(f"lane_lookup: table rank {table.ndim} != index rank {idx.ndim}")
    if any(a != b for d, (a, b) in enumerate(zip(table.shape, idx.shape)) if d != axis % idx.ndim):
        raise ValueError(f"lane_lookup: table {table.shape} and index {idx.shape} differ off axis {axis}")
    return lane_lookup_p.bind(table, idx.astype(jnp.int32), axis=axis % idx.ndim)


def _take(table, idx, *, axis):
    return jnp.take_along_axis(table, idx, axis=axis, mode="clip")


lane_lookup_p.def_impl(_take)
lane_lookup_p.def_abstract_eval(lambda table, idx, *, axis: jax_core.ShapedArray(idx.shape, table.dtype))
mlir.register_lowering(lane_lookup_p, mlir.lower_fun(_take, multiple_results=False))


@triton_lowering.register_lowering(lane_lookup_p)
def _lane_lookup_triton(ctx, table, idx, *, axis):
    del ctx
    return tt_dialect.gather(table, idx, axis)
