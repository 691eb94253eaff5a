"""``grouped_matmul(x_sorted, w, group_sizes, impl=...)``: dropless grouped matmul for MoE experts held dense
(bf16 / fp32) as a stack w [G, N, K] (out, in), with the rows of x sorted by group.

    impl="reference"   masked matmul per group (reference.py) — the definition
    impl="xla"         jax.lax.ragged_dot (xla.py) — portable, slow on this jaxlib's GPU backend
    impl="mosaic_gpu"  JAX's Pallas Mosaic GPU ragged_dot kernel, tuned configs (mosaic_gpu.py) — sm_90 only, raises
                       elsewhere
Shapes: x [M, K], w [G, N, K], group_sizes int [G] with Σ group_sizes == M for "mosaic_gpu" (≤ M for the others,
rows past the sum are zero) → [M, N] in x dtype, fp32 accumulation. Quantized expert stacks use
hlwq_jax.ops.ragged_hlwq_matmul.
"""
from __future__ import annotations

from typing import Callable

import jax

from hlwq_jax.ops.grouped_matmul import mosaic_gpu, reference, xla
from hlwq_jax.ops.grouped_matmul.mosaic_gpu import MosaicGroupedConfig

_IMPLS: dict[str, Callable] = {
    "reference": lambda x, w, g, config=None: reference.grouped_matmul_reference(x, w, g),
    "xla": lambda x, w, g, config=None: xla.grouped_matmul_xla(x, w, g),
    "mosaic_gpu": mosaic_gpu.grouped_matmul_mosaic_gpu,
}


def implementations() -> tuple[str, ...]:
    return tuple(_IMPLS)


def grouped_matmul(x_sorted: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str = "xla", *,
                   config: MosaicGroupedConfig | None = None) -> jax.Array:
    """x_sorted [M, K], w [G, N, K], group_sizes int [G] -> [M, N] (see module docstring)."""
    if impl not in _IMPLS:
        raise ValueError(f"grouped_matmul: unknown impl {impl!r}; available {implementations()}")
    if x_sorted.ndim != 2 or w.ndim != 3 or x_sorted.shape[1] != w.shape[2] or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_matmul: x {x_sorted.shape}, w {w.shape}, group_sizes {group_sizes.shape} disagree "
                         f"(expected x [M, K], w [G, N, K], group_sizes [G])")
    return _IMPLS[impl](x_sorted, w, group_sizes, config=config)


__all__ = ["grouped_matmul", "implementations", "MosaicGroupedConfig"]
