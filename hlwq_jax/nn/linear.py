"""``linear(x, w)``: y = x @ Wᵀ for a plain weight or any quantized leaf — the one place that branches on leaf type.

W is stored in PyTorch layout [out, in]. HLWQ leaves (``HLWQArray`` or its kernel layout ``HLWQPlanes``) go through
``hlwq_jax.ops.hlwq_matmul`` with the chosen ``impl`` (default "xla": rotate activations, contract codes); the
baseline formats (RTN, NF4, NVFP4) are dequantized to the activation dtype first.

Kernels per leaf: ``select_kernels(params, "pallas-decode", names=...)`` wraps the chosen HLWQ leaves in
``KernelChoice`` (the leaf plus its hlwq_matmul impl and config); ``linear`` runs a wrapped leaf with its own impl, so
a model picks kernels leaf by leaf without any model code knowing.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hlwq_jax.ops.hlwq_matmul import api as hlwq_ops
from hlwq_jax.ops.hlwq_matmul.layout import HLWQPlanes, repack
from hlwq_jax.quant.array import HLWQArray
from hlwq_jax.quant.baselines import NF4Array, NVFP4Array, RTNArray

HLWQ_TYPES = (HLWQArray, HLWQPlanes)
DENSE_PROJECTIONS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj",
                     "lm_head")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """An HLWQ weight with the hlwq_matmul implementation ``linear`` must use for it.

    Invariant: ``weight`` is an HLWQArray or HLWQPlanes of shape [out, in] (used by ``linear``) or a stacked expert
    weight [E, out, in] (used by nn.moe); ``impl`` is a registered hlwq_matmul implementation; ``config`` its frozen
    config, a RaggedPallasConfig for a stacked weight, or None for the default. Leaves: those of ``weight``.
    """
    weight: Any
    impl: str = dataclasses.field(metadata=dict(static=True))
    config: Any = dataclasses.field(metadata=dict(static=True), default=None)
    interpret: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def shape(self):
        return self.weight.shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return self.weight.dequantize(dtype)


QUANTIZED_TYPES = (HLWQArray, HLWQPlanes, RTNArray, NF4Array, NVFP4Array, KernelChoice)


def select_kernels(params, impl: str, *, names=DENSE_PROJECTIONS, config=None, experts: bool = False,
                   expert_config=None, interpret: bool = False, repack_weights: bool = True):
    """Wrap every 2-D HLWQ leaf whose last path key is in ``names`` in ``KernelChoice(impl, config)`` (``linear``
    honours it; ``config``: the impl's config, e.g. a PallasConfig).

    ``experts``: also wrap stacked expert leaves [E, out, in] under those names, with ``expert_config`` (a
    RaggedPallasConfig or None): nn.moe's gather (decode) path then runs them on the Pallas gather GEMV for impl
    "pallas" / "pallas-decode", on XLA otherwise; its other paths read the weight inside as before. Measured on the
    30B-shaped model (H200, results/bench_model_experts*.json): batch-1 fused decode 258 tok/s with it against 224
    without (bf16: 327), prefill 14.2 k against 14.8 k tok/s. Off by default so that the experts stay in the
    canonical HLWQArray layout unless asked; repacking them peaks at two copies of the experts on the device.
    ``repack_weights``: convert the chosen HLWQArray leaves to the kernel layout (``HLWQPlanes``) once, here, so that
    the Pallas kernels do not repack on every call. Raises if ``impl`` is not a registered hlwq_matmul implementation.
    """
    if impl not in hlwq_ops.implementations():
        raise ValueError(f"unknown hlwq_matmul impl {impl!r}; registered: {hlwq_ops.implementations()}")
    ranks = (2, 3) if experts else (2,)

    def one(path, leaf):
        key = path[-1] if path else None
        name = getattr(key, "key", getattr(key, "name", None))
        if not (isinstance(leaf, HLWQ_TYPES) and len(leaf.shape) in ranks and name in names):
            return leaf
        w = repack(leaf) if repack_weights and isinstance(leaf, HLWQArray) else leaf
        return KernelChoice(w, impl, config if len(leaf.shape) == 2 else expert_config, interpret)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda l: isinstance(l, (*HLWQ_TYPES, KernelChoice)))


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
    ("reference" | "xla" | "pallas" | "pallas-decode", see ``hlwq_jax.ops.hlwq_matmul``); it is ignored for other
    leaves, and a ``KernelChoice`` leaf uses its own.
    """
    if isinstance(w, KernelChoice):
        y = hlwq_ops.hlwq_matmul(x, w.weight, impl=w.impl, config=w.config, interpret=w.interpret)
    elif isinstance(w, HLWQ_TYPES):
        y = hlwq_ops.hlwq_matmul(x, w, impl=impl)
    elif is_quantized(w):
        y = jnp.einsum("...i,oi->...o", x, w.dequantize(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    else:
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
