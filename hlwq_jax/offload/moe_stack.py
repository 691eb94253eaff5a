"""Drive the routed experts of several MoE layers through per-layer caches (decode loop, prefetch, traces).

``OffloadedMoE`` owns one ``LayerCache`` per MoE layer. A model calls ``routed(l, h, ids, weights)`` in place of its
all-resident routed-experts call (the router and the shared expert stay in the model); with ``prefetch`` it also
passes the next MoE layer's router output for the same hidden state (``next_ids``), whose non-resident experts are
sent to the device before layer l's expert compute is dispatched, so the copy overlaps that compute.

``moe_only_decode_step`` is the stand-in model used by the benchmark when no full model is at hand: L MoE layers
with pre-RMS-norm residuals, h = rms(x); x += routed(h) — real expert shapes and router, no attention/Mamba.
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
    prefetch; sync_timing: block on every transfer to time it (serialises; for diagnostics)."""
    slots: int
    policy: str = "lru"
    prefetch: bool = False
    sync_timing: bool = False


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

    def routed(self, l: int, h: jax.Array, ids: jax.Array, weights: jax.Array, *, next_ids: jax.Array | None = None,
               trace: tuple[str, str, int] | None = None) -> jax.Array:
        """Routed experts of MoE layer ``l`` (float32 [T, D]); ``trace=(prompt, phase, pos0)`` records routing."""
        cache = self.caches[l]
        t0 = time.perf_counter()
        host_ids = np.asarray(ids)  # the one device→host sync of this layer (waits for the queued compute)
        cache.stats.wait_s += time.perf_counter() - t0
        host_next = None if next_ids is None else np.asarray(next_ids)
        if self.recorder is not None and trace is not None:
            self.recorder.record(trace[0], trace[1], trace[2], l, host_ids, np.asarray(weights))
        before = None
        if host_next is not None and l + 1 < len(self.caches):
            nxt = self.caches[l + 1]
            before = lambda: nxt.prefetch(host_next.reshape(-1).tolist())  # noqa: E731
        return cached_moe(cache, h, ids, weights, self.experts_fn, host_ids=host_ids, before_compute=before)

    def stats(self) -> list[LayerStats]:
        return [dataclasses.replace(c.stats) for c in self.caches]

    def end_step(self) -> None:
        """Call after each forward: unused prefetches are dropped (counted as wasted)."""
        for c in self.caches:
            c.drop_staged()


def moe_only_decode_step(moe: OffloadedMoE, routers: Sequence[tuple], x: jax.Array, k: int, *,
                         trace: tuple[str, str, int] | None = None) -> jax.Array:
    """One forward of the MoE-only stand-in model through the caches. x [T, D]; routers [(gate [E, D], bias [E])].
    Per layer: one jitted call (previous residual + pre-norm + router), the id read, the cached routed experts."""
    y = None
    for l, (gate, bias) in enumerate(routers):
        nxt = None
        if moe.cfg.prefetch and l + 1 < len(routers):
            x, h, ids, w, nxt = route_layer_with_prediction(x, y, gate, bias, *routers[l + 1], k=k)
        else:
            x, h, ids, w = route_layer(x, y, gate, bias, k=k)
        y = moe.routed(l, h, ids, w, next_ids=nxt, trace=trace)
    moe.end_step()
    return residual_add(x, y)


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
