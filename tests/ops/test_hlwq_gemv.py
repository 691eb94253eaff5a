"""The decode GEMV's pieces: the GEMV order of the activations (a float64 pairing oracle over the planes), the
warp-shuffle lookup primitives lane_ids / lane_shuffle (CPU model, interpret mode, Triton lowering, GPU), the tile
geometry and GemvConfig's grid plan."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from hlwq_oracle import exact_weight
from triton_ir import lowered_triton_ir
from hlwq_jax.ops.hlwq_matmul import hlwq_matmul, repack
from hlwq_jax.ops.hlwq_matmul.gemv_triton import GemvConfig, chunk_order, plan_grid, tile_geometry, to_gemv_order
from hlwq_jax.ops.hlwq_matmul.rotate import chunk_permutation
from hlwq_jax.ops.hlwq_matmul.lane_lut import lane_ids, lane_shuffle, lane_table
from hlwq_jax.ops.hlwq_matmul.layout import PLANE_WIDTHS


def _code_of_field(planes, bits, word, field):
    """Code held by field ``field`` of base word ``word`` (every row), read from the layout's definition as Python
    ints: the stream base_w | extension_w << 32, extension_w = X bits at X·(w mod G) of extra word w // G."""
    widths = PLANE_WIDTHS[bits]
    base = np.asarray(planes[0])[:, word].astype(object)
    stream = base
    if len(widths) > 1:
        x_ = 32 * widths[1] // widths[0]
        extra = np.asarray(planes[1])[:, word // (32 // x_)].astype(object)
        stream = base | (((extra >> (x_ * (word % (32 // x_)))) & ((1 << x_) - 1)) << 32)
    return np.array([(int(v) >> (bits * field)) & ((1 << bits) - 1) for v in stream], np.int64)


@pytest.mark.parametrize("bits,n_in", [(3, 300), (4, 2688), (5, 300), (5, 2688), (6, 1000), (8, 640)])
def test_gemv_order_pairs_each_field_with_its_column(bits, n_in):
    """The kernel multiplies field f of base word w (chunk w // nw) by GEMV-order activation
    128·(w // nw) + nw·f + (w mod nw): Σ over words and fields of c[code] · x_gemv equals Σ_k c[code_k] · x_k,
    in float64."""
    rng = np.random.default_rng(bits)
    w = exact_weight(rng, bits, (7, n_in))
    p = repack(w)
    x = rng.standard_normal((1, p.padded_in))
    xg = np.asarray(to_gemv_order(jnp.asarray(x, jnp.float32), p), np.float64)[0]
    f0, nw, _, _ = tile_geometry(p)
    table = rng.standard_normal(1 << bits)  # any table: the pairing must hold entry by entry
    got = np.zeros(p.rows)
    for word in range(np.asarray(p.planes[0]).shape[1]):
        for f in range(f0):
            got += table[_code_of_field(p.planes, bits, word, f)] * xg[128 * (word // nw) + nw * f + word % nw]
    codes = np.asarray(p.codes()).astype(np.int64)  # [out, padded_in]
    np.testing.assert_allclose(got[: w.shape[0]], table[codes] @ x[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,n_in", [(2, 300), (3, 2688), (5, 1856), (5, 4096), (8, 5000)])
def test_to_gemv_order_is_the_chunk_order_gather(bits, n_in):
    """The transpose form equals the gather by ``chunk_order`` within every chunk (what rotate_activations folds
    into its matrix), and chunk_order is a permutation."""
    rng = np.random.default_rng(n_in)
    p = repack(exact_weight(rng, bits, (3, n_in)))
    order = chunk_order(bits)
    assert sorted(order.tolist()) == list(range(128))
    x = rng.standard_normal((2, p.padded_in)).astype(np.float32)
    want = np.take(x, chunk_permutation(order, p.padded_in), axis=1)
    np.testing.assert_array_equal(np.asarray(to_gemv_order(jnp.asarray(x), p)), want)


def test_plan_grid_splits_rows_and_steps():
    p = repack(exact_weight(np.random.default_rng(0), 5, (1000, 2688)))  # 1024 rows, 3 tiles
    assert plan_grid(p, 1, GemvConfig()) == (3, 1, 1)  # 1024 / 2 · 3 = 1536 programs < 2048: one step each
    assert plan_grid(p, 1, GemvConfig(min_programs=1)) == (3, 1, 16)
    assert plan_grid(p, 1, GemvConfig(max_tiles=3, min_programs=1, rows=4, max_steps=8)) == (1, 3, 8)
    assert plan_grid(p, 6, GemvConfig(max_tiles=2, min_programs=3 * 6 * 128)) == (3, 1, 4)  # 3 ∤ 2: 3 groups
    for bad in (dict(rows=3), dict(max_steps=0), dict(rows=16, max_steps=16), dict(min_programs=0),
                dict(max_tiles=0), dict(lookup="lanes")):
        with pytest.raises(ValueError, match="GemvConfig"):
            GemvConfig(**bad)


def _lookup_kernel(t_ref, i_ref, o_ref):
    o_ref[...] = lane_shuffle(lane_table(t_ref, i_ref.shape), i_ref[...])


def _lookup_case(seed, shape, n_table):
    """A table of n_table entries and indices with garbage above their log2(n_table) bits."""
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.standard_normal(n_table), jnp.float32)
    idx = rng.integers(0, n_table, size=shape) + n_table * rng.integers(0, 1 << 20, size=shape)
    return table, jnp.asarray(idx, jnp.int32), np.asarray(table)[np.asarray(idx) % n_table]


def test_lane_shuffle_cpu_model_and_interpret_mode():
    table, idx, want = _lookup_case(1, (4, 32), 32)
    np.testing.assert_array_equal(np.asarray(lane_ids((4, 32)))[2], np.arange(32))
    own = table[lane_ids((4, 32))]
    np.testing.assert_array_equal(np.asarray(lane_shuffle(own, idx)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(lane_shuffle)(own, idx)), want)
    for n_table in (8, 32):
        table, idx, want = _lookup_case(n_table, (4, 32), n_table)
        out = pl.pallas_call(_lookup_kernel, out_shape=jax.ShapeDtypeStruct(idx.shape, jnp.float32),
                             interpret=True)(table, idx)
        np.testing.assert_array_equal(np.asarray(out), want)
    with pytest.raises(ValueError, match="multiple of 32"):
        lane_ids((4, 16))
    with pytest.raises(ValueError, match="share one shape"):
        lane_shuffle(own, idx[:, :16])
    with pytest.raises(ValueError, match="power-of-two size"):
        lane_table(jnp.zeros(64), (4, 32))


def test_lane_model_of_a_wide_tile_is_runs_of_32():
    """A last axis of 128 models four warps' worth of lanes: lane = column mod 32, and a shuffle reads within the
    element's run of 32 (so with lane_table it is still table[idx mod T])."""
    table, idx, want = _lookup_case(3, (2, 128), 16)
    np.testing.assert_array_equal(np.asarray(lane_ids((2, 128)))[1], np.arange(128) % 32)
    own = jnp.arange(256, dtype=jnp.float32).reshape(2, 128)
    got = np.asarray(lane_shuffle(own, jnp.full((2, 128), 37, jnp.int32)))
    np.testing.assert_array_equal(got[1], 128 + 32 * (np.arange(128) // 32) + 5)
    out = pl.pallas_call(_lookup_kernel, out_shape=jax.ShapeDtypeStruct(idx.shape, jnp.float32),
                         interpret=True)(table, idx)
    np.testing.assert_array_equal(np.asarray(out), want)


def test_lane_primitives_lower_to_laneid_and_shuffle(monkeypatch):
    """Lowered for CUDA (on any host), the lookup kernel carries %laneid and shfl.sync.idx inline assembly."""
    fn = pl.pallas_call(_lookup_kernel, out_shape=jax.ShapeDtypeStruct((4, 32), jnp.float32))
    texts = lowered_triton_ir(monkeypatch, fn, jax.ShapeDtypeStruct((32,), jnp.float32),
                              jax.ShapeDtypeStruct((4, 32), jnp.int32))
    assert texts and "%laneid" in texts[0] and "shfl.sync.idx.b32" in texts[0]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,n_table", [((4, 32), 32), ((4, 32), 16), ((8, 32), 8), ((1, 32), 32), ((2, 4, 32), 32),
                                           ((64, 128), 32), ((16, 128), 16)])
def test_lane_shuffle_on_gpu_matches_table_lookup(shape, n_table):
    """Whatever layout Triton gives the tile, the shuffle returns table[idx mod T] (indices with high garbage)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    table, idx, want = _lookup_case(n_table + len(shape), shape, n_table)
    out = pl.pallas_call(_lookup_kernel, out_shape=jax.ShapeDtypeStruct(idx.shape, jnp.float32))(table, idx)
    np.testing.assert_array_equal(np.asarray(out), want)


@pytest.mark.parametrize("out,n_in", [(256, 640), (130, 300), (1, 2688)])
def test_gemv_stores_exactly_the_output_rows(out, n_in):
    """Output rows a multiple of the 128-row padding (plain store) or not (masked store): the GEMV returns [M, out]
    equal to the float64 oracle, with nothing of the padding rows."""
    rng = np.random.default_rng(out)
    w = exact_weight(rng, 5, (out, n_in))
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    y = hlwq_matmul(jnp.asarray(x), repack(w), impl="pallas", interpret=True)
    want = x.astype(np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64).T
    assert y.shape == (1, out)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2e-5, atol=2e-5)
