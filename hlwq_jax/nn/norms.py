"""RMSNorm variants (fp32 statistics, cast back to the input dtype, then scale).

Public signatures:
  rms_norm(x, weight, eps=1e-5, *, offset=0.0, scale_in_fp32=False) -> array like x
      x [..., D], weight [D]. y = w' * cast(x * rsqrt(mean(x^2) + eps)), w' = weight + offset.
      scale_in_fp32=False (HF Llama / Nemotron-H): normalise in fp32, cast to x.dtype, multiply by w'.
      scale_in_fp32=True (HF Gemma-3): multiply in fp32, then cast to x.dtype.
  gated_rms_norm(x, z, weight, group_size, eps=1e-5) -> array like x
      Mamba2 grouped gated norm: u = x * silu(z) in fp32, RMS-normalise each consecutive group of `group_size`
      channels separately, cast to x.dtype, times weight [D].
  rms_norm_reference / gated_rms_norm_reference: float64 numpy references of the same definitions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-5, *, offset: float = 0.0,
             scale_in_fp32: bool = False) -> jax.Array:
    """RMSNorm over the last axis; see module docstring."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {weight.shape} != ({x.shape[-1]},)")
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if scale_in_fp32:
        return (xf * (weight.astype(jnp.float32) + offset)).astype(x.dtype)
    w = weight + offset if offset else weight
    return (w * xf.astype(x.dtype)).astype(jnp.result_type(x.dtype, weight.dtype))


def gated_rms_norm(x: jax.Array, z: jax.Array, weight: jax.Array, group_size: int,
                   eps: float = 1e-5) -> jax.Array:
    """Grouped gated RMSNorm (Mamba2, norm_before_gate=False). x, z [..., D]; weight [D]; D % group_size == 0."""
    d = x.shape[-1]
    if z.shape != x.shape or weight.shape != (d,) or d % group_size:
        raise ValueError(f"gated_rms_norm: x {x.shape}, z {z.shape}, weight {weight.shape}, group_size {group_size}")
    u = x.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    ug = u.reshape(*u.shape[:-1], d // group_size, group_size)
    ug = ug * jax.lax.rsqrt(jnp.mean(ug * ug, axis=-1, keepdims=True) + eps)
    u = ug.reshape(u.shape).astype(x.dtype)
    return (weight * u).astype(jnp.result_type(x.dtype, weight.dtype))


def rms_norm_reference(x, weight, eps=1e-5, offset=0.0):
    """float64 numpy RMSNorm."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (np.asarray(weight, np.float64) + offset)


def gated_rms_norm_reference(x, z, weight, group_size, eps=1e-5):
    """float64 numpy grouped gated RMSNorm."""
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    u = x * z / (1.0 + np.exp(-z))
    ug = u.reshape(*u.shape[:-1], -1, group_size)
    ug = ug / np.sqrt(np.mean(ug * ug, -1, keepdims=True) + eps)
    return ug.reshape(u.shape) * np.asarray(weight, np.float64)
