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

Transfer paths (``transfer``, an explicit option of ``HostBank``; ``TRANSFERS``):
- ``"rows"``: one host array per expert; a miss set is ONE ``device_put`` of the list of rows, then one
  jitted install (two dispatches per layer with misses). H200: 0.480 ms per bf16 miss (raw PCIe 0.37 ms), 0.277 ms
  per Q5 miss (raw 0.127 ms) — ~0.11-0.15 ms per missed expert of overhead that is not bandwidth.
- ``"stacked-jit"`` (``HostBank``'s default): the layer's bank is ONE host array uint8 [E, expert_nbytes]
  (``stacked``); a miss set is fetched and installed by ONE jitted, donated XLA program
  (``expert_cache._gather_install``): per miss a ``dynamic_slice`` of the host array at a runtime expert id, moved
  to device memory inside jit (``gather_host_rows``: XLA's host-offload pass ends a host path at "dynamic-slice of a
  host parameter feeding a move-to-device", so each row is one host→device copy; whether XLA GPU does it as a DMA or
  a kernel reading over PCIe is not verified on CPU), split into fields and scattered into the slots. Miss lists are
  padded to ``transfer_length`` entries (exact up to ``EXACT_LENGTHS``, then powers of two ≤ C) so few programs
  compile; padded entries target slot C (out of range: dropped by the scatter) but still copy a row. H200
  (results/offload_h200_spec.jsonl, same run shape as "rows" above): 0.421 ms per bf16 miss (1.14× raw), 0.091 ms
  per Q5 miss (the per-layer loop's host latency hides part of the copy: below raw); XLA GPU compiles the in-jit
  host slices. On the CPU backend every memory kind is plain RAM: tests there check results, not speed.
  ``DiskBank`` supports only ``"rows"`` (a memory map is not a pinned-host array).
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
TRANSFERS = ("rows", "stacked-jit")
EXACT_LENGTHS = 8  # miss lists up to this length compile exactly (batch-1 decode misses ≤ top_k per layer)


def check_transfer(transfer: str, what: str = "bank") -> str:
    if transfer not in TRANSFERS:
        raise ValueError(f"{what}: unknown transfer {transfer!r} (known: {list(TRANSFERS)})")
    return transfer


def transfer_length(m: int, cap: int | None = None) -> int:
    """Padded length of a list of m ≥ 1 rows for the stacked-jit path: m itself up to ``EXACT_LENGTHS`` (no padded
    row, no wasted copy), else the next power of two, capped at ``cap`` (the slot count; ≥ m)."""
    if m < 1 or (cap is not None and cap < m):
        raise ValueError(f"transfer length: need 1 <= m <= cap, got m={m}, cap={cap}")
    if m <= EXACT_LENGTHS:
        return m
    p = 1 << (m - 1).bit_length()
    return p if cap is None else min(p, cap)


def transfer_lengths(cap: int) -> list[int]:
    """Every padded length ``transfer_length`` can return for 1 ≤ m ≤ cap (the programs to precompile)."""
    return sorted({transfer_length(m, cap) for m in range(1, cap + 1)})


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


def gather_host_rows(stacked: jax.Array, ids: jax.Array) -> jax.Array:
    """Traceable (inside jit): rows ``ids`` of a host-memory bank -> device uint8 [M, expert_nbytes].

    stacked: uint8 [E, expert_nbytes] whose sharding has a host memory kind; ids int32 [M] (device). One
    ``dynamic_slice`` of the host array per id, each moved to device memory by an in-jit ``device_put`` (one
    host→device copy per row; a gather on the host array would need host-memory indices, and XLA's host-offload pass
    runs any op other than (dynamic-)slice on host memory as host compute). Ids are clamped by ``dynamic_slice``:
    callers validate them."""
    rows = [jax.device_put(jax.lax.dynamic_slice_in_dim(stacked, ids[i], 1, axis=0), jax.memory.Space.Device)
            for i in range(ids.shape[0])]
    return jnp.concatenate(rows)


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


def _build_plan(specs: Sequence[FieldSpec], layout: dict) -> list[tuple]:
    """Per leaf (``build_weights``' order): (name, field indices, None for a plain array or the HLWQArray's static
    arguments {"shape": per-expert shape, "kw": codebook + metadata})."""
    where: dict[str, dict[str, int]] = {}
    for i, s in enumerate(specs):
        where.setdefault(s.leaf, {})[s.attr] = i
    plan = []
    for name, f in where.items():
        lay = layout[name]
        if lay["kind"] == "array":
            plan.append((name, (f[""],), None))
        else:
            kw = {"codebook": lay["codebook_device"], **{k: lay[k] for k in _HLWQ_META}}
            plan.append((name, (f["packed"], f["norms"]), {"shape": tuple(lay["shape"]), "kw": kw}))
    return plan


class _Bank:
    """Common part: field layout, device placement, slot buffers, the ``"rows"`` transfer (subclasses provide
    ``_host_row(e)``). ``transfer`` names the path the caches use (module docstring)."""

    transfer = "rows"

    def __init__(self, specs, layout, n_experts, device=None):
        self.specs, self.layout, self.n_experts = list(specs), layout, int(n_experts)
        self.device = device or jax.devices()[0]
        self.device_sharding = jax.sharding.SingleDeviceSharding(self.device)
        for lay in self.layout.values():
            if lay["kind"] == "hlwq":
                lay["codebook_device"] = jax.device_put(jnp.asarray(lay["codebook"], jnp.float32),
                                                        self.device_sharding)
        self._expert_nbytes = sum(s.nbytes for s in self.specs)
        self._plan = _build_plan(self.specs, self.layout)

    @property
    def expert_nbytes(self) -> int:
        """Bytes moved per expert brought in."""
        return self._expert_nbytes

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
        """``build_weights(self.specs, self.layout, fields, n)`` from a plan made once per bank (a cache rebuilds its
        weight dict after every install, on the per-layer path's critical host path)."""
        if len(fields) != len(self.specs):
            raise ValueError(f"expert bank: {len(fields)} field arrays for {len(self.specs)} fields")
        out = {}
        for name, idx, static in self._plan:
            if static is None:
                out[name] = fields[idx[0]]
            else:
                out[name] = HLWQArray(packed=fields[idx[0]], norms=fields[idx[1]], shape=(int(n), *static["shape"]),
                                      **static["kw"])
        return out

    def all_resident(self) -> dict:
        """Every expert on the device, stacked [E, ...] (the all-resident baseline)."""
        return self.build(_stack_split(tuple(self.fetch(range(self.n_experts))), specs=tuple(self.specs)),
                          self.n_experts)


@functools.partial(jax.jit, static_argnames=("specs",))
def _stack_split(rows, *, specs):
    return split_rows(specs, jnp.stack(rows))


@functools.partial(jax.jit, static_argnames=("specs",))
def _split(rows, *, specs):
    return split_rows(specs, rows)


@jax.jit
def _gather_rows(stacked, ids):
    """Rows ``ids`` (int32 [M]) of a host bank [E, expert_nbytes] as M device rows, in one program."""
    rows = gather_host_rows(stacked, ids)
    return tuple(rows[i] for i in range(rows.shape[0]))


class HostBank(_Bank):
    """A layer's experts in host memory of kind ``memory_kind`` (default ``pinned_host``), laid out for ``transfer``:
    ``"rows"``: one uint8 row array [expert_nbytes] per expert (``expert_row``); ``"stacked-jit"``: ONE uint8 array
    [E, expert_nbytes] (``stacked``) read inside jit (module docstring)."""

    def __init__(self, weights: dict, *, memory_kind: str = "pinned_host", device=None,
                 transfer: str = "stacked-jit"):
        check_transfer(transfer, "host bank")
        specs, arrays, layout, n_exp = split_layer(weights)
        super().__init__(specs, layout, n_exp, device)
        host = self._host_sharding(memory_kind)
        rows = [expert_row([a[e] for a in arrays]) for e in range(n_exp)]
        if transfer == "rows":
            # per expert one host row (a stacked host array cannot be sliced outside jit); one device_put for all
            self._rows = jax.device_put(rows, host)
        else:
            self._place_stacked(np.stack(rows), host)

    def _host_sharding(self, memory_kind: str):
        kinds = {m.kind for m in self.device.addressable_memories()}
        if memory_kind not in kinds:
            raise ValueError(f"memory kind {memory_kind!r} not available on {self.device} (has {sorted(kinds)})")
        self.memory_kind = memory_kind
        return jax.sharding.SingleDeviceSharding(self.device, memory_kind=memory_kind)

    def _place_stacked(self, stacked: np.ndarray, host) -> None:
        self.transfer = "stacked-jit"
        self._stacked = jax.device_put(stacked, host)

    @classmethod
    def from_rows(cls, specs, layout, rows: list[jax.Array], *, device=None) -> "HostBank":
        """Wrap already-placed per-expert host rows (uint8 [expert_nbytes], e.g. from ``expert_row``; used to build
        large banks without a stacked copy). Transfer ``"rows"``."""
        self = cls.__new__(cls)
        _Bank.__init__(self, specs, layout, len(rows), device)
        bad = [i for i, r in enumerate(rows) if r.dtype != np.uint8 or r.shape != (self.expert_nbytes,)]
        if bad:
            raise ValueError(f"host bank: row {bad[0]} is {rows[bad[0]].dtype} {rows[bad[0]].shape}, expected uint8 "
                             f"({self.expert_nbytes},)")
        self.memory_kind = rows[0].sharding.memory_kind
        self._rows = list(rows)
        return self

    @classmethod
    def from_stacked(cls, specs, layout, stacked: np.ndarray, *, memory_kind: str = "pinned_host",
                     device=None) -> "HostBank":
        """A ``"stacked-jit"`` bank from the experts' rows stacked on the host, numpy uint8 [E, expert_nbytes]
        (row e = ``expert_row`` of expert e), copied into one host array of kind ``memory_kind``."""
        self = cls.__new__(cls)
        _Bank.__init__(self, specs, layout, len(stacked), device)
        if not isinstance(stacked, np.ndarray) or stacked.dtype != np.uint8 or stacked.ndim != 2 \
                or stacked.shape[1] != self.expert_nbytes:
            raise ValueError(f"host bank: stacked rows must be a numpy uint8 [E, {self.expert_nbytes}] array, got "
                             f"{type(stacked).__name__} {getattr(stacked, 'dtype', None)} "
                             f"{getattr(stacked, 'shape', None)}")
        self._place_stacked(stacked, self._host_sharding(memory_kind))
        return self

    @property
    def stacked(self) -> jax.Array:
        """The ``"stacked-jit"`` bank: uint8 [E, expert_nbytes] in host memory."""
        if self.transfer != "stacked-jit":
            raise ValueError(f"host bank: transfer is {self.transfer!r}; only a 'stacked-jit' bank has a stacked "
                             "array")
        return self._stacked

    @property
    def host_arrays(self) -> list[jax.Array]:
        """The bank's host arrays (per-expert rows, or the one stacked array)."""
        return list(self._rows) if self.transfer == "rows" else [self._stacked]

    def _host_row(self, e: int):
        if self.transfer != "rows":
            raise ValueError("host bank: a 'stacked-jit' bank has no per-expert host rows")
        return self._rows[e]

    def fetch(self, experts: Sequence[int]) -> list[jax.Array]:
        """Device copies of the rows of ``experts`` (uint8 [expert_nbytes] each); [] if none. ``"rows"``: ONE
        device_put; ``"stacked-jit"``: ONE jitted gather (``transfer_length`` entries, padding discarded; used for
        prefetch — misses go through ``expert_cache._gather_install``)."""
        if self.transfer == "rows":
            return super().fetch(experts)
        experts = [int(e) for e in experts]
        if not experts:
            return []
        self._check_ids(experts)
        m = len(experts)
        ids = np.asarray(experts + [experts[-1]] * (transfer_length(m) - m), np.int32)
        return list(_gather_rows(self._stacked, ids)[:m])

    def all_resident(self) -> dict:
        if self.transfer == "rows":
            return super().all_resident()
        rows = jax.device_put(self._stacked, self.device_sharding)  # the whole bank, one copy
        return self.build(_split(rows, specs=tuple(self.specs)), self.n_experts)


class DiskBank(_Bank):
    """A bank memory-mapped from a directory written by ``DiskBank.save`` (``rows.bin``: the experts' rows, uint8
    [E, expert_nbytes], and a ``manifest.json``). Fetches read the rows through the OS page cache (pageable memory:
    slower than pinned), without a host copy. Transfer ``"rows"`` only (``"stacked-jit"`` raises ValueError)."""

    def __init__(self, path: str | os.PathLike, *, device=None, transfer: str = "rows"):
        if check_transfer(transfer, "disk bank") != "rows":
            raise ValueError(f"disk bank: transfer {transfer!r} is not supported (only 'rows': the in-jit gather needs "
                             "the bank as one pinned-host array; load the experts into a HostBank for 'stacked-jit')")
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
