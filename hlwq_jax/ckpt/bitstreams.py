"""Host-side (numpy) code packings used by the HLWQ on-disk formats (docs/format.md, docs/hlwq.md §6).

All functions map uint8 codes ``[..., n]`` (each < 2**bits) to uint8 bytes and back; none allocates more than a few
times the output. Layouts:

* ``"lsb-row"``   — one LSB-first bit stream per row: code i occupies stream bits [i·b, (i+1)·b), stream bit k is
  bit (k mod 8) of byte k // 8. Row bytes = ceil(n·b/8). This is ``HLWQArray.packed`` and, at 5 bits with rows of
  whole 128-blocks, the original ``polar_engine_v5`` layout (8 codes → 5 bytes).
* ``"msb-flat"``  — one MSB-first bit stream over the flattened tensor: stream bit k is bit 7 − (k mod 8) of byte
  k // 8 (the ``hlwq-q5`` layout; at 4 bits the first code sits in the high nibble).
* ``"half-block"`` — ≤ 4 bits, per block of B codes: byte i = code[B/2 + i] << 4 | code[i] (``polar_engine_v4``).

Each packer has a plain bit-by-bit oracle in tests/ckpt/test_bitstreams.py.
"""
from __future__ import annotations

import numpy as np


def packed_size(n: int, bits: int) -> int:
    """Bytes that n codes of ``bits`` bits take in a dense stream: ceil(n·bits/8)."""
    return -(-n * bits // 8)


def _check(codes: np.ndarray, bits: int) -> np.ndarray:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if bits < 8 and codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code {int(codes.max())} does not fit in {bits} bits")
    return codes


def _pack_groups(codes: np.ndarray, bits: int, msb: bool) -> np.ndarray:
    """codes [..., n] → bytes [..., ceil(n·bits/8)]: every 8 codes form one 8·bits-bit integer, emitted as bytes."""
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    pad = (-n) % 8
    if pad:
        codes = np.concatenate([codes, np.zeros((*lead, pad), np.uint8)], axis=-1)
    g = codes.reshape(*lead, (n + pad) // 8, 8).astype(np.uint64)  # [..., G, 8]
    pos = np.arange(8, dtype=np.uint64)
    shifts = np.uint64(bits) * (np.uint64(7) - pos) if msb else np.uint64(bits) * pos
    word = np.bitwise_or.reduce(g << shifts, axis=-1)  # [..., G], 8·bits significant bits
    j = np.arange(bits, dtype=np.uint64)
    byte_shift = np.uint64(8) * (np.uint64(bits - 1) - j) if msb else np.uint64(8) * j
    out = ((word[..., None] >> byte_shift) & np.uint64(0xFF)).astype(np.uint8)  # [..., G, bits]
    return out.reshape(*lead, -1)[..., : packed_size(n, bits)]


def _unpack_groups(packed: np.ndarray, bits: int, n: int, msb: bool) -> np.ndarray:
    lead = packed.shape[:-1]
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"packed stream has {packed.shape[-1]} bytes, expected {packed_size(n, bits)} "
                         f"for {n} codes of {bits} bits")
    groups = -(-n // 8)
    full = groups * bits
    p = packed
    if p.shape[-1] < full:
        p = np.concatenate([p, np.zeros((*lead, full - p.shape[-1]), np.uint8)], axis=-1)
    g = p.reshape(*lead, groups, bits).astype(np.uint64)
    j = np.arange(bits, dtype=np.uint64)
    byte_shift = np.uint64(8) * (np.uint64(bits - 1) - j) if msb else np.uint64(8) * j
    word = np.bitwise_or.reduce(g << byte_shift, axis=-1)  # [..., G]
    pos = np.arange(8, dtype=np.uint64)
    shifts = np.uint64(bits) * (np.uint64(7) - pos) if msb else np.uint64(bits) * pos
    codes = ((word[..., None] >> shifts) & np.uint64((1 << bits) - 1)).astype(np.uint8)
    return codes.reshape(*lead, groups * 8)[..., :n]


def pack_lsb_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., n] → uint8 [..., ceil(n·bits/8)], one LSB-first stream per row (the HLWQArray layout)."""
    return _pack_groups(_check(codes, bits), bits, msb=False)


def unpack_lsb_rows(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_lsb_rows``."""
    return _unpack_groups(np.asarray(packed, np.uint8), bits, n, msb=False)


def pack_msb_flat(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (any shape) → uint8 [ceil(size·bits/8)], one MSB-first stream over the C-order flattening."""
    return _pack_groups(_check(codes, bits).reshape(-1), bits, msb=True)


def unpack_msb_flat(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """uint8 [ceil(n·bits/8)] → uint8 codes [n] (inverse of ``pack_msb_flat``)."""
    return _unpack_groups(np.asarray(packed, np.uint8).reshape(-1), bits, n, msb=True)


def pack_half_block(codes: np.ndarray, block_size: int) -> np.ndarray:
    """uint8 codes [..., K] (< 16, K a multiple of B) → uint8 [..., K/2]: byte i = code[B/2+i] << 4 | code[i]."""
    codes = _check(codes, 4)
    k = codes.shape[-1]
    if block_size % 2 or k % block_size:
        raise ValueError(f"half-block packing needs an even block size dividing the row ({k} codes, B={block_size})")
    c = codes.reshape(*codes.shape[:-1], k // block_size, 2, block_size // 2)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*codes.shape[:-1], k // 2)


def unpack_half_block(packed: np.ndarray, block_size: int) -> np.ndarray:
    """uint8 [..., K/2] → uint8 codes [..., K] (inverse of ``pack_half_block``)."""
    packed = np.asarray(packed, np.uint8)
    half = block_size // 2
    if packed.shape[-1] % half:
        raise ValueError(f"half-block packed row of {packed.shape[-1]} bytes is not a multiple of B/2 = {half}")
    p = packed.reshape(*packed.shape[:-1], packed.shape[-1] // half, 1, half)
    c = np.concatenate([p & 0xF, p >> 4], axis=-2)  # [..., n_blocks, 2, B/2]
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
