"""impl="xla": the rotation of activations against a float64 oracle (a Sylvester matrix from scipy.linalg.hadamard,
not the code under test), XlaConfig validation, and the fused-reduce and dequantize-then-dot paths against each
other and against the shared hlwq_matmul suite's float64 oracle (every token count through the dot path).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from hlwq_oracle import exact_weight, rel_err
from hlwq_jax.ops.hlwq_matmul import XlaConfig, hlwq_matmul, rotate_activations
from hlwq_jax.quant.hadamard import random_signs
from test_hlwq_matmul import HLWQMatmulSuite, IN, OUT


def rotate_numpy(x64: np.ndarray, block_size: int, n_pad: int, rotation: str, seed: int) -> np.ndarray:
    """x̃ float64 [..., n_pad]: zero-pad, multiply by the seeded signs (random-hadamard), then x_b @ H_B per block."""
    xp = np.zeros((*x64.shape[:-1], n_pad))
    xp[..., : x64.shape[-1]] = x64
    if rotation == "none":
        return xp
    if rotation == "random-hadamard":
        xp = xp * random_signs(n_pad, seed).astype(np.float64)
    h = scipy.linalg.hadamard(block_size).astype(np.float64) / math.sqrt(block_size)
    blocks = xp.reshape(*xp.shape[:-1], n_pad // block_size, block_size)
    return (blocks @ h).reshape(xp.shape)


# ---- rotation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rotation", ["hadamard", "random-hadamard", "none"])
@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_rotation_float32(rotation, block_size):
    rng = np.random.default_rng(block_size)
    n_in = 3 * block_size - 5  # padded in-dim: the last block has 5 zero columns
    w = exact_weight(rng, 4, (8, n_in), block_size=block_size, rotation=rotation, seed=block_size + 1)
    x = jnp.asarray(rng.standard_normal((2, 3, n_in)), jnp.float32)
    y = rotate_activations(x, w)
    ref = rotate_numpy(np.asarray(x, np.float64), block_size, w.padded_in, rotation, w.seed)
    assert y.dtype == jnp.float32 and y.shape == ref.shape
    err = rel_err(y, ref)
    assert err < 1e-6, f"B={block_size} {rotation}: rel err {err:.2e}"


@pytest.mark.parametrize("rotation", ["hadamard", "random-hadamard", "none"])
@pytest.mark.parametrize("block_size,dtype", [(128, jnp.float32), (256, jnp.float32), (128, jnp.bfloat16),
                                              (256, jnp.bfloat16)])
def test_rotation_in_a_chunk_order(rotation, block_size, dtype):
    """chunk_order (folded into the Hadamard columns) = the float64 oracle's columns permuted within every chunk."""
    rng = np.random.default_rng(block_size)
    n_in = 2 * block_size + 100
    w = exact_weight(rng, 4, (8, n_in), block_size=block_size, rotation=rotation, seed=3)
    x = jnp.asarray(rng.standard_normal((3, n_in)), dtype)
    order = rng.permutation(128)
    y = rotate_activations(x, w, chunk_order=order)
    ref = rotate_numpy(np.asarray(x.astype(jnp.float32), np.float64), block_size, w.padded_in, rotation, w.seed)
    perm = (np.arange(0, w.padded_in, 128)[:, None] + order[None, :]).reshape(-1)
    assert y.dtype == jnp.float32 and y.shape == ref.shape
    assert rel_err(y, ref[:, perm]) < 1e-6
    with pytest.raises(ValueError, match="permutation"):
        rotate_activations(x, w, chunk_order=np.zeros(128, int))
    w64 = exact_weight(rng, 4, (8, n_in), block_size=64)
    with pytest.raises(ValueError, match="multiple of 128"):
        rotate_activations(x, w64, chunk_order=order)


def test_config_errors():
    with pytest.raises(ValueError, match="XlaConfig.reduce_max_m"):
        XlaConfig(reduce_max_m=-1)


class TestXlaDotPath(HLWQMatmulSuite):
    """Every token count through the dequantize-then-dot path."""
    impl = "xla"
    config = XlaConfig(reduce_max_m=0)


@pytest.mark.parametrize("m", [1, 16])
def test_fused_reduce_and_dot_paths_agree(m):
    """reduce_max_m=16 (fused multiply-reduce) against 0 (dequantize + dot), float32."""
    rng = np.random.default_rng(m)
    w = exact_weight(rng, 5, (OUT, IN), rotation="random-hadamard", seed=1)
    x = jnp.asarray(rng.standard_normal((m, IN)), jnp.float32)
    a = hlwq_matmul(x, w, impl="xla", config=XlaConfig(reduce_max_m=16))
    b = hlwq_matmul(x, w, impl="xla", config=XlaConfig(reduce_max_m=0))
    assert rel_err(b, a) < 2e-6


@pytest.mark.parametrize("rotation", ["hadamard", "random-hadamard", "none"])
def test_bf16_dot_path_matches_oracle(rotation):
    """The bf16 dot path (bf16 x̃ and Ŵ_rot, bf16 output) against the float64 dequantise-then-matmul of the same bf16
    input: bf16 rounding of x̃, Ŵ_rot and y only."""
    rng = np.random.default_rng(11)
    w = exact_weight(rng, 5, (OUT, IN), rotation=rotation, seed=4)
    x = jnp.asarray(rng.standard_normal((24, IN)), jnp.bfloat16)
    y = hlwq_matmul(x, w, impl="xla", config=XlaConfig(reduce_max_m=8))
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64).T
    assert rel_err(y, ref) < 1e-2
