"""Chunks holding rows of several tensors (``plan_chunks``): the plan covers every quantized row once, in order, within
the memory bound and ≤ 25 % padding; converted files do not depend on the chunk size (byte for byte) and equal
whole-tensor quantization; fewer programs are dispatched; an error in one piece names that piece's tensor."""
import pathlib

import numpy as np
import pytest

from hlwq_jax.cli import convert as cv
from hlwq_jax.ckpt import hlwq_format as hfmt
from hlwq_jax.ckpt.streaming import TensorInfo
from hlwq_jax.quant.hlwq import quantize
from ckpt_synth import make_checkpoint, select_proj

UP, DOWN = (24, 64), (16, 128)


def _shapes(stacked=True):
    """Small same-shape expert matrices with a second shape interleaved, a large tensor that splits at small chunk
    sizes, unquantized tensors in between, and (hlwq only) a stacked [E, out, in] tensor and a width off the block."""
    shapes = {"model.embed_tokens.weight": (40, 64)}
    for i in range(12):
        shapes[f"model.layers.0.mlp.experts.{i}.up_proj.weight"] = UP
        shapes[f"model.layers.0.mlp.experts.{i}.down_proj.weight"] = DOWN
        if i == 5:
            shapes["model.layers.1.o_proj.weight"] = (300, 64)
            shapes["model.layers.1.norm.weight"] = (64,)
    if stacked:
        shapes["model.layers.2.experts.weight"] = (3, 40, 64)
        shapes["model.layers.2.x_proj.weight"] = (37, 100)
    return shapes


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(root).iterdir()) if p.is_file()}


# ---- plan_chunks (pure) ---------------------------------------------------------------------------------------------

def _entry(name, shape, **meta):
    info = TensorInfo(pathlib.Path("src.safetensors"), name, "BF16", shape, 0, 2 * int(np.prod(shape)))
    if meta.pop("copy", False):
        return cv.Entry(name, info, None, ())
    return cv.Entry(name, info, {"bits": 4, "block_size": 64, "codebook": "converged", "rotation": "hadamard",
                                 "seed": 0, **meta}, ())


def test_plan_chunks_covers_rows_in_order_within_bound():
    """Closed-form oracle: per group of equal (trailing shape, dtype, settings), ⌈rows / full⌉ chunks, all of ``full``
    rows but the last (``padded_rows`` of its rows); each tensor's pieces cover [0, n) in order; groups never mix."""
    entries = [_entry("copy", (50, 64), copy=True)]
    for i in range(9):
        entries += [_entry(f"up{i}", (24, 64)), _entry(f"down{i}", (16, 128)), _entry(f"seed{i}", (24, 64), seed=1)]
    entries += [_entry("big", (300, 64)), _entry("stack", (3, 40, 64)), _entry("up_last", (24, 64))]
    chunk_bytes = 40 * 64 * 4  # full = 40 rows of width 64, 20 of width 128, 1 expert of [40, 64]
    chunks = cv.plan_chunks(entries, chunk_bytes)
    groups = {"up": (9 * 24 + 300 + 24, 40), "down": (9 * 16, 20), "seed": (9 * 24, 40), "stack": (3, 1)}
    key = lambda e: next(g for g in groups if e.name.startswith(g)) if e.name != "big" and e.name != "up_last" else "up"
    seen = {}
    for g, (rows, full) in groups.items():
        mine = [c for c in chunks if key(c.pieces[0][0]) == g]
        assert len(mine) == -(-rows // full), g
        assert all(c.rows == full == c.real_rows for c in mine[:-1])
        tail = rows - full * (len(mine) - 1)
        assert mine[-1].real_rows == tail and mine[-1].rows == cv.padded_rows(tail, full)
        assert mine[-1].rows <= max(8, 1.25 * tail)
    for c in chunks:
        assert len({key(e) for e, _, _ in c.pieces}) == 1  # one group per chunk
        for e, s, stop, off in c.spans():
            assert seen.get(e.name, 0) == s < stop  # each tensor's rows arrive in order, without gaps
            seen[e.name] = stop
    assert seen == {e.name: e.info.shape[0] for e in entries if e.meta is not None}
    with pytest.raises(ValueError, match="tensor 'empty'.*empty dimension"):
        cv.plan_chunks([_entry("empty", (0, 64))], chunk_bytes)


# ---- conversions ----------------------------------------------------------------------------------------------------

def _convert(src, dst, chunk_bytes, export="hlwq", source="hlwq", shard_bytes=6000):
    sel = select_proj(bits=5, block_size=64, rotation="random-hadamard", seed=7)
    select = sel if export == "hlwq" else (lambda n, s: dict(sel(n, s), source=source) if sel(n, s) else None)
    opts = cv.ConvertOptions(select=select, export=export, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes)
    return cv.convert_checkpoint(src, dst, opts, progress=False)


@pytest.mark.parametrize("export,source", [("hlwq", "hlwq"), ("compressed-tensors", "hlwq"),
                                           ("compressed-tensors", "weights")])
def test_output_does_not_depend_on_chunk_size(tmp_path, rng, export, source):
    """A chunk of 1 MiB packs every same-group tensor of a shard into one program; 2.5 KiB splits the large tensor
    (10 rows of width 64 per chunk) and packs ≤ 10 rows of small ones: the files are identical byte for byte."""
    src = make_checkpoint(tmp_path / "src", rng, shapes=_shapes(stacked=export == "hlwq"), n_shards=2)
    big = _convert(tmp_path / "src", tmp_path / "big", 1 << 20, export, source)
    tiny = _convert(tmp_path / "src", tmp_path / "tiny", 2560, export, source)
    assert len(list((tmp_path / "big").glob("*.safetensors"))) >= 3  # grouping happens within each output shard
    assert big["chunks"] < tiny["chunks"]
    assert _files(tmp_path / "big") == _files(tmp_path / "tiny")
    if export != "hlwq":
        return  # the CompressedTensors values are checked against their oracle in test_compressed_tensors.py
    ck = hfmt.HLWQCheckpoint(tmp_path / "big", check_hashes=True)
    for name in ("model.layers.0.mlp.experts.3.up_proj.weight", "model.layers.0.mlp.experts.11.down_proj.weight",
                 "model.layers.1.o_proj.weight", "model.layers.2.experts.weight", "model.layers.2.x_proj.weight"):
        want = quantize(np.asarray(src[name], np.float32), bits=5, block_size=64, rotation="random-hadamard", seed=7)
        got = ck.read(name)
        for leaf in ("packed", "norms", "codebook"):
            np.testing.assert_array_equal(np.asarray(getattr(got, leaf)), np.asarray(getattr(want, leaf)), name)
        np.testing.assert_array_equal(got.signs(), want.signs())
    np.testing.assert_array_equal(ck.read("model.embed_tokens.weight"), src["model.embed_tokens.weight"])


def test_small_tensors_share_one_dispatch(tmp_path, rng, monkeypatch):
    """One output shard, 1 MiB chunks: the 12 up, 12 down matrices and the [300, 64] one go out in 2 programs (one per
    input width) instead of 25; the stats' ``chunks`` counts the dispatches."""
    make_checkpoint(tmp_path / "src", rng, shapes=_shapes(stacked=False), n_shards=2)
    real, calls = cv._quantize_chunk, []
    monkeypatch.setattr(cv, "_quantize_chunk", lambda x, *rest: calls.append(x.shape) or real(x, *rest))
    stats = _convert(tmp_path / "src", tmp_path / "dst", 1 << 20, shard_bytes=1 << 30)
    rows64, rows128 = 12 * UP[0] + 300, 12 * DOWN[0]
    assert sorted(calls) == sorted([(cv.padded_rows(rows64, 4096), 64), (cv.padded_rows(rows128, 2048), 128)])
    assert stats["chunks"] == len(calls) == 2
    assert stats["h2d_bytes"] == 2 * sum(r * w for r, w in calls)


@pytest.mark.parametrize("value,message", [(np.inf, "contains NaN or Inf"), (3e4, "exceeds the float16 range")])
def test_bad_piece_names_its_tensor(tmp_path, rng, value, message):
    """A non-finite value, or a block norm beyond float16, in the 6th of 12 tensors packed into one chunk: the error
    names that tensor (per-row checks), and no output looks complete."""
    from safetensors.numpy import save_file
    src = make_checkpoint(tmp_path / "src", rng, shapes=_shapes(stacked=False), n_shards=1)
    bad = "model.layers.0.mlp.experts.5.up_proj.weight"
    w = np.asarray(src[bad], np.float32)
    w[17, :] = value
    src[bad] = w.astype(src[bad].dtype)
    save_file(src, str(tmp_path / "src" / "model-00001-of-00001.safetensors"))
    with pytest.raises(ValueError, match=rf"model-00001-of-00001.safetensors: tensor '{bad}'.*{message}"):
        _convert(tmp_path / "src", tmp_path / "dst", 1 << 20, shard_bytes=1 << 30)
    assert not (tmp_path / "dst" / hfmt.MANIFEST_FILE).exists() and not list((tmp_path / "dst").glob("*.partial"))
