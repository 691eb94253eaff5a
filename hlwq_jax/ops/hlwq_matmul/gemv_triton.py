"""Decode GEMV (M ≤ gemv_max_m tokens) over ``HLWQPlanes``: a Pallas kernel lowered through Triton, one warp per program.

What bounds a quantized GEMV on the H200 is how many bytes each memory request carries and how many are in flight,
then integer instructions per code; the layout of every tile below follows from that:

* Tile = 128 consecutive base words of a row (``TILE_WORDS``; 8 chunks of 128 codes at 4 base bits), held as
  [VEC=4, LANES=32, R rows]: lane l owns words 4l … 4l+3, so each row is one 16-byte load per lane, 512 contiguous
  bytes per warp request. A program owns R rows (``PallasConfig.gemv_rows``, default 1) and loads all its tiles
  (≤ ``gemv_max_tiles``) before any arithmetic, so R · tiles · 512 bytes are in flight per warp.
* Codes are rebuilt in registers per field f of those words: (word >> b0·f) & mask, OR the e high bits from the
  extra plane (layout.py). Each field of a word is a different column, so the activations are passed in *tile
  order* (``tile_order``): for field f of tile t the 128 values its slots need are contiguous.
* The table lookup is ``lane_lookup`` (lane_lut.py): the 2^b-entry table sits one entry per lane and a lookup is a
  single warp shuffle, without 64-bit address arithmetic (for b ≤ 5; 6 and 8 bits use a load from the 2^b·4-byte
  table, which L1 serves: ``gemv_lookup="auto"``).
* Per chunk the field sums are scaled by the (row, chunk) norm; the R row sums are reduced across lanes at the end.

With R ≥ 8 rows per program the row index is permuted inside the program ((r · 5) mod R; the identity for R ≤ 4)
so that no load looks contiguous along rows to Triton's coalescing pass, which would otherwise give the norm load its
own layout and a shared-memory conversion per tile (seen in the compiled IR of a 16-row scratch version).
Measurements and what bounds this kernel: results/bench_hlwq_matmul_gemv.md.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hlwq_jax.ops.hlwq_matmul.lane_lut import lane_lookup
from hlwq_jax.ops.hlwq_matmul.layout import CHUNK, HLWQPlanes, bitrev

VEC, LANES = 4, 32
TILE_WORDS = VEC * LANES
LOOKUPS = ("auto", "shuffle", "gather")


def tile_geometry(p: HLWQPlanes) -> tuple[int, int, int, int]:
    """(F0 fields per base word, nw base words per chunk, cpt chunks per tile, n_tiles) of a layout."""
    f0 = 32 // p.widths[0]
    nw = CHUNK // f0
    cpt = TILE_WORDS // nw
    return f0, nw, cpt, -(-p.n_chunks // cpt)


def tile_order(p: HLWQPlanes) -> np.ndarray:
    """int [n_tiles · F0 · 128]: position i of the tile-order activations holds padded column ``tile_order(p)[i]``
    (columns past the last chunk index the zero padding at n_chunks · 128)."""
    f0, nw, cpt, n_tiles = tile_geometry(p)
    t, f, s = np.meshgrid(np.arange(n_tiles), np.arange(f0), np.arange(TILE_WORDS), indexing="ij")
    col = CHUNK * (t * cpt + s // nw) + f0 * (s % nw) + bitrev(f0.bit_length() - 1)[f]
    return np.minimum(col, p.n_chunks * CHUNK).reshape(-1)


def to_tile_order(xr: jax.Array, p: HLWQPlanes) -> jax.Array:
    """Rotated activations float32 [M, padded_in] → tile order [M, n_tiles · F0 · 128] (zeros past the last chunk)."""
    xr = jnp.pad(xr, [(0, 0), (0, 1)])  # column n_chunks · 128 is the zero every padding slot reads
    return jnp.take(xr, jnp.asarray(tile_order(p)), axis=1)


def check_settings(owner: str, rows: int, max_tiles: int, lookup: str) -> None:
    """Validate a config's gemv_rows / gemv_max_tiles / gemv_lookup (``owner``: the config's class name)."""
    if not (isinstance(rows, int) and 1 <= rows <= 128 and rows & (rows - 1) == 0):
        raise ValueError(f"{owner}.gemv_rows must be a power of two in [1, 128], got {rows!r}")
    if not (isinstance(max_tiles, int) and max_tiles >= 1):
        raise ValueError(f"{owner}.gemv_max_tiles must be an int ≥ 1, got {max_tiles!r}")
    if lookup not in LOOKUPS:
        raise ValueError(f"{owner}.gemv_lookup must be one of {LOOKUPS}, got {lookup!r}")


def resolve_lookup(lookup: str, bits: int) -> str:
    if lookup not in LOOKUPS:
        raise ValueError(f"gemv_lookup must be one of {LOOKUPS}, got {lookup!r}")
    if lookup == "auto":
        return "shuffle" if bits <= 5 else "gather"
    if lookup == "shuffle" and bits > 5:
        raise ValueError(f"gemv_lookup='shuffle' holds the table one entry per lane: ≤ 32 entries, got 2^{bits}")
    return lookup


def reduce_groups(y, out_dtype):
    """[n_groups, M, rows] partial sums → [M, rows] (one small XLA fusion; none when there is one group)."""
    return y[0] if y.shape[0] == 1 else jnp.sum(y, axis=0).astype(out_dtype)


def load(ref, idx, mask):
    """ref[idx], zeros where ``mask`` is False (no mask: a plain load)."""
    return ref[idx] if mask is None else pltriton.load(ref.at[idx], mask=mask, other=0)


def _gemv_kernel(*refs, widths, rows_per_program, group, cpb, n_chunks, m_rows, lookup, stacked):
    """x_ref f32 [M, n_tiles·F0·128] (tile order); o_ref [n_groups, M, rows]; grid (rows / R, n_groups), every
    program computing all M rows. ``stacked``: a leading expert_ref int32 [M], planes [E, rows, words], grid
    (rows / R, n_groups, M): program (·, ·, m) computes token row m against expert expert_ref[m] (m_rows = 1)."""
    if stacked:
        expert_ref, x_ref, norms_ref, table_ref, *plane_refs, o_ref = refs
        token = pl.program_id(2)
        lead = (expert_ref[token],)
    else:
        x_ref, norms_ref, table_ref, *plane_refs, o_ref = refs
        token, lead = 0, ()
    b0, r = widths[0], rows_per_program
    f0, nw = 32 // b0, CHUNK // (32 // b0)
    cpt = TILE_WORDS // nw
    shape = (VEC, LANES, r)
    slot = lax.broadcasted_iota(jnp.int32, shape, 1) * VEC + lax.broadcasted_iota(jnp.int32, shape, 0)
    row0 = pl.program_id(0) * r
    rows = row0 + ((lax.broadcasted_iota(jnp.int32, shape, 2) * 5) & (r - 1))
    slot1 = (lax.broadcasted_iota(jnp.int32, (VEC, LANES, 1), 1) * VEC
             + lax.broadcasted_iota(jnp.int32, (VEC, LANES, 1), 0))
    g = pl.program_id(1)
    if lookup == "shuffle":  # lane l holds table[l mod 2^b]
        lane = lax.broadcasted_iota(jnp.int32, (VEC, LANES, 1), 1)
        table = jnp.broadcast_to(table_ref[lane % table_ref.shape[0]], shape)
    if len(widths) > 1:
        e = widths[1]
        per = b0 // e  # base words per extra word
        ne = CHUNK * e // 32
        eshift = (e * (slot % per)).astype(jnp.uint32)
    ragged = n_chunks % cpt != 0

    def fetch(i):
        c0 = (g * group + i) * cpt
        word = c0 * nw + slot
        mask = word < n_chunks * nw if ragged else None
        base = load(plane_refs[0], (*lead, rows, word), mask)
        extra = None
        if len(widths) > 1:
            extra = load(plane_refs[1], (*lead, rows, c0 * ne + slot // per), mask) >> eshift
        chunk = jnp.minimum(c0 + slot // nw, n_chunks - 1)
        return base, extra, norms_ref[(*lead, chunk // cpb, rows)]

    def accumulate(i, data, accs):
        base, extra, norm = data
        t = g * group + i
        sums = [None] * m_rows
        for f in range(f0):
            code = base >> (b0 * f) if f else base
            if f < f0 - 1:
                code = code & ((1 << b0) - 1)
            if extra is not None:
                code = code | (((extra >> (e * per * f)) & ((1 << e) - 1)) << b0)
            code = code.astype(jnp.int32)
            val = lane_lookup(table, code, axis=1) if lookup == "shuffle" else table_ref[code]
            for m in range(m_rows):
                xf = x_ref[token + m, (t * f0 + f) * TILE_WORDS + slot1]  # [VEC, LANES, 1]
                sums[m] = val * xf if sums[m] is None else sums[m] + val * xf
        norm = norm.astype(jnp.float32)
        return [acc + s * norm for acc, s in zip(accs, sums)]

    data = [fetch(i) for i in range(group)]  # every load of the program first, then the arithmetic
    accs = [jnp.zeros(shape, jnp.float32) for _ in range(m_rows)]
    for i in range(group):
        accs = accumulate(i, data[i], accs)
    out_rows = row0 + ((lax.broadcasted_iota(jnp.int32, (r,), 0) * 5) & (r - 1))
    for m in range(m_rows):
        o_ref[g, token + m, out_rows] = jnp.sum(accs[m], axis=(0, 1)).astype(o_ref.dtype)


def gemv_call(x_tiles: jax.Array, p: HLWQPlanes, out_dtype, *, rows_per_program: int, max_tiles: int, lookup: str,
              interpret: bool, expert_ids: jax.Array | None = None) -> jax.Array:
    """x_tiles f32 [M, n_tiles·F0·128] (``to_tile_order``) → [M, rows].

    ``expert_ids`` int32 [M] (stacked layouts [E, rows, words] only): token row m is multiplied by expert
    expert_ids[m]; one program per (rows, chunk group, token), so only the experts named there are read.
    """
    m = x_tiles.shape[0]
    stacked = expert_ids is not None
    if stacked != (p.ndim == 3) or p.ndim not in (2, 3):
        raise ValueError(f"gemv_call: expert_ids must be given exactly for stacked [E, out, in] layouts, got shape "
                         f"{p.shape} with expert_ids {'given' if stacked else 'None'}")
    r = rows_per_program
    _, _, _, n_tiles = tile_geometry(p)
    n_groups = -(-n_tiles // max_tiles)
    while n_tiles % n_groups:
        n_groups += 1
    group = n_tiles // n_groups
    kernel = functools.partial(_gemv_kernel, widths=p.widths, rows_per_program=r, group=group,
                               cpb=p.block_size // CHUNK, n_chunks=p.n_chunks, m_rows=1 if stacked else m,
                               lookup=resolve_lookup(lookup, p.bits), stacked=stacked)
    grid = (p.rows // r, n_groups, m) if stacked else (p.rows // r, n_groups)
    lead_args = (expert_ids.astype(jnp.int32),) if stacked else ()
    y = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_groups, m, p.rows), out_dtype if n_groups == 1 else jnp.float32),
        grid=grid, compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret, name=f"hlwq_gemv_q{p.bits}",
    )(*lead_args, x_tiles.astype(jnp.float32), p.norms_t, p.table, *p.planes)
    return reduce_groups(y, out_dtype)
