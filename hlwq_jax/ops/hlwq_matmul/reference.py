"""Plain-jnp reference of the HLWQ matmul: dequantize, then matmul (docs/hlwq.md §1, step 6).

    1. Ŵ = w.dequantize(float32)                       [out, in]   (the definition of the quantized weight)
    2. y = x · Ŵᵀ in float32, 'highest' precision      [..., out]
    3. cast to x.dtype
No speed tricks: this is the oracle every other implementation is tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def hlwq_matmul_reference(x: jax.Array, w) -> jax.Array:
    """x [..., in], w HLWQArray | HLWQPlanes [out, in] → [..., out] in x.dtype."""
    if len(w.shape) != 2:
        raise ValueError(f"hlwq_matmul needs a 2-D weight [out, in], got shape {w.shape}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} input features, weight {w.shape} expects {w.shape[-1]}")
    w_hat = w.dequantize(jnp.float32)  # 1.
    y = jnp.einsum("...i,oi->...o", x.astype(jnp.float32), w_hat, precision=jax.lax.Precision.HIGHEST)  # 2.
    return y.astype(x.dtype)  # 3.
