"""Fused code-lookup HLWQ matmul as Pallas kernels lowered through Triton (GPU), or run in interpret mode (CPU).

Every kernel streams the bit planes of ``HLWQPlanes`` (layout.py), rebuilds each code with shifts and masks, looks it
up in the 2^b-entry table c/√B and applies one norm per (row, 128-code chunk). The activations are rotated
beforehand (rotate.py; one small dot).

Three paths, chosen by the token count M (``plan``; the config makes the thresholds explicit):
  "gemv"    M ≤ gemv_max_m (decode): gemv_triton.py — 16-byte code loads, one warp per program, the table lookup
            a warp shuffle (≤ 5 bits); the regime where bytes decide.
  "dot"     gemv_max_m < M < dequant_min_m: grid (output tiles, token tiles); the dequantised [bn, 128] tile goes to
            the tensor cores (tl.dot) against [bm, 128] activations (``unpack_chunk``: join-based unpacking).
  "dequant" M ≥ dequant_min_m: a Pallas kernel writes r·c[code]/√B in bf16 once, then an XLA (cuBLAS) dot.
Why Triton rather than Mosaic GPU: Mosaic GPU lowers neither a pointer gather nor a register gather, so its lookup
would be a 2^b-way select chain per code; on the H200 the select chain costs 1.65× (4 bits) to 2.5× (5 bits) the
pointer gather (``lookup="select"`` is that ablation; results/bench_hlwq_matmul.md).
Status: the "gemv" path beats XLA's bf16 GEMV on the large shapes (results/bench_hlwq_matmul_gemv.md); "dot" and
"dequant" stay slower than bf16 (results/bench_hlwq_matmul*.md say by how much and why).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hlwq_jax.ops.hlwq_matmul.gemv_triton import GemvConfig, gemv_call, reduce_groups, to_tile_order
from hlwq_jax.ops.hlwq_matmul.layout import CHUNK, HLWQPlanes, bitrev, extension_bits, field, fields_per_word, repack
from hlwq_jax.ops.hlwq_matmul.rotate import rotate_activations


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    gemv_max_m: int = 1  # the GEMV up to this M (its registers grow with M; M = 2–8 on it are not timed)
    gemv: GemvConfig = GemvConfig()  # the GEMV's tiling (gemv_triton.py)
    dequant_min_m: int = 1024
    block_m_dot: int = 64  # token rows per program (power of two ≥ 16)
    block_n_dot: int = 128
    warps_dot: int = 4
    stages_dot: int = 1
    block_n_deq: int = 64
    warps_deq: int = 4
    unroll: int = 3  # dot path: chunks per loop iteration, statically unrolled so their loads are in flight together
    min_programs: int = 528  # dot path: split the chunks over programs (partial sums) until the grid has this many
    lookup: str = "gather"  # dot/dequant: "gather" (table load) | "select" (2^b-way where chain, the Mosaic ablation)

    def __post_init__(self):
        if not isinstance(self.gemv, GemvConfig):
            raise ValueError(f"PallasConfig.gemv must be a GemvConfig, got {type(self.gemv).__name__}")


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


def unpack_chunk(plane_refs, bits, lead, r0, bn, c):
    """int32 codes [bn, 128] of chunk c for rows [r0, r0 + bn); ``lead`` indexes leading (expert) axes (layout.py)."""
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
    return interleave([field(base, ext, f, bits) & mask for f in range(f_)]).astype(jnp.int32)


def lookup(table_ref, code, n_levels: int, mode: str):
    """table[code] as float32 [bn, 128]: a gather from the table ref, or a select chain over the levels."""
    if mode == "gather":
        return table_ref[code]
    if mode != "select":
        raise ValueError(f"unknown lookup mode {mode!r}")
    vals = jnp.zeros(code.shape, jnp.float32) + table_ref[0]
    for i in range(1, n_levels):
        vals = jnp.where(code == i, table_ref[i], vals)
    return vals


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

    def body(c, acc):
        vals = lookup(table_ref, unpack_chunk(plane_refs, bits, (), r0, bn, c), table_ref.shape[0], mode)
        xs = x_ref[toks, pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)]  # [bm, 128]
        part = lax.dot_general(xs, vals.astype(x_ref.dtype), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32, precision=precision)  # [bm, bn]
        return acc + part * norms_ref[c // cpb, rows].astype(jnp.float32)[None, :]

    acc = chunk_loop(g * group, group, unroll, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[g, toks, rows] = acc.astype(o_ref.dtype)


def _dequant_kernel(norms_ref, table_ref, *refs, bits, bn, cpb):
    """o_ref [rows, padded_in] = r · c[code] / √B (rotated domain); grid (rows / bn, n_chunks)."""
    *plane_refs, o_ref = refs
    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    c = pl.program_id(1)
    vals = table_ref[unpack_chunk(plane_refs, bits, (), r0, bn, c)]
    vals = vals * norms_ref[c // cpb, pl.ds(r0, bn)].astype(jnp.float32)[:, None]
    o_ref[pl.ds(r0, bn), pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)] = vals.astype(o_ref.dtype)


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
                               precision=precision, mode=config.lookup)
    y = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_groups, mp, p.rows), out_dtype if n_groups == 1 else jnp.float32),
        grid=(p.rows // bn, n_groups, mp // bm), compiler_params=_params(config.warps_dot, config.stages_dot),
        interpret=interpret, name=f"hlwq_dot_q{p.bits}",
    )(xr, p.norms_t, p.table, *p.planes)
    return reduce_groups(y, out_dtype)[:m]


def dequant_call(p: HLWQPlanes, dtype, config: PallasConfig, interpret: bool):
    """The rotated-domain weight r · c[code] / √B, [rows, padded_in] in ``dtype`` (2-D layouts)."""
    bn = config.block_n_deq
    kernel = functools.partial(_dequant_kernel, bits=p.bits, bn=bn, cpb=p.block_size // CHUNK)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((p.rows, p.padded_in), dtype), grid=(p.rows // bn, p.n_chunks),
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
    xr = x if rotated else rotate_activations(x, p)
    if xr.shape[-1] != p.padded_in:
        raise ValueError(f"rotated activations have {xr.shape[-1]} features, expected padded_in={p.padded_in}")
    xr = xr.reshape(-1, p.padded_in)
    m = xr.shape[0]
    if m == 0:
        return jnp.zeros((*lead, p.out_features), out_dtype)
    dot_dtype = jnp.float32 if jnp.dtype(out_dtype).itemsize >= 4 else out_dtype
    path = plan(m, config)
    if path == "gemv":
        y = gemv_call(to_tile_order(xr.astype(jnp.float32), p), p, out_dtype, config.gemv, interpret=interpret)
    elif path == "dot":
        y = dot_call(xr.astype(dot_dtype), p, out_dtype, config, interpret)
    else:
        w_rot = dequant_call(p, dot_dtype, config, interpret)
        y = jnp.einsum("mi,oi->mo", xr.astype(dot_dtype), w_rot, preferred_element_type=jnp.float32,
                       precision=lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None)
    return y[:, : p.out_features].reshape(*lead, p.out_features).astype(out_dtype)
