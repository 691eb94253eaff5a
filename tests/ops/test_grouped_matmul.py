"""One suite for hlwq_jax.ops.grouped_matmul, run against a float64 numpy oracle for every implementation that can
run here (mosaic_gpu in the gpu tier)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.ops.grouped_matmul import MosaicGroupedConfig, grouped_matmul


def _oracle(x, w, sizes):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, start = np.zeros((x.shape[0], w.shape[1])), 0
    for g, n in enumerate(np.asarray(sizes)):
        out[start:start + n] = x[start:start + n] @ w[g].T
        start += n
    return out


def _case(rng, m, k, n, sizes, dtype):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((len(sizes), n, k)) / np.sqrt(k), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32)


SIZES = {"uneven": [5, 0, 17, 1, 0, 9], "one_group": [0, 0, 32, 0, 0, 0], "all_empty_but_last": [0, 0, 0, 0, 0, 7]}


class Suite:
    impl: str
    dtype = jnp.float32
    tol = 1e-5
    k, n = 48, 24

    @pytest.mark.parametrize("name", sorted(SIZES))
    def test_matches_oracle(self, rng, name):
        sizes = SIZES[name]
        x, w, g = _case(rng, sum(sizes), self.k, self.n, sizes, self.dtype)
        got = jax.jit(lambda *a: grouped_matmul(*a, impl=self.impl))(x, w, g)
        ref = _oracle(x, w, g)
        err = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
        assert got.shape == ref.shape and got.dtype == x.dtype and err < self.tol, f"rel err {err:.2e}"


class ZeroTailSuite(Suite):
    """Implementations that promise zeros for rows at or past Σ group_sizes."""

    def test_rows_past_the_groups_are_zero(self, rng):
        x, w, g = _case(rng, 12, 8, 4, [3, 4], jnp.float32)
        assert not np.any(np.asarray(grouped_matmul(x, w, g, impl=self.impl))[7:])


class TestReference(ZeroTailSuite):
    impl = "reference"


class TestXla(ZeroTailSuite):
    impl = "xla"


@pytest.mark.gpu
class TestMosaicGpu(Suite):
    impl = "mosaic_gpu"
    dtype = jnp.bfloat16
    tol = 1e-2
    k, n = 256, 128

    def test_bad_input(self, rng):
        x, w, g = _case(rng, 6, 8, 4, [3, 3], jnp.float32)
        with pytest.raises(ValueError, match="16-bit"):
            grouped_matmul(x, w, g, impl="mosaic_gpu")
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        with pytest.raises(ValueError, match="block_k"):
            grouped_matmul(xb, wb, g, impl="mosaic_gpu", config=MosaicGroupedConfig(block_k=64))


def test_bad_input(rng):
    x, w, g = _case(rng, 6, 8, 4, [3, 3], jnp.float32)
    with pytest.raises(ValueError, match="unknown impl"):
        grouped_matmul(x, w, g, impl="triton")
    with pytest.raises(ValueError, match="disagree"):
        grouped_matmul(x[:, :5], w, g)


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="checks the error raised off-GPU")
def test_mosaic_gpu_raises_off_hopper(rng):
    x, w, g = _case(rng, 6, 64, 64, [3, 3], jnp.bfloat16)
    with pytest.raises(RuntimeError, match="sm_90"):
        grouped_matmul(x, w, g, impl="mosaic_gpu", config=MosaicGroupedConfig(block_n=64, block_k=64))
