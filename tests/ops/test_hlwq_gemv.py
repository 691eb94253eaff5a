"""The decode GEMV's pieces: the tile order of the activations (a float64 pairing oracle over the planes), the
lane_lookup primitive (take_along_axis semantics; its Triton lowering is a tt.gather) and the tile geometry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from hlwq_oracle import exact_weight
from hlwq_jax.ops.hlwq_matmul import repack
from hlwq_jax.ops.hlwq_matmul.gemv_triton import TILE_WORDS, tile_geometry, tile_order, to_tile_order
from hlwq_jax.ops.hlwq_matmul.lane_lut import lane_lookup
from hlwq_jax.ops.hlwq_matmul.layout import PLANE_WIDTHS


def _code_of_field(planes, bits, word, field):
    """Code held by field ``field`` of base word ``word`` (every row), read bit by bit from the layout's definition:
    low b0 bits at [b0·f, b0·f + b0) of the base word, high e bits at e·(G·f + s) of extra word word // G."""
    widths = PLANE_WIDTHS[bits]
    b0 = widths[0]
    base = np.asarray(planes[0]).astype(np.uint64)
    code = (base[:, word] >> np.uint64(b0 * field)) & np.uint64((1 << b0) - 1)
    if len(widths) > 1:
        e = widths[1]
        g = b0 // e
        extra = np.asarray(planes[1]).astype(np.uint64)[:, word // g]
        high = (extra >> np.uint64(e * (g * field + word % g))) & np.uint64((1 << e) - 1)
        code |= high << np.uint64(b0)
    return code


@pytest.mark.parametrize("bits,n_in", [(3, 300), (4, 2688), (5, 300), (5, 2688), (6, 1000), (8, 640)])
def test_tile_order_pairs_each_field_with_its_column(bits, n_in):
    """Σ_{t,f,s} c[code(word 128·t + s, field f)] · x_tiles[t, f, s] equals Σ_k c[code_k] · x_k, in float64."""
    rng = np.random.default_rng(bits)
    w = exact_weight(rng, bits, (7, n_in))
    p = repack(w)
    x = rng.standard_normal((1, p.padded_in))
    xt = np.asarray(to_tile_order(jnp.asarray(x, jnp.float32), p), np.float64)[0]
    f0, nw, cpt, n_tiles = tile_geometry(p)
    table = rng.standard_normal(1 << bits)  # any table: the pairing must hold entry by entry
    got = np.zeros(p.rows)
    n_words = np.asarray(p.planes[0]).shape[1]
    for t in range(n_tiles):
        for s in range(TILE_WORDS):
            word = t * TILE_WORDS + s
            if word >= n_words:
                assert not xt[t * f0 * TILE_WORDS:(t + 1) * f0 * TILE_WORDS].reshape(f0, TILE_WORDS)[:, s].any()
                continue
            for f in range(f0):
                got += table[_code_of_field(p.planes, bits, word, f)] * xt[(t * f0 + f) * TILE_WORDS + s]
    codes = np.asarray(p.codes()).astype(np.int64)  # [out, padded_in]
    want = table[codes] @ x[0]
    np.testing.assert_allclose(got[: w.shape[0]], want, rtol=1e-6, atol=1e-6)


def test_tile_order_is_a_permutation_plus_padding():
    p = repack(exact_weight(np.random.default_rng(0), 5, (3, 2688)))  # 21 chunks: 3 tiles of 8, 3 chunks padding
    order = tile_order(p)
    f0, nw, cpt, n_tiles = tile_geometry(p)
    assert (f0, nw, cpt, n_tiles) == (8, 16, 8, 3)
    real = order[order < p.n_chunks * 128]
    assert sorted(real.tolist()) == list(range(p.n_chunks * 128))
    assert (order == p.n_chunks * 128).sum() == (n_tiles * cpt - p.n_chunks) * 128


def test_lane_lookup_matches_take_along_axis():
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.standard_normal((4, 32, 3)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, 32, size=(4, 32, 3)), jnp.int32)
    want = np.take_along_axis(np.asarray(table), np.asarray(idx), axis=1)
    np.testing.assert_array_equal(np.asarray(lane_lookup(table, idx, axis=1)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda t, i: lane_lookup(t, i, 1))(table, idx)), want)

    def kernel(t_ref, i_ref, o_ref):
        o_ref[...] = lane_lookup(t_ref[...], i_ref[...], axis=1)

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(idx.shape, jnp.float32), interpret=True)(table, idx)
    np.testing.assert_array_equal(np.asarray(out), want)
    with pytest.raises(ValueError, match="differ off axis"):
        lane_lookup(table, idx[:, :, :2], axis=1)


def test_lane_lookup_lowers_to_triton_gather(monkeypatch):
    """Lowered for CUDA (on any host), a kernel using lane_lookup carries a tt.gather in its Triton module."""
    from jax._src.pallas.triton import gpu_info, lowering, pallas_call_registration as reg

    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    texts = []
    lower = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        texts.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", capture)

    def kernel(t_ref, i_ref, o_ref):
        o_ref[...] = lane_lookup(t_ref[...], i_ref[...], axis=0)

    fn = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((32, 4), jnp.float32))
    jax.jit(fn).trace(jax.ShapeDtypeStruct((32, 4), jnp.float32), jax.ShapeDtypeStruct((32, 4), jnp.int32)).lower(
        lowering_platforms=("cuda",))
    assert texts and "tt.gather" in texts[0]


@pytest.mark.gpu
def test_lane_lookup_kernel_on_gpu_matches_take_along_axis():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.standard_normal((4, 32, 2)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, 32, size=(4, 32, 2)), jnp.int32)

    def kernel(t_ref, i_ref, o_ref):
        o_ref[...] = lane_lookup(t_ref[...], i_ref[...], axis=1)

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(idx.shape, jnp.float32))(table, idx)
    np.testing.assert_array_equal(np.asarray(out), np.take_along_axis(np.asarray(table), np.asarray(idx), axis=1))
