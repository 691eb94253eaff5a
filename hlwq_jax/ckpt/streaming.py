"""Bounded-memory safetensors I/O: validated headers, row-slice reads, and a positional streaming writer.

Reading: ``read_header`` parses and checks a file's header against its size before any tensor is touched, so a
truncated or corrupt shard fails with a ``ValueError`` naming the file and the first tensor it cannot hold.
``CheckpointIndex`` maps every tensor of a Hugging Face checkpoint directory to its file. ``read_rows`` reads a row
range of one tensor with positional reads at the validated offsets (memory = the slice; ``read_rows_reference``
does the same through ``safetensors.safe_open``).

Writing: ``StreamWriter`` lays out the header up front from (name, dtype, shape) specs, then accepts row chunks of
any tensor in any interleaving (``os.pwrite`` at each tensor's own cursor), into ``<path>.partial``; ``close`` checks
that every byte was written, fsyncs and renames to the final name. A file under its final name is always complete.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from safetensors import safe_open

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
CODES = {v: k for k, v in DTYPES.items()}
PARTIAL_SUFFIX = ".partial"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype code, shape, absolute byte range in the file."""
    file: pathlib.Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns ({name: TensorInfo} in file order, __metadata__).

    Raises ValueError naming the file (and tensor) when the header is unreadable, a dtype is unknown, a byte range
    disagrees with dtype × shape, or the file is shorter than a tensor's data (truncated).
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: corrupt or truncated header (declares {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt header JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dt, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt header entry for tensor {name!r}: {h!r}") from None
        if dt not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
        if e - b != want or b < 0:
            raise ValueError(f"{path}: tensor {name!r} byte range [{b}, {e}) does not match {dt}{list(shape)}")
        if base + e > size:
            raise ValueError(f"{path}: truncated: tensor {name!r} needs bytes up to {base + e}, file has {size}")
        infos[name] = TensorInfo(path, name, dt, shape, base + b, base + e)
    return dict(sorted(infos.items(), key=lambda kv: kv[1].start)), meta


class CheckpointIndex:
    """All tensors of a checkpoint directory (``*.safetensors``, with or without an index json), headers validated.

    Attributes: ``tensors``: {name: TensorInfo} in (file name, offset) order; ``files``: sorted shard paths.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a checkpoint directory")
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.root / n).exists()]
            if missing:
                raise ValueError(f"{index}: lists shard(s) that do not exist: {missing}")
        else:
            weight_map = None
            names = sorted(p.name for p in self.root.glob("*.safetensors"))
        if not names:
            raise ValueError(f"{self.root}: no *.safetensors files")
        self.files = [self.root / n for n in names]
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in read_header(f)[0].items():
                if name in self.tensors:
                    raise ValueError(f"tensor {name!r} appears in both {self.tensors[name].file} and {f}")
                if weight_map is not None and weight_map.get(name) != f.name:
                    raise ValueError(f"{f}: tensor {name!r} is not mapped to this file by {index.name}")
                self.tensors[name] = info
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.tensors))
            if absent:
                raise ValueError(f"{index}: tensors missing from their shards: {absent[:5]}")

    def __getitem__(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ValueError(f"{self.root}: no tensor named {name!r}")
        return self.tensors[name]


def read_rows(info: TensorInfo, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) of the tensor's first axis (source dtype), read with positional file reads.

    ``out`` (optional): a C-contiguous array of the source dtype with ≥ stop − start rows of the tensor's trailing
    shape; the rows are read into its first stop − start rows (the rest is left as it is) and ``out`` is returned.

    No mmap: memory is the returned array only (the page cache is not charged to this process), and no page faults
    per 4 KiB, so one thread reads several GB/s. ``read_rows_reference`` is the safetensors ``safe_open`` path.
    Errors name the file and the tensor.
    """
    if not 0 <= start <= stop <= (info.shape[0] if info.shape else 1):
        raise ValueError(f"{info.file}: rows [{start}, {stop}) out of range for tensor {info.name!r} {list(info.shape)}")
    row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
    if out is None:
        out = np.empty((stop - start, *info.shape[1:]) if info.shape else (), info.np_dtype)
    elif (out.dtype != info.np_dtype or not out.flags.c_contiguous or out.shape[1:] != tuple(info.shape[1:])
          or out.shape[0] < stop - start):
        raise ValueError(f"{info.file}: buffer {out.dtype}{list(out.shape)} cannot hold rows [{start}, {stop}) of "
                         f"tensor {info.name!r} {info.dtype}{list(info.shape)}")
    buf = memoryview(out.reshape(-1).view(np.uint8))[: (stop - start) * row]
    pos, done = info.start + start * row, 0
    with open(info.file, "rb", buffering=0) as f:
        while done < buf.nbytes:
            n = os.preadv(f.fileno(), [buf[done:]], pos + done)
            if n <= 0:
                raise ValueError(f"{info.file}: truncated while reading tensor {info.name!r} "
                                 f"(got {done} of {buf.nbytes} bytes at offset {pos})")
            done += n
    return out


def read_rows_reference(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """``read_rows`` through ``safetensors.safe_open`` (the library's own reader; used to check ``read_rows``)."""
    try:
        with safe_open(str(info.file), framework="numpy") as f:
            arr = f.get_slice(info.name)[start:stop]
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{info.file}: cannot read tensor {info.name!r} rows [{start}, {stop}): {e}") from None
    return np.ascontiguousarray(arr)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The whole tensor (source dtype, numpy)."""
    return read_rows(info, 0, info.shape[0] if info.shape else 1).reshape(info.shape)


def rows_per_chunk(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> int:
    """How many first-axis rows fit in ``chunk_bytes`` (at least 1)."""
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    return max(1, chunk_bytes // max(row, 1))


class StreamWriter:
    """Write one safetensors file from row chunks without holding whole tensors.

    specs: [(name, numpy dtype, shape)] — the data lies in this order. ``write(name, chunk)`` appends ``chunk``
    (C-contiguous, the next rows of that tensor) at the tensor's cursor. ``close()`` verifies completeness, fsyncs,
    and renames ``<path>.partial`` → ``<path>``; ``abort()`` (or an exception inside ``with``) deletes the partial file.
    """

    def __init__(self, path: str | os.PathLike, specs, metadata: dict[str, str] | None = None):
        self.path = pathlib.Path(path)
        self.tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        header, offset = {}, 0
        self._cursor, self._end, self._dtype = {}, {}, {}
        for name, dtype, shape in specs:
            dtype = np.dtype(dtype)
            if dtype not in CODES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            if name in header:
                raise ValueError(f"{self.path}: tensor {name!r} listed twice")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._cursor[name], self._end[name], self._dtype[name] = offset, offset + nbytes, dtype
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
        blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)
        self._base = 8 + len(blob)
        self.header = header
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(blob)) + blob, 0)
        os.ftruncate(self._fd, self._base + offset)

    def write(self, name: str, chunk: np.ndarray) -> None:
        if name not in self._cursor:
            raise ValueError(f"{self.path}: tensor {name!r} is not in this file's layout")
        chunk = np.ascontiguousarray(chunk)
        if chunk.dtype != self._dtype[name]:
            raise ValueError(f"{self.path}: tensor {name!r} chunk dtype {chunk.dtype} != {self._dtype[name]}")
        buf = memoryview(chunk.reshape(-1).view(np.uint8))
        pos = self._cursor[name]
        if pos + buf.nbytes > self._end[name]:
            raise ValueError(f"{self.path}: tensor {name!r} overflows its {self._end[name] - pos} remaining bytes")
        done = 0
        while done < buf.nbytes:
            done += os.pwrite(self._fd, buf[done:], self._base + pos + done)
        self._cursor[name] = pos + buf.nbytes

    def close(self) -> pathlib.Path:
        short = [n for n in self._cursor if self._cursor[n] != self._end[n]]
        if short:
            self.abort()
            raise ValueError(f"{self.path}: tensors not completely written: {short[:5]}")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif self._fd is not None:
            self.close()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a small file atomically (temp in the same directory, fsync, rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
