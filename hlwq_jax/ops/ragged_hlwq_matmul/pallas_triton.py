"""Dropless grouped HLWQ matmul as Pallas (Triton) kernels over stacked expert planes [E, rows, words].

Two paths (``plan``):
  "decode"  T ≤ decode_max_rows: the dense decode GEMV (hlwq_matmul/gemv_triton.py) with one program per (output
            rows, token row), each reading the expert its token row is routed to (the expert id per row comes from
            ``searchsorted`` over the group ends). Experts without tokens are never read; an expert shared by
            several token rows is streamed once per row (from L2 after the first).
  "grouped" otherwise: a tile schedule (expert, first row, last row) with ≤ ⌈T / bm⌉ + E + 1 tiles; each program
            dequantises a [bn, 128] tile of its expert per chunk (the warp-shuffle lookup of hlwq_matmul) and feeds
            it to the tensor cores as the A operand against [bm, 128] activation rows, storing only its group's
            rows (masked). Rows past Σ group_sizes form a virtual group that stores zeros, so every output row is
            written exactly once without a separate memset.
            H200, Nemotron expert up at 4096 tokens × top-6: 1.55 ms against 0.32 ms for the dense bf16 matmul of
            the same FLOPs (results/bench_hlwq_matmul_batched_run2.md): each weight tile is dequantised once per
            128-token tile, each chunk's wgmma is waited for before the next chunk's lookups, and one 8-warp block
            (226 registers per thread, scripts/kernel_sass.py) fits per SM (ncu of the 64-token version:
            results/ncu_h200/).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hlwq_jax.ops.hlwq_matmul.gemv_triton import GemvConfig, chunk_order, gemv_call
from hlwq_jax.ops.hlwq_matmul.layout import CHUNK, HLWQPlanes, repack
from hlwq_jax.ops.hlwq_matmul.pallas_triton import (LOOKUPS, check_can_run, chunk_dot, chunk_loop, chunk_values,
                                                    largest_divisor_at_most, lookup_source, resolve_lookup)
from hlwq_jax.ops.hlwq_matmul.rotate import rotate_activations
from hlwq_jax.ops.ragged_hlwq_matmul.reference import check_args


@dataclasses.dataclass(frozen=True)
class RaggedPallasConfig:
    decode_max_rows: int = 16
    # decode: the dense GEMV (hlwq_matmul/gemv_triton.py), one program per token row; whole rows per program (fewer,
    # longer-lived programs than the dense default): 6 experts × 1856 rows took 26 µs so, 53 µs with max_tiles=1
    # (H200, results/bench_hlwq_matmul_gemv.md)
    gemv: GemvConfig = GemvConfig(max_tiles=3)
    # 128-token tiles dequantise each weight tile half as often as 64; with 8 warps (two warpgroups of 64 weight
    # rows) they run at 226 registers, one block per SM: 1.55 ms prefill against 1.78 for bm 64, 4 warps in one call
    # (H200, results/bench_hlwq_matmul_batched_run2.md; other tilings: results/tenth_explore/)
    block_m: int = 128
    block_n: int = 128
    warps: int = 8
    stages: int = 3  # Triton pipelining (cp.async of code words and activations): 1.79 ms prefill, 2.46 at 1
    unroll: int = 1  # (ptxas: unroll 3 with bn 128 spills; 1 does not)
    lookup: str = "auto"  # grouped kernel: as PallasConfig.lookup (the decode GEMV has its own, in ``gemv``)

    def __post_init__(self):
        if not isinstance(self.gemv, GemvConfig):
            raise ValueError(f"RaggedPallasConfig.gemv must be a GemvConfig, got {type(self.gemv).__name__}")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"RaggedPallasConfig.lookup must be one of {LOOKUPS}, got {self.lookup!r}")


def plan(t: int, config: RaggedPallasConfig) -> str:
    return "decode" if t <= config.decode_max_rows else "grouped"


def _grouped_kernel(tile_e_ref, tile_s_ref, tile_t_ref, x_ref, norms_ref, table_ref, *refs, bits, bm, bn,
                    n_chunks, unroll, cpb, precision, mode):
    """x_ref [T + bm, padded_in]; o_ref [T + bm, rows]; grid (tiles, rows / bn)."""
    *plane_refs, o_ref = refs
    i = pl.program_id(0)
    r0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    rows = pl.ds(r0, bn)
    e, start, stop = tile_e_ref[i], tile_s_ref[i], tile_t_ref[i]
    toks = pl.ds(start, bm)
    mask = (start + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)) < stop

    @pl.when((stop > start) & (e >= 0))
    def _compute():
        source = lookup_source(table_ref, (bn, CHUNK), mode)

        def body(c, acc):
            vals = chunk_values(source, plane_refs, bits, (e,), r0, bn, c, mode)
            xs = x_ref[toks, pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)]  # [bm, 128]
            return chunk_dot(vals, xs, norms_ref[e, c // cpb, rows], precision, acc)

        acc = chunk_loop(0, n_chunks, unroll, body, jnp.zeros((bn, bm), jnp.float32))
        pltriton.store(o_ref.at[toks, rows], acc.T.astype(o_ref.dtype), mask=mask)

    @pl.when((stop > start) & (e < 0))
    def _zeros():
        pltriton.store(o_ref.at[toks, rows], jnp.zeros((bm, bn), o_ref.dtype), mask=mask)


def _tiles(group_sizes, t: int, bm: int):
    """Tile schedule (expert or −1, start, stop) int32 [⌈t / bm⌉ + E + 1] over the groups plus the zero tail."""
    e = group_sizes.shape[0]
    sizes = jnp.concatenate([group_sizes, jnp.asarray([t], group_sizes.dtype) - jnp.sum(group_sizes)[None]])
    ids = jnp.concatenate([jnp.arange(e, dtype=jnp.int32), jnp.asarray([-1], jnp.int32)])
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    n_tiles = -(-sizes // bm)
    tile_ends = jnp.cumsum(n_tiles)
    max_tiles = -(-t // bm) + e + 1
    i = jnp.arange(max_tiles)
    g = jnp.minimum(jnp.searchsorted(tile_ends, i, side="right", method="compare_all"), e)
    local = i - (tile_ends[g] - n_tiles[g])
    start = starts[g] + local * bm
    stop = jnp.minimum(start + bm, ends[g])
    live = i < tile_ends[-1]
    return (jnp.where(live, ids[g], 0).astype(jnp.int32), jnp.where(live, start, 0).astype(jnp.int32),
            jnp.where(live, stop, 0).astype(jnp.int32))


def gather_hlwq_matmul_pallas(x: jax.Array, w: HLWQPlanes, expert_ids: jax.Array, *,
                              config: RaggedPallasConfig = RaggedPallasConfig(), interpret: bool = False) -> jax.Array:
    """float32 [A, out]: row a of x [A, in] times expert expert_ids[a] (int, in [0, E)) of the stacked HLWQPlanes
    w [E, out, in] — the decode GEMV with one program per (rows, row a); only the experts named are read (an MoE
    decode's gathered experts, without sorting the rows by expert)."""
    check_can_run(interpret)
    if not isinstance(w, HLWQPlanes) or w.ndim != 3:
        raise ValueError(f"gather_hlwq_matmul_pallas needs stacked HLWQPlanes [E, out, in], got "
                         f"{type(w).__name__} of shape {getattr(w, 'shape', None)}")
    if x.ndim != 2 or x.shape[-1] != w.in_features or expert_ids.shape != x.shape[:1]:
        raise ValueError(f"gather_hlwq_matmul_pallas: x {x.shape}, expert_ids {expert_ids.shape} and weight "
                         f"{w.shape} disagree (want x [A, {w.in_features}], expert_ids [A])")
    if x.shape[0] == 0:
        return jnp.zeros((0, w.out_features), jnp.float32)
    xg = rotate_activations(x, w, chunk_order=chunk_order(w.bits))  # f32 [A, padded_in], the GEMV's order
    return gemv_call(xg, w, jnp.float32, config.gemv, interpret=interpret, expert_ids=expert_ids.astype(jnp.int32))


def ragged_hlwq_matmul_pallas(x_sorted: jax.Array, w, group_sizes: jax.Array, *,
                              config: RaggedPallasConfig = RaggedPallasConfig(), interpret: bool = False) -> jax.Array:
    """x_sorted [T, in], w HLWQPlanes | HLWQArray [E, out, in], group_sizes int [E] → [T, out] in x dtype."""
    check_can_run(interpret)
    check_args(x_sorted, w, group_sizes)
    p = w if isinstance(w, HLWQPlanes) else repack(w)
    t, n_e = x_sorted.shape[0], p.shape[0]
    out_dtype = x_sorted.dtype
    if t == 0:
        return jnp.zeros((0, p.out_features), out_dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    if plan(t, config) == "decode":
        ends = jnp.cumsum(group_sizes)
        # compare_all: one [T, E] comparison; the default binary search ran as 18 dependent ~2 µs kernels on the
        # H200, 25 → 7 kernels and 68 → 31 µs per call (results/ncu_h200/decode_kernel_list.md)
        expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(t, dtype=jnp.int32), side="right", method="compare_all"),
                             n_e - 1)
        y = gather_hlwq_matmul_pallas(x_sorted, p, expert, config=config, interpret=interpret)
        covered = jnp.arange(t) < ends[-1]  # rows past the groups read the last expert here and are zeroed
        return jnp.where(covered[:, None], y, 0).astype(out_dtype)
    cpb = p.block_size // CHUNK
    bm, bn = config.block_m, config.block_n
    dot_dtype = jnp.float32 if jnp.dtype(out_dtype).itemsize >= 4 else out_dtype
    xr = rotate_activations(x_sorted, p)  # f32 [T, padded_in]
    xr = jnp.pad(xr.astype(dot_dtype), [(0, bm), (0, 0)])  # a tile may start within bm of the end
    kernel = functools.partial(_grouped_kernel, bits=p.bits, bm=bm, bn=bn, n_chunks=p.n_chunks,
                               unroll=largest_divisor_at_most(p.n_chunks, config.unroll), cpb=cpb,
                               precision=lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None,
                               mode=resolve_lookup(config.lookup, p.bits, LOOKUPS))
    sched = _tiles(group_sizes, t, bm)
    y = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((t + bm, p.rows), out_dtype),
        grid=(sched[0].shape[0], p.rows // bn),
        compiler_params=pltriton.CompilerParams(num_warps=config.warps, num_stages=config.stages),
        interpret=interpret, name=f"hlwq_ragged_grouped_q{p.bits}",
    )(*sched, xr, p.norms_t, p.table, *p.planes)
    return y[:t, : p.out_features]
