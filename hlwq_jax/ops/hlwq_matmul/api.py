"""``hlwq_matmul(x, w, impl=...)``: the one dispatch point over the HLWQ matmul implementations (a small registry).

    impl="reference"  dequantize then matmul in float32 (reference.py; the oracle)
    impl="xla"        rotate the activations, contract the codes in XLA (xla.py; runs anywhere)
    impl="pallas"     fused code-lookup Pallas kernels (pallas_triton.py): GPU, or the CPU with interpret=True;
                      anything else raises (no fallback)
    impl="pallas-decode"  the Pallas GEMV for M ≤ config.gemv_max_m tokens and impl="xla" above — the pairing a
                      model wants (the Pallas GEMV beats bf16 at decode; at M > 1 XLA's paths beat the Pallas ones,
                      results/bench_hlwq_matmul*.md); its Pallas part has the same GPU-or-interpret rule
Register another with ``register(name, fn)``; ``fn(x, w, *, config, interpret, rotated)``.
"""
from __future__ import annotations

import math
from typing import Callable

import jax

from hlwq_jax.ops.hlwq_matmul import pallas_triton, reference, xla

_IMPLS: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
    if name in _IMPLS:
        raise ValueError(f"hlwq_matmul implementation {name!r} is already registered")
    _IMPLS[name] = fn


def implementations() -> tuple[str, ...]:
    return tuple(_IMPLS)


def _reference(x, w, *, config=None, interpret=False, rotated=False):
    if rotated:
        raise ValueError("impl='reference' takes un-rotated activations (rotated=False)")
    return reference.hlwq_matmul_reference(x, w)


def _xla(x, w, *, config=None, interpret=False, rotated=False):
    return xla.hlwq_matmul_xla(x, w, config=config or xla.XlaConfig(), rotated=rotated)


def _pallas(x, w, *, config=None, interpret=False, rotated=False):
    return pallas_triton.hlwq_matmul_pallas(x, w, config=config or pallas_triton.PallasConfig(),
                                            interpret=interpret, rotated=rotated)


def _pallas_decode(x, w, *, config=None, interpret=False, rotated=False):
    config = config or pallas_triton.PallasConfig()
    m = math.prod(x.shape[:-1])
    if m <= config.gemv_max_m:
        return _pallas(x, w, config=config, interpret=interpret, rotated=rotated)
    return _xla(x, w, rotated=rotated)


register("reference", _reference)
register("xla", _xla)
register("pallas", _pallas)
register("pallas-decode", _pallas_decode)


def hlwq_matmul(x: jax.Array, w, impl: str = "xla", interpret: bool = False, *, config=None,
                rotated: bool = False) -> jax.Array:
    """y = x · Ŵᵀ for an HLWQ weight.

    Args:
      x: [..., in] activations (or, with ``rotated=True``, float32 [..., padded_in] from ``rotate_activations``,
        to share one rotation among the projections that read the same hidden state).
      w: HLWQArray or HLWQPlanes of shape [out, in] (``layout.repack`` it once for impl="pallas").
      impl: one of ``implementations()``.
      interpret: run Pallas kernels in interpret mode (CPU).
      config: the implementation's frozen config (XlaConfig / PallasConfig), default when None.
    Returns:
      [..., out] in x.dtype.
    """
    if impl not in _IMPLS:
        raise ValueError(f"unknown hlwq_matmul impl {impl!r}; registered: {implementations()}")
    return _IMPLS[impl](x, w, config=config, interpret=interpret, rotated=rotated)
