"""Host-side expert banks of one MoE layer: ``HostBank`` (pinned host memory) and ``DiskBank`` (np.memmap).

A layer's experts are a dict ``{name: leaf}`` of stacked weights, each leaf a ``jax.Array``/``np.ndarray``
[E, out, in] or an ``HLWQArray`` of shape [E, out, in]. A bank splits them into per-expert *fields* — the arrays one
expert owns (a plain leaf: itself; an HLWQArray: ``packed`` and ``norms``; its ``codebook`` is shared and kept on the
device) — and stores each expert as ONE contiguous uint8 *row* [expert_nbytes]: the raw bytes of its fields, in
``specs`` order (``expert_row``). ``fetch(experts)`` moves the rows of all given experts to the device in **one**
``jax.device_put`` call (one host→device copy per expert, not one per field: a Q5 expert has four fields, two of
them ~80 KB norms, and every array copied pays a fixed cost); ``split_rows`` cuts device rows back into typed
fields by slicing and bitcasting (traceable: the cache does it inside its jitted, donated install);
``build(fields, n)`` reassembles a weight dict with leading dimension n from stacked device fields (the slot buffer of
a cache or the all-resident weights).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hlwq_jax.quant.array import HLWQArray


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One per-expert array: ``leaf`` name, ``attr`` ("" for a plain leaf, else the HLWQArray field), per-expert
    ``shape`` and dtype name."""
    leaf: str
    attr: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(_np_dtype(self.dtype)).itemsize


def _np_dtype(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


_HLWQ_META = ("bits", "block_size", "rotation", "seed", "codebook_name")


def split_layer(weights: dict) -> tuple[list[FieldSpec], list[np.ndarray], dict, int]:
    """Split ``{name: leaf}`` into field specs, stacked host arrays [E, ...] per field, the static layout (HLWQ
    metadata + shared codebooks, as numpy) and E. Raises ValueError on unsupported or inconsistent leaves."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError("expert bank: weights must be a non-empty dict {name: stacked leaf}")
    specs, arrays, layout, n_exp = [], [], {}, None
    for name in sorted(weights):
        w = weights[name]
        if isinstance(w, HLWQArray):
            if w.ndim != 3:
                raise ValueError(f"expert bank: leaf {name!r} must be a stacked [E, out, in] HLWQArray, got {w.shape}")
            fields = {"packed": w.packed, "norms": w.norms}
            layout[name] = {"kind": "hlwq", "shape": list(w.shape[1:]), "codebook": np.asarray(w.codebook),
                            **{k: getattr(w, k) for k in _HLWQ_META}}
        elif isinstance(w, (jax.Array, np.ndarray)):
            if w.ndim != 3:
                raise ValueError(f"expert bank: leaf {name!r} must be stacked [E, out, in], got shape {w.shape}")
            fields = {"": w}
            layout[name] = {"kind": "array"}
        else:
            raise ValueError(f"expert bank: leaf {name!r} has unsupported type {type(w).__name__} "
                             "(supported: jax.Array, np.ndarray, HLWQArray)")
        for attr, a in fields.items():
            a = np.asarray(a)
            if n_exp is None:
                n_exp = a.shape[0]
            if a.shape[0] != n_exp:
                raise ValueError(f"expert bank: leaf {name!r}{'.' + attr if attr else ''} has {a.shape[0]} experts, "
                                 f"expected {n_exp}")
            specs.append(FieldSpec(name, attr, tuple(a.shape[1:]), str(a.dtype)))
            arrays.append(a)
    return specs, arrays, layout, int(n_exp)


def expert_row(fields: Sequence[np.ndarray]) -> np.ndarray:
    """One expert's field arrays (``specs`` order) as one contiguous uint8 row: their raw bytes, concatenated."""
    return np.concatenate([np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in fields])


def split_rows(specs: Sequence[FieldSpec], rows: jax.Array) -> list[jax.Array]:
    """uint8 rows [M, expert_nbytes] -> per field [M, *shape] of its dtype, bit for bit (slice + bitcast)."""
    if rows.ndim != 2 or rows.dtype != jnp.uint8 or rows.shape[1] != sum(s.nbytes for s in specs):
        raise ValueError(f"expert rows must be uint8 [M, {sum(s.nbytes for s in specs)}], got {rows.dtype} "
                         f"{rows.shape}")
    out, off, m = [], 0, rows.shape[0]
    for s in specs:
        dt = np.dtype(_np_dtype(s.dtype))
        raw = rows[:, off:off + s.nbytes].reshape(m, -1, dt.itemsize)  # [M, n_elements, itemsize]
        if dt == np.uint8:
            field = raw[..., 0]
        else:
            field = jax.lax.bitcast_convert_type(raw if dt.itemsize > 1 else raw[..., 0], dt)
        out.append(field.reshape(m, *s.shape))
        off += s.nbytes
    return out


def build_weights(specs: Sequence[FieldSpec], layout: dict, fields: Sequence, n: int) -> dict:
    """Reassemble ``{name: leaf}`` with leading dimension ``n`` from stacked field arrays (order of ``specs``)."""
    by_leaf: dict[str, dict] = {}
    for s, a in zip(specs, fields):
        by_leaf.setdefault(s.leaf, {})[s.attr] = a
    out = {}
    for name, f in by_leaf.items():
        lay = layout[name]
        if lay["kind"] == "array":
            out[name] = f[""]
        else:
            out[name] = HLWQArray(packed=f["packed"], norms=f["norms"], codebook=lay["codebook_device"],
                                  shape=(int(n), *lay["shape"]), **{k: lay[k] for k in _HLWQ_META})
    return out


class _Bank:
    """Common part: field layout, device placement, slot buffers. Subclasses provide ``_host_row(e)``."""

    def __init__(self, specs, layout, n_experts, device=None):
        self.specs, self.layout, self.n_experts = list(specs), layout, int(n_experts)
        self.device = device or jax.devices()[0]
        self.device_sharding = jax.sharding.SingleDeviceSharding(self.device)
        for lay in self.layout.values():
            if lay["kind"] == "hlwq":
                lay["codebook_device"] = jax.device_put(jnp.asarray(lay["codebook"], jnp.float32),
                                                        self.device_sharding)

    @property
    def expert_nbytes(self) -> int:
        """Bytes moved per expert brought in."""
        return sum(s.nbytes for s in self.specs)

    @property
    def nbytes(self) -> int:
        return self.expert_nbytes * self.n_experts

    def _check_ids(self, experts):
        for e in experts:
            if not 0 <= int(e) < self.n_experts:
                raise ValueError(f"expert id {e} outside [0, {self.n_experts})")

    def fetch(self, experts: Sequence[int]) -> list[jax.Array]:
        """Device copies of the rows (uint8 [expert_nbytes]) of ``experts``, in ONE device_put; [] if none."""
        experts = [int(e) for e in experts]
        if not experts:
            return []
        self._check_ids(experts)
        return jax.device_put([self._host_row(e) for e in experts], self.device_sharding)

    def empty_slots(self, slots: int) -> list[jax.Array]:
        """Zero slot buffers [slots, ...] per field, on the device."""
        return [jax.device_put(jnp.zeros((slots, *s.shape), _np_dtype(s.dtype)), self.device_sharding)
                for s in self.specs]

    def build(self, fields: Sequence[jax.Array], n: int) -> dict:
        return build_weights(self.specs, self.layout, fields, n)

    def all_resident(self) -> dict:
        """Every expert on the device, stacked [E, ...] (the all-resident baseline)."""
        return self.build(_stack_split(tuple(self.fetch(range(self.n_experts))), specs=tuple(self.specs)),
                          self.n_experts)


@functools.partial(jax.jit, static_argnames=("specs",))
def _stack_split(rows, *, specs):
    return split_rows(specs, jnp.stack(rows))


class HostBank(_Bank):
    """One uint8 row per expert (``expert_row``) in host memory of kind ``memory_kind`` (default ``pinned_host``)."""

    def __init__(self, weights: dict, *, memory_kind: str = "pinned_host", device=None):
        specs, arrays, layout, n_exp = split_layer(weights)
        super().__init__(specs, layout, n_exp, device)
        kinds = {m.kind for m in self.device.addressable_memories()}
        if memory_kind not in kinds:
            raise ValueError(f"memory kind {memory_kind!r} not available on {self.device} (has {sorted(kinds)})")
        self.memory_kind = memory_kind
        host = jax.sharding.SingleDeviceSharding(self.device, memory_kind=memory_kind)
        # per expert one host row (a stacked host array cannot be sliced outside jit); one device_put for all
        self._rows = jax.device_put([expert_row([a[e] for a in arrays]) for e in range(n_exp)], host)

    @classmethod
    def from_rows(cls, specs, layout, rows: list[jax.Array], *, device=None) -> "HostBank":
        """Wrap already-placed per-expert host rows (uint8 [expert_nbytes], e.g. from ``expert_row``; used to build
        large banks without a stacked copy)."""
        self = cls.__new__(cls)
        _Bank.__init__(self, specs, layout, len(rows), device)
        bad = [i for i, r in enumerate(rows) if r.dtype != np.uint8 or r.shape != (self.expert_nbytes,)]
        if bad:
            raise ValueError(f"host bank: row {bad[0]} is {rows[bad[0]].dtype} {rows[bad[0]].shape}, expected uint8 "
                             f"({self.expert_nbytes},)")
        self.memory_kind = rows[0].sharding.memory_kind
        self._rows = list(rows)
        return self

    def _host_row(self, e: int):
        return self._rows[e]


class DiskBank(_Bank):
    """A bank memory-mapped from a directory written by ``DiskBank.save`` (``rows.bin``: the experts' rows, uint8
    [E, expert_nbytes], and a ``manifest.json``). Fetches read the rows through the OS page cache (pageable memory:
    slower than pinned), without a host copy."""

    def __init__(self, path: str | os.PathLike, *, device=None):
        path = os.fspath(path)
        man_path = os.path.join(path, "manifest.json")
        if not os.path.exists(man_path):
            raise ValueError(f"disk bank {path!r}: no manifest.json")
        with open(man_path) as f:
            man = json.load(f)
        specs = [FieldSpec(d["leaf"], d["attr"], tuple(d["shape"]), d["dtype"]) for d in man["fields"]]
        layout = man["layout"]
        for lay in layout.values():
            if lay["kind"] == "hlwq":
                lay["codebook"] = np.asarray(lay["codebook"], np.float32)
        super().__init__(specs, layout, man["n_experts"], device)
        fn = os.path.join(path, "rows.bin")
        want = self.expert_nbytes * self.n_experts
        if not os.path.exists(fn) or os.path.getsize(fn) != want:
            raise ValueError(f"disk bank {path!r}: {fn} missing or not {want} bytes")
        self._map = np.memmap(fn, dtype=np.uint8, mode="r", shape=(self.n_experts, self.expert_nbytes))

    @staticmethod
    def save(path: str | os.PathLike, weights: dict) -> None:
        """Write ``weights`` as a disk bank directory, atomically (temp directory, then ``os.replace``)."""
        path = os.fspath(path)
        specs, arrays, layout, n_exp = split_layer(weights)
        parent = os.path.dirname(os.path.abspath(path))
        tmp = tempfile.mkdtemp(prefix=".bank-", dir=parent)
        try:
            with open(os.path.join(tmp, "rows.bin"), "wb") as f:
                for e in range(n_exp):
                    expert_row([a[e] for a in arrays]).tofile(f)
            lay = {k: {**v, **({"codebook": v["codebook"].tolist()} if v["kind"] == "hlwq" else {})}
                   for k, v in layout.items()}
            man = {"n_experts": n_exp, "layout": lay, "fields": [dataclasses.asdict(s) for s in specs]}
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(man, f)
            os.chmod(tmp, 0o755)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _host_row(self, e: int):
        return self._map[e]
