"""Bit-exact checks of the host packings against bit-by-bit oracles written from the layout definitions."""
import numpy as np
import pytest

from hlwq_jax.ckpt import bitstreams as bs
from hlwq_jax.quant.packing import pack_codes_numpy


def _oracle_stream(codes, bits, msb):
    """Write each code's bits into a flat bit list, then bytes: the literal definition of the layouts."""
    flat = [int(c) for c in np.asarray(codes).reshape(-1)]
    stream = []
    for c in flat:
        stream += [(c >> (bits - 1 - k)) & 1 for k in range(bits)] if msb else [(c >> k) & 1 for k in range(bits)]
    stream += [0] * ((-len(stream)) % 8)
    out = []
    for i in range(0, len(stream), 8):
        byte = stream[i:i + 8]
        out.append(sum(b << (7 - k) for k, b in enumerate(byte)) if msb else sum(b << k for k, b in enumerate(byte)))
    return np.array(out, np.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 128])
def test_lsb_rows_match_oracle_and_invert(bits, n, rng):
    codes = rng.integers(0, 1 << bits, size=(3, n), dtype=np.uint8)
    packed = bs.pack_lsb_rows(codes, bits)
    for r in range(3):
        np.testing.assert_array_equal(packed[r], _oracle_stream(codes[r], bits, msb=False))
    np.testing.assert_array_equal(packed, pack_codes_numpy(codes, bits))  # the HLWQArray layout
    np.testing.assert_array_equal(bs.unpack_lsb_rows(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_msb_flat_matches_oracle_and_invert(bits, rng):
    codes = rng.integers(0, 1 << bits, size=(5, 19), dtype=np.uint8)
    packed = bs.pack_msb_flat(codes, bits)
    np.testing.assert_array_equal(packed, _oracle_stream(codes, bits, msb=True))
    np.testing.assert_array_equal(bs.unpack_msb_flat(packed, bits, codes.size), codes.reshape(-1))


def test_msb_4bit_first_code_in_high_nibble():
    assert bs.pack_msb_flat(np.array([0xA, 0x3], np.uint8), 4).tolist() == [0xA3]


def test_v5_group_of_eight_layout():
    # The documented polar_engine_v5 byte formulas for one group of 8 five-bit codes.
    c = np.array([17, 3, 30, 9, 22, 1, 26, 12], np.uint8)
    b = [c[0] | (c[1] << 5), (c[1] >> 3) | (c[2] << 2) | (c[3] << 7), (c[3] >> 1) | (c[4] << 4),
         (c[4] >> 4) | (c[5] << 1) | (c[6] << 6), (c[6] >> 2) | (c[7] << 3)]
    expect = np.array([int(x) & 0xFF for x in b], np.uint8)
    np.testing.assert_array_equal(bs.pack_lsb_rows(c[None], 5)[0], expect)


@pytest.mark.parametrize("block", [8, 128])
def test_half_block(block, rng):
    codes = rng.integers(0, 16, size=(4, 3 * block), dtype=np.uint8)
    packed = bs.pack_half_block(codes, block)
    h = block // 2
    for r in range(4):
        for blk in range(3):
            for i in range(h):
                want = (int(codes[r, blk * block + h + i]) << 4) | int(codes[r, blk * block + i])
                assert packed[r, blk * h + i] == want
    np.testing.assert_array_equal(bs.unpack_half_block(packed, block), codes)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="does not fit"):
        bs.pack_lsb_rows(np.array([[8]], np.uint8), 3)
    with pytest.raises(ValueError, match="expected"):
        bs.unpack_lsb_rows(np.zeros((1, 4), np.uint8), 5, 8)
    with pytest.raises(ValueError, match="block"):
        bs.pack_half_block(np.zeros((1, 12), np.uint8), 8)
