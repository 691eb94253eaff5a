"""Drive the routed experts of several MoE layers through per-layer caches (decode loop, prefetch, traces).

``OffloadedMoE`` owns one ``LayerCache`` per MoE layer. A model calls ``routed(l, h, ids, weights)`` in place of its
all-resident routed-experts call (the router and the shared expert stay in the model); with ``prefetch`` it also
passes the next MoE layer's router output for the same hidden state (``next_ids``), whose non-resident experts are
sent to the device before layer l's expert compute is dispatched, so the copy overlaps that compute.

``moe_only_decode`` is the stand-in model used by the benchmark when no full model is at hand: L MoE layers with
pre-RMS-norm residuals, h = rms(x); x += routed(h) — real expert shapes and router, no attention/Mamba; each token's
input is its embedding plus a small term of the previous token's output (``token_input``), so tokens depend on each
other as in a real decode loop and every token's input stays on the device.

Transfers: every install (misses, preload, speculative repairs) goes through ``LayerCache.ensure`` and so through
the banks' transfer path (``HostBank(..., transfer="rows" | "stacked-jit")``, bank.py); nothing here depends on it.

Speculative mode of the stand-in model (``OffloadConfig.speculative``; the hybrid model's is in nemotron.py): the
per-layer loop reads each layer's routed ids to the host before it can run the layer (L syncs per token). Instead,
``speculative_stack`` runs ALL L layers in ONE jitted call with the current expert→slot maps: per layer it routes,
looks the ids up in the slot map and runs the routed FFN on the slot buffers (absent experts read slot 0: garbage,
detected). It returns only the output and one int32 code per routed id (the id, or ``~id`` where the expert is
absent) — no per-layer states — and ONE host read of the codes follows. If every layer hit, the output is accepted
and each layer's policy gets the same access step the per-layer path would have made. If layer L missed, the pass's
output is discarded: layers < L are accepted as above and recomputed from the pass's input by the per-layer path's
calls on their slots (resident, unchanged; no host read), layer L runs through ``cached_moe`` with its recorded ids
(installs its misses; the ids are exact since layers < L are), and layers > L continue on the per-layer path. Each
layer is computed by the same jitted functions either way (the pass keeps their call boundaries with optimization
barriers), so the output equals the all-resident output bit for bit (tests check it on CPU; the benchmark checks it
on the GPU: ``exact``).

Pipelining (``speculative_decode``): token t+1's speculative call is dispatched on token t's speculative output,
still on the device, BEFORE t's codes are read, so the host's read, policy updates and next dispatch overlap
device work instead of leaving the GPU idle between tokens. If t is accepted, t+1's call stands. If t missed, t+1's
call is discarded (its input and slot maps are stale; counted in ``SpecStats.discarded``), t is repaired as above
and t+1 re-dispatched on the repaired output. Invariant that makes this sound: while a call is in flight, nothing
changes the slot maps or buffers it reads except a repair, after which that call is discarded (the repair's install
may donate slot buffers the discarded call still reads; device order keeps the install correct, and nothing reads
the discarded call's outputs). Accepted layers' policy steps are applied lazily (``apply_pending``) while later
calls are in flight; they are all hits, which never evict or install (``EvictionPolicy.access`` evicts at most one
expert per miss), so they only reorder recency / frequency state — ``apply_pending`` raises if one ever changed a
slot map. Policy steps reach each layer in token order, before any later access of that layer, so every policy sees
exactly the per-layer path's access sequence. Costs: a token with a miss pays its own wasted speculative pass, the
recomputed layers before the miss (dispatched without a sync) and, when a next token was in flight, that one too.
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
    prefetch; sync_timing: block on every transfer to time it (serialises; for diagnostics); speculative: read
    routing once per token — stand-in model: all MoE layers in one jitted call, pipelined by one token (module
    docstring); hybrid model: a chain of the per-layer calls without reads (``nemotron``); speculative_backoff
    (hybrid model): after a chain that missed, run that many tokens on the per-layer path before the next chain,
    doubling per consecutive miss up to this cap (0: speculate every token)."""
    slots: int
    policy: str = "lru"
    prefetch: bool = False
    sync_timing: bool = False
    speculative: bool = False
    speculative_backoff: int = 64

    def __post_init__(self):
        if not isinstance(self.speculative_backoff, int) or self.speculative_backoff < 0:
            raise ValueError(f"OffloadConfig.speculative_backoff must be an int >= 0, got {self.speculative_backoff!r}")


@dataclasses.dataclass
class SpecStats:
    """Per-stack counters. tokens: tokens decoded by ``moe_only_decode``; host_reads: device→host reads of
    routing made by the stack (both modes); read_s: host time blocked in them; accepts / rollbacks: speculative
    forwards kept whole / cut at a missing layer; resumed_layers: layers run on the per-layer path after rollbacks
    (the missing layer included; not the accepted layers a rollback recomputes without a read); discarded:
    in-flight speculative calls of the next token thrown away because the token before it rolled back (pipelining's
    extra cost)."""
    tokens: int = 0
    host_reads: int = 0
    read_s: float = 0.0
    accepts: int = 0
    rollbacks: int = 0
    resumed_layers: int = 0
    discarded: int = 0

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
        self._smap: list[tuple[int, jax.Array] | None] = [None] * len(self.caches)  # per layer (version, [E])

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
        this host work overlaps the in-flight speculative calls; done before any other access, so every policy sees
        exactly the per-layer path's sequence of steps. Hits never move an expert, so the slot maps those in-flight
        calls read stay valid; a step that would change a map raises RuntimeError (an accepted layer missed)."""
        pending, self._pending = self._pending, []
        for l, experts in pending:
            cache = self.caches[l]
            version = cache.version
            cache.stats.groups += 1
            cache.ensure(experts)
            if cache.version != version:
                raise RuntimeError(f"speculative decode: accepted layer {l} step {experts} changed the slot map "
                                   "(a policy evicted on an all-hit step)")

    def queue_hits(self, l: int, ids: np.ndarray) -> None:
        """Queue layer ``l``'s access step of an accepted speculative pass (every routed id in ``ids`` resident: one
        group, all hits, the union in first-seen order — what the per-layer path would do); ``apply_pending`` gives
        it to the policy."""
        self._pending.append((l, list(dict.fromkeys(np.asarray(ids).reshape(-1).tolist()))))

    def settle(self, codes: jax.Array, weights, k: int, trace: tuple[str, str, int] | None):
        """The host side of one speculative pass (both models): give the policies the previous token's steps, read
        the pass's codes int32 [L, T·k] (and, when tracing, its routing weights per layer) in ONE host read, queue the
        all-hit steps of the layers before the first miss (and record their routing), count the pass. Returns
        (stop, ids [L, T, k], weights or None): stop = the first MoE layer that missed, L if none (accepted: the step
        ended)."""
        self.apply_pending()  # the previous token's policy steps, overlapping in-flight calls (hits: maps unchanged)
        want_w = self.recorder is not None and trace is not None
        codes_h, ws_h = self._read((codes, weights if want_w else None))
        ids_h, hit = decode_codes(codes_h, k)
        n_layers = len(self.caches)
        missed = np.flatnonzero(~hit)
        stop = int(missed[0]) if missed.size else n_layers
        for l in range(stop):  # every routed expert resident: one group, all hits (the per-layer path's step)
            self.queue_hits(l, ids_h[l])
            if want_w:
                self.recorder.record(trace[0], trace[1], trace[2], l, ids_h[l], ws_h[l])
        self.spec.tokens += 1
        if stop == n_layers:
            self.spec.accepts += 1
            self.end_step()
        else:
            self.spec.rollbacks += 1
            self.spec.resumed_layers += n_layers - stop
        return stop, ids_h, ws_h

    def preload(self, experts: Sequence[int]) -> None:
        """Make ``experts`` (distinct, ≤ slots) resident in every layer: one access step per layer through the normal
        install path, so policy state and counters stay consistent (a benchmark's miss-free warm start)."""
        self.apply_pending()
        for cache in self.caches:
            cache.ensure([int(e) for e in experts])

    def device_slot_maps(self) -> jax.Array:
        """int32 [L, E] expert→slot maps of all layers on the device (−1: absent); re-sent only after a change."""
        versions = tuple(c.version for c in self.caches)
        if versions != self._smaps[0]:
            host = np.stack([c.slot_map() for c in self.caches])
            self._smaps = (versions, jax.device_put(host, self.caches[0].bank.device_sharding))
        return self._smaps[1]

    def device_slot_map(self, l: int) -> jax.Array:
        """int32 [E] expert→slot map of layer ``l`` on the device (−1: absent); re-sent only after a change."""
        cache, got = self.caches[l], self._smap[l]
        if got is None or got[0] != cache.version:
            got = self._smap[l] = (cache.version, jax.device_put(cache.slot_map(), cache.bank.device_sharding))
        return got[1]

    def routed(self, l: int, h: jax.Array, ids: jax.Array, weights: jax.Array, *, next_ids: jax.Array | None = None,
               trace: tuple[str, str, int] | None = None) -> jax.Array:
        """Routed experts of MoE layer ``l``: ``experts_fn``'s result (``routed_experts``: float32 [T, D]; the
        offloaded Nemotron-H's ``routed_call`` defers a one-token step's); ``trace=(prompt, phase, pos0)`` records
        routing."""
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


def _check_args(moe: OffloadedMoE, routers: Sequence[tuple], embeds: Sequence[jax.Array]) -> None:
    if len(routers) != len(moe.caches):
        raise ValueError(f"stand-in model: {len(routers)} routers for {len(moe.caches)} MoE layers")
    if len(embeds) < 1:
        raise ValueError("stand-in model: embeds must hold at least one token's input [T, D]")


@jax.jit
def _token_input(e, prev):
    return e + (rms(prev).astype(jnp.float32) * (1 / 16)).astype(e.dtype)


def token_input(e: jax.Array, prev: jax.Array | None) -> jax.Array:
    """The stand-in model's input for one token: its (teacher-forced) embedding e [T, D] plus, from the second token
    on, the previous token's output prev [T, D] through a weightless RMS norm, scaled by 1/16 — a carried dependency
    (as a KV / SSM cache gives a real model: token t+1 cannot start before token t ends) small enough that routing
    stays as varied as with independent tokens (a plain output→input chain freezes the routing: the residual grows
    and each token barely moves it)."""
    return e if prev is None else _token_input(e, prev)


def moe_only_decode(moe: OffloadedMoE, routers: Sequence[tuple], embeds: Sequence[jax.Array], k: int, *,
                    prev: jax.Array | None = None, trace: tuple[str, str, int] | None = None) -> list[jax.Array]:
    """Decode ``len(embeds)`` tokens of the MoE-only stand-in model through the caches.

    embeds: per token [T, D]; token t's input is ``token_input(embeds[t], output of token t−1)`` (``prev``: the
    output before the first token, None at the start of a sequence); routers [(gate [E, D], bias [E])] × L;
    ``trace=(prompt, phase, pos0)`` records token t at position pos0 + t. Returns the outputs [T, D] per token
    (device arrays, not waited for).

    Per-layer path (default): per token and layer one jitted call (previous residual + pre-norm + router), the id
    read, the cached routed experts. With ``moe.cfg.speculative``: ``speculative_decode`` (pipelined)."""
    _check_args(moe, routers, embeds)
    if moe.cfg.speculative:
        return speculative_decode(moe, routers, embeds, k, prev=prev, trace=trace)
    outs = []
    for t, e in enumerate(embeds):
        moe.spec.tokens += 1
        prev = _layers_from(moe, routers, 0, token_input(e, prev), None, k, _token_trace(trace, t))
        outs.append(prev)
    return outs


def moe_only_decode_step(moe: OffloadedMoE, routers: Sequence[tuple], x: jax.Array, k: int, *,
                         trace: tuple[str, str, int] | None = None) -> jax.Array:
    """One token of ``moe_only_decode`` from input x [T, D] (no previous token) -> out [T, D];
    ``trace=(prompt, phase, pos)``."""
    return moe_only_decode(moe, routers, [x], k, trace=trace)[0]


def _token_trace(trace, t):
    return None if trace is None else (trace[0], trace[1], trace[2] + t)


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


@functools.partial(jax.jit, static_argnames=("k", "with_weights"))
def speculative_stack(x, routers, smaps, slot_weights, *, k, with_weights=False):
    """All L layers of the stand-in model in one call, on the slot buffers as they are.

    x [T, D]; routers [(gate [E, D], bias [E])] × L; smaps int32 [L, E] (slot of each expert, −1 absent);
    slot_weights: per layer the slot-buffer weight dict (leading dim C). Returns (out [T, D], codes int32 [L, T·k])
    and, with ``with_weights`` (trace recording only), the routing weights f32 [L, T, k]. codes holds each layer's
    routed ids, flattened, with every expert that is not resident encoded as ``~id`` (= −1 − id < 0): a layer hit
    iff all its codes are ≥ 0 (``decode_codes``). Nothing else leaves the call — no per-layer states (a rollback
    recomputes them, ``_repair``). Beyond the all-resident model, per layer only the slot lookup on the index path
    of the routed FFN (absent experts read slot 0); the codes are formed once, after the last layer.
    """
    # Optimization barriers at the per-layer path's call boundaries keep XLA from fusing across them, so each
    # layer's two calls compile as they do alone: bit-identical results also where fusion would change rounding
    # (XLA GPU's SimplifyFPConversions, on with the default xla_allow_excess_precision, drops an f32 -> bf16 -> f32
    # convert pair inside one module, e.g. the bf16 residual x or normed h re-widened by the next call; the
    # per-layer calls round them at the boundary; CPU XLA does not run that pass, so CPU tests cannot show it).
    barrier = jax.lax.optimization_barrier
    slots = jnp.maximum(smaps, 0)  # [L, E]; absent experts read slot 0 (garbage, flagged by the codes)
    y, ids_l, ws = None, [], []
    for l, ((gate, bias), wl) in enumerate(zip(routers, slot_weights)):
        x, h, ids, w = barrier(route_layer(x, y, gate, bias, k=k))
        y = barrier(routed_experts(h, slots[l][ids], w, wl))
        ids_l.append(ids.reshape(-1))
        ws.append(w)
    ids = jnp.stack(ids_l).astype(jnp.int32)  # [L, T·k]
    out = (residual_add(x, y), encode_codes(smaps, ids))
    return (*out, jnp.stack(ws)) if with_weights else out


def encode_codes(smaps: jax.Array, ids: jax.Array) -> jax.Array:
    """Device side of a speculative pass's codes: routed ids int32 [L, N] → the id where layer l's slot map
    ``smaps`` [L, E] has the expert, ``~id`` (< 0) where it is absent."""
    return jnp.where(jnp.take_along_axis(smaps, ids, axis=1) >= 0, ids, ~ids)


def decode_codes(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Host side of ``speculative_stack``'s codes [L, T·k] -> (ids int [L, T, k], hit bool [L])."""
    codes = np.asarray(codes)
    ids = np.where(codes >= 0, codes, ~codes)
    return ids.reshape(codes.shape[0], -1, k), (codes >= 0).all(axis=1)


def speculative_decode(moe: OffloadedMoE, routers: Sequence[tuple], embeds: Sequence[jax.Array], k: int, *,
                       prev: jax.Array | None = None, trace: tuple[str, str, int] | None = None) -> list[jax.Array]:
    """``moe_only_decode`` with one speculative call per token, pipelined by one token (module docstring).

    Token t+1's ``speculative_stack`` call is dispatched on token t's (speculative) output before t's codes are
    read, so that read, the policy updates and the next dispatch overlap t+1's device work. t accepted: its
    policy steps are queued (``apply_pending``) and t+1 stays. t missed: t+1's call is discarded (``discarded``),
    t is repaired (``_repair``) and t+1 re-dispatched on the repaired output. Outputs equal the per-layer path's
    bit for bit; every layer's policy sees the per-layer path's access sequence.
    """
    _check_args(moe, routers, embeds)
    routers, n = list(routers), len(embeds)
    want_w = moe.recorder is not None and trace is not None
    inflight = _dispatch(moe, routers, token_input(embeds[0], prev), k, want_w)
    outs = []
    for t in range(n):
        cur = inflight
        inflight = _dispatch(moe, routers, token_input(embeds[t + 1], cur[0]), k, want_w) if t + 1 < n else None
        out = _settle(moe, routers, cur, k, _token_trace(trace, t))
        if out is not cur[0] and inflight is not None:  # t was repaired: t+1 ran on a wrong input / stale slots
            moe.spec.discarded += 1
            inflight = _dispatch(moe, routers, token_input(embeds[t + 1], out), k, want_w)
        outs.append(out)
    return outs


def _dispatch(moe, routers, x, k, with_weights=False):
    """Dispatch one speculative pass with the caches' current slot maps and buffers (not waited for). Returns
    (out, codes, weights or None, x): the call's outputs and its input (kept for a rollback)."""
    res = speculative_stack(x, routers, moe.device_slot_maps(), [c.weights() for c in moe.caches], k=k,
                            with_weights=with_weights)
    return res[0], res[1], res[2] if with_weights else None, x


def _settle(moe, routers, spec, k, trace):
    """Settle one speculative pass (``OffloadedMoE.settle``: the token's ONE host read) and return its output, or the
    repaired output if a layer missed."""
    out, codes, ws, _ = spec
    stop, ids_h, ws_h = moe.settle(codes, ws, k, trace)
    if stop == len(routers):
        return out
    return _repair(moe, routers, spec, ids_h, ws_h, stop, k, trace)


def _repair(moe, routers, spec, ids_h, ws_h, stop, k, trace):
    """Roll back a speculative pass that missed at layer ``stop``: layers < stop are accepted (queued) and recomputed
    from the pass's input with the per-layer path's calls on their (unchanged) slots — no host read; layer stop runs
    through ``cached_moe`` with its recorded (exact) ids, installing its misses; the per-layer path does the rest."""
    x = spec[3]
    n_layers = len(routers)
    moe.apply_pending()  # all hits: layers < stop keep the slot maps the pass read
    if ws_h is not None:
        moe.recorder.record(trace[0], trace[1], trace[2], stop, ids_h[stop], ws_h[stop])
    y = None
    for l in range(stop):
        x, h, _, w = route_layer(x, y, *routers[l], k=k)
        cache = moe.caches[l]
        y = moe.experts_fn(h, cache.slot_ids(ids_h[l]), w, cache.weights())
    x, h, _, w = route_layer(x, y, *routers[stop], k=k)
    y = cached_moe(moe.caches[stop], h, ids_h[stop], w, moe.experts_fn, host_ids=ids_h[stop])
    if stop + 1 == n_layers:
        moe.end_step()
        return residual_add(x, y)
    return _layers_from(moe, routers, stop + 1, x, y, k, trace)


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
