import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hlwq_jax.quant.packing import pack_codes, pack_codes_numpy, packed_size, unpack_codes


@given(bits=st.integers(1, 8), n=st.sampled_from([1, 7, 13, 128, 300]), rows=st.integers(1, 2), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_pack_matches_bit_oracle_and_roundtrips(bits, n, rows, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, n)).astype(np.uint8)
    packed = np.asarray(pack_codes(jnp.asarray(codes), bits))
    assert packed.shape == (rows, packed_size(n, bits)) == (rows, -(-n * bits // 8))
    np.testing.assert_array_equal(packed, pack_codes_numpy(codes, bits))
    np.testing.assert_array_equal(np.asarray(unpack_codes(jnp.asarray(packed), bits, n)), codes)


def test_true_bit_packing_sizes():
    assert [packed_size(128, b) for b in range(2, 9)] == [32, 48, 64, 80, 96, 112, 128]


def test_lsb_first_layout_example():
    # 3-bit codes 1, 2, 3 → stream bits 100 010 110 … (LSB first) → byte0 = 0b11_010_001 = 0xD1, byte1 = 0b0.
    packed = np.asarray(pack_codes(jnp.asarray(np.array([[1, 2, 3]], np.uint8)), 3))
    np.testing.assert_array_equal(packed, [[0xD1, 0x00]])


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(jnp.zeros((2, 10), jnp.uint8), 5, 128)
