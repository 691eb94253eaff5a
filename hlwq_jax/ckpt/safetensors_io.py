"""Hugging Face safetensors checkpoints: a declarative key map, streaming tensor-by-tensor loading, and writers.

Public signatures:
  open_checkpoint(path) -> Checkpoint             path: a directory (model.safetensors.index.json or *.safetensors),
                                                  a single .safetensors file, or an index json. Headers validated.
  Checkpoint.tensors: {key: TensorInfo(dtype code, shape, ...)};  Checkpoint.read(key) -> np.ndarray (source dtype)
  KeyRule(key, path, stack=None, to_leaf=None, to_disk=None)
      key:  checkpoint key template, e.g. "backbone.layers.{layer}.mixer.experts.{expert}.up_proj.weight";
            every {name} matches a decimal integer. The whole key must match.
      path: pytree leaf path template, e.g. "layers.{layer}.mixer.experts.up_proj" (dots; list indices as numbers).
      stack: name of a template field that indexes a new leading axis of the leaf (per-expert tensors -> [E, ...]).
      to_leaf / to_disk: array transforms disk -> leaf and back (e.g. conv1d [C,1,K] <-> [C,K]); shape-only safe.
  plan_load(checkpoint_shapes, rules, expected) -> {leaf path: [(key, stack index or None), ...]}
      checkpoint_shapes {key: shape}; expected {leaf path: shape}. Raises ValueError naming the key for: a key no
      rule matches, a key mapping to a leaf the model does not have, a key or stack index filled twice, a wrong
      shape; and naming the leaf and its checkpoint key for a missing tensor.
  load_leaves(ckpt, plan, expected, convert) -> iterator of (path, leaf): reads one leaf at a time (stacked experts
      are assembled from their per-expert tensors), then `convert(path, np.ndarray)` (cast / device_put / quantize).
  to_checkpoint(leaves {path: array}, rules) -> {key: np.ndarray}     inverse map (writing test checkpoints).
  save_safetensors(path, tensors, metadata=None)                      one file, atomic (temp then os.replace).
  save_sharded(root, tensors, max_shard_bytes)                        shards + model.safetensors.index.json.
  tree_paths(tree) -> {path: leaf};  tree_from_paths(template, {path: leaf}) -> tree shaped like template.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import struct
import tempfile
from collections.abc import Callable, Iterator

import jax
import numpy as np

from hlwq_jax.ckpt.streaming import CODES, CheckpointIndex, TensorInfo, read_header, read_tensor


class Checkpoint:
    """Tensors of one checkpoint (see open_checkpoint)."""

    def __init__(self, tensors: dict[str, TensorInfo], root: pathlib.Path):
        self.tensors, self.root = tensors, root

    def read(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise ValueError(f"{self.root}: no tensor named {key!r}")
        return read_tensor(self.tensors[key])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    p = pathlib.Path(path)
    if p.is_file() and p.name.endswith(".index.json"):
        p = p.parent
    if p.is_dir():
        return Checkpoint(CheckpointIndex(p).tensors, p)
    if p.is_file():
        return Checkpoint(read_header(p)[0], p)
    raise ValueError(f"{p}: no such checkpoint file or directory")


@dataclasses.dataclass(frozen=True)
class KeyRule:
    key: str
    path: str
    stack: str | None = None
    to_leaf: Callable[[np.ndarray], np.ndarray] | None = None
    to_disk: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def regex(self) -> re.Pattern:
        parts = re.split(r"\{(\w+)\}", self.key)
        out = "".join(re.escape(s) if i % 2 == 0 else f"(?P<{s}>\\d+)" for i, s in enumerate(parts))
        return re.compile(out)

    def leaf_shape(self, disk_shape) -> tuple[int, ...]:
        if self.to_leaf is None:
            return tuple(disk_shape)
        return tuple(self.to_leaf(np.broadcast_to(np.zeros((), np.float32), disk_shape)).shape)


def _match(key: str, rules: list[KeyRule]):
    hits = [(r, m) for r in rules if (m := r.regex.fullmatch(key))]
    if not hits:
        raise ValueError(f"unknown tensor key {key!r}: no key-map rule matches it")
    if len(hits) > 1:
        raise ValueError(f"tensor key {key!r} matches several rules: {[r.key for r, _ in hits]}")
    rule, m = hits[0]
    fields = {k: int(v) for k, v in m.groupdict().items()}
    idx = fields.pop(rule.stack) if rule.stack else None
    return rule, rule.path.format(**fields), idx, fields


def plan_load(checkpoint_shapes: dict[str, tuple[int, ...]], rules: list[KeyRule],
              expected: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, int | None]]]:
    plan: dict[str, list[tuple[str, int | None]]] = {}
    stacked: set[str] = set()
    for key in sorted(checkpoint_shapes):
        rule, path, idx, _ = _match(key, rules)
        if path not in expected:
            raise ValueError(f"unexpected tensor {key!r}: it maps to {path!r}, which this model config does not have")
        want = expected[path] if idx is None else expected[path][1:]
        got = rule.leaf_shape(checkpoint_shapes[key])
        if got != tuple(want):
            raise ValueError(f"tensor {key!r} has shape {tuple(checkpoint_shapes[key])} (as leaf {got}); "
                             f"{path!r} expects {tuple(want)}")
        if idx is not None:
            stacked.add(path)
            if idx >= expected[path][0]:
                raise ValueError(f"tensor {key!r}: index {idx} out of range for {path!r} with {expected[path][0]}")
        prev = plan.get(path, [])
        if prev and (idx is None or prev[0][1] is None or any(i == idx for _, i in prev)):
            other = next((k for k, i in prev if i == idx or idx is None or i is None), prev[0][0])
            raise ValueError(f"tensor {key!r} fills {path!r} (index {idx}) already filled by {other!r}")
        plan.setdefault(path, []).append((key, idx))
    for path, shape in expected.items():
        if path not in plan:
            raise ValueError(f"missing tensor for {path!r} (checkpoint key {_key_for(path, rules)!r})")
        if path in stacked:
            have = {i for _, i in plan[path]}
            if len(have) != shape[0]:
                miss = min(set(range(shape[0])) - have)
                raise ValueError(f"missing tensor {_key_for(path, rules, miss)!r} (index {miss} of {path!r})")
            plan[path].sort(key=lambda ki: ki[1])
    return plan


def _key_for(path: str, rules: list[KeyRule], index: int | None = None) -> str:
    for r in rules:
        parts = re.split(r"\{(\w+)\}", r.path)
        rx = "".join(re.escape(s) if i % 2 == 0 else f"(?P<{s}>\\d+)" for i, s in enumerate(parts))
        m = re.fullmatch(rx, path)
        if m and (index is None) == (r.stack is None):
            fields = {k: int(v) for k, v in m.groupdict().items()}
            if r.stack:
                fields[r.stack] = index
            return r.key.format(**fields)
    return "<no rule>"


def load_leaves(ckpt: Checkpoint, plan: dict, expected: dict[str, tuple[int, ...]],
                convert: Callable[[str, np.ndarray], object], rules: list[KeyRule]) -> Iterator[tuple[str, object]]:
    """Yield (path, convert(path, array)) one leaf at a time, in plan order."""
    for path, items in plan.items():
        parts = []
        for key, _ in items:
            rule = _match(key, rules)[0]
            a = ckpt.read(key)
            parts.append(rule.to_leaf(a) if rule.to_leaf else a)
        arr = parts[0] if items[0][1] is None else np.stack(parts)
        del parts
        yield path, convert(path, arr)


def to_checkpoint(leaves: dict[str, np.ndarray], rules: list[KeyRule]) -> dict[str, np.ndarray]:
    """Inverse key map: {leaf path: array} -> {checkpoint key: array}, using the first rule (in list order) whose
    path template fits each leaf; stacked rules split the leading axis into per-index tensors."""
    out = {}
    for path, arr in leaves.items():
        arr = np.asarray(arr)
        for rule in rules:
            if _key_for(path, [rule], 0 if rule.stack else None) == "<no rule>":
                continue
            items = [(None, arr)] if rule.stack is None else list(enumerate(arr))
            for i, a in items:
                out[_key_for(path, [rule], i)] = rule.to_disk(a) if rule.to_disk else a
            break
        else:
            raise ValueError(f"to_checkpoint: no key-map rule for leaf {path!r}")
    return out


def _encode(tensors: dict[str, np.ndarray], metadata: dict | None) -> tuple[bytes, list[np.ndarray]]:
    header, off, datas = {}, 0, []
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        if a.dtype not in CODES:
            raise ValueError(f"save_safetensors: tensor {k!r} has unsupported dtype {a.dtype}")
        header[k] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        datas.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h, datas


def _atomic_write(path: pathlib.Path, chunks) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c if isinstance(c, bytes) else c.tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    head, datas = _encode(tensors, {"format": "pt", **(metadata or {})})
    _atomic_write(pathlib.Path(path), [head, *datas])


def save_sharded(root: str | os.PathLike, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    root = pathlib.Path(root)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(tensors):
        nb = np.asarray(tensors[k]).nbytes
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nb
    n = len(shards)
    weight_map = {}
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_safetensors(root / name, sh)
        weight_map.update({k: name for k in sh})
    index = {"metadata": {"total_size": int(sum(np.asarray(t).nbytes for t in tensors.values()))},
             "weight_map": weight_map}
    _atomic_write(root / "model.safetensors.index.json", [json.dumps(index, indent=1).encode()])


def _is_leaf(x) -> bool:
    """Arrays, quantized leaves, and shape tuples (tuples of ints) are leaves; dicts / lists / other tuples are not."""
    if isinstance(x, tuple) and all(isinstance(i, int) for i in x):
        return True
    return not isinstance(x, (dict, list, tuple))


def _path_str(kp) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)


def tree_paths(tree) -> dict:
    """{"layers.3.mixer.in_proj": leaf, ...}; leaves: arrays, ShapeDtypeStructs, shape tuples, quantized leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    return {_path_str(kp): v for kp, v in flat}


def tree_from_paths(template, values: dict):
    """A tree shaped like `template` whose leaves are values[path]."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: values[_path_str(kp)], template, is_leaf=_is_leaf)
