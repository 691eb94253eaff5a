import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hlwq_jax.quant.hadamard import blockwise_rotate, fwht, hadamard_matrix, random_signs


@pytest.mark.parametrize("n", [1, 2, 8, 128, 512])
def test_orthonormal_symmetric(n):
    h = hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n))


@given(logn=st.sampled_from([0, 1, 3, 7, 9]), rows=st.just(2), seed=st.integers(0, 1000))
@settings(max_examples=12, deadline=None)
def test_fwht_equals_matrix(logn, rows, seed):
    n = 1 << logn
    x = np.random.default_rng(seed).standard_normal((rows, n))
    np.testing.assert_allclose(np.asarray(fwht(jnp.asarray(x, jnp.float32))), x @ hadamard_matrix(n), atol=2e-5 * np.sqrt(n))


def test_blockwise_rotation_preserves_products():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 384)), rng.standard_normal((5, 384))
    s = jnp.asarray(random_signs(384, 7))
    xr = np.asarray(blockwise_rotate(jnp.asarray(x, jnp.float32), 128, s), np.float64)
    wr = np.asarray(blockwise_rotate(jnp.asarray(w, jnp.float32), 128, s), np.float64)
    np.testing.assert_allclose(xr @ wr.T, x @ w.T, atol=1e-4)
    # blockwise: each 128-block is rotated on its own
    np.testing.assert_allclose(xr[:, 128:256], (x[:, 128:256] * random_signs(384, 7)[128:256]) @ hadamard_matrix(128), atol=1e-5)


def test_random_signs_deterministic():
    a, b = random_signs(256, 3), random_signs(256, 3)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert not np.array_equal(a, random_signs(256, 4))


@pytest.mark.parametrize("bad", [0, 3, 96, -4])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(bad)
