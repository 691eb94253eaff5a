"""The bit-plane kernel layout (HLWQPlanes): element-wise numpy oracle, round trips, sizes and errors."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_oracle import exact_weight, unpack_numpy
from hlwq_jax.ops.hlwq_matmul.layout import (PLANE_WIDTHS, ROW_ALIGN, HLWQPlanes, codes_to_planes, extension_bits, field,
                                             fields_per_word, planes_to_codes, planes_to_codes_numpy, repack)


@pytest.mark.parametrize("bits", sorted(PLANE_WIDTHS))
def test_planes_match_elementwise_oracle(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 256)).astype(np.uint8)
    planes = codes_to_planes(jnp.asarray(codes), bits)
    assert all(p.dtype == jnp.uint32 for p in planes)
    assert sum(p.shape[-1] for p in planes) * 32 == 256 * bits  # exactly b bits per code
    np.testing.assert_array_equal(planes_to_codes_numpy(planes, bits), codes)
    np.testing.assert_array_equal(np.asarray(planes_to_codes(planes, bits)), codes)


def test_field_positions_by_hand():
    """5 bits: column k = 8w + bitrev3(f) sits in bits [5f, 5f+5) of the 40-bit stream of base word w, whose top 8
    bits are byte w mod 4 of extra word w // 4."""
    codes = np.zeros((1, 128), np.uint8)
    codes[0, 8 * 2 + 0b110] = 0b10111  # word 2, r = 6 → f = bitrev3(6) = 3: stream bits [15, 20), all in base
    codes[0, 8 * 5 + 0b011] = 0b11001  # word 5, r = 3 → f = 6: stream bits [30, 35), straddling bit 32
    base, extra = (np.asarray(p) for p in codes_to_planes(jnp.asarray(codes), 5))
    assert base[0, 2] == 0b10111 << 15 and base[0, 5] == 0b01 << 30 and base.sum() == base[0, 2] + base[0, 5]
    assert extra[0, 1] == 0b110 << 8 and extra.sum() == extra[0, 1]  # word 5: extra word 1, byte 1, its bits 0–2
    np.testing.assert_array_equal(planes_to_codes_numpy((base, extra), 5), codes)


def test_field_reads_every_code_with_garbage_only_above_b():
    for bits in sorted(PLANE_WIDTHS):
        codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(2, 128)).astype(np.uint8)
        planes = [np.asarray(p) for p in codes_to_planes(jnp.asarray(codes), bits)]
        f_, x_ = fields_per_word(bits), extension_bits(bits)
        ext = None
        if x_:
            g = 32 // x_
            ext = np.repeat(planes[1], g, axis=-1) >> np.tile(x_ * np.arange(g), planes[0].shape[-1] // g).astype(np.uint32)
        rev = [int(format(r, f"0{f_.bit_length() - 1}b")[::-1], 2) for r in range(f_)]
        for f in range(f_):
            got = np.asarray(field(planes[0], ext, f, bits)) & ((1 << bits) - 1)
            np.testing.assert_array_equal(got, codes.reshape(2, -1, f_)[..., rev[f]], err_msg=f"bits {bits} f {f}")


@pytest.mark.parametrize("bits,rotation", [(3, "hadamard"), (5, "random-hadamard"), (8, "none")])
def test_repack_round_trip(bits, rotation):
    rng = np.random.default_rng(0)
    w = exact_weight(rng, bits, (2, 130, 300), rotation=rotation, seed=5)
    p = repack(w)
    assert isinstance(p, HLWQPlanes) and p.rows == 256 and p.rows % ROW_ALIGN == 0
    np.testing.assert_array_equal(np.asarray(p.codes()), unpack_numpy(w))
    back = p.to_hlwq()
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(w.packed))
    np.testing.assert_array_equal(np.asarray(back.norms), np.asarray(w.norms))
    np.testing.assert_allclose(np.asarray(p.dequantize()), np.asarray(w.dequantize()), rtol=0, atol=0)
    one = p.take(jnp.asarray([1]))
    np.testing.assert_array_equal(np.asarray(one.codes()), unpack_numpy(w)[1:2])
    # exactly b bits per code and 16 per (row, block) norm, over the padded rows; plus table and codebook
    assert p.nbytes == 2 * 256 * (384 * bits // 8 + 2 * 3) + 8 * (1 << bits)


def test_repack_rejects_unsupported():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="multiple of 128"):
        repack(exact_weight(rng, 4, (8, 256), block_size=64))
    with pytest.raises(ValueError, match="bits"):
        repack(exact_weight(rng, 7, (8, 256)))
    with pytest.raises(ValueError, match="HLWQArray"):
        repack(np.zeros((8, 256)))
