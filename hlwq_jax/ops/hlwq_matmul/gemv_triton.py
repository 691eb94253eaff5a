"""Decode GEMV (M ≤ gemv_max_m tokens) over ``HLWQPlanes``: a Pallas kernel lowered through Triton, one warp per program.

What bounds a quantized GEMV on the H200 is how many bytes each memory request carries and how many are in flight,
then instructions per code, then how often the activations are re-read; each choice below follows from one of those
(measurements: results/gemv_explore/, results/bench_hlwq_matmul_gemv.md):

* Tile = 128 consecutive base words of a row (``TILE_WORDS``), held as [VEC=4, LANES=32]: lane l owns words
  4l … 4l+3 and their extension bits (layout.py): one 16-byte load plus one 4-byte load of the extension word (two
  words for 3 and 6 bits) per lane and row, 512 contiguous bytes per warp request. Every code of a lane falls in
  one 128-code chunk, so one norm per (lane, row, tile).
* Each code is one (funnel) shift of those words (``layout.field``); the table lookup is ``lane_shuffle``
  (lane_lut.py): lane l holds table[l mod 2^b] and a lookup is one warp shuffle, which reads only the low 5 bits of
  its index, so the codes need no mask (b ≤ 5; 6 and 8 bits mask and load from the 2^b·4-byte table, which L1
  serves). Then one FMA, written as ``fma.fma`` (XLA's Triton pipeline left every product and sum unfused:
  fma.py): ≈ 4.1 SASS instructions per code in the step loop (``scripts/kernel_sass.py``).
* A program owns a group of ≤ ``max_tiles`` tiles of the input (longer rows are split; XLA adds the partial sums)
  and keeps that group's activations in registers (F·4 floats per lane and tile), so they are read once per
  program, not once per row. The activations come in *GEMV order* (``chunk_order``: within every 128-column chunk,
  field-major), so that a lane's 4 words of one field are 4 consecutive floats; the order is folded into the
  rotation's Hadamard matrix (``rotate_activations(..., chunk_order=...)``), which costs no pass of its own.
  Programs of one row block's tile groups are launched next to each other (the group is grid axis 0).
* It walks ``steps`` × ``rows`` output rows, each step its loads then its arithmetic. Neither register double
  buffering (ptxas sinks the next step's loads to the end of the loop body, results/gemv_explore/README.md) nor an
  L2 prefetch of later steps made it faster on the H200; only the other warps of the SM (32 at 64 registers, and
  at most 32 one-warp blocks per SM) hide the latency, and that is what bounds it now, with the lookups
  (results/bench_hlwq_matmul_gemv.md, results/eleventh_explore/README.md). Rows past ``out`` (the layout's padding)
  are computed and not stored (a masked store instead of a slice after the kernel).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hlwq_jax.ops.hlwq_matmul.fma import fma
from hlwq_jax.ops.hlwq_matmul.lane_lut import lane_shuffle, lane_table
from hlwq_jax.ops.hlwq_matmul.layout import CHUNK, HLWQPlanes, bitrev, extension_bits, field, fields_per_word

VEC, LANES = 4, 32
TILE_WORDS = VEC * LANES
LOOKUPS = ("auto", "shuffle", "gather")


def tile_geometry(p: HLWQPlanes) -> tuple[int, int, int, int]:
    """(F0 fields per base word, nw base words per chunk, cpt chunks per tile, n_tiles) of a layout."""
    f0 = 32 // p.widths[0]
    nw = CHUNK // f0
    cpt = TILE_WORDS // nw
    return f0, nw, cpt, -(-p.n_chunks // cpt)


def chunk_order(bits: int) -> np.ndarray:
    """int [128]: the GEMV's order of the columns within every 128-column chunk (F0 fields per base word, nw base
    words per chunk). Position f·nw + w (field f, base word w of the chunk) holds chunk column F0·w + bitrev(f), the
    column whose code is field f of word w (layout.py), so a lane's 4 words of one field meet 4 consecutive
    activations (one 16-byte load). ``rotate_activations(x, w, chunk_order=chunk_order(bits))`` folds it into the
    Hadamard matrix's columns."""
    f0 = fields_per_word(bits)
    nw = CHUNK // f0
    f, w = np.meshgrid(np.arange(f0), np.arange(nw), indexing="ij")
    return (f0 * w + bitrev(f0.bit_length() - 1)[f]).reshape(-1)


def to_gemv_order(xr: jax.Array, p: HLWQPlanes) -> jax.Array:
    """Rotated activations float32 [M, padded_in] (natural order, e.g. shared by several projections) → the GEMV's
    order [M, padded_in] (``chunk_order`` within every chunk): reshapes and one transpose, no gather — bitrev over
    L bits is the reversal of the L binary axes of f."""
    f0 = fields_per_word(p.bits)
    m, lb = xr.shape[0], f0.bit_length() - 1
    x = xr.reshape(m, p.n_chunks, CHUNK // f0, *([2] * lb))  # last axes: the bits of r = bitrev(f), msb first
    perm = (0, 1, *range(3 + lb - 1, 2, -1), 2)
    return x.transpose(perm).reshape(m, p.padded_in)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Settings of the decode GEMV (module docstring). Programs: rows / (rows · steps) × groups (× tokens)."""

    rows: int = 2  # output rows per step, loaded together (a power of two)
    max_steps: int = 16  # steps per program at most (a power of two; rows · steps ≤ 128) ...
    min_programs: int = 2048  # ... fewer while the grid would have fewer programs than this
    max_tiles: int = 1  # tiles per program (their activations stay in registers); longer rows are split
    lookup: str = "auto"  # "shuffle" (≤ 5 bits) | "gather" (table load) | "auto": shuffle when it applies

    def __post_init__(self):
        for name in ("rows", "max_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 1 <= v <= 128 and v & (v - 1) == 0):
                raise ValueError(f"GemvConfig.{name} must be a power of two in [1, 128], got {v!r}")
        if self.rows * self.max_steps > 128:
            raise ValueError(f"GemvConfig: rows · max_steps must be ≤ 128 (the row padding), got "
                             f"{self.rows} · {self.max_steps}")
        for name in ("min_programs", "max_tiles"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"GemvConfig.{name} must be an int ≥ 1, got {getattr(self, name)!r}")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"GemvConfig.lookup must be one of {LOOKUPS}, got {self.lookup!r}")


def resolve_lookup(lookup: str, bits: int, allowed: tuple[str, ...] = LOOKUPS) -> str:
    """The lookup a kernel runs: "auto" is the shuffle for ≤ 5 bits (a ≤ 32-entry table), else the table load."""
    if lookup not in allowed:
        raise ValueError(f"lookup must be one of {allowed}, got {lookup!r}")
    if lookup == "auto":
        return "shuffle" if bits <= 5 else "gather"
    if lookup == "shuffle" and bits > 5:
        raise ValueError(f"lookup='shuffle' holds the table one entry per lane: ≤ 32 entries, got 2^{bits}")
    return lookup


def reduce_groups(y, out_dtype):
    """[n_groups, M, rows] partial sums → [M, rows] (one small XLA fusion; none when there is one group)."""
    return y[0] if y.shape[0] == 1 else jnp.sum(y, axis=0).astype(out_dtype)


def load(ref, idx, mask):
    """ref[idx], zeros where ``mask`` is False (no mask: a plain load)."""
    return ref[idx] if mask is None else pltriton.load(ref.at[idx], mask=mask, other=0)


def _gemv_kernel(*refs, bits, rows, steps, group, cpb, n_chunks, n_out, m_rows, lookup, stacked):
    """x_ref f32 [M, padded_in] (GEMV order, ``chunk_order``); o_ref [n_groups, M, out] (with ``n_out`` = out given,
    the rows past it, the layout's padding, are computed and not stored); grid (n_groups, row blocks), every
    program computing all M token rows for rows · steps output rows. ``stacked``: a leading expert_ref int32 [M],
    planes [E, rows, words], grid (n_groups, row blocks, M): program (·, ·, m) computes token row m against expert
    expert_ref[m] (m_rows = 1)."""
    if stacked:
        expert_ref, x_ref, norms_ref, table_ref, *plane_refs, o_ref = refs
        token = pl.program_id(2)
        lead = (expert_ref[token],)
    else:
        x_ref, norms_ref, table_ref, *plane_refs, o_ref = refs
        token, lead = 0, ()
    f_, x_ = fields_per_word(bits), extension_bits(bits)
    nw = CHUNK // f_  # base words per chunk
    cpt = TILE_WORDS // nw  # chunks per tile
    shape = (VEC, LANES)
    lane = lax.broadcasted_iota(jnp.int32, shape, 1)
    slot = lane * VEC + lax.broadcasted_iota(jnp.int32, shape, 0)  # base word of the tile
    lane1 = lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
    g = pl.program_id(0)  # (read outside the step loop: interpret mode has no program_id inside it)
    tiles = [g * group + i for i in range(group)]
    ragged = n_chunks % cpt != 0
    lpc = nw // VEC  # lanes per chunk

    def x_tile(m, t):
        """Activations of tile t for token row m, [field][VEC, LANES]: lane l's words' columns in GEMV order, written
        as lane part + iota along VEC so that Triton sees 4 contiguous floats (one 16-byte load)."""
        chunk = t * cpt + lane // lpc
        col = chunk * CHUNK + (lane % lpc) * VEC + lax.broadcasted_iota(jnp.int32, shape, 0)
        mask = chunk < n_chunks if ragged else None  # a ragged last tile reads zeros past the end
        return [load(x_ref, (token + m, col + f * nw), mask) for f in range(f_)]

    xs = [[x_tile(m, t) for t in tiles] for m in range(m_rows)]  # in registers for all of the program's rows
    if lookup == "shuffle":  # lane l holds table[l mod 2^b]: a code's garbage above bit b selects the same entry
        own = lane_table(table_ref, shape)
    per_ext = 32 // x_ if x_ else 0  # base words per extra word
    row0 = pl.program_id(1) * (rows * steps)

    def fetch(step):
        """[rows][tiles] of (base [VEC, LANES], extra word, norm [1, LANES]) for the rows of ``step``."""
        data = []
        for r in range(rows):
            row = row0 + step * rows + r
            per_tile = []
            for t in tiles:
                word = t * TILE_WORDS + slot
                mask = word < n_chunks * nw if ragged else None
                ext = None
                if per_ext == VEC:  # one extra word per lane ([1, LANES]: one load, broadcast)
                    u = t * (TILE_WORDS // VEC) + lane1
                    ext = load(plane_refs[1], (*lead, row, u), u < n_chunks * nw // VEC if ragged else None)
                elif x_:
                    ext = load(plane_refs[1], (*lead, row, word // per_ext), mask)
                chunk = jnp.minimum(t * cpt + lane1 // (nw // VEC), n_chunks - 1)
                per_tile.append((load(plane_refs[0], (*lead, row, word), mask), ext,
                                 norms_ref[(*lead, chunk // cpb, row)]))
            data.append(per_tile)
        return data

    def compute(data):
        """[rows][M] float32 row sums."""
        sums = []
        for per_tile in data:
            accs = [None] * m_rows
            for ti, (base, ext, norm) in enumerate(per_tile):
                if x_:  # the extension of word `slot`: X bits at X · (slot mod per_ext), garbage above
                    ext = jnp.broadcast_to(ext, shape) >> (x_ * (slot % per_ext)).astype(jnp.uint32)
                parts = [None] * m_rows
                for f in range(f_):
                    code = field(base, ext, f, bits)
                    if lookup == "shuffle":
                        val = lane_shuffle(own, code.astype(jnp.int32))
                    else:
                        val = table_ref[(code & ((1 << bits) - 1)).astype(jnp.int32)]
                    for m in range(m_rows):  # explicit FMAs (fma.py: XLA's Triton pipeline contracts none)
                        parts[m] = val * xs[m][ti][f] if parts[m] is None else fma(val, xs[m][ti][f], parts[m])
                nrm = norm.astype(jnp.float32)
                accs = [p_ * nrm if a is None else fma(p_, nrm, a) for a, p_ in zip(accs, parts)]
            sums.append([jnp.sum(jnp.sum(a, axis=0)) for a in accs])  # in-thread first, then one lane reduction
        return sums

    def store(step, sums):
        for r, row_sums in enumerate(sums):
            row = row0 + step * rows + r
            for m, s in enumerate(row_sums):
                if n_out is not None:  # a masked store, not a slice pass after the kernel
                    at = o_ref.at[g, jnp.int32(token + m), row]  # (the indexer takes no Python int here)
                    pltriton.store(at, s.astype(o_ref.dtype), mask=row < n_out)
                else:
                    o_ref[g, token + m, row] = s.astype(o_ref.dtype)

    def step(i, carry):  # loads, then arithmetic; other warps of the SM hide the latency
        store(i, compute(fetch(i)))
        return carry

    lax.fori_loop(0, steps, step, 0)


def plan_grid(p: HLWQPlanes, tokens: int, config: GemvConfig) -> tuple[int, int, int]:
    """(n_groups, tiles per group, steps per program) of a GEMV over ``p`` for ``tokens`` program rows (1 unless
    stacked): the fewest groups with ≤ max_tiles tiles, then the most steps ≤ max_steps that leave ≥ min_programs."""
    _, _, _, n_tiles = tile_geometry(p)
    n_groups = -(-n_tiles // config.max_tiles)
    while n_tiles % n_groups:
        n_groups += 1
    steps = config.max_steps
    while steps > 1 and p.rows // (config.rows * steps) * n_groups * tokens < config.min_programs:
        steps //= 2
    return n_groups, n_tiles // n_groups, steps


def gemv_call(x_gemv: jax.Array, p: HLWQPlanes, out_dtype, config: GemvConfig, *, interpret: bool,
              expert_ids: jax.Array | None = None) -> jax.Array:
    """x_gemv f32 [M, padded_in], rotated activations in GEMV order (``rotate_activations(..., chunk_order=
    chunk_order(bits))`` or ``to_gemv_order``) → [M, out].

    ``expert_ids`` int32 [M] (stacked layouts [E, rows, words] only): token row m is multiplied by expert
    expert_ids[m]; one program per (row block, tile group, token), so only the experts named there are read.
    """
    m = x_gemv.shape[0]
    stacked = expert_ids is not None
    if stacked != (p.ndim == 3) or p.ndim not in (2, 3):
        raise ValueError(f"gemv_call: expert_ids must be given exactly for stacked [E, out, in] layouts, got shape "
                         f"{p.shape} with expert_ids {'given' if stacked else 'None'}")
    n_groups, group, steps = plan_grid(p, m if stacked else 1, config)
    rows = config.rows
    kernel = functools.partial(_gemv_kernel, bits=p.bits, rows=rows, steps=steps, group=group,
                               cpb=p.block_size // CHUNK, n_chunks=p.n_chunks,
                               n_out=p.out_features if p.rows != p.out_features else None,
                               m_rows=1 if stacked else m,
                               lookup=resolve_lookup(config.lookup, p.bits), stacked=stacked)
    blocks = p.rows // (rows * steps)
    # tile groups vary fastest, so programs launched together read whole rows (the same speed as row blocks first on
    # the H200: results/gemv_explore/dev7c.jsonl)
    grid = (n_groups, blocks, m) if stacked else (n_groups, blocks)
    lead_args = (expert_ids.astype(jnp.int32),) if stacked else ()
    y = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_groups, m, p.out_features),
                                         out_dtype if n_groups == 1 else jnp.float32),
        grid=grid, compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret, name=f"hlwq_gemv_q{p.bits}",
    )(*lead_args, x_gemv.astype(jnp.float32), p.norms_t, p.table, *p.planes)
    return reduce_groups(y, out_dtype)
