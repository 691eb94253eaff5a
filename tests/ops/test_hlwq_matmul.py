"""Shared test suite of hlwq_matmul, subclassed per implementation (reference, xla, pallas in interpret mode, and
pallas on a GPU in the `gpu` tier). Oracle: float64 numpy dequantisation from the stated invariant (hlwq_oracle)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_oracle import dequantize_numpy, exact_weight, rel_err
from hlwq_jax.ops.hlwq_matmul import (GemvConfig, PallasConfig, XlaConfig, hlwq_matmul, plan, repack,
                                     rotate_activations)

OUT, IN = 200, 300  # neither a multiple of the 64/128 output tiles nor of the 128-column chunks


class HLWQMatmulSuite:
    impl = "reference"
    interpret = False
    tol = {jnp.dtype(jnp.float32): 2e-6, jnp.dtype(jnp.bfloat16): 1e-2}
    config = None

    def run(self, x, w, config=None, **kw):
        return hlwq_matmul(x, w, impl=self.impl, interpret=self.interpret, config=config or self.config, **kw)

    def check(self, y, x, w):
        dtype = jnp.dtype(x.dtype)
        ref = np.asarray(x.astype(jnp.float32), np.float64) @ dequantize_numpy(w).T
        assert y.dtype == dtype and y.shape == ref.shape
        err = rel_err(y, ref)
        assert err < self.tol[dtype], f"{self.impl}: rel err {err:.3e} (max abs {np.abs(np.asarray(y, np.float64) - ref).max():.3e})"

    @pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
    def test_bits_decode(self, bits):
        rng = np.random.default_rng(bits)
        w = exact_weight(rng, bits, (OUT, IN))
        x = jnp.asarray(rng.standard_normal((1, IN)), jnp.float32)
        self.check(self.run(x, w), x, w)

    @pytest.mark.parametrize("m", [3, 37])
    def test_tokens(self, m):
        rng = np.random.default_rng(m)
        w = exact_weight(rng, 5, (OUT, IN))
        x = jnp.asarray(rng.standard_normal((m, IN)), jnp.float32)
        self.check(self.run(x, w), x, w)

    @pytest.mark.parametrize("rotation", ["random-hadamard", "none"])
    def test_rotations(self, rotation):
        rng = np.random.default_rng(7)
        w = exact_weight(rng, 4, (OUT, IN), rotation=rotation, seed=11)
        x = jnp.asarray(rng.standard_normal((2, IN)), jnp.float32)
        self.check(self.run(x, w), x, w)

    def test_block_256_zero_block_and_leading_dims(self):
        rng = np.random.default_rng(3)
        w = exact_weight(rng, 6, (OUT, 2 * IN), block_size=256, zero_block=True)
        x = jnp.asarray(rng.standard_normal((2, 2, 2 * IN)), jnp.float32)
        y = self.run(x, w)
        assert y.shape == (2, 2, OUT)
        self.check(y.reshape(4, OUT), x.reshape(4, 2 * IN), w)

    def test_bf16_activations(self):
        rng = np.random.default_rng(5)
        w = exact_weight(rng, 5, (OUT, IN))
        x = jnp.asarray(rng.standard_normal((20, IN)), jnp.bfloat16)
        self.check(self.run(x, w), x, w)

    def test_errors(self):
        rng = np.random.default_rng(0)
        w = exact_weight(rng, 4, (OUT, IN))
        with pytest.raises(ValueError, match="input features"):
            self.run(jnp.ones((1, IN + 1)), w)
        stacked = exact_weight(rng, 4, (2, OUT, IN))
        with pytest.raises(ValueError, match="2-D"):
            self.run(jnp.ones((1, IN)), stacked if self.impl != "pallas" else repack(stacked))


class TestReference(HLWQMatmulSuite):
    impl = "reference"


class TestXla(HLWQMatmulSuite):
    impl = "xla"

    def test_shared_rotation(self):
        rng = np.random.default_rng(9)
        w = exact_weight(rng, 5, (OUT, IN), rotation="random-hadamard", seed=3)
        x = jnp.asarray(rng.standard_normal((4, IN)), jnp.float32)
        xr = rotate_activations(x, w)
        for cfg in (XlaConfig(reduce_max_m=8), XlaConfig(reduce_max_m=0)):  # both XLA paths
            self.check(hlwq_matmul(xr, w, impl="xla", config=cfg, rotated=True), x, w)


class TestPallasInterpret(HLWQMatmulSuite):
    """The Pallas kernels in interpret mode on the CPU, on HLWQPlanes (repacked) and HLWQArray inputs."""
    impl = "pallas"
    interpret = True

    @pytest.mark.parametrize("m,config,path", [
        (3, PallasConfig(gemv_max_m=4), "gemv"),  # three accumulators per program
        (3, PallasConfig(gemv_max_m=2, block_m_dot=16, block_n_dot=64), "dot"),
        (40, PallasConfig(block_m_dot=16), "dot"),  # 3 token tiles, last one partial
        (40, PallasConfig(dequant_min_m=32), "dequant"),
        (1, PallasConfig(gemv=GemvConfig(rows=4, min_programs=1)), "gemv"),  # 2 programs of 16 steps
        (2, PallasConfig(gemv_max_m=2, gemv=GemvConfig(rows=1, max_steps=8, min_programs=1, max_tiles=3,
                                                       lookup="gather")), "gemv"),
        (20, PallasConfig(min_programs=1, block_m_dot=16, unroll=1), "dot"),
        (20, PallasConfig(block_m_dot=16, lookup="gather"), "dot"),  # the table load instead of the shuffle
        (40, PallasConfig(dequant_min_m=32, block_n_deq=32, chunks_deq=2), "dequant"),  # a 2-chunk loop per program
        (40, PallasConfig(dequant_min_m=32, lookup="gather"), "dequant"),
    ])
    def test_paths(self, m, config, path):
        assert plan(m, config) == path
        rng = np.random.default_rng(m)
        w = exact_weight(rng, 5, (OUT, IN))
        x = jnp.asarray(rng.standard_normal((m, IN)), jnp.float32)
        self.check(self.run(x, repack(w), config=config), x, w)

    @pytest.mark.parametrize("rotation,block_size", [("hadamard", 128), ("random-hadamard", 256), ("none", 128)])
    def test_bf16_dequant_path(self, rotation, block_size):
        """bf16 x on the dequantize + dot path (bf16 weight [out, padded_in], bf16 output), every rotation."""
        rng = np.random.default_rng(block_size)
        w = exact_weight(rng, 5, (OUT, 2 * IN), block_size=block_size, rotation=rotation, seed=6)
        x = jnp.asarray(rng.standard_normal((20, 2 * IN)), jnp.bfloat16)
        self.check(self.run(x, repack(w), config=PallasConfig(dequant_min_m=2)), x, w)

    def test_select_lookup_on_the_dot_path(self):
        rng = np.random.default_rng(2)
        w = exact_weight(rng, 4, (OUT, IN))
        x = jnp.asarray(rng.standard_normal((5, IN)), jnp.float32)
        self.check(self.run(x, repack(w), config=PallasConfig(lookup="select")), x, w)

    @pytest.mark.parametrize("bits", [3, 5, 6])
    def test_gemv_split_rows_partial_sums(self, bits):
        """Rows longer than max_tiles tiles are split over programs whose partial sums XLA adds."""
        rng = np.random.default_rng(bits)
        w = exact_weight(rng, bits, (OUT, 5 * 4096 + 300))  # 165 chunks: 21 tiles at 4 base bits, 11 at 2
        x = jnp.asarray(rng.standard_normal((1, w.shape[1])), jnp.float32)
        self.check(self.run(x, repack(w), config=PallasConfig(gemv=GemvConfig(max_tiles=2, min_programs=1))), x, w)

    def test_gemv_shared_rotation(self):
        rng = np.random.default_rng(4)
        w = exact_weight(rng, 5, (OUT, IN), rotation="random-hadamard", seed=5)
        x = jnp.asarray(rng.standard_normal((1, IN)), jnp.float32)
        self.check(self.run(rotate_activations(x, w), repack(w), rotated=True), x, w)

    def test_config_errors(self):
        with pytest.raises(ValueError, match="PallasConfig.gemv must be a GemvConfig"):
            PallasConfig(gemv=dict(rows=2))
        w = repack(exact_weight(np.random.default_rng(0), 6, (OUT, IN)))
        with pytest.raises(ValueError, match="≤ 32 entries"):
            self.run(jnp.ones((1, IN)), w, config=PallasConfig(gemv=GemvConfig(lookup="shuffle")))
        with pytest.raises(ValueError, match="≤ 32 entries"):
            self.run(jnp.ones((40, IN)), w, config=PallasConfig(lookup="shuffle"))
        with pytest.raises(ValueError, match="PallasConfig.lookup must be one of"):
            PallasConfig(lookup="lanes")

    @pytest.mark.parametrize("m", [1, 3])
    def test_pallas_decode_impl(self, m):
        """impl="pallas-decode": the GEMV at M ≤ gemv_max_m, impl="xla" above; both against the oracle."""
        rng = np.random.default_rng(m)
        w = exact_weight(rng, 5, (OUT, IN))
        x = jnp.asarray(rng.standard_normal((m, IN)), jnp.float32)
        y = hlwq_matmul(x, repack(w), impl="pallas-decode", interpret=True)
        self.check(y, x, w)
        if m > 1 and jax.default_backend() != "gpu":  # no Pallas call at M = 3: runs without interpret on a CPU
            self.check(hlwq_matmul(x, repack(w), impl="pallas-decode"), x, w)

    def test_needs_gpu_or_interpret(self):
        if jax.default_backend() == "gpu":
            pytest.skip("a GPU is present")
        w = exact_weight(np.random.default_rng(0), 4, (OUT, IN))
        with pytest.raises(RuntimeError, match="needs a GPU"):
            hlwq_matmul(jnp.ones((1, IN)), w, impl="pallas")

    def test_block_64_raises(self):
        w = exact_weight(np.random.default_rng(0), 4, (OUT, IN), block_size=64)
        with pytest.raises(ValueError, match="multiple of 128"):
            self.run(jnp.ones((1, IN)), w)


@pytest.mark.gpu
class TestPallasGpu(HLWQMatmulSuite):
    impl = "pallas"
    interpret = False
    tol = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}

    @pytest.fixture(autouse=True)
    def _need_gpu(self):
        if jax.default_backend() != "gpu":
            pytest.skip("needs a GPU")

    @pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
    @pytest.mark.parametrize("path", ["dot", "dequant"])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_bits_batched(self, bits, path, dtype):
        """The tensor-core paths at every bit width (warp-shuffle lookup ≤ 5 bits, table load above)."""
        config = PallasConfig(dequant_min_m=2 if path == "dequant" else 1024)
        assert plan(24, config) == path
        rng = np.random.default_rng(10 + bits)
        w = exact_weight(rng, bits, (OUT, IN), rotation="random-hadamard", seed=bits)
        x = jnp.asarray(rng.standard_normal((24, IN)), dtype)
        self.check(self.run(x, w, config=config), x, w)


def test_unknown_impl():
    w = exact_weight(np.random.default_rng(0), 4, (OUT, IN))
    with pytest.raises(ValueError, match="unknown hlwq_matmul impl"):
        hlwq_matmul(jnp.ones((1, IN)), w, impl="cuda")
