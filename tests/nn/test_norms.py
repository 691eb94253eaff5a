import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.nn.norms import gated_rms_norm, gated_rms_norm_reference, rms_norm, rms_norm_reference


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_rms_norm_matches_float64(rng):
    x = rng.standard_normal((3, 5, 48)).astype(np.float32) * 3
    w = rng.standard_normal(48).astype(np.float32)
    assert _rel(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5), rms_norm_reference(x, w, 1e-5)) < 1e-6
    ref = rms_norm_reference(x, w, 1e-6, offset=1.0)
    got = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, offset=1.0, scale_in_fp32=True)
    assert _rel(got, ref) < 1e-6


def test_rms_norm_bf16_casts_before_scale(rng):
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(64), jnp.bfloat16)
    got = rms_norm(x, w)
    assert got.dtype == jnp.bfloat16
    xf = x.astype(jnp.float32)
    normed = (xf / jnp.sqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(w * normed, np.float32))


def test_gated_rms_norm_groups_are_independent(rng):
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    z = rng.standard_normal((2, 3, 32)).astype(np.float32)
    w = rng.standard_normal(32).astype(np.float32)
    got = gated_rms_norm(jnp.asarray(x), jnp.asarray(z), jnp.asarray(w), group_size=8)
    assert _rel(got, gated_rms_norm_reference(x, z, w, 8)) < 1e-6
    # scaling one group of x leaves the output unchanged (per-group normalisation), a global norm would not be
    x2 = x.copy()
    x2[..., 8:16] *= 7.0
    tiny = dict(group_size=8, eps=1e-12)
    got1 = gated_rms_norm(jnp.asarray(x), jnp.asarray(z), jnp.asarray(w), **tiny)
    got2 = gated_rms_norm(jnp.asarray(x2), jnp.asarray(z), jnp.asarray(w), **tiny)
    np.testing.assert_allclose(np.asarray(got2), np.asarray(got1), rtol=1e-5, atol=1e-6)
    got_g = gated_rms_norm(jnp.asarray(x2), jnp.asarray(z), jnp.asarray(w), group_size=32)
    assert not np.allclose(np.asarray(got_g), np.asarray(got), atol=1e-3)


def test_norm_shape_errors():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(jnp.ones((2, 8)), jnp.ones(7))
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm(jnp.ones((2, 8)), jnp.ones((2, 8)), jnp.ones(8), group_size=3)
