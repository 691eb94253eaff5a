"""``fma(a, b, c)`` = a · b + c inside Pallas-Triton kernels, as one fused multiply-add on the GPU.

Why it exists: the Triton IR that Pallas emits is compiled by XLA's own Triton pipeline, and there the float32
products and sums of a kernel stay separate instructions. On the H200 the decode GEMV ran as FMUL + FADD per code
(Nsight Compute on lm_head: "0 fused and 28.3 M non-fused FP32 instructions" of 64.7 M issued,
results/ncu_h200/dense_lm_head_1.txt), while a standalone Triton 3.6 compile of the same IR contracts them to FFMA
(``scripts/kernel_sass.py``). The GEMV issues instructions at about two thirds of the peak rate, so one instruction
fewer per code is time. ``fma`` makes the contraction explicit:

* Triton (GPU): ``fma.rn.f32 d, a, b, c`` as elementwise inline assembly (one rounding).
* Elsewhere (CPU, interpret mode): a · b + c in float32, two roundings. The interpret-mode tests use exactly
  representable values, where the two agree; the `gpu` tier checks the single rounding (tests/ops/test_fma.py).
Uses JAX's private Pallas-Triton lowering registry, like lane_lut.py (pinned by jax==0.11.2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import mlir
from jax._src.pallas.triton import lowering as triton_lowering

from hlwq_jax.ops.hlwq_matmul.lane_lut import inline_asm

fma_p = jax_core.Primitive("hlwq_fma")


def fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """float32 a · b + c, elementwise; the operands broadcast to one shape."""
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
    ops = [jnp.broadcast_to(v, shape) for v in (a, b, c)]
    for name, v in zip("abc", ops):
        if v.dtype != jnp.float32:
            raise ValueError(f"fma: operand {name} must be float32, got {v.dtype}")
    return fma_p.bind(*ops)


def _fma(a, b, c):
    return a * b + c


fma_p.def_impl(_fma)
fma_p.def_abstract_eval(lambda a, b, c: jax_core.ShapedArray(a.shape, a.dtype))
mlir.register_lowering(fma_p, mlir.lower_fun(_fma, multiple_results=False))


@triton_lowering.register_lowering(fma_p)
def _fma_triton(ctx, a, b, c):
    return inline_asm(ctx, "fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f", [a, b, c])
