"""True b-bit packing (b in 1..8) of code arrays along the last axis, LSB-first.

Layout: the codes of one row form a bit stream in which code i occupies bits [i·b, (i+1)·b), bit 0 being the least
significant bit of byte 0 (the same order as ``np.packbits(..., bitorder="little")`` over each code's bits written
LSB first). A row of n codes takes ceil(n·b / 8) bytes; unused trailing bits are zero.

Both directions are plain jnp (jit-able, run on GPU); they process groups of 8 codes ↔ b bytes with static shifts.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def packed_size(n: int, bits: int) -> int:
    """Bytes that n codes of ``bits`` bits take: ceil(n·bits/8)."""
    return -(-n * bits // 8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack_codes(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """uint8 codes [..., n] (each < 2**bits) → uint8 [..., ceil(n·bits/8)]."""
    _check_bits(bits)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    pad = (-n) % 8
    c = codes.astype(jnp.uint32)
    if pad:
        c = jnp.pad(c, [(0, 0)] * len(lead) + [(0, pad)])
    groups = c.reshape(*lead, (n + pad) // 8, 8)
    out_bytes = []
    for j in range(bits):  # byte j of each 8-code group holds stream bits [8j, 8j + 8)
        acc = jnp.zeros(groups.shape[:-1], jnp.uint32)
        for i in range(8):
            lo = i * bits  # first stream bit of code i
            if lo + bits <= 8 * j or lo >= 8 * j + 8:
                continue
            shift = lo - 8 * j
            part = groups[..., i] << shift if shift >= 0 else groups[..., i] >> (-shift)
            acc = acc | part
        out_bytes.append(acc & 0xFF)
    packed = jnp.stack(out_bytes, axis=-1).reshape(*lead, ((n + pad) // 8) * bits)
    return packed[..., : packed_size(n, bits)].astype(jnp.uint8)


def unpack_codes(packed: jnp.ndarray, bits: int, n: int) -> jnp.ndarray:
    """uint8 [..., ceil(n·bits/8)] → uint8 codes [..., n] (inverse of ``pack_codes``)."""
    _check_bits(bits)
    lead = packed.shape[:-1]
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"packed row has {packed.shape[-1]} bytes, expected {packed_size(n, bits)} for {n} codes of {bits} bits")
    pad = (-n) % 8
    groups_n = (n + pad) // 8
    p = packed.astype(jnp.uint32)
    full = groups_n * bits
    if p.shape[-1] < full:
        p = jnp.pad(p, [(0, 0)] * len(lead) + [(0, full - p.shape[-1])])
    g = p.reshape(*lead, groups_n, bits)
    mask = (1 << bits) - 1
    codes = []
    for i in range(8):
        lo = i * bits
        j, off = divmod(lo, 8)
        v = g[..., j] >> off
        if off + bits > 8:
            v = v | (g[..., j + 1] << (8 - off))
        codes.append(v & mask)
    out = jnp.stack(codes, axis=-1).reshape(*lead, groups_n * 8)
    return out[..., :n].astype(jnp.uint8)


def pack_codes_numpy(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit-level numpy oracle of ``pack_codes`` (independent: explodes codes into bits, then np.packbits)."""
    _check_bits(bits)
    codes = np.asarray(codes, np.uint8)
    n = codes.shape[-1]
    bit_planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [..., n, bits], LSB first
    stream = bit_planes.reshape(*codes.shape[:-1], n * bits)
    return np.packbits(stream, axis=-1, bitorder="little")
