"""StreamWriter / read_header: interleaved positional writes give a file safetensors reads back exactly; incomplete or
overflowing writes never leave a final file; corrupt headers are reported with the file and tensor."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hlwq_jax.ckpt.streaming import (CheckpointIndex, StreamWriter, read_header, read_rows, read_rows_reference,
                                     read_tensor)


def test_interleaved_chunks_round_trip(tmp_path, rng):
    a = rng.standard_normal((7, 5)).astype(ml_dtypes.bfloat16)
    b = rng.integers(0, 255, (4, 3), dtype=np.uint8)
    c = np.array(3.5, np.float32)
    path = tmp_path / "x.safetensors"
    with StreamWriter(path, [("a", a.dtype, a.shape), ("b", b.dtype, b.shape), ("c", c.dtype, ())], {"k": "v"}) as w:
        w.write("b", b[:1])
        w.write("a", a[:3])
        w.write("c", c)
        w.write("b", b[1:])
        w.write("a", a[3:])
        assert not path.exists() and (tmp_path / "x.safetensors.partial").exists()
    got = load_file(str(path))
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    assert got["c"] == c
    infos, meta = read_header(path)
    assert meta == {"k": "v"} and list(infos) == ["a", "b", "c"]
    np.testing.assert_array_equal(read_rows(infos["a"], 2, 5), a[2:5])
    for name, x in (("a", a), ("b", b)):  # positional reads agree with safetensors' own reader
        for lo, hi in ((0, 0), (0, 1), (1, 3), (0, x.shape[0])):
            got, ref = read_rows(infos[name], lo, hi), read_rows_reference(infos[name], lo, hi)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)
    assert read_tensor(infos["c"]) == c and read_tensor(infos["c"]).shape == ()
    with pytest.raises(ValueError, match="out of range for tensor 'a'"):
        read_rows(infos["a"], 5, 9)


def test_file_shrunk_after_indexing_names_tensor(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"w": np.ones((64, 8), np.float32)}, str(path))
    info = read_header(path)[0]["w"]
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"z.safetensors: truncated while reading tensor 'w'"):
        read_rows(info, 0, 64)


def test_incomplete_or_overflowing_write_leaves_nothing(tmp_path):
    path = tmp_path / "y.safetensors"
    w = StreamWriter(path, [("a", np.float32, (4,))])
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="not completely written"):
        w.close()
    assert not path.exists() and not (tmp_path / "y.safetensors.partial").exists()
    with pytest.raises(ValueError, match="overflows"):
        with StreamWriter(path, [("a", np.float32, (2,))]) as w2:
            w2.write("a", np.zeros(3, np.float32))
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="dtype"):
        with StreamWriter(path, [("a", np.float32, (2,))]) as w3:
            w3.write("a", np.zeros(2, np.float16))


def _raw(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_header_errors_name_file_and_tensor(tmp_path):
    p = tmp_path / "h.safetensors"
    _raw(p, {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ValueError, match=r"h.safetensors: tensor 'w' has unsupported dtype 'Q7'"):
        read_header(p)
    _raw(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ValueError, match=r"tensor 'w' byte range \[0, 8\) does not match F32\[3\]"):
        read_header(p)
    p.write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(p)
    save_file({"a": np.zeros(3, np.float32)}, str(tmp_path / "g.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "g.safetensors", "b": "missing.safetensors"}}))
    with pytest.raises(ValueError, match="missing.safetensors"):
        CheckpointIndex(tmp_path)


def test_read_rows_into_padded_buffer(tmp_path, rng):
    x = rng.standard_normal((37, 5, 3)).astype(ml_dtypes.bfloat16)
    save_file({"w": x}, str(tmp_path / "a.safetensors"))
    info = CheckpointIndex(tmp_path).tensors["w"]
    buf = np.full((16, 5, 3), 7, ml_dtypes.bfloat16)
    assert read_rows(info, 30, 37, out=buf) is buf
    np.testing.assert_array_equal(buf[:7], read_rows_reference(info, 30, 37))  # safetensors' own reader
    assert np.all(buf[7:] == 7)  # rows past stop − start untouched
    for bad in (np.zeros((6, 5, 3), ml_dtypes.bfloat16), np.zeros((16, 5, 3), np.float32),
                np.zeros((16, 3, 5), ml_dtypes.bfloat16)):
        with pytest.raises(ValueError, match=r"a.safetensors: buffer .* tensor 'w'"):
            read_rows(info, 30, 37, out=bad)
