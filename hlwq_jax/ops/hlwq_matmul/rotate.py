"""Blockwise rotation of activations, x_b ↦ H_B (s_b ⊙ x_b), shared by every implementation of the HLWQ matmul.

Rotate a hidden state once and pass the result to every projection that reads it (q/k/v, Mamba in_proj, the up
projections of all experts): ``hlwq_matmul(x_rot, w, rotated=True)``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.quant import hadamard


def padded_in(w) -> int:
    return -(-w.shape[-1] // w.block_size) * w.block_size


def rotate_activations(x: jax.Array, w) -> jax.Array:
    """x [..., in] → x̃ float32 [..., padded_in] for an HLWQArray / HLWQPlanes ``w``.

    float32 (or wider) inputs rotate with a float32 'highest' einsum (the quantizer's ``blockwise_rotate``). bf16 /
    fp16 inputs rotate on the tensor cores with the ±1 Sylvester matrix (exact products, float32 accumulation) and
    then scale by 1/√B, which is as accurate as the float32 path up to float32 rounding of the sums.
    """
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} input features, weight {w.shape} expects {w.shape[-1]}")
    n = padded_in(w)
    if n != x.shape[-1]:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])
    if w.rotation == "none":
        return x.astype(jnp.float32)
    signs = None
    if w.rotation == "random-hadamard":
        signs = jnp.asarray(hadamard.random_signs(n, w.seed))
    if jnp.dtype(x.dtype).itemsize >= 4:
        return hadamard.blockwise_rotate(x, w.block_size, signs).astype(jnp.float32)
    b = w.block_size
    if signs is not None:
        x = x * signs.astype(x.dtype)  # ±1: exact
    h_pm1 = jnp.asarray(np.round(hadamard.hadamard_matrix(b) * math.sqrt(b)), x.dtype)  # ±1 entries
    blocks = x.reshape(*x.shape[:-1], n // b, b)
    y = jnp.einsum("...kb,bc->...kc", blocks, h_pm1, preferred_element_type=jnp.float32)
    return (y * np.float32(1.0 / math.sqrt(b))).reshape(*x.shape[:-1], n)
