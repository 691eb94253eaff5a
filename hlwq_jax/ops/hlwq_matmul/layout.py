"""``HLWQPlanes``: a kernel-friendly repacking of an ``HLWQArray`` (a derived array, same information, same bits).

Why: the canonical layout is one LSB-first bit stream per row, so a 5-bit code straddles byte boundaries and a GPU
thread would need unaligned reads and several shifts and masks per code. Here the codes of a row are split over a
*base* plane of 32-bit words and an optional *extra* plane, arranged so that a kernel gets every code with one
(funnel) shift from registers: b = b0 + e with b0 ∈ {2, 4, 8}, e ∈ {1, 2} (2 = 2, 3 = 2+1, 4 = 4, 5 = 4+1, 6 = 4+2,
8 = 8; 1 and 7 bits have no kernel layout).

Layout (chunk c = padded input columns [128c, 128c + 128); F = 32 / b0 codes per base word, L = log2 F):
* base:  uint32 [*lead, rows, n_chunks·4·b0] — word w counted along the row.
* extra: uint32 [*lead, rows, n_chunks·4·e] (b0 + e bits only); with G = b0 / e, the X = 32 / G bits
  [X·(w mod G), X·(w mod G) + X) of extra word w // G are the *extension* of base word w.
* Base word w and its extension form one stream S_w = base_w | extension_w << 32 of 32 + X = F·b bits; bits
  [b·f, b·f + b) of S_w hold the code of column k = F·w + bitrev_L(f) (bitrev reverses the L-bit index).
``field`` below reads field f from (base word, extension) with one shift — a funnel shift for the field that
straddles bit 32 — leaving garbage only above bit b. The bit reversal makes the kernels' pairwise interleave of the
F fields (``interleave``) come out in column order.

``rows`` is ``out`` padded to a multiple of ``ROW_ALIGN`` (padding rows are code 0 with norm 0), the input is padded
to a multiple of 128 (padding columns are code 0 and meet zero activations). Also stored, for the kernels:
``norms_t`` float16 [*lead, n_blocks, rows] (transposed: one contiguous load per chunk) and ``table`` float32 [2^b]
= codebook / √B (the 1/√B folded in). The kernels need block_size to be a multiple of 128 (one norm per chunk);
``repack`` raises otherwise.

Bits per weight are those of the source array: b per code + 16 / B for the norms (+ row padding, < 128 rows).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.quant import packing
from hlwq_jax.quant.array import BlockGeometry, HLWQArray

CHUNK = 128  # codes per chunk
ROW_ALIGN = 128
PLANE_WIDTHS = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}  # bits → (b0,) or (b0, e)


def bitrev(n_bits: int) -> np.ndarray:
    """[2^n_bits] int: i with its n_bits-bit binary representation reversed."""
    return np.array([int(format(v, f"0{n_bits}b")[::-1], 2) if n_bits else 0 for v in range(1 << n_bits)])


def fields_per_word(bits: int) -> int:
    """F = 32 / b0: codes per base word (and per stream S_w)."""
    return 32 // PLANE_WIDTHS[bits][0]


def extension_bits(bits: int) -> int:
    """X = 32 · e / b0: bits of the extra plane that extend each base word (0 without an extra plane)."""
    widths = PLANE_WIDTHS[bits]
    return 32 * widths[1] // widths[0] if len(widths) > 1 else 0


def field(base, ext, f: int, bits: int):
    """Field f of the stream base | ext << 32 (uint32 arrays or kernel tiles) in the low ``bits`` bits of a uint32,
    garbage above: one shift, or one funnel shift for the field that straddles bit 32 (``ext`` unused, may be None,
    when the field lies in ``base``). Callers that index with it mask it, or ignore the high bits."""
    o = bits * f
    if o + bits <= 32:
        return base >> o if o else base
    if o >= 32:
        return ext >> (o - 32) if o > 32 else ext
    return (base >> o) | (ext << (32 - o))


def check_kernel_bits(bits: int) -> None:
    if bits not in PLANE_WIDTHS:
        raise ValueError(f"the HLWQ kernel layout supports bits {sorted(PLANE_WIDTHS)}, got {bits}; use impl='xla'")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HLWQPlanes(BlockGeometry):
    """Bit-plane layout of an HLWQArray (see module docstring). Leaves: planes, norms_t, table, codebook."""

    planes: tuple  # of arrays, one per entry of PLANE_WIDTHS[bits]
    norms_t: jax.Array  # float16 [*lead, n_blocks, rows]
    table: jax.Array  # float32 [2^b] = codebook / sqrt(B)
    codebook: jax.Array  # float32 [2^b]
    bits: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    rotation: str = dataclasses.field(metadata=dict(static=True), default="hadamard")
    seed: int = dataclasses.field(metadata=dict(static=True), default=0)
    codebook_name: str = dataclasses.field(metadata=dict(static=True), default="converged")

    @property
    def n_chunks(self) -> int:
        return self.padded_in // CHUNK

    @property
    def rows(self) -> int:
        return self.norms_t.shape[-1]

    @property
    def widths(self) -> tuple[int, ...]:
        return PLANE_WIDTHS[self.bits]

    @property
    def nbytes(self) -> int:
        return sum(int(p.size) * p.dtype.itemsize for p in self.planes) + 2 * int(self.norms_t.size) + 8 * int(self.table.size)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / math.prod(self.shape)

    def signs(self) -> jax.Array | None:
        return self.to_hlwq().signs()

    def codes(self) -> jax.Array:
        """uint8 [*lead, out, padded_in] recovered from the planes (the inverse of ``repack``)."""
        return planes_to_codes(self.planes, self.bits)[..., : self.out_features, :]

    def to_hlwq(self) -> HLWQArray:
        """The canonical HLWQArray this layout was made from (bit-exact round trip)."""
        packed = packing.pack_codes(self.codes(), self.bits)
        norms = jnp.swapaxes(self.norms_t, -1, -2)[..., : self.out_features, :]
        return HLWQArray(packed=packed, norms=norms, codebook=self.codebook, bits=self.bits,
                         block_size=self.block_size, shape=self.shape, rotation=self.rotation, seed=self.seed,
                         codebook_name=self.codebook_name)

    def rotated_values(self, dtype=jnp.float32) -> jax.Array:
        """norms · codebook[codes] / √B in the rotated domain, [*lead, out, padded_in] (as HLWQArray's; no H)."""
        lead = self.shape[:-2]
        norms = jnp.swapaxes(self.norms_t, -1, -2)[..., : self.out_features, :].astype(jnp.float32)
        vals = self.table[self.codes()].reshape(*lead, self.out_features, self.n_blocks, self.block_size)
        return (vals * norms[..., None]).reshape(*lead, self.out_features, self.padded_in).astype(dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return self.to_hlwq().dequantize(dtype)

    def take(self, indices: jax.Array) -> "HLWQPlanes":
        """Select experts of a stacked [E, out, in] layout."""
        if self.ndim != 3:
            raise ValueError(f"take() needs a stacked [E, out, in] layout, this one has shape {self.shape}")
        idx = jnp.asarray(indices)
        return dataclasses.replace(self, planes=tuple(jnp.take(p, idx, axis=0) for p in self.planes),
                                   norms_t=jnp.take(self.norms_t, idx, axis=0),
                                   shape=(int(idx.shape[0]), *self.shape[1:]))

    def __repr__(self) -> str:
        return f"HLWQPlanes(shape={self.shape}, bits={self.bits}, block_size={self.block_size}, widths={self.widths})"


def check_kernel_block_size(block_size: int) -> None:
    if block_size % CHUNK:
        raise ValueError(f"the HLWQ kernels need block_size to be a multiple of {CHUNK} (one norm per 128-code "
                         f"chunk), got {block_size}; use impl='xla' for this weight")


def codes_to_planes(codes: jax.Array, bits: int) -> tuple:
    """uint8 codes [..., n] (n a multiple of 128) → (base,) or (base, extra) uint32 planes (module docstring)."""
    check_kernel_bits(bits)
    *lead, n = codes.shape
    if n % CHUNK:
        raise ValueError(f"codes last axis {n} is not a multiple of {CHUNK}")
    f_, x_ = fields_per_word(bits), extension_bits(bits)
    c = codes.astype(jnp.uint32).reshape(*lead, n // f_, f_)[..., bitrev(f_.bit_length() - 1)]  # [..., w, field f]
    base = jnp.zeros(c.shape[:-1], jnp.uint32)
    ext = jnp.zeros(c.shape[:-1], jnp.uint32)
    for f in range(f_):  # disjoint bit fields: | is exact
        o = bits * f
        if o < 32:
            base = base | (c[..., f] << o)  # uint32: the bits past 32 drop out
        if o + bits > 32:
            ext = ext | (c[..., f] << (o - 32) if o >= 32 else c[..., f] >> (32 - o))
    if not x_:
        return (base,)
    g = 32 // x_
    ext = ext.reshape(*lead, -1, g) << jnp.asarray(x_ * np.arange(g), jnp.uint32)
    return base, jnp.sum(ext, axis=-1, dtype=jnp.uint32)  # disjoint bits: sum = or


def planes_to_codes(planes, bits: int) -> jax.Array:
    """Inverse of ``codes_to_planes``: planes → uint8 codes [..., n_chunks·128]."""
    f_, x_ = fields_per_word(bits), extension_bits(bits)
    base = planes[0].astype(jnp.uint32)
    ext = None
    if x_:
        g = 32 // x_
        words = jnp.repeat(planes[1].astype(jnp.uint32), g, axis=-1)
        ext = words >> jnp.asarray(np.tile(x_ * np.arange(g), base.shape[-1] // g), jnp.uint32)
    # column F·w + j holds field bitrev(j) (bitrev is an involution): stacked in column order, no gather
    code = jnp.stack([field(base, ext, int(f), bits) & ((1 << bits) - 1) for f in bitrev(f_.bit_length() - 1)], axis=-1)
    return code.reshape(*base.shape[:-1], -1).astype(jnp.uint8)


def repack(w: HLWQArray) -> HLWQPlanes:
    """HLWQArray [*lead, out, in] → HLWQPlanes (pure jnp; run once, offline or at load time)."""
    if not isinstance(w, HLWQArray):
        raise ValueError(f"repack needs an HLWQArray, got {type(w).__name__}")
    check_kernel_block_size(w.block_size)
    check_kernel_bits(w.bits)
    out = w.out_features
    rows = -(-out // ROW_ALIGN) * ROW_ALIGN
    lead = w.shape[:-2]
    codes = w.unpack_codes().reshape(*lead, out, w.padded_in)
    norms = w.norms
    if rows != out:
        pad = [(0, 0)] * len(lead) + [(0, rows - out), (0, 0)]
        codes = jnp.pad(codes, pad)
        norms = jnp.pad(norms, pad)
    table = w.codebook.astype(jnp.float32) * np.float32(1.0 / math.sqrt(w.block_size))
    return HLWQPlanes(planes=codes_to_planes(codes, w.bits), norms_t=jnp.swapaxes(norms, -1, -2), table=table,
                      codebook=w.codebook, bits=w.bits, block_size=w.block_size, shape=w.shape,
                      rotation=w.rotation, seed=w.seed, codebook_name=w.codebook_name)


def planes_to_codes_numpy(planes, bits: int) -> np.ndarray:
    """Element-by-element numpy oracle of ``planes_to_codes``: for each column, build its word's stream as a Python
    int (no shifts shared with the kernels' ``field``) and read the code's bits."""
    widths = PLANE_WIDTHS[bits]
    f_ = 32 // widths[0]
    l_ = f_.bit_length() - 1
    base = np.asarray(planes[0]).astype(np.uint64)
    extra = np.asarray(planes[1]).astype(np.uint64) if len(widths) > 1 else None
    x_ = 32 * widths[1] // widths[0] if extra is not None else 0
    n = base.shape[-1] * f_
    out = np.zeros(base.shape[:-1] + (n,), np.uint8)
    for idx in np.ndindex(base.shape[:-1]):
        for k in range(n):
            w_, r = divmod(k, f_)
            f = int(format(r, f"0{l_}b")[::-1], 2) if l_ else 0
            stream = int(base[idx + (w_,)])
            if extra is not None:
                u, s = divmod(w_, 32 // x_)
                stream |= ((int(extra[idx + (u,)]) >> (x_ * s)) & ((1 << x_) - 1)) << 32
            out[idx + (k,)] = (stream >> (bits * f)) & ((1 << bits) - 1)
    return out
