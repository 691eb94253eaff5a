"""Drive the routed experts of several MoE layers through per-layer caches (decode loop, prefetch, traces).

``OffloadedMoE`` owns one ``LayerCache`` per MoE layer. A model calls ``routed(l, h, ids, weights)`` in place of its
all-resident routed-experts call (the router and the shared expert stay in the model); with ``prefetch`` it also
passes the next MoE layer's router output for the same hidden state (``next_ids``), whose non-resident experts are
sent to the device before layer l's expert compute is dispatched, so the copy overlaps that compute.

``moe_only_decode_step`` is the stand-in model used by the benchmark when no full model is at hand: L MoE layers
with pre-RMS-norm residuals, h = rms(x); x += routed(h) — real expert shapes and router, no attention/Mamba.

Speculative mode (``OffloadConfig.speculative``, stand-in model only): the per-layer loop reads each layer's routed
ids to the host before it can run the layer (L syncs per token). Instead, ``speculative_stack`` runs ALL L layers in
ONE jitted call with the current expert→slot maps: per layer it routes, looks the ids up in the slot map, runs the
routed FFN on the slot buffers (absent experts read slot 0: garbage, detected) and records ``all_hit`` and the ids.
ONE host read (flags + ids) follows. If every layer hit, the output is accepted and each layer's policy gets the same
access step the per-layer path would have made. If layer L missed, the outputs of layers ≥ L are discarded: layers
< L are accepted as above, layer L runs through ``cached_moe`` with its recorded ids (installs its misses; the ids
are exact since layers < L are), and layers > L continue on the per-layer path. Each layer is computed by the same
jitted functions either way, so the output equals the all-resident output bit for bit (tests check it on CPU; the
benchmark checks it on the GPU: ``exact``). Costs: a token with a miss pays one wasted speculative pass.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.nn.moe import MoEConfig, route
from hlwq_jax.offload.bank import _Bank
from hlwq_jax.offload.expert_cache import ExpertsFn, LayerCache, LayerStats, cached_moe, routed_experts
from hlwq_jax.offload.trace import TraceRecorder


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """slots: device slots per MoE layer; policy: a name from ``policy.POLICIES``; prefetch: next-layer router
    prefetch; sync_timing: block on every transfer to time it (serialises; for diagnostics); speculative: run all MoE
    layers of a token in one jitted call and read routing once per token (module docstring; stand-in model only)."""
    slots: int
    policy: str = "lru"
    prefetch: bool = False
    sync_timing: bool = False
    speculative: bool = False


@dataclasses.dataclass
class SpecStats:
    """Per-stack counters. tokens: forwards through ``moe_only_decode_step``; host_reads: device→host reads of
    routing made by the stack (both modes); read_s: host time blocked in them; accepts / rollbacks: speculative
    forwards kept whole / cut at a missing layer; resumed_layers: layers run on the per-layer path after rollbacks
    (the missing layer included)."""
    tokens: int = 0
    host_reads: int = 0
    read_s: float = 0.0
    accepts: int = 0
    rollbacks: int = 0
    resumed_layers: int = 0

    def minus(self, other: "SpecStats") -> "SpecStats":
        return SpecStats(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                            for f in dataclasses.fields(self)})


def host_read(tree):
    """The stack's device→host read of routing (ONE ``jax.device_get`` call for the whole tree)."""
    return jax.device_get(tree)


@functools.partial(jax.jit, static_argnames=("k", "scale"))
def sigmoid_topk_route(h: jax.Array, gate: jax.Array, bias: jax.Array, *, k: int, scale: float = 2.5):
    """The Nemotron-H router (``hlwq_jax.nn.moe.route``) for the stand-in model: h [T, D], gate [E, D], bias [E] ->
    (ids int32 [T, k], weights float32 [T, k]); normalised top-k sigmoid scores × ``scale``."""
    cfg = MoEConfig(hidden=h.shape[-1], num_experts=gate.shape[0], top_k=k, expert_dim=1, routed_scaling=scale)
    w, ids = route({"router": gate, "router_bias": bias}, h, cfg)  # expert_dim is unused by the router
    return ids, w


def rms(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Weightless RMS norm in float32, cast back to x.dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype)


class OffloadedMoE:
    """Per-layer expert caches for ``banks`` (one bank per MoE layer, in MoE-layer order)."""

    def __init__(self, banks: Sequence[_Bank], cfg: OffloadConfig, experts_fn: ExpertsFn = routed_experts,
                 recorder: TraceRecorder | None = None, policy_kw: dict | Sequence[dict] | None = None):
        """policy_kw: keyword arguments of the policy, one dict for all layers or one per layer (e.g. ``static``:
        ``[{"pinned": [...]}, ...]`` from ``trace.static_pins``)."""
        self.cfg, self.experts_fn, self.recorder = cfg, experts_fn, recorder
        kws = [dict(policy_kw or {})] * len(banks) if policy_kw is None or isinstance(policy_kw, dict) \
            else [dict(k) for k in policy_kw]
        if len(kws) != len(banks):
            raise ValueError(f"policy_kw has {len(kws)} entries for {len(banks)} MoE layers")
        self.caches = [LayerCache(b, cfg.slots, cfg.policy, sync_timing=cfg.sync_timing, **kw)
                       for b, kw in zip(banks, kws)]
        self.spec = SpecStats()
        self._pending: list[tuple[int, list[int]]] = []  # accepted all-hit access steps not yet given to policies
        self._smaps: tuple[tuple | None, jax.Array | None] = (None, None)  # cache versions, device maps [L, E]

    def _read(self, tree, cache: LayerCache | None = None):
        t0 = time.perf_counter()
        out = host_read(tree)
        dt = time.perf_counter() - t0
        self.spec.host_reads += 1
        self.spec.read_s += dt
        if cache is not None:
            cache.stats.wait_s += dt
        return out

    def apply_pending(self) -> None:
        """Give the policies the access steps of accepted speculative layers (all hits, in order). Deferred so that
        this host work overlaps the next token's speculative call; done before any other access, so every
        policy sees exactly the per-layer path's sequence of steps."""
        for l, experts in self._pending:
            cache = self.caches[l]
            cache.stats.groups += 1
            cache.ensure(experts)
        self._pending.clear()

    def device_slot_maps(self) -> jax.Array:
        """int32 [L, E] expert→slot maps of all layers on the device (−1: absent); re-sent only after a change."""
        versions = tuple(c.version for c in self.caches)
        if versions != self._smaps[0]:
            host = np.stack([c.slot_map() for c in self.caches])
            self._smaps = (versions, jax.device_put(host, self.caches[0].bank.device_sharding))
        return self._smaps[1]

    def routed(self, l: int, h: jax.Array, ids: jax.Array, weights: jax.Array, *, next_ids: jax.Array | None = None,
               trace: tuple[str, str, int] | None = None) -> jax.Array:
        """Routed experts of MoE layer ``l`` (float32 [T, D]); ``trace=(prompt, phase, pos0)`` records routing."""
        self.apply_pending()
        cache = self.caches[l]
        want_w = self.recorder is not None and trace is not None
        # the one device→host sync of this layer (waits for the queued compute)
        host_ids, host_next, host_w = self._read((ids, next_ids, weights if want_w else None), cache)
        host_ids = np.asarray(host_ids)
        if want_w:
            self.recorder.record(trace[0], trace[1], trace[2], l, host_ids, np.asarray(host_w))
        before = None
        if host_next is not None and l + 1 < len(self.caches):
            nxt = self.caches[l + 1]
            before = lambda: nxt.prefetch(host_next.reshape(-1).tolist())  # noqa: E731
        return cached_moe(cache, h, ids, weights, self.experts_fn, host_ids=host_ids, before_compute=before)

    def stats(self) -> list[LayerStats]:
        self.apply_pending()
        return [dataclasses.replace(c.stats) for c in self.caches]

    def end_step(self) -> None:
        """Call after each forward: unused prefetches are dropped (counted as wasted)."""
        for c in self.caches:
            c.drop_staged()


def moe_only_decode_step(moe: OffloadedMoE, routers: Sequence[tuple], x: jax.Array, k: int, *,
                         trace: tuple[str, str, int] | None = None) -> jax.Array:
    """One forward of the MoE-only stand-in model through the caches. x [T, D]; routers [(gate [E, D], bias [E])].
    Per layer: one jitted call (previous residual + pre-norm + router), the id read, the cached routed experts.
    With ``moe.cfg.speculative``: ``speculative_decode_step``."""
    if len(routers) != len(moe.caches):
        raise ValueError(f"stand-in model: {len(routers)} routers for {len(moe.caches)} MoE layers")
    if moe.cfg.speculative:
        return speculative_decode_step(moe, routers, x, k, trace=trace)
    moe.spec.tokens += 1
    return _layers_from(moe, routers, 0, x, None, k, trace)


def _layers_from(moe, routers, start, x, y, k, trace):
    """The per-layer path from MoE layer ``start`` on (x: residual before ``start``'s pre-add of y); ends the step."""
    for l in range(start, len(routers)):
        gate, bias = routers[l]
        nxt = None
        if moe.cfg.prefetch and l + 1 < len(routers):
            x, h, ids, w, nxt = route_layer_with_prediction(x, y, gate, bias, *routers[l + 1], k=k)
        else:
            x, h, ids, w = route_layer(x, y, gate, bias, k=k)
        y = moe.routed(l, h, ids, w, next_ids=nxt, trace=trace)
    moe.end_step()
    return residual_add(x, y)


@functools.partial(jax.jit, static_argnames=("k",))
def speculative_stack(x, routers, smaps, slot_weights, *, k):
    """All L layers of the stand-in model in one call, on the slot buffers as they are.

    x [T, D]; routers [(gate [E, D], bias [E])] × L; smaps int32 [L, E] (slot of each expert, −1 absent);
    slot_weights: per layer the slot-buffer weight dict (leading dim C). Returns (out [T, D], xs [L, T, D],
    hs [L, T, D], ws f32 [L, T, k], info int32 [L, T·k + 1]): per layer the residual after its pre-add, the normed
    input and the routing weights (what the per-layer path computes; valid up to and including the first missing
    layer), and the routed ids, flattened, then the layer's all-hit flag (1 = every routed expert resident).
    Stacked outputs keep the per-call output count (and its dispatch cost) independent of L.
    """
    # optimization barriers at the per-layer path's call boundaries keep XLA from fusing across them, so each
    # layer's two calls compile as they do alone (bit-identical results, also where fusion would change rounding)
    barrier = jax.lax.optimization_barrier
    y, xs, hs, ws, info = None, [], [], [], []
    for l, ((gate, bias), wl) in enumerate(zip(routers, slot_weights)):
        x, h, ids, w = barrier(route_layer(x, y, gate, bias, k=k))
        sid = smaps[l][ids]  # [T, k]
        hit = jnp.all(sid >= 0)
        y = barrier(routed_experts(h, jnp.where(sid >= 0, sid, 0), w, wl))
        xs.append(x)
        hs.append(h)
        ws.append(w)
        info.append(jnp.concatenate([ids.reshape(-1).astype(jnp.int32), hit.astype(jnp.int32)[None]]))
    return residual_add(x, y), jnp.stack(xs), jnp.stack(hs), jnp.stack(ws), jnp.stack(info)


def speculative_decode_step(moe: OffloadedMoE, routers: Sequence[tuple], x: jax.Array, k: int, *,
                            trace: tuple[str, str, int] | None = None) -> jax.Array:
    """``moe_only_decode_step`` with one speculative call and ONE host read per token when every layer hits.

    On a miss at layer L: layers < L are accepted, layer L runs through ``cached_moe`` with its recorded ids, the
    rest on the per-layer path. Policy access steps equal the per-layer path's, in the same order per layer; those
    of accepted layers are applied while the next token's speculative call runs (``apply_pending``; pending steps
    are all hits, so the slot maps the call uses stay valid).
    """
    n_layers = len(routers)
    smaps = moe.device_slot_maps()
    out, xs, hs, ws, info = speculative_stack(x, list(routers), smaps, [c.weights() for c in moe.caches], k=k)
    moe.apply_pending()  # the previous token's policy updates, overlapping this call
    want_w = moe.recorder is not None and trace is not None
    info_h, ws_h = moe._read((info, ws if want_w else None))
    t = x.shape[0]
    ids_h = info_h[:, :-1].reshape(n_layers, t, k)
    missed = np.flatnonzero(info_h[:, -1] == 0)
    stop = int(missed[0]) if missed.size else n_layers
    for l in range(stop):  # accepted layers: every routed expert resident -> one group, all hits
        moe._pending.append((l, list(dict.fromkeys(ids_h[l].reshape(-1).tolist()))))
        if want_w:
            moe.recorder.record(trace[0], trace[1], trace[2], l, ids_h[l], ws_h[l])
    moe.spec.tokens += 1
    if stop == n_layers:
        moe.spec.accepts += 1
        moe.end_step()
        return out
    moe.spec.rollbacks += 1
    moe.spec.resumed_layers += n_layers - stop
    moe.apply_pending()
    if want_w:
        moe.recorder.record(trace[0], trace[1], trace[2], stop, ids_h[stop], ws_h[stop])
    x_l, h_l, w_l = _layer_state(xs, hs, ws, stop)
    y = cached_moe(moe.caches[stop], h_l, ids_h[stop], w_l, moe.experts_fn, host_ids=ids_h[stop])
    if stop + 1 == n_layers:
        moe.end_step()
        return residual_add(x_l, y)
    return _layers_from(moe, routers, stop + 1, x_l, y, k, trace)


@jax.jit
def _layer_state(xs, hs, ws, l):
    """Layer l's rows of the speculative pass's stacked states (a copy: bit-identical values)."""
    return xs[l], hs[l], ws[l]


def _pre(x, y):
    return x if y is None else x + y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("k",))
def route_layer(x, y, gate, bias, *, k):
    """x += y (the previous MoE layer's routed output, or None), pre-norm, route — one call.
    x [T, D] -> (x [T, D], h [T, D], ids int32 [T, k], weights f32 [T, k])."""
    x = _pre(x, y)
    h = rms(x)
    return (x, h, *sigmoid_topk_route(h, gate, bias, k=k))


@functools.partial(jax.jit, static_argnames=("k",))
def route_layer_with_prediction(x, y, gate, bias, next_gate, next_bias, *, k):
    """``route_layer`` plus the next MoE layer's router applied to the same h (the prefetch prediction)."""
    x = _pre(x, y)
    h = rms(x)
    return (x, h, *sigmoid_topk_route(h, gate, bias, k=k), sigmoid_topk_route(h, next_gate, next_bias, k=k)[0])


@jax.jit
def residual_add(x, y):
    return x + y.astype(x.dtype)


def eager_resident_step(full: Sequence[dict], routers: Sequence[tuple], x: jax.Array, k: int) -> jax.Array:
    """The all-resident stand-in model with exactly the cached loop's calls (the bit-exact reference)."""
    y = None
    for (gate, bias), wl in zip(routers, full):
        x, h, ids, w = route_layer(x, y, gate, bias, k=k)
        y = routed_experts(h, ids, w, wl)
    return residual_add(x, y)


@functools.partial(jax.jit, static_argnames=("k",))
def resident_decode_step(weights: list, routers: list, x: jax.Array, *, k: int) -> jax.Array:
    """The all-resident stand-in model as ONE jitted call (same routed kernel); weights: per layer
    {"up_proj", "down_proj"}."""
    for (gate, bias), wl in zip(routers, weights):
        h = rms(x)
        ids, w = sigmoid_topk_route(h, gate, bias, k=k)
        x = x + routed_experts(h, ids, w, wl).astype(x.dtype)
    return x
