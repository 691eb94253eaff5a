"""Streaming conversion to the hlwq format: chunked output equals whole-tensor quantization bit for bit, resume after
interruption gives byte-identical files, bad input never leaves a complete-looking output."""
import json
import pathlib

import numpy as np
import pytest

from hlwq_jax.cli import convert as cv
from hlwq_jax.ckpt import hlwq_format as hfmt
from hlwq_jax.quant.hlwq import quantize
from ckpt_synth import make_checkpoint, select_proj


def _opts(**kw):
    kw.setdefault("select", select_proj())
    kw.setdefault("shard_bytes", 9000)  # several output shards
    kw.setdefault("chunk_bytes", 4096)  # several chunks per tensor, padded tail
    return cv.ConvertOptions(**kw)


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(root).iterdir()) if p.is_file()}


@pytest.mark.parametrize("rotation", ["hadamard", "random-hadamard"])
def test_convert_matches_in_memory_quantize(tmp_path, rng, rotation):
    src = make_checkpoint(tmp_path / "src", rng)
    cv.convert_checkpoint(tmp_path / "src", tmp_path / "dst", _opts(select=select_proj(rotation=rotation, seed=3)),
                          progress=False)
    ck = hfmt.HLWQCheckpoint(tmp_path / "dst", check_hashes=True)
    assert len(list((tmp_path / "dst").glob("*.safetensors"))) > 2
    assert set(ck.names) == set(src)
    for name, x in src.items():
        got = ck.read(name)
        if name.endswith("proj.weight") or name.endswith("experts.weight"):
            want = quantize(np.asarray(x, np.float32), bits=5, block_size=64, rotation=rotation, seed=3)
            for leaf in ("packed", "norms", "codebook"):
                np.testing.assert_array_equal(np.asarray(getattr(got, leaf)), np.asarray(getattr(want, leaf)))
            assert got.shape == want.shape and got.rotation == rotation and got.seed == 3
        else:
            assert got.dtype == x.dtype
            np.testing.assert_array_equal(got, x)
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg["model_type"] == "toy" and cfg["quantization_config"]["quant_method"] == "polarengine"
    assert (tmp_path / "dst" / "tokenizer.json").exists()
    meta = json.loads((tmp_path / "dst" / "hlwq_config.json").read_text())["tensors"]["model.layers.0.o_proj.weight"]
    assert meta["shape"] == [96, 200] and meta["dtype"] == "bfloat16" and meta["packing"] == "lsb-row"


def test_resume_after_interruption_is_byte_identical(tmp_path, rng, monkeypatch):
    make_checkpoint(tmp_path / "src", rng)
    cv.convert_checkpoint(tmp_path / "src", tmp_path / "clean", _opts(), progress=False)
    real, calls = cv._quantize_chunk, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt  # the user presses ^C in the middle of a shard
        return real(*a, **k)

    monkeypatch.setattr(cv, "_quantize_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        cv.convert_checkpoint(tmp_path / "src", tmp_path / "dst", _opts(), progress=False)
    dst = tmp_path / "dst"
    assert not (dst / hfmt.MANIFEST_FILE).exists() and not list(dst.glob("*.partial"))
    n_final = len(list(dst.glob("*.safetensors")))
    assert 0 < n_final < len(list((tmp_path / "clean").glob("*.safetensors")))
    with pytest.raises(ValueError, match="incomplete"):
        hfmt.HLWQCheckpoint(dst)
    monkeypatch.setattr(cv, "_quantize_chunk", real)
    stats = cv.convert_checkpoint(tmp_path / "src", dst, _opts(), progress=False)
    assert stats["skipped_shards"] == n_final
    assert _files(dst) == _files(tmp_path / "clean")
    with pytest.raises(ValueError, match="different source or options"):
        cv.convert_checkpoint(tmp_path / "src", dst, _opts(select=select_proj(bits=4)), progress=False)


def test_truncated_shard_names_file_and_tensor(tmp_path, rng):
    make_checkpoint(tmp_path / "src", rng)
    shard = tmp_path / "src" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])  # the tensor the cut reaches into
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=rf"model-00002-of-00002.safetensors: truncated: tensor '{last}'"):
        cv.convert_checkpoint(tmp_path / "src", tmp_path / "dst", _opts(), progress=False)
    assert not (tmp_path / "dst" / hfmt.MANIFEST_FILE).exists()
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      " + data[24:])
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors: corrupt header"):
        cv.convert_checkpoint(tmp_path / "src", tmp_path / "dst", _opts(), progress=False)


def test_nonfinite_weight_names_file_and_tensor(tmp_path, rng):
    from safetensors.numpy import save_file
    src = make_checkpoint(tmp_path / "src", rng, n_shards=1)
    bad = dict(src)
    w = np.asarray(bad["model.layers.0.o_proj.weight"], np.float32)
    w[7, 3] = np.inf
    bad["model.layers.0.o_proj.weight"] = w.astype(src["model.layers.0.o_proj.weight"].dtype)
    save_file(bad, str(tmp_path / "src" / "model-00001-of-00001.safetensors"))
    with pytest.raises(ValueError, match=r"model-00001-of-00001.safetensors.*'model.layers.0.o_proj.weight'.*NaN or Inf"):
        cv.convert_checkpoint(tmp_path / "src", tmp_path / "dst", _opts(), progress=False)
    dst = tmp_path / "dst"
    assert not (dst / hfmt.MANIFEST_FILE).exists() and not list(dst.glob("*.partial"))


@pytest.mark.parametrize("chunk_bytes", [128 * 128 * 4, 1 << 20])
def test_compiled_programs_shared_across_tensors_of_one_width(tmp_path, rng, chunk_bytes):
    """36 tensors of 36 distinct shapes (150..399 rows) but 3 input widths: the rows of each width's tensors are packed
    into chunks of ``full`` rows (256 / 128 / 85 at 64 KiB, 4096 / 2048 / 1365 at 1 MiB) plus one padded tail, so XLA
    builds ≤ 2 programs per width (counted by jax.monitoring), not one per shape, and dispatches ⌈rows / full⌉ chunks
    per width, not one or more per tensor. Padding ≤ 25 %; the output equals whole-tensor quantization bit for bit."""
    outs = rng.permutation(np.arange(150, 400))[:36]
    widths = (64, 128, 192)
    shapes = {f"model.layers.{i}.q_proj.weight": (int(o), widths[i % 3]) for i, o in enumerate(outs)}
    src = make_checkpoint(tmp_path / "src", rng, shapes=shapes, n_shards=2)
    opts = _opts(shard_bytes=1 << 30, chunk_bytes=chunk_bytes)
    stats = cv.convert_checkpoint(tmp_path / "src", tmp_path / "dst", opts, progress=False)
    ck = hfmt.HLWQCheckpoint(tmp_path / "dst")
    plan = cv.plan_conversion(cv.CheckpointIndex(tmp_path / "src"), opts)
    assert len(plan.shards) == 1
    chunks = cv.plan_chunks(plan.shards[0][1], opts.chunk_bytes)
    programs = {(c.rows, c.pieces[0][0].info.shape[1]) for c in chunks}
    per_width = {w: sum(1 for _, v in programs if v == w) for w in widths}
    assert max(per_width.values()) <= 2, per_width
    real = sum(o for o, _ in shapes.values())
    assert real == sum(c.real_rows for c in chunks) <= sum(c.rows for c in chunks) <= 1.25 * real
    rows = {w: sum(o for o, v in shapes.values() if v == w) for w in widths}
    assert stats["chunks"] == len(chunks) == sum(-(-rows[w] // (chunk_bytes // (4 * w))) for w in widths)
    assert stats["compiles"] <= len(programs) <= 6 < len(set(shapes.values()))
    assert stats["h2d_bytes"] == 2 * sum(c.rows * c.pieces[0][0].info.shape[1] for c in chunks)  # bf16, not f32
    for name in list(src)[:4]:
        want = quantize(np.asarray(src[name], np.float32), bits=5, block_size=64)
        got = ck.read(name)
        np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(want.packed))
        np.testing.assert_array_equal(np.asarray(got.norms), np.asarray(want.norms))


def test_padded_rows_quarter_octaves():
    assert [cv.padded_rows(k, 1000) for k in (1, 8, 9, 16, 17, 33, 100, 1000, 5000)] == \
        [8, 8, 10, 16, 20, 40, 112, 1000, 1000]
    assert cv.padded_rows(5, 4) == 4  # never above the full chunk
    for k in range(1, 3000):  # ≤ 25 % padding above 8 rows
        assert k <= cv.padded_rows(k, 10**6) <= max(8, 1.25 * k)
