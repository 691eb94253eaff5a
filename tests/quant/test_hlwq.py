import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax import HLWQArray, hlwq_matmul, lloyd_max_codebook, quantize
from hlwq_jax.quant.hadamard import hadamard_matrix, random_signs
from hlwq_jax.quant.lloyd_max import gaussian_mse


def rel_mse(w, wq):
    w = np.asarray(w, np.float64)
    return float(np.sum((w - np.asarray(wq.dequantize(jnp.float32), np.float64)) ** 2) / np.sum(w * w))


@pytest.fixture(scope="module")
def gauss():
    return np.random.default_rng(0).standard_normal((1024, 4096)).astype(np.float32)


@pytest.mark.parametrize("bits", range(2, 9))
def test_gaussian_relative_mse_within_3pct_of_lloyd_max(gauss, bits):
    ratio = rel_mse(gauss, quantize(gauss, bits=bits)) / gaussian_mse(lloyd_max_codebook(bits))
    assert abs(ratio - 1) < 0.03, ratio


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_original_codebook_within_3pct_of_its_own_mse(gauss, bits):
    q = quantize(gauss, bits=bits, codebook="polarengine")
    assert q.codebook_name == "polarengine"
    ratio = rel_mse(gauss, q) / gaussian_mse(lloyd_max_codebook(bits, "polarengine"))
    assert abs(ratio - 1) < 0.03, ratio


def dequantize_numpy(q: HLWQArray) -> np.ndarray:
    """Float64 oracle of the invariant, written independently of the package (no packing / rotation helpers)."""
    packed = np.asarray(q.packed)
    bits_ = np.unpackbits(packed, axis=-1, bitorder="little")[..., : q.padded_in * q.bits]
    bits_ = bits_.reshape(*packed.shape[:-1], q.padded_in, q.bits)
    codes = (bits_ * (1 << np.arange(q.bits))).sum(-1)
    vals = np.asarray(q.codebook, np.float64)[codes] / np.sqrt(q.block_size)
    vals = vals.reshape(*q.shape[:-1], q.n_blocks, q.block_size) * np.asarray(q.norms, np.float64)[..., None]
    if q.rotation != "none":
        vals = vals @ hadamard_matrix(q.block_size)
    vals = vals.reshape(*q.shape[:-1], q.padded_in)
    if q.rotation == "random-hadamard":
        vals = vals * random_signs(q.padded_in, q.seed)
    return vals[..., : q.shape[-1]]


@pytest.mark.parametrize("rotation", ["hadamard", "random-hadamard", "none"])
@pytest.mark.parametrize("bits,block,shape", [(2, 32, (5, 70)), (5, 128, (3, 4, 300)), (8, 64, (7, 64)), (3, 256, (2, 600))])
def test_dequantize_matches_numpy_oracle(rotation, bits, block, shape):
    w = np.random.default_rng(bits).standard_normal(shape).astype(np.float32)
    q = quantize(w, bits=bits, block_size=block, rotation=rotation, seed=11)
    q.validate()
    assert q.packed.dtype == np.uint8 and q.norms.dtype == np.float16 and q.codebook.dtype == np.float32
    assert q.packed.shape[-1] == -(-q.padded_in * bits // 8)
    assert q.shape == shape
    np.testing.assert_allclose(np.asarray(q.dequantize()), dequantize_numpy(q), atol=2e-6, rtol=1e-5)
    assert rel_mse(w, q) < 2.5 * gaussian_mse(lloyd_max_codebook(bits)) + 1e-3


def test_stacked_experts_are_quantized_per_expert():
    w = np.random.default_rng(3).standard_normal((4, 16, 200)).astype(np.float32)
    w[2] *= 1000.0  # per-expert, per-row norms: scaling one expert must not change the others
    q = quantize(w, bits=4)
    for e in range(4):
        qe = quantize(w[e], bits=4)
        np.testing.assert_array_equal(np.asarray(q.packed[e]), np.asarray(qe.packed))
        np.testing.assert_array_equal(np.asarray(q.norms[e]), np.asarray(qe.norms))
    sub = q.take(jnp.array([2, 0]))
    np.testing.assert_array_equal(np.asarray(sub.dequantize()), np.asarray(q.dequantize())[[2, 0]])


def test_identity_on_codebook_points():
    """Blocks whose rotated, normalised coordinates are codebook points (with Σz² = B) come back exactly."""
    B, rows = 128, 6
    cb = np.array([-1.5, -0.5, 0.5, 1.5])
    rng = np.random.default_rng(5)
    codes = np.zeros((rows, 2 * B), np.int64)
    for r in range(rows):
        for k in range(2):  # 48 coordinates of magnitude 1.5 and 80 of 0.5: Σz² = 48·2.25 + 80·0.25 = 128 = B
            mags = rng.permutation(np.r_[np.full(48, 1), np.full(80, 0)])
            signs = rng.integers(0, 2, B)
            codes[r, k * B:(k + 1) * B] = np.where(signs, 2 + mags, 1 - mags)
    z = cb[codes].reshape(rows, 2, B)
    norms = np.float16(rng.uniform(0.5, 4.0, (rows, 2))).astype(np.float64)
    w = (norms[..., None] * (z / np.sqrt(B)) @ hadamard_matrix(B)).reshape(rows, 2 * B)
    q = quantize(w.astype(np.float32), bits=2, codebook=cb)
    np.testing.assert_array_equal(np.asarray(q.unpack_codes()).reshape(rows, -1), codes)
    np.testing.assert_allclose(np.asarray(q.dequantize()), w, rtol=1e-3, atol=1e-5)  # fp16 norm rounding


def test_codes_recovered_on_lloyd_max_points():
    """Requantizing a dequantized weight keeps every code (quantization is idempotent on its own grid)."""
    w = np.random.default_rng(2).standard_normal((32, 512)).astype(np.float32)
    q = quantize(w, bits=5)
    q2 = quantize(q.dequantize(), bits=5)
    np.testing.assert_array_equal(np.asarray(q2.unpack_codes()), np.asarray(q.unpack_codes()))


def test_zero_blocks_dequantize_to_exact_zeros():
    w = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    w[1] = 0.0
    w[2, 128:] = 0.0
    d = np.asarray(quantize(w, bits=4).dequantize())
    assert np.all(d[1] == 0.0) and np.all(d[2, 128:] == 0.0)


@pytest.mark.parametrize("rotation", ["hadamard", "random-hadamard", "none"])
@pytest.mark.parametrize("n_in", [128, 200])
def test_hlwq_matmul_equals_dequantized_product(rotation, n_in):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((48, n_in)).astype(np.float32)
    x = rng.standard_normal((2, 3, n_in)).astype(np.float32)
    q = quantize(w, bits=5, rotation=rotation, seed=2)
    y = np.asarray(hlwq_matmul(jnp.asarray(x), q), np.float64)
    ref = x.astype(np.float64) @ dequantize_numpy(q).T
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) <= 1e-5


def test_passes_through_jit_and_device_put():
    q = quantize(np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32), bits=3)
    q2 = jax.device_put(q)
    y = jax.jit(lambda x, w: hlwq_matmul(x, w))(jnp.ones((1, 128)), q2)
    assert y.shape == (1, 8)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3
    assert jax.tree_util.tree_unflatten(treedef, leaves).bits == 3


def test_bits_per_weight_is_honest():
    q = quantize(np.ones((256, 4096), np.float32), bits=5)
    assert q.bits_per_weight == pytest.approx(5.125, abs=1e-3)
    assert q.nbytes == 256 * 4096 * 5 // 8 + 256 * 32 * 2 + 32 * 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(block_size=96), "power of two"),
    (dict(rotation="givens"), "rotation"), (dict(codebook="k-means"), "codebook"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(np.ones((4, 128), np.float32), **kwargs)


def test_nan_and_inf_name_the_tensor():
    w = np.ones((4, 128), np.float32)
    w[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"layers\.3\.mixer\.in_proj.*NaN"):
        quantize(w, name="layers.3.mixer.in_proj")
    w[1, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(w, name="x")


def test_one_dimensional_input_rejected():
    with pytest.raises(ValueError, match=r"matrix \[out, in\]"):
        quantize(np.ones(128, np.float32), name="norm.weight")


def test_matmul_rejects_wrong_width():
    q = quantize(np.ones((4, 128), np.float32))
    with pytest.raises(ValueError, match="input features"):
        hlwq_matmul(jnp.ones((1, 100)), q)


def test_quantize_traces_under_eval_shape_and_jit():
    spec = jax.ShapeDtypeStruct((3, 64, 300), jnp.bfloat16)
    q = jax.eval_shape(lambda w: quantize(w, bits=5), spec)
    assert isinstance(q, HLWQArray) and q.shape == (3, 64, 300)
    assert q.packed.shape == (3, 64, 3 * 128 * 5 // 8) and q.norms.shape == (3, 64, 3)
    w = np.random.default_rng(9).standard_normal((64, 300)).astype(np.float32)
    eager = quantize(w, bits=5)
    jitted = jax.jit(lambda w: quantize(w, bits=5))(w)
    np.testing.assert_array_equal(np.asarray(jitted.packed), np.asarray(eager.packed))
