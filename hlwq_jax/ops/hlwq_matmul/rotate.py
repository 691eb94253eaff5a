"""Blockwise rotation of activations, x_b ↦ H_B (s_b ⊙ x_b), shared by every implementation of the HLWQ matmul.

Rotate a hidden state once and pass the result to every projection that reads it (q/k/v, Mamba in_proj, the up
projections of all experts): ``hlwq_matmul(x_rot, w, rotated=True)``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.ops.hlwq_matmul.layout import CHUNK
from hlwq_jax.quant import hadamard


def padded_in(w) -> int:
    return -(-w.shape[-1] // w.block_size) * w.block_size


def chunk_permutation(chunk_order: np.ndarray | None, n: int) -> np.ndarray:
    """int [n] (n a multiple of 128): column i of the result is column perm[i] of the input, ``chunk_order``
    applied within every 128-column chunk (the identity for None)."""
    if chunk_order is None:
        return np.arange(n)
    order = np.asarray(chunk_order)
    if sorted(order.tolist()) != list(range(CHUNK)):
        raise ValueError(f"chunk_order must be a permutation of range({CHUNK}), got one of length {len(order)}")
    return (np.arange(0, n, CHUNK)[:, None] + order[None, :]).reshape(-1)


def rotate_activations(x: jax.Array, w, chunk_order: np.ndarray | None = None) -> jax.Array:
    """x [..., in] → x̃ float32 [..., padded_in] for an HLWQArray / HLWQPlanes ``w``.

    float32 (or wider) inputs rotate with a float32 'highest' einsum (as the quantizer's ``blockwise_rotate``). bf16 /
    fp16 inputs rotate on the tensor cores with the ±1 Sylvester matrix (exact products, float32 accumulation) and
    then scale by 1/√B, which is as accurate as the float32 path up to float32 rounding of the sums.
    ``chunk_order`` (int [128], a permutation; needs B a multiple of 128): position i of every 128-column chunk of
    the result holds column chunk_order[i] of that chunk — the decode GEMV's order (gemv_triton.chunk_order), folded
    into the Hadamard matrix's columns, so it costs no pass of its own.
    """
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} input features, weight {w.shape} expects {w.shape[-1]}")
    n = padded_in(w)
    if chunk_order is not None and w.block_size % CHUNK:
        raise ValueError(f"chunk_order needs block_size to be a multiple of {CHUNK}, got {w.block_size}")
    if n != x.shape[-1]:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])
    if w.rotation == "none":
        return x.astype(jnp.float32)[..., chunk_permutation(chunk_order, n)]
    b = w.block_size
    wide = jnp.dtype(x.dtype).itemsize >= 4
    dtype = jnp.promote_types(x.dtype, jnp.float32) if wide else x.dtype
    if w.rotation == "random-hadamard":
        x = x.astype(dtype) * jnp.asarray(hadamard.random_signs(n, w.seed)).astype(dtype)  # ±1: exact
    h = hadamard.hadamard_matrix(b)[:, chunk_permutation(chunk_order, b)]  # a constant: permuted in numpy
    h = jnp.asarray(h if wide else np.round(h * math.sqrt(b)), dtype)  # bf16 / fp16: the ±1 entries
    blocks = x.astype(dtype).reshape(*x.shape[:-1], n // b, b)
    if wide:
        y = jnp.einsum("...kb,bc->...kc", blocks, h, precision="highest")  # H symmetric: x_b @ H = H x_b
        return y.reshape(*x.shape[:-1], n).astype(jnp.float32)
    y = jnp.einsum("...kb,bc->...kc", blocks, h, preferred_element_type=jnp.float32)
    return (y * np.float32(1.0 / math.sqrt(b))).reshape(*x.shape[:-1], n)
