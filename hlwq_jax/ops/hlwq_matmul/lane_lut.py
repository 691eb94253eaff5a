"""A table lookup by warp shuffle inside Pallas-Triton kernels: two primitives, ``lane_ids`` and ``lane_shuffle``.

Pallas-Triton on jax 0.11.2 lowers no gather of a *value*, only pointer loads from a ref (one L1 load and 64-bit
address arithmetic per code). For a table of T ≤ 32 entries (a power of two) a lookup can be one warp shuffle:

    own = lane_table(table_ref, shape)      # once per kernel: each lane holds the entry of its lane number
    val = lane_shuffle(own, idx)            # table[idx mod T], one shfl.sync.idx per element

Semantics, on every backend: ``lane_shuffle(own, idx)[e] = own[e'][...]`` read from an element held by lane
``idx[e] mod 32`` — so with ``own`` built as above the result is table[idx mod T], whatever layout Triton gives the
tensors. The modulo is free: a shuffle reads only the low 5 bits of its source-lane operand (PTX ISA, shfl.sync:
``bval = b[4:0]``), so callers pass indices with garbage above their b bits and no mask (gemv_triton.py does).

* Triton (GPU): ``lane_ids`` is ``mov.u32 %laneid`` and ``lane_shuffle`` is ``shfl.sync.idx.b32 d, own, idx, 31,
  -1``, both as Triton elementwise inline assembly. Every lane executes each shuffle (the kernels have no divergent
  control flow around it), which the full member mask requires.
* Elsewhere (CPU, interpret mode): the model of a warp is each run of 32 consecutive elements of the last axis (a
  multiple of 32): ``lane_ids`` is the last-axis index mod 32 and ``lane_shuffle`` reads, within the element's run,
  the element at position ``idx & 31``.
``lane_table`` builds ``own`` from the lane id rather than as a load ``table_ref[lane & (T-1)]``: Triton's
coalescing pass gives such a gathering load a layout of its own, and the layout conversion after it moves entries to
other lanes (seen in the TTGIR of a [64, 128] tile), which breaks the "lane l holds table[l]" invariant.
Elementwise ops from a constant are rematerialised in their consumer's layout instead. It is a sum of
(lane == i) · table[i], not a select chain: from ``where(lane == i, table[i], own)`` ptxas made 31 loads predicated
on the lane into one register, each waiting for the one before (ncu on the H200: the decode GEMV's set-up cost
≈ 10 µs on in_proj; scripts/ncu_profile.py, results/ncu_h200/). The product needs every entry in every lane, so the
32 loads are unconditional and in flight together (≈ 3 instructions per entry, once per program).
The `gpu` tier checks the primitives against a plain lookup (tests/ops/test_hlwq_gemv.py).
Uses JAX's private Pallas-Triton lowering registry (``jax._src.pallas.triton.lowering``), pinned by jax==0.11.2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import mlir
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering as triton_lowering

WARP = 32
lane_ids_p = jax_core.Primitive("hlwq_lane_ids")
lane_shuffle_p = jax_core.Primitive("hlwq_lane_shuffle")


def lane_ids(shape: tuple[int, ...]) -> jax.Array:
    """int32 [shape] (last axis a multiple of 32): the lane that holds each element (CPU model: last-axis index mod
    32)."""
    if not shape or shape[-1] % WARP:
        raise ValueError(f"lane_ids: the last axis models warps and must be a multiple of {WARP}, got shape {shape}")
    return lane_ids_p.bind(shape=tuple(shape))


def lane_shuffle(own: jax.Array, idx: jax.Array) -> jax.Array:
    """own float32 [..., 32·k], int32 idx of the same shape → own's value held by lane idx mod 32, per element."""
    if own.shape != idx.shape or not own.shape or own.shape[-1] % WARP:
        raise ValueError(f"lane_shuffle: own {own.shape} and idx {idx.shape} must share one shape whose last axis "
                         f"is a multiple of {WARP}")
    if own.dtype != jnp.float32:
        raise ValueError(f"lane_shuffle moves 32-bit floats, got {own.dtype}")
    return lane_shuffle_p.bind(own, idx.astype(jnp.int32))


def lane_table(table_ref, shape: tuple[int, ...]) -> jax.Array:
    """float32 [shape]: each element is table[lane mod T] for the lane holding it (T = table_ref.shape[0], a power of
    two ≤ 32): the ``own`` operand of ``lane_shuffle``. Read inside a kernel (``table_ref`` a ref or an array)."""
    n = table_ref.shape[0]
    if n > WARP or n & (n - 1):
        raise ValueError(f"lane_table: the table must have a power-of-two size ≤ {WARP}, got {n}")
    lane = lane_ids(shape) & (n - 1)
    own = jnp.zeros(shape, jnp.float32)
    for i in range(n):  # a product, not a select: every lane needs every entry, so no load is predicated
        own = own + jnp.where(lane == i, 1.0, 0.0).astype(jnp.float32) * table_ref[i]
    return own


def _ids(*, shape):
    return jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) & (WARP - 1)


def _shuffle(own, idx):
    runs = (*own.shape[:-1], own.shape[-1] // WARP, WARP)
    out = jnp.take_along_axis(own.reshape(runs), idx.reshape(runs) & (WARP - 1), axis=-1)
    return out.reshape(own.shape)


lane_ids_p.def_impl(_ids)
lane_ids_p.def_abstract_eval(lambda *, shape: jax_core.ShapedArray(shape, jnp.int32))
mlir.register_lowering(lane_ids_p, mlir.lower_fun(_ids, multiple_results=False))
lane_shuffle_p.def_impl(_shuffle)
lane_shuffle_p.def_abstract_eval(lambda own, idx: jax_core.ShapedArray(own.shape, own.dtype))
mlir.register_lowering(lane_shuffle_p, mlir.lower_fun(_shuffle, multiple_results=False))


def inline_asm(ctx, asm: str, constraints: str, args):
    """One PTX instruction per element, as Triton elementwise inline assembly (the lowering rules' building block)."""
    out = mlir.aval_to_ir_type(ctx.context.mlir_ctx, ctx.avals_out[0])
    return tt_dialect.elementwise_inline_asm([out], asm, constraints=constraints, pure=True, packed_element=1,
                                             args=args)


@triton_lowering.register_lowering(lane_ids_p)
def _lane_ids_triton(ctx, *, shape):
    # elementwise asm needs a tensor operand to take its shape from: a zero tensor, not read by the asm
    zero = triton_lowering._full(mlir.aval_to_ir_type(ctx.context.mlir_ctx, ctx.avals_out[0]), 0)
    return inline_asm(ctx, "mov.u32 $0, %laneid;", "=r,r", [zero])


@triton_lowering.register_lowering(lane_shuffle_p)
def _lane_shuffle_triton(ctx, own, idx):
    return inline_asm(ctx, "shfl.sync.idx.b32 $0, $1, $2, 31, -1;", "=f,f,r", [own, idx])
