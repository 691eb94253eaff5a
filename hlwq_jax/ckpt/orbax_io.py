"""orbax-checkpoint save / restore of parameter pytrees whose leaves may be quantized arrays (exact round trip).

A quantized leaf (``HLWQArray`` or a baseline array: any registered frozen dataclass listed in ``QUANTIZED_TYPES``)
is saved as a dict of its array fields; its class name and static fields (bits, block size, logical shape, rotation,
seed, codebook name, …) go into a JSON item next to the arrays, so ``restore_params`` rebuilds the exact tree without
being given a target. Arrays keep their dtype and values bit for bit; sharded ``jax.Array`` leaves are written by
orbax shard by shard, and can be restored onto any sharding (``shardings=``) or onto one device.

Layout (an orbax composite checkpoint directory, written atomically by orbax): ``arrays/`` (PyTree of plain arrays,
nested dicts keyed by the original keys) and ``structure/`` (JSON: per quantized leaf path its class and statics;
container kinds so lists come back as lists).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hlwq_jax.quant import baselines
from hlwq_jax.quant.array import HLWQArray

QUANTIZED_TYPES = {cls.__name__: cls for cls in (HLWQArray, baselines.RTNArray, baselines.NF4Array,
                                                  baselines.NVFP4Array)}
_Q = "__quantized__"


def _fields(obj):
    data, static = {}, {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.metadata.get("static"):
            static[f.name] = list(v) if isinstance(v, tuple) else v
        else:
            data[f.name] = v
    return data, static


def _leaf_desc(x) -> dict:
    kind = "jax" if isinstance(x, jax.Array) else "numpy"
    return {"array": kind, "shape": [int(d) for d in np.shape(x)], "dtype": np.dtype(x.dtype).name}


def _split(tree, path=""):
    """tree → (plain nested dict of arrays, JSON structure description with every array's kind, shape, dtype)."""
    if type(tree).__name__ in QUANTIZED_TYPES and isinstance(tree, QUANTIZED_TYPES[type(tree).__name__]):
        data, static = _fields(tree)
        return data, {_Q: type(tree).__name__, "static": static, "fields": {k: _leaf_desc(v) for k, v in data.items()}}
    if isinstance(tree, dict):
        out, desc = {}, {}
        for k, v in tree.items():
            if not isinstance(k, str):
                raise ValueError(f"{path or '<root>'}: dict keys must be strings for checkpointing, got {k!r}")
            out[k], desc[k] = _split(v, f"{path}.{k}" if path else k)
        return out, {"dict": desc}
    if isinstance(tree, (list, tuple)):
        out, desc = {}, []
        for i, v in enumerate(tree):
            out[str(i)], d = _split(v, f"{path}.{i}" if path else str(i))
            desc.append(d)
        return out, {"list" if isinstance(tree, list) else "tuple": desc}
    if isinstance(tree, jax.Array):
        return tree, _leaf_desc(tree)
    if isinstance(tree, (np.ndarray, np.generic)):
        return np.asarray(tree), _leaf_desc(tree)
    raise ValueError(f"{path or '<root>'}: cannot checkpoint leaf of type {type(tree).__name__}")


def _join(plain, desc, path=""):
    if _Q in desc:
        cls = QUANTIZED_TYPES.get(desc[_Q])
        if cls is None:
            raise ValueError(f"{path}: unknown quantized type {desc[_Q]!r} in checkpoint structure")
        static = {k: tuple(v) if isinstance(v, list) else v for k, v in desc["static"].items()}
        return cls(**plain, **static)
    if "dict" in desc:
        return {k: _join(plain[k], d, f"{path}.{k}" if path else k) for k, d in desc["dict"].items()}
    for kind, typ in (("list", list), ("tuple", tuple)):
        if kind in desc:
            return typ(_join(plain[str(i)], d, f"{path}.{i}") for i, d in enumerate(desc[kind]))
    return plain


def save_params(path: str | os.PathLike, params, force: bool = False) -> None:
    """Save a pytree (nested dicts/lists of arrays and quantized arrays) to ``path`` (a new directory)."""
    plain, desc = _split(params)
    path = pathlib.Path(path).absolute()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(path, ocp.args.Composite(arrays=ocp.args.StandardSave(plain), structure=ocp.args.JsonSave(desc)),
                force=force)


def _target(desc, shardings, path=""):
    """Restore target from the structure description: numpy leaves → np.ndarray; others → ShapeDtypeStruct on
    ``shardings`` (None: first device; a Sharding; or fn(path, shape) → Sharding)."""
    if _Q in desc:
        return {k: _target(d, shardings, f"{path}.{k}") for k, d in desc["fields"].items()}
    if "dict" in desc:
        return {k: _target(d, shardings, f"{path}.{k}" if path else k) for k, d in desc["dict"].items()}
    for kind in ("list", "tuple"):
        if kind in desc:
            return {str(i): _target(d, shardings, f"{path}.{i}" if path else str(i)) for i, d in enumerate(desc[kind])}
    shape, dtype = tuple(desc["shape"]), jnp.dtype(desc["dtype"])
    if desc["array"] == "numpy":
        return np.empty(shape, dtype)
    if shardings is None:
        s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    elif isinstance(shardings, jax.sharding.Sharding):
        s = shardings
    else:
        s = shardings(path, shape)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=s)


def restore_params(path: str | os.PathLike, shardings=None):
    """Restore what ``save_params`` wrote.

    shardings: None → every array on the first device; a ``jax.sharding.Sharding`` for all arrays; or a function
      (array path like "layers.0.w.packed", shape) → Sharding, e.g. to shard the packed codes of big matrices.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise ValueError(f"{path}: no checkpoint")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        desc = ck.restore(path, ocp.args.Composite(structure=ocp.args.JsonRestore()))["structure"]
        target = _target(desc, shardings)
        plain = ck.restore(path, ocp.args.Composite(arrays=ocp.args.StandardRestore(target)))["arrays"]
    return _join(plain, desc)
