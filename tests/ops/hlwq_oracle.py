"""Float64 numpy oracle and exactly-representable HLWQ weights for the kernel tests (shared by tests/ops)."""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from hlwq_jax.quant.array import HLWQArray
from hlwq_jax.quant.packing import pack_codes_numpy


def sylvester64(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def exact_weight(rng, bits: int, shape, block_size: int = 128, rotation: str = "hadamard", seed: int = 0,
                 zero_block: bool = False) -> HLWQArray:
    """Random codes, a codebook of multiples of 1/8 and norms in {1/4, 1/2, 1, 2} (exact in fp16 / fp32)."""
    *lead, out, n_in = shape
    nb = -(-n_in // block_size)
    codes = rng.integers(0, 1 << bits, size=(*lead, out, nb * block_size)).astype(np.uint8)
    norms = rng.choice(np.array([0.25, 0.5, 1.0, 2.0]), size=(*lead, out, nb)).astype(np.float16)
    if zero_block:
        norms[..., 0, 0] = 0.0
    levels = np.arange(1 << bits, dtype=np.float64)
    codebook = ((2.0 * levels - ((1 << bits) - 1)) / 8.0).astype(np.float32)  # ascending, exact
    packed = pack_codes_numpy(codes, bits)
    return HLWQArray(packed=jnp.asarray(packed), norms=jnp.asarray(norms), codebook=jnp.asarray(codebook), bits=bits,
                     block_size=block_size, shape=tuple(shape), rotation=rotation, seed=seed)


def unpack_numpy(w: HLWQArray) -> np.ndarray:
    """Codes [*lead, out, padded_in] from the LSB-first bit stream, bit by bit (independent of the jnp unpacker)."""
    packed = np.asarray(w.packed)
    bits_ = np.unpackbits(packed, axis=-1, bitorder="little")
    n = w.padded_in
    stream = bits_[..., : n * w.bits].reshape(*packed.shape[:-1], n, w.bits).astype(np.int64)
    return (stream << np.arange(w.bits)).sum(-1)


def dequantize_numpy(w: HLWQArray) -> np.ndarray:
    """Ŵ float64 [*lead, out, in] from the invariant: r · (c[code] / √B) · R_b, R_b = H_B or H_B diag(s_b)."""
    from hlwq_jax.quant.hadamard import random_signs  # the seeded sign vector is part of the format

    b = w.block_size
    codes = unpack_numpy(w).reshape(*w.shape[:-1], w.n_blocks, b)
    vals = np.asarray(w.codebook, np.float64)[codes] / np.sqrt(b) * np.asarray(w.norms, np.float64)[..., None]
    if w.rotation != "none":
        vals = vals @ sylvester64(b)
        if w.rotation == "random-hadamard":
            vals = vals * random_signs(w.padded_in, w.seed).astype(np.float64).reshape(w.n_blocks, b)
    return vals.reshape(*w.shape[:-1], w.padded_in)[..., : w.in_features]


def rel_err(y, ref) -> float:
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))
