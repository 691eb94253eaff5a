"""``linear(x, w)``: y = x @ Wᵀ for a plain weight or any quantized leaf — the one place that branches on leaf type.

W is stored in PyTorch layout [out, in]. HLWQ leaves go through ``hlwq_matmul`` (rotate activations, contract
codes); the baseline formats (RTN, NF4, NVFP4) are dequantized to the activation dtype first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hlwq_jax.quant.array import HLWQArray
from hlwq_jax.quant.baselines import NF4Array, NVFP4Array, RTNArray
from hlwq_jax.quant.hlwq import hlwq_matmul

QUANTIZED_TYPES = (HLWQArray, RTNArray, NF4Array, NVFP4Array)


def is_quantized(w) -> bool:
    return isinstance(w, QUANTIZED_TYPES)


def dense_weight(w, dtype) -> jax.Array:
    """The weight as a dense array in ``dtype`` (dequantizes quantized leaves)."""
    if is_quantized(w):
        return w.dequantize(dtype)
    return jnp.asarray(w).astype(dtype)


def linear(x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ W[out, in]ᵀ (+ bias [out]) → [..., out] in x.dtype.

    Plain weights compute in x.dtype with float32 accumulation.
    """
    if isinstance(w, HLWQArray):
        y = hlwq_matmul(x, w)
    elif is_quantized(w):
        y = jnp.einsum("...i,oi->...o", x, w.dequantize(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    else:
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
