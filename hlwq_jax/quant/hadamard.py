"""Walsh-Hadamard rotations applied blockwise along the last axis.

H_B is the Sylvester matrix normalised to be orthonormal: H_1 = [1], H_2n = [[H, H], [H, −H]] / √2. It is symmetric
and self-inverse, so rotating a weight block by H and the matching activation block by H leaves ⟨w, x⟩ unchanged.

``random_signs(n, seed)`` gives the ±1 vector of the "random-hadamard" rotation R_b = H_B · diag(s_b), where s is
drawn over the whole padded input dimension (n = n_blocks · B) from numpy's PCG64 seeded with ``seed``.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, (int, np.integer)) or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two, got {block_size!r}")


@functools.lru_cache(maxsize=None)
def _hadamard64(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]]) / np.sqrt(2.0)
    h.setflags(write=False)
    return h


def hadamard_matrix(n: int) -> np.ndarray:
    """Orthonormal Sylvester Walsh-Hadamard matrix, float64 [n, n] (read-only)."""
    check_block_size(n)
    return _hadamard64(int(n))


def fwht(x: jnp.ndarray) -> jnp.ndarray:
    """Fast Walsh-Hadamard transform along the last axis (length a power of two), orthonormal: x @ H.

    log2(n) butterfly stages of adds; the reference for ``blockwise_rotate``'s matmul form.
    """
    n = x.shape[-1]
    check_block_size(n)
    lead = x.shape[:-1]
    h = 1
    y = x
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return y.reshape(*lead, n) * (1.0 / np.sqrt(n)).astype(np.float32 if x.dtype != jnp.float64 else np.float64)


def random_signs(n: int, seed: int) -> np.ndarray:
    """Seeded ±1 float32 vector of length n (the "random-hadamard" signs)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return np.where(rng.integers(0, 2, size=n) == 1, 1.0, -1.0).astype(np.float32)


def blockwise_rotate(x: jnp.ndarray, block_size: int, signs: jnp.ndarray | None = None) -> jnp.ndarray:
    """Rotate each length-B block of the last axis: x_b ↦ H_B (s_b ⊙ x_b).

    Args:
      x: [..., n] with n a multiple of block_size (pad first).
      block_size: B, a power of two.
      signs: optional ±1 [n] (random-hadamard); None for plain Hadamard.
    Returns:
      [..., n], same dtype as x (computed in float32 or wider).
    """
    n = x.shape[-1]
    if n % block_size:
        raise ValueError(f"last axis {n} is not a multiple of block_size {block_size}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dtype)
    if signs is not None:
        xf = xf * signs.astype(dtype)
    h = jnp.asarray(hadamard_matrix(block_size), dtype)
    blocks = xf.reshape(*x.shape[:-1], n // block_size, block_size)
    out = jnp.einsum("...kb,bc->...kc", blocks, h, precision="highest")  # H symmetric: x_b @ H = H x_b
    return out.reshape(x.shape).astype(dtype)
