"""``HLWQPlanes``: a kernel-friendly repacking of an ``HLWQArray`` (a derived array, same information, same bits).

Why: the canonical layout is one LSB-first bit stream per row, so a 5-bit code straddles byte boundaries and a GPU
thread would need unaligned two-byte reads per code. Here the codes are split into a *base* plane of b0 ∈ {2, 4, 8}
bits and an optional *extra* plane of e ∈ {1, 2} bits (b = b0 + e: 2 = 2, 3 = 2+1, 4 = 4, 5 = 4+1, 6 = 4+2,
8 = 8; 1 and 7 bits have no kernel layout), both uint32 words, arranged so that a Triton kernel rebuilds a
[rows, 128] tile of codes with ≈ 3 integer ops per code, all in registers, and no redundant loads.

Layout (chunk c = padded input columns [128c, 128c + 128); F0 = 32 / b0 fields per base word, L0 = log2 F0):
* base:  uint32 [*lead, rows, n_chunks·4·b0]; bits [b0·f, b0·f + b0) of word w (counted along the row) hold the low
  b0 bits of the code of column k = F0·w + bitrev_L0(f) (bitrev reverses the L0-bit index).
* extra: uint32 [*lead, rows, n_chunks·4·e]; with G = b0 / e, bits [e·(G·f + s), … + e) of extra word u hold the
  high e bits of the code whose low bits sit in field f of base word w = G·u + s.
The kernel (pallas_triton.unpack_chunk) loads the chunk's base words, splits them once into (x & m, (x >> b0) & m),
ORs in the extra bits (which the layout puts right above each field: G·e = b0), then keeps splitting the b-bit fields
into halves — x & m, x >> d — and joins each pair along a new minor axis (Triton join + reshape, register-only). The
bit reversal is what makes the recursive halving come out in column order.

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


def _base_shifts(b0: int) -> np.ndarray:
    """uint32 [F0]: bit offset in a base word of the field of column residue r = k mod F0 (b0 · bitrev(r))."""
    f0 = 32 // b0
    return (b0 * bitrev(f0.bit_length() - 1)).astype(np.uint32)


def _extra_shifts(b0: int, e: int) -> np.ndarray:
    """uint32 [G, F0]: bit offset in an extra word of the high bits for base word s (mod G), column residue r."""
    f0, g = 32 // b0, b0 // e
    return (e * (g * bitrev(f0.bit_length() - 1)[None, :] + np.arange(g)[:, None])).astype(np.uint32)


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
    c = codes.astype(jnp.uint32)
    b0 = PLANE_WIDTHS[bits][0]
    f0 = 32 // b0
    low = (c & ((1 << b0) - 1)).reshape(*lead, n // f0, f0)  # [..., word, k mod F0]
    planes = [jnp.sum(low << jnp.asarray(_base_shifts(b0)), axis=-1, dtype=jnp.uint32)]  # disjoint bits: sum = or
    if len(PLANE_WIDTHS[bits]) > 1:
        e = PLANE_WIDTHS[bits][1]
        g = b0 // e
        high = (c >> b0).reshape(*lead, n // (f0 * g), g, f0)  # [..., extra word, s, k mod F0]
        planes.append(jnp.sum(high << jnp.asarray(_extra_shifts(b0, e)), axis=(-2, -1), dtype=jnp.uint32))
    return tuple(planes)


def planes_to_codes(planes, bits: int) -> jax.Array:
    """Inverse of ``codes_to_planes``: planes → uint8 codes [..., n_chunks·128]."""
    b0 = PLANE_WIDTHS[bits][0]
    base = planes[0].astype(jnp.uint32)
    code = (base[..., None] >> jnp.asarray(_base_shifts(b0))) & ((1 << b0) - 1)
    code = code.reshape(*base.shape[:-1], -1)
    if len(planes) > 1:
        e = PLANE_WIDTHS[bits][1]
        extra = planes[1].astype(jnp.uint32)
        high = (extra[..., None, None] >> jnp.asarray(_extra_shifts(b0, e))) & ((1 << e) - 1)
        code = code | (high.reshape(code.shape) << b0)
    return code.astype(jnp.uint8)


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
    """Element-by-element numpy oracle of ``planes_to_codes``: for each column, find its word and bit offset."""
    widths = PLANE_WIDTHS[bits]
    b0 = widths[0]
    f0 = 32 // b0
    l0 = f0.bit_length() - 1
    base = np.asarray(planes[0]).astype(np.uint64)
    n = base.shape[-1] * f0
    out = np.zeros(base.shape[:-1] + (n,), np.uint64)
    for k in range(n):
        w_, r = divmod(k, f0)
        f = int(format(r, f"0{l0}b")[::-1], 2)
        out[..., k] = (base[..., w_] >> np.uint64(b0 * f)) & np.uint64((1 << b0) - 1)
        if len(widths) > 1:
            e = widths[1]
            g = b0 // e
            u, s_ = divmod(w_, g)
            word = np.asarray(planes[1]).astype(np.uint64)[..., u]
            out[..., k] |= ((word >> np.uint64(e * (g * f + s_))) & np.uint64((1 << e) - 1)) << np.uint64(b0)
    return out.astype(np.uint8)
