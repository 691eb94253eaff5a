"""fma.fma: the CPU model (a · b + c), interpret mode, its lowering to fma.rn.f32, and on a GPU the single rounding
that distinguishes a fused multiply-add from a product and a sum."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from hlwq_jax.ops.hlwq_matmul.fma import fma
from triton_ir import lowered_triton_ir


def _kernel(a_ref, b_ref, c_ref, o_ref):
    o_ref[...] = fma(a_ref[...], b_ref[...], c_ref[...])


def _call(a, b, c, interpret):
    return pl.pallas_call(_kernel, out_shape=jax.ShapeDtypeStruct(a.shape, jnp.float32), interpret=interpret)(a, b, c)


def _exact_case(seed, shape=(4, 32)):
    """Small integers: every product and sum is exact in float32, so fused and unfused agree."""
    rng = np.random.default_rng(seed)
    a, b, c = (jnp.asarray(rng.integers(-300, 300, size=shape), jnp.float32) for _ in range(3))
    return a, b, c, np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)


def test_cpu_model_and_interpret_mode():
    a, b, c, want = _exact_case(0)
    np.testing.assert_array_equal(np.asarray(fma(a, b, c)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(fma)(a, b, c)), want)
    np.testing.assert_array_equal(np.asarray(_call(a, b, c, interpret=True)), want)
    # broadcasting: a norm per column against a tile
    np.testing.assert_array_equal(np.asarray(fma(a, b[:1], c)), np.asarray(a) * np.asarray(b[:1]) + np.asarray(c))
    with pytest.raises(ValueError, match="operand b must be float32"):
        fma(a, b.astype(jnp.bfloat16), c)


def test_lowers_to_one_fused_instruction(monkeypatch):
    """Lowered for CUDA (on any host), the kernel carries fma.rn.f32 inline assembly."""
    spec = jax.ShapeDtypeStruct((4, 32), jnp.float32)
    texts = lowered_triton_ir(monkeypatch, lambda a, b, c: _call(a, b, c, False), spec, spec, spec)
    assert texts and "fma.rn.f32" in texts[0]


@pytest.mark.gpu
def test_gpu_rounds_once():
    """a = b = 1 + 2^-12, c = -(1 + 2^-11): a · b = 1 + 2^-11 + 2^-24 rounds (to even) to 1 + 2^-11 in float32, so a
    product then a sum gives 0, a fused multiply-add the exact 2^-24."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    a = jnp.full((4, 32), 1 + 2.0 ** -12, jnp.float32)
    c = jnp.full((4, 32), -(1 + 2.0 ** -11), jnp.float32)
    np.testing.assert_array_equal(np.asarray(_call(a, a, c, interpret=False)), np.full((4, 32), 2.0 ** -24))
    a, b, c, want = _exact_case(1, (8, 128))
    np.testing.assert_array_equal(np.asarray(_call(a, b, c, interpret=False)), want)
