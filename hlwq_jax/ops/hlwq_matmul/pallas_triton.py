"""Fused code-lookup HLWQ matmul as Pallas kernels lowered through Triton (GPU), or run in interpret mode (CPU).

Every kernel streams the bit planes of ``HLWQPlanes`` (layout.py), rebuilds each code with shifts (``field``), looks
it up in the 2^b-entry table c/√B and applies one norm per (row, 128-code chunk). The lookup (``PallasConfig.lookup``)
is a warp shuffle for ≤ 5 bits (lane_lut.py: one ``shfl.sync`` per code, no mask, no layout conversion) and a load
from the table above. The activations are rotated beforehand (rotate.py; one small dot, which for the GEMV also
puts the columns in its order).

Three paths, chosen by the token count M (``plan``; the config makes the thresholds explicit):
  "gemv"    M ≤ gemv_max_m (decode): gemv_triton.py — 16-byte code loads, one warp per program, activations in
            registers; the regime where bytes decide.
  "dot"     gemv_max_m < M < dequant_min_m: grid (output tiles, chunk groups, token tiles); the dequantised
            [bn, 128] weight tile is the tensor-core A operand (wgmma on the H200 with bn = 64) against [bm, 128]
            activation rows, accumulated over the chunks with one norm per row and chunk, with Triton's software
            pipelining (``stages_dot``).
  "dequant" M ≥ dequant_min_m: a Pallas kernel writes r·c[code]/√B in the dot dtype once (2.4 TB/s on lm_head),
            then one XLA (cuBLAS) dot that writes the output dtype.
Why Triton rather than Mosaic GPU: Mosaic GPU lowers neither a pointer gather nor a register gather, so its lookup
would be a 2^b-way select chain per code; on the H200 the select chain cost 1.65× (4 bits) to 2.5× (5 bits) the
pointer gather (``lookup="select"`` is that ablation; results/bench_hlwq_matmul.md), and the shuffle beats both.
Status (H200, results/bench_hlwq_matmul_batched.md): "gemv" beats XLA's bf16 GEMV on the large shapes; "dot" is
1.2–1.6× the bf16 time at M = 16 … 64; "dequant" is 1.1–1.3× at M = 4096 on the four large shapes, more on the
expert shapes and at M = 1024 (the dequantize pass is a fixed cost that short matmuls do not hide).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hlwq_jax.ops.hlwq_matmul.gemv_triton import LOOKUPS as GEMV_LOOKUPS
from hlwq_jax.ops.hlwq_matmul.gemv_triton import (GemvConfig, chunk_order, gemv_call, reduce_groups, resolve_lookup,
                                                  to_gemv_order)
from hlwq_jax.ops.hlwq_matmul.fma import fma
from hlwq_jax.ops.hlwq_matmul.lane_lut import lane_shuffle, lane_table
from hlwq_jax.ops.hlwq_matmul.layout import CHUNK, HLWQPlanes, bitrev, extension_bits, field, fields_per_word, repack
from hlwq_jax.ops.hlwq_matmul.rotate import rotate_activations


LOOKUPS = (*GEMV_LOOKUPS, "select")


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    gemv_max_m: int = 1  # the GEMV up to this M (its registers grow with M; M = 2–8 on it are not timed)
    gemv: GemvConfig = GemvConfig()  # the GEMV's tiling (gemv_triton.py)
    # from this M on, dequantize + cuBLAS (H200: at M = 128 the dot path was 1.15× faster on lm_head, at M = 256
    # dequantize + cuBLAS 1.5–1.7×; results/bench_hlwq_matmul_batched.md)
    dequant_min_m: int = 256
    block_m_dot: int = 64  # token rows per program (power of two ≥ 16)
    block_n_dot: int = 64  # output rows per program: the weight tile is the wgmma A operand (64 rows per warpgroup)
    warps_dot: int = 4
    stages_dot: int = 3  # Triton software pipelining (code words and activations by cp.async)
    block_n_deq: int = 32  # (32 rows: 2.4 TB/s on lm_head, 64 rows: 2.3; results/bench_hlwq_matmul_batched.md)
    warps_deq: int = 4
    chunks_deq: int = 8  # dequant: chunks per program at most (a divisor of n_chunks), amortising the table setup
    unroll: int = 1  # dot path: chunks per loop iteration, statically unrolled (3 overflows shared memory at stages 3)
    min_programs: int = 528  # dot path: split the chunks over programs (partial sums) until the grid has this many
    # dot/dequant: "shuffle" (warp shuffle, ≤ 5 bits) | "gather" (table load) | "select" (2^b-way where chain, the
    # Mosaic ablation) | "auto" (shuffle where it applies, else gather)
    lookup: str = "auto"

    def __post_init__(self):
        if not isinstance(self.gemv, GemvConfig):
            raise ValueError(f"PallasConfig.gemv must be a GemvConfig, got {type(self.gemv).__name__}")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"PallasConfig.lookup must be one of {LOOKUPS}, got {self.lookup!r}")


def plan(m: int, config: PallasConfig) -> str:
    """Which kernel path runs for M tokens: "gemv" | "dot" | "dequant"."""
    if m <= config.gemv_max_m:
        return "gemv"
    return "dequant" if m >= config.dequant_min_m else "dot"


def split_chunks(n_chunks: int, base_programs: int, min_programs: int) -> int:
    """Number of chunk groups (a divisor of n_chunks): the fewest that give base·groups ≥ min_programs."""
    for d in range(1, n_chunks + 1):
        if n_chunks % d == 0 and base_programs * d >= min_programs:
            return d
    return n_chunks


def largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def check_can_run(interpret: bool) -> None:
    if not interpret and jax.default_backend() != "gpu":
        raise RuntimeError(f"impl='pallas' needs a GPU (default backend is {jax.default_backend()!r}); "
                           "pass interpret=True to run the kernel in Pallas interpret mode on the CPU")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---- in-kernel building blocks ---------------------------------------------------------------------------------
def _join(lo, hi):
    """[bn, n] × 2 → [bn, 2n] with lo, hi interleaved (Triton join + reshape: stays in registers)."""
    return jnp.stack([lo, hi], axis=-1).reshape(lo.shape[0], 2 * lo.shape[1])


def interleave(parts):
    """[bn, n] × P (P a power of two) → [bn, P·n]: element i of parts[j] lands at P·i + bitrev(j) (pairwise joins)."""
    if len(parts) == 1:
        return parts[0]
    half = len(parts) // 2
    return _join(interleave(parts[:half]), interleave(parts[half:]))


def unpack_chunk(plane_refs, bits, lead, r0, bn, c, masked=True):
    """int32 codes [bn, 128] of chunk c for rows [r0, r0 + bn); ``lead`` indexes leading (expert) axes (layout.py).
    ``masked=False`` leaves garbage above bit b (for the shuffle lookup, which reads only the low 5 bits)."""
    f_, x_ = fields_per_word(bits), extension_bits(bits)
    nw = CHUNK // f_  # base words per row and chunk
    base = plane_refs[0][(*lead, pl.ds(r0, bn), pl.ds(pl.multiple_of(c * nw, nw), nw))]  # [bn, nw] uint32
    ext = None
    if x_:  # extension of base word G·u + s = extra word u >> X·s; interleave puts part j at s = bitrev(j)
        g = 32 // x_
        ne = nw // g
        y = plane_refs[1][(*lead, pl.ds(r0, bn), pl.ds(pl.multiple_of(c * ne, ne), ne))]  # [bn, ne]
        ext = interleave([y >> int(x_ * s) if s else y for s in bitrev(g.bit_length() - 1)])
    mask = (1 << bits) - 1
    return interleave([field(base, ext, f, bits) & mask if masked else field(base, ext, f, bits)
                       for f in range(f_)]).astype(jnp.int32)


def lookup_source(table_ref, shape, mode: str):
    """What ``lookup`` reads, built once per kernel: for "shuffle" each lane's own table entry [shape] (lane_lut.py),
    otherwise the table ref itself."""
    return lane_table(table_ref, shape) if mode == "shuffle" else table_ref


def lookup(source, code, mode: str):
    """table[code] as float32 (code's shape): a warp shuffle ("shuffle": codes may carry garbage above bit b), a
    load from the table ref ("gather"), or a select chain over the levels ("select", the Mosaic ablation)."""
    if mode == "shuffle":
        return lane_shuffle(source, code)
    if mode == "gather":
        return source[code]
    if mode != "select":
        raise ValueError(f"unknown lookup mode {mode!r}")
    vals = jnp.zeros(code.shape, jnp.float32) + source[0]
    for i in range(1, source.shape[0]):
        vals = jnp.where(code == i, source[i], vals)
    return vals


def chunk_values(source, plane_refs, bits, lead, r0, bn, c, mode: str):
    """float32 [bn, 128]: the table values c[code]/√B of chunk c, rows [r0, r0 + bn) (no norm)."""
    return lookup(source, unpack_chunk(plane_refs, bits, lead, r0, bn, c, masked=mode != "shuffle"), mode)


def chunk_dot(vals, xs, norm, precision, acc):
    """float32 [bn, bm] = acc + norm[:, None] · (vals [bn, 128] @ xs [bm, 128]ᵀ), the norm applied by explicit FMAs
    (fma.py): the weight tile is the tensor-core A operand (with the weights as B, Triton stored the tile to shared
    memory one code at a time)."""
    part = lax.dot_general(vals.astype(xs.dtype), xs, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=precision)
    return fma(part, norm.astype(jnp.float32)[:, None], acc)


def chunk_loop(first, n, unroll, body, init):
    """Run body(c, carry) for c in [first, first + n), ``unroll`` chunks per fori_loop iteration (static)."""
    def step(i, carry):
        for u in range(unroll):
            carry = body(first + i * unroll + u, carry)
        return carry
    return lax.fori_loop(0, n // unroll, step, init)


# ---- kernels ---------------------------------------------------------------------------------------------------
def _dot_kernel(x_ref, norms_ref, table_ref, *refs, bits, bm, bn, group, unroll, cpb, precision, mode):
    """x_ref [Mp, padded_in] (bf16 or f32); o_ref [n_groups, Mp, rows]; grid (rows / bn, n_groups, Mp / bm)."""
    *plane_refs, o_ref = refs
    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    g = pl.program_id(1)
    rows = pl.ds(r0, bn)
    toks = pl.ds(pl.multiple_of(pl.program_id(2) * bm, bm), bm)
    source = lookup_source(table_ref, (bn, CHUNK), mode)

    def body(c, acc):
        vals = chunk_values(source, plane_refs, bits, (), r0, bn, c, mode)
        xs = x_ref[toks, pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)]  # [bm, 128]
        return chunk_dot(vals, xs, norms_ref[c // cpb, rows], precision, acc)

    acc = chunk_loop(g * group, group, unroll, body, jnp.zeros((bn, bm), jnp.float32))
    o_ref[g, toks, rows] = acc.T.astype(o_ref.dtype)


def _dequant_kernel(norms_ref, table_ref, *refs, bits, bn, group, cpb, mode):
    """o_ref [rows, padded_in] = r · c[code] / √B (rotated domain); grid (rows / bn, n_chunks / group), each program
    ``group`` chunks of bn rows."""
    *plane_refs, o_ref = refs
    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    source = lookup_source(table_ref, (bn, CHUNK), mode)

    def body(c, carry):
        vals = chunk_values(source, plane_refs, bits, (), r0, bn, c, mode)
        vals = vals * norms_ref[c // cpb, pl.ds(r0, bn)].astype(jnp.float32)[:, None]
        o_ref[pl.ds(r0, bn), pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)] = vals.astype(o_ref.dtype)
        return carry

    chunk_loop(pl.program_id(1) * group, group, 1, body, 0)


# ---- pallas_call wrappers --------------------------------------------------------------------------------------
def _params(warps, stages):
    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


def dot_call(xr, p: HLWQPlanes, out_dtype, config: PallasConfig, interpret: bool):
    """xr [M, padded_in] in the dot dtype (bf16 or f32) → [M, rows]."""
    m = xr.shape[0]
    bm = min(config.block_m_dot, max(16, _next_pow2(m)))
    mp = -(-m // bm) * bm
    if mp != m:
        xr = jnp.pad(xr, [(0, mp - m), (0, 0)])
    bn = config.block_n_dot
    n_groups = split_chunks(p.n_chunks, (p.rows // bn) * (mp // bm), config.min_programs)
    group = p.n_chunks // n_groups
    precision = lax.Precision.HIGHEST if xr.dtype == jnp.float32 else None
    kernel = functools.partial(_dot_kernel, bits=p.bits, bm=bm, bn=bn, group=group,
                               unroll=largest_divisor_at_most(group, config.unroll), cpb=p.block_size // CHUNK,
                               precision=precision, mode=resolve_lookup(config.lookup, p.bits, LOOKUPS))
    y = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_groups, mp, p.rows), out_dtype if n_groups == 1 else jnp.float32),
        grid=(p.rows // bn, n_groups, mp // bm), compiler_params=_params(config.warps_dot, config.stages_dot),
        interpret=interpret, name=f"hlwq_dot_q{p.bits}",
    )(xr, p.norms_t, p.table, *p.planes)
    return reduce_groups(y, out_dtype)[:m]


def dequant_call(p: HLWQPlanes, dtype, config: PallasConfig, interpret: bool):
    """The rotated-domain weight r · c[code] / √B in ``dtype`` (2-D layouts): [out, padded_in] when block_n_deq
    divides out (every Nemotron shape), else [rows, padded_in] with the zero padding rows."""
    bn = config.block_n_deq
    rows = p.out_features if p.out_features % bn == 0 else p.rows
    group = largest_divisor_at_most(p.n_chunks, config.chunks_deq)
    kernel = functools.partial(_dequant_kernel, bits=p.bits, bn=bn, group=group, cpb=p.block_size // CHUNK,
                               mode=resolve_lookup(config.lookup, p.bits, LOOKUPS))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((rows, p.padded_in), dtype), grid=(rows // bn, p.n_chunks // group),
        compiler_params=_params(config.warps_deq, 1), interpret=interpret, name=f"hlwq_dequant_q{p.bits}",
    )(p.norms_t, p.table, *p.planes)


def hlwq_matmul_pallas(x: jax.Array, w, *, config: PallasConfig = PallasConfig(), interpret: bool = False,
                       rotated: bool = False) -> jax.Array:
    """x [..., in] (or x̃ f32 [..., padded_in] when ``rotated``), w HLWQPlanes | HLWQArray [out, in] → [..., out].

    Pass an ``HLWQPlanes`` (``layout.repack`` once, at load time) for speed: an HLWQArray is repacked on every call.
    """
    check_can_run(interpret)
    p = w if isinstance(w, HLWQPlanes) else repack(w)
    if p.ndim != 2:
        raise ValueError(f"hlwq_matmul needs a 2-D weight [out, in], got shape {p.shape}")
    out_dtype = x.dtype
    lead = x.shape[:-1]
    m = math.prod(lead)
    if m == 0:
        return jnp.zeros((*lead, p.out_features), out_dtype)
    if x.shape[-1] != (p.padded_in if rotated else p.in_features):
        raise ValueError(f"x has {x.shape[-1]} features, expected {p.padded_in if rotated else p.in_features} "
                         f"({'rotated, padded_in' if rotated else 'input features'}) for weight {p.shape}")
    dot_dtype = jnp.float32 if jnp.dtype(out_dtype).itemsize >= 4 else out_dtype
    path = plan(m, config)
    if path == "gemv":  # the GEMV's column order folded into the rotation (or one transpose of shared activations)
        xg = (to_gemv_order(x.reshape(m, p.padded_in).astype(jnp.float32), p) if rotated
              else rotate_activations(x, p, chunk_order=chunk_order(p.bits)).reshape(m, p.padded_in))
        return gemv_call(xg, p, out_dtype, config.gemv, interpret=interpret).reshape(*lead, p.out_features)
    xr = (x if rotated else rotate_activations(x, p)).reshape(m, p.padded_in)
    if path == "dot":
        y = dot_call(xr.astype(dot_dtype), p, out_dtype, config, interpret)
    else:
        w_rot = dequant_call(p, dot_dtype, config, interpret)
        # float32 accumulation written in the dot dtype directly: a float32 [M, out] result plus a cast pass cost
        # ≈ 1.4× at M = 4096 (results/bench_hlwq_matmul_xla_f32out.md)
        y = jnp.einsum("mi,oi->mo", xr.astype(dot_dtype), w_rot, preferred_element_type=dot_dtype,
                       precision=lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None)
    return y[:, : p.out_features].reshape(*lead, p.out_features).astype(out_dtype)
