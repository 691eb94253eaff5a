"""Routing traces as JSON lines (format: docs/offload_traces.md) — writer, validating reader, recorder, replay.

One line per (prompt, token, MoE layer):
``{"prompt": str, "phase": "prefill"|"decode", "pos": int, "layer": int, "experts": [int, ...], "weights": [float, ...]}``
(``weights`` optional, same length as ``experts``). Lines of one prompt are in time order: ``pos`` never decreases,
within one ``pos`` the layers strictly ascend, and no ``prefill`` line follows a ``decode`` line of the same prompt.
Prompts may interleave. No JAX import here (the recorder accepts anything ``numpy.asarray`` understands).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from hlwq_jax.offload import policy as P

PHASES = ("prefill", "decode")
_REQUIRED = ("prompt", "phase", "pos", "layer", "experts")
_KEYS = frozenset(_REQUIRED + ("weights",))


@dataclasses.dataclass(frozen=True)
class TraceRecord:
    prompt: str
    phase: str
    pos: int
    layer: int
    experts: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def to_json(self) -> str:
        d = {"prompt": self.prompt, "phase": self.phase, "pos": self.pos, "layer": self.layer,
             "experts": list(self.experts)}
        if self.weights is not None:
            d["weights"] = list(self.weights)
        return json.dumps(d, separators=(",", ":"))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_record(obj, where: str = "record") -> TraceRecord:
    """Validate one decoded JSON object; ``where`` prefixes every error (e.g. ``"trace.jsonl:12"``)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    if not isinstance(obj["prompt"], str):
        raise ValueError(f"{where}: field 'prompt' must be a string")
    if obj["phase"] not in PHASES:
        raise ValueError(f"{where}: field 'phase' must be one of {PHASES}, got {obj['phase']!r}")
    for k in ("pos", "layer"):
        if not _is_int(obj[k]) or obj[k] < 0:
            raise ValueError(f"{where}: field {k!r} must be a non-negative integer, got {obj[k]!r}")
    ex = obj["experts"]
    if not isinstance(ex, list) or not ex or not all(_is_int(e) and e >= 0 for e in ex):
        raise ValueError(f"{where}: field 'experts' must be a non-empty list of non-negative integers, got {ex!r}")
    if len(set(ex)) != len(ex):
        raise ValueError(f"{where}: field 'experts' repeats an expert: {ex}")
    w = obj.get("weights")
    if w is not None:
        if (not isinstance(w, list) or len(w) != len(ex)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in w)):
            raise ValueError(f"{where}: field 'weights' must be {len(ex)} finite numbers (one per expert), got {w!r}")
        w = tuple(float(v) for v in w)
    return TraceRecord(obj["prompt"], obj["phase"], obj["pos"], obj["layer"], tuple(ex), w)


class _OrderChecker:
    """Checks the per-prompt time order of records."""

    def __init__(self):
        self.last: dict[str, TraceRecord] = {}

    def check(self, r: TraceRecord, where: str) -> None:
        prev = self.last.get(r.prompt)
        if prev is not None:
            if prev.phase == "decode" and r.phase == "prefill":
                raise ValueError(f"{where}: prompt {r.prompt!r} has a prefill line after a decode line")
            if (r.pos, r.layer) <= (prev.pos, prev.layer):
                raise ValueError(f"{where}: prompt {r.prompt!r} goes back in time: (pos {r.pos}, layer {r.layer}) "
                                 f"after (pos {prev.pos}, layer {prev.layer})")
        self.last[r.prompt] = r


def iter_trace(path: str | os.PathLike) -> Iterator[TraceRecord]:
    """Yield validated records of a JSON-lines trace; errors name ``file:line``. Blank lines are skipped."""
    order = _OrderChecker()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            r = parse_record(obj, where)
            order.check(r, where)
            yield r


def read_trace(path: str | os.PathLike) -> list[TraceRecord]:
    return list(iter_trace(path))


def write_trace(path: str | os.PathLike, records: Iterable[TraceRecord]) -> None:
    """Validate and write atomically (temp file in the same directory, then ``os.replace``)."""
    path = os.fspath(path)
    order = _OrderChecker()
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".trace-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, r in enumerate(records):
                where = f"record {i}"
                r = parse_record(json.loads(r.to_json()), where)
                order.check(r, where)
                f.write(r.to_json() + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class TraceRecorder:
    """Collects records from a model run. Call ``record`` once per MoE layer call with host-readable arrays.

    ``record(prompt, phase, pos0, layer, experts [T, k], weights [T, k] | None)`` — token t has position pos0 + t.
    Records are re-ordered into the format's time order (per prompt: by pos, then layer) by ``records()``.
    """

    def __init__(self):
        self._recs: list[TraceRecord] = []

    def record(self, prompt: str, phase: str, pos0: int, layer: int, experts, weights=None) -> None:
        ex = np.asarray(experts)
        if ex.ndim == 1:
            ex = ex[None]
        if ex.ndim != 2:
            raise ValueError(f"TraceRecorder.record: experts must be [T, k], got shape {ex.shape}")
        w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(ex.shape)
        for t in range(ex.shape[0]):
            obj = {"prompt": prompt, "phase": phase, "pos": int(pos0) + t, "layer": int(layer),
                   "experts": [int(e) for e in ex[t]]}
            if w is not None:
                obj["weights"] = [float(v) for v in w[t]]
            self._recs.append(parse_record(obj, f"TraceRecorder (layer {layer}, pos {pos0 + t})"))

    def records(self) -> list[TraceRecord]:
        first = {}
        for i, r in enumerate(self._recs):
            first.setdefault(r.prompt, i)
        phase_rank = {"prefill": 0, "decode": 1}
        return sorted(self._recs, key=lambda r: (first[r.prompt], phase_rank[r.phase], r.pos, r.layer))

    def write(self, path) -> None:
        write_trace(path, self.records())


def _warm_counts(records, phase, per_prompt_cold, pos) -> dict[tuple[int, int], int]:
    """(layer, segment) -> number of leading steps with position < pos (checked to be a prefix)."""
    flags: dict[int, dict[str, list[bool]]] = {}
    for r in records:
        if phase is not None and r.phase != phase:
            continue
        flags.setdefault(r.layer, {}).setdefault(r.prompt if per_prompt_cold else "", []).append(r.pos < pos)
    out = {}
    for layer, segs in flags.items():
        for i, f in enumerate(segs.values()):
            n = sum(f)
            if any(f[n:]):
                raise ValueError(f"layer {layer}: lines before position {pos} are not all ahead of the others")
            out[(layer, i)] = n
    return out


@dataclasses.dataclass(frozen=True)
class LayerReplay:
    layer: int
    accesses: int
    misses: int


def layer_segments(records: Sequence[TraceRecord], *, phase: str | None = None,
                   per_prompt_cold: bool = False) -> dict[int, list[list[tuple[int, ...]]]]:
    """Per layer, the access steps in file order, cut into segments that start with a cold cache (one segment, or
    one per prompt with ``per_prompt_cold``). ``phase`` keeps only that phase's lines."""
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    out: dict[int, dict[str, list]] = {}
    for r in records:
        if phase is not None and r.phase != phase:
            continue
        key = r.prompt if per_prompt_cold else ""
        out.setdefault(r.layer, {}).setdefault(key, []).append(r.experts)
    return {layer: list(segs.values()) for layer, segs in sorted(out.items())}


def replay_records(records: Sequence[TraceRecord], policy: str, slots: int, *, phase: str | None = None,
                   per_prompt_cold: bool = False, count_from_pos: int = 0) -> list[LayerReplay]:
    """Replay per layer (one cache per MoE layer) against ``policy``; returns per-layer counts. Lines with
    ``pos < count_from_pos`` only warm the caches (not counted); they must precede the counted ones in each layer."""
    res = []
    warm = {} if not count_from_pos else _warm_counts(records, phase, per_prompt_cold, count_from_pos)
    for layer, segs in layer_segments(records, phase=phase, per_prompt_cold=per_prompt_cold).items():
        acc = mis = 0
        for i, steps in enumerate(segs):
            try:
                r = P.replay(steps, policy, slots, count_from=warm.get((layer, i), 0))
            except ValueError as e:
                raise ValueError(f"layer {layer}: {e}") from None
            acc, mis = acc + r.accesses, mis + r.misses
        res.append(LayerReplay(layer, acc, mis))
    return res


def static_pins(records: Sequence[TraceRecord], slots: int, *, phase: str | None = None) -> list[list[int]]:
    """Per MoE layer (0..max layer), the ``slots - k`` most frequent experts of the trace (k = the widest step):
    the ``pinned`` argument of the ``static`` policy, profiled offline."""
    segs = layer_segments(records, phase=phase)
    n = max(segs, default=-1) + 1
    out = []
    for layer in range(n):
        steps = [s for seg in segs.get(layer, []) for s in seg]
        width = max((len(s) for s in steps), default=0)
        out.append(P.most_frequent(steps, slots - width))
    return out
