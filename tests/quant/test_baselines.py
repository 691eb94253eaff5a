import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hlwq_jax import quantize_nf4, quantize_nvfp4, quantize_rtn
from hlwq_jax.quant.baselines import E2M1, nf4_levels

# QLoRA / bitsandbytes NF4 table (published constants).
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def rtn_numpy(w, bits, group):
    """Float64 oracle: symmetric RTN with fp16 scales."""
    out, n = w.shape
    g = -(-n // group)
    wp = np.zeros((out, g * group))
    wp[:, :n] = w
    wp = wp.reshape(out, g, group)
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(wp).max(-1) / qmax).astype(np.float16).astype(np.float64)
    q = np.clip(np.round(np.divide(wp, scale[..., None], out=np.zeros_like(wp), where=scale[..., None] > 0)), -qmax - 1, qmax)
    return (q * scale[..., None]).reshape(out, -1)[:, :n]


@pytest.mark.parametrize("bits,group,n", [(4, 128, 300), (8, 32, 64), (3, 64, 100)])
def test_rtn_matches_numpy(bits, group, n):
    w = np.random.default_rng(bits).standard_normal((6, n)).astype(np.float32)
    w[0, :group] = 0.0  # a zero group
    q = quantize_rtn(w, bits=bits, group_size=group)
    np.testing.assert_allclose(np.asarray(q.dequantize()), rtn_numpy(w.astype(np.float64), bits, group), rtol=1e-6, atol=1e-6)
    assert np.asarray(q.int_values()).min() >= -(2 ** (bits - 1)) and np.asarray(q.int_values()).max() <= 2 ** (bits - 1) - 1


def test_rtn_int4_g128_bits_per_weight():
    q = quantize_rtn(np.ones((64, 4096), np.float32), bits=4, group_size=128)
    assert q.bits_per_weight == pytest.approx(4.125)


def test_nf4_levels_match_published_table():
    np.testing.assert_allclose(nf4_levels(), NF4_TABLE, atol=2e-7)


def nf4_numpy(w, block):
    out, n = w.shape
    wp = w.reshape(out, n // block, block).astype(np.float64)
    absmax = np.abs(wp).max(-1, keepdims=True)
    levels = np.array(NF4_TABLE)
    idx = np.abs((wp / absmax)[..., None] - levels).argmin(-1)
    return (levels[idx] * absmax).reshape(out, n)


def test_nf4_matches_numpy_and_bits():
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    q = quantize_nf4(w)
    np.testing.assert_allclose(np.asarray(q.dequantize()), nf4_numpy(w, 64), rtol=1e-6, atol=1e-6)
    assert q.bits_per_weight == pytest.approx(4.5)
    w2 = np.random.default_rng(1).standard_normal((256, 4096)).astype(np.float32)
    qd = quantize_nf4(w2, double_quant=True)
    assert qd.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    # double quant only perturbs the absmaxes slightly
    rel = lambda a: np.sum((w2 - np.asarray(a.dequantize())) ** 2) / np.sum(w2**2)
    assert rel(qd) == pytest.approx(rel(quantize_nf4(w2)), rel=0.02)


def test_nvfp4_grid_scales_and_error():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 16, 100)).astype(np.float32)
    q = quantize_nvfp4(w)
    assert q.block_scales.dtype == jnp.float8_e4m3fn and q.tensor_scale.shape == (2,)
    d = np.asarray(q.dequantize(), np.float64)
    s = np.asarray(q.block_scales.astype(jnp.float32), np.float64) * np.asarray(q.tensor_scale, np.float64)[:, None, None]
    grid = d.reshape(2, 16, -1)
    padded = np.zeros((2, 16, 112)); padded[..., :100] = grid
    ratio = padded.reshape(2, 16, 7, 16) / s[..., None]
    assert np.all(np.isin(np.round(ratio, 5), E2M1))  # every value is an E2M1 point times its two scales
    # nearest-point property versus a float64 oracle using the same (E4M3-rounded) scales
    wp = np.zeros((2, 16, 112)); wp[..., :100] = w
    z = wp.reshape(2, 16, 7, 16) / s[..., None]
    best = E2M1[np.abs(np.clip(z, -6, 6)[..., None] - E2M1).argmin(-1)]
    np.testing.assert_allclose(ratio, best, atol=1e-5)
    assert ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max == 448
    assert q.bits_per_weight == pytest.approx(4.5 + 64 / w.size * 1, abs=0.6)


def test_nvfp4_bits_per_weight():
    assert quantize_nvfp4(np.ones((128, 4096), np.float32)).bits_per_weight == pytest.approx(4.5, abs=1e-3)


@pytest.mark.parametrize("fn", [quantize_rtn, quantize_nf4, quantize_nvfp4])
def test_baselines_reject_bad_input(fn):
    w = np.ones((4, 128), np.float32)
    w[0, 0] = np.inf
    with pytest.raises(ValueError, match="experts.up"):
        fn(w, name="experts.up")
    with pytest.raises(ValueError, match="matrix"):
        fn(np.ones(128, np.float32))
