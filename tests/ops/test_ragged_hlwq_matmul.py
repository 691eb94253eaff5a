"""Shared test suite of ragged_hlwq_matmul (dropless grouped MoE matmul), subclassed per implementation.
Oracle: float64 numpy, expert by expert, from the stated HLWQ invariant."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_oracle import dequantize_numpy, exact_weight, rel_err
from hlwq_jax.ops.hlwq_matmul import GemvConfig, repack
from hlwq_jax.ops.ragged_hlwq_matmul import RaggedPallasConfig, gather_hlwq_matmul_pallas, plan, ragged_hlwq_matmul

E, OUT, IN = 5, 200, 300


def oracle(x, w, group_sizes):
    w_hat = dequantize_numpy(w)  # [E, out, in]
    y = np.zeros((x.shape[0], w.shape[1]))
    start = 0
    for e, g in enumerate(group_sizes):
        y[start:start + g] = np.asarray(x[start:start + g], np.float64) @ w_hat[e].T
        start += g
    return y  # rows past Σ group_sizes stay zero


class RaggedSuite:
    impl = "reference"
    interpret = False
    config = None
    tol = 2e-6

    def run(self, x, w, gs, config=None):
        return ragged_hlwq_matmul(x, w, jnp.asarray(gs, jnp.int32), impl=self.impl, interpret=self.interpret,
                                  config=config or self.config)

    def check(self, bits, group_sizes, t, config=None, seed=0):
        rng = np.random.default_rng(seed)
        w = exact_weight(rng, bits, (E, OUT, IN))
        x = jnp.asarray(rng.standard_normal((t, IN)), jnp.float32)
        y = self.run(x, w, group_sizes, config)
        ref = oracle(np.asarray(x), w, group_sizes)
        assert y.shape == ref.shape and y.dtype == x.dtype
        err = rel_err(y, ref) if np.any(ref) else float(np.abs(np.asarray(y)).max())
        assert err < self.tol, f"{self.impl}: rel err {err:.3e}"
        tail = int(sum(group_sizes))
        assert not np.any(np.asarray(y)[tail:]), "rows past the groups must be zero"

    @pytest.mark.parametrize("rotation", ["random-hadamard", "none"])
    def test_bf16_prefill(self, rotation):
        """bf16 rows through the grouped path, against the float64 oracle of the same bf16 input: bf16 rounding
        only."""
        rng = np.random.default_rng(3)
        w = exact_weight(rng, 5, (E, OUT, IN), rotation=rotation, seed=9)
        gs = [7, 0, 30, 5, 0]
        x = jnp.asarray(rng.standard_normal((45, IN)), jnp.bfloat16)
        y = self.run(x, w, gs, RaggedPallasConfig(block_m=16) if self.impl == "pallas" else None)
        assert y.dtype == jnp.bfloat16
        assert rel_err(y, oracle(np.asarray(x.astype(jnp.float32)), w, gs)) < 1e-2

    @pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
    def test_decode_bits(self, bits):  # one token each for 3 of 5 experts, two unrouted rows
        self.check(bits, [0, 1, 0, 1, 1], 5, seed=bits)

    def test_prefill_with_empty_groups(self):
        self.check(5, [10, 0, 40, 7, 0], 60)

    def test_all_groups_empty(self):
        self.check(4, [0, 0, 0, 0, 0], 3)

    def test_errors(self):
        rng = np.random.default_rng(0)
        w = exact_weight(rng, 4, (E, OUT, IN))
        with pytest.raises(ValueError, match="group_sizes"):
            self.run(jnp.ones((4, IN)), w, [1, 1, 1, 1])
        with pytest.raises(ValueError, match="x_sorted"):
            self.run(jnp.ones((4, IN + 1)), w, [1, 1, 1, 1, 0])


class TestReference(RaggedSuite):
    impl = "reference"


class TestXla(RaggedSuite):
    impl = "xla"


class TestPallasInterpret(RaggedSuite):
    impl = "pallas"
    interpret = True

    @pytest.mark.parametrize("t,config,path", [
        (8, RaggedPallasConfig(), "decode"),
        (8, RaggedPallasConfig(gemv=GemvConfig(rows=1, max_tiles=3, min_programs=1, lookup="gather")), "decode"),
        (8, RaggedPallasConfig(decode_max_rows=4, block_m=16, block_n=64), "grouped"),
        (60, RaggedPallasConfig(block_m=16, block_n=128), "grouped"),
        (60, RaggedPallasConfig(block_m=16, block_n=64, lookup="gather"), "grouped"),
    ])
    def test_paths(self, t, config, path):
        assert plan(t, config) == path
        self.check(5, [3, 0, t - 6, 0, 1], t, config=config)

    def test_config_errors(self):
        with pytest.raises(ValueError, match="RaggedPallasConfig.gemv must be a GemvConfig"):
            RaggedPallasConfig(gemv=6)
        with pytest.raises(ValueError, match="RaggedPallasConfig.lookup must be one of"):
            RaggedPallasConfig(lookup="lanes")

    def test_planes_input_reads_only_routed_experts(self):
        """Poisoned (NaN-norm) experts that receive no tokens must not reach the output."""
        rng = np.random.default_rng(1)
        w = exact_weight(rng, 5, (E, OUT, IN))
        p = repack(w)
        p = dataclasses.replace(p, norms_t=p.norms_t.at[jnp.asarray([0, 2])].set(jnp.nan))
        x = jnp.asarray(rng.standard_normal((2, IN)), jnp.float32)
        y = self.run(x, p, [0, 1, 0, 1, 0])
        np.testing.assert_allclose(np.asarray(y), oracle(np.asarray(x), w, [0, 1, 0, 1, 0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,ids", [(5, [3, 3, 0, 4, 3, 1]), (4, [2]), (6, [4, 0, 4])])
def test_gather_matmul_rows_by_expert(bits, ids):
    """Row a times expert ids[a] (unsorted, repeated experts), float64 oracle; GPU kernel on a GPU, else interpret."""
    rng = np.random.default_rng(bits)
    w = exact_weight(rng, bits, (E, OUT, IN))
    x = jnp.asarray(rng.standard_normal((len(ids), IN)), jnp.float32)
    y = gather_hlwq_matmul_pallas(x, repack(w), jnp.asarray(ids), interpret=jax.default_backend() != "gpu")
    w_hat = dequantize_numpy(w)
    ref = np.stack([w_hat[e] @ np.asarray(x[a], np.float64) for a, e in enumerate(ids)])
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert rel_err(y, ref) < 1e-5


def test_gather_matmul_errors():
    p = repack(exact_weight(np.random.default_rng(0), 4, (E, OUT, IN)))
    with pytest.raises(ValueError, match="stacked HLWQPlanes"):
        gather_hlwq_matmul_pallas(jnp.ones((2, IN)), p.take(jnp.asarray([0])).to_hlwq(), jnp.zeros(2, jnp.int32),
                                  interpret=True)
    with pytest.raises(ValueError, match="disagree"):
        gather_hlwq_matmul_pallas(jnp.ones((2, IN)), p, jnp.zeros(3, jnp.int32), interpret=True)
    assert gather_hlwq_matmul_pallas(jnp.ones((0, IN)), p, jnp.zeros(0, jnp.int32), interpret=True).shape == (0, OUT)


@pytest.mark.gpu
class TestPallasGpu(RaggedSuite):
    impl = "pallas"
    tol = 1e-5

    @pytest.fixture(autouse=True)
    def _need_gpu(self):
        if jax.default_backend() != "gpu":
            pytest.skip("needs a GPU")
