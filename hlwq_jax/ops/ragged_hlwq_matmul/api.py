"""``ragged_hlwq_matmul(x_sorted, w_experts, group_sizes, impl=...)``: dropless grouped matmul over stacked HLWQ
experts [E, out, in] with tokens sorted by expert (registry as in ops/hlwq_matmul/api.py).

    impl="reference"  dequantize all experts, masked per-expert matmuls (reference.py)
    impl="xla"        rotate once, dequantise in the rotated domain, lax.ragged_dot (xla.py)
    impl="pallas"     decode kernel over the experts that received tokens / grouped tensor-core kernel
                      (pallas_triton.py); GPU, or CPU with interpret=True, otherwise raises
"""
from __future__ import annotations

from typing import Callable

import jax

from hlwq_jax.ops.ragged_hlwq_matmul import pallas_triton, reference, xla

_IMPLS: dict[str, Callable] = {
    "reference": lambda x, w, g, *, config=None, interpret=False: reference.ragged_hlwq_matmul_reference(x, w, g),
    "xla": lambda x, w, g, *, config=None, interpret=False: xla.ragged_hlwq_matmul_xla(x, w, g),
    "pallas": lambda x, w, g, *, config=None, interpret=False: pallas_triton.ragged_hlwq_matmul_pallas(
        x, w, g, config=config or pallas_triton.RaggedPallasConfig(), interpret=interpret),
}


def register(name: str, fn: Callable) -> None:
    if name in _IMPLS:
        raise ValueError(f"ragged_hlwq_matmul implementation {name!r} is already registered")
    _IMPLS[name] = fn


def implementations() -> tuple[str, ...]:
    return tuple(_IMPLS)


def ragged_hlwq_matmul(x_sorted: jax.Array, w_experts, group_sizes: jax.Array, impl: str = "xla",
                       interpret: bool = False, *, config=None) -> jax.Array:
    """x_sorted [T, in] (sorted by expert), w_experts HLWQArray | HLWQPlanes [E, out, in], group_sizes int [E]
    → [T, out] in x dtype; rows at or past Σ group_sizes are zero."""
    if impl not in _IMPLS:
        raise ValueError(f"unknown ragged_hlwq_matmul impl {impl!r}; registered: {implementations()}")
    return _IMPLS[impl](x_sorted, w_experts, group_sizes, config=config, interpret=interpret)
