"""``linear(x, w)``: y = x @ Wᵀ for a plain weight or any quantized leaf — the one place that branches on leaf type.

W is stored in PyTorch layout [out, in]. HLWQ leaves (``HLWQArray`` or its kernel layout ``HLWQPlanes``) go through
``hlwq_jax.ops.hlwq_matmul`` with the chosen ``impl`` (default "xla": rotate activations, contract codes); the
baseline formats (RTN, NF4, NVFP4) are dequantized to the activation dtype first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hlwq_jax.ops.hlwq_matmul import api as hlwq_ops
from hlwq_jax.ops.hlwq_matmul.layout import HLWQPlanes
from hlwq_jax.quant.array import HLWQArray
from hlwq_jax.quant.baselines import NF4Array, NVFP4Array, RTNArray

HLWQ_TYPES = (HLWQArray, HLWQPlanes)
QUANTIZED_TYPES = (HLWQArray, HLWQPlanes, RTNArray, NF4Array, NVFP4Array)


def is_quantized(w) -> bool:
    return isinstance(w, QUANTIZED_TYPES)


def dense_weight(w, dtype) -> jax.Array:
    """The weight as a dense array in ``dtype`` (dequantizes quantized leaves)."""
    if is_quantized(w):
        return w.dequantize(dtype)
    return jnp.asarray(w).astype(dtype)


def linear(x: jax.Array, w, bias: jax.Array | None = None, *, impl: str = "xla") -> jax.Array:
    """x [..., in] @ W[out, in]ᵀ (+ bias [out]) → [..., out] in x.dtype.

    Plain weights compute in x.dtype with float32 accumulation. ``impl`` selects the HLWQ matmul implementation
    ("reference" | "xla" | "pallas", see ``hlwq_jax.ops.hlwq_matmul``); it is ignored for other leaves.
    """
    if isinstance(w, HLWQ_TYPES):
        y = hlwq_ops.hlwq_matmul(x, w, impl=impl)
    elif is_quantized(w):
        y = jnp.einsum("...i,oi->...o", x, w.dequantize(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    else:
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
