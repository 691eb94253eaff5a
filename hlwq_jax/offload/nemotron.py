"""Nemotron-H forward with the routed experts offloaded: host banks + per-layer device caches.

The model is cut at its MoE layers into *segments*, each ONE jitted call: (finish the previous MoE layer: x += routed
+ shared) → the non-MoE blocks up to the next MoE layer → that layer's pre-norm, router and shared expert. Between
segments the host reads the routed ids (one sync per MoE layer) and ``OffloadedMoE`` installs the layer's misses into
the cache slots. The routed experts (``nn.moe.moe_experts(impl="gather")`` on the slots) of a ONE-token step run at the
start of the next segment's program (``routed_call``: 24 instead of 47 jitted calls per decoded token); longer steps
(prefill, overflow splits) run them as a call of their own. With every cache size the logits equal those of the same
segmented forward with all experts resident, bit for bit; against ``models.nemotron_h.forward`` (one jit, other
fusion) they agree to float rounding.

Speculative mode (``OffloadConfig.speculative``): the segmented forward syncs once per MoE layer (23 host reads per
token for Nano-30B) and its no-miss decode ran at a third of the all-resident speed on the H200. Instead the forward
is dispatched as a *chain* of the per-layer path's own jitted calls with no host read in between: per MoE layer j,
``_segment`` (which also maps its routed ids to slots through the layer's device slot map; an absent expert reads slot
0: garbage, detected; its routed experts on the slot buffers run in segment j+1); before the last segment
``_chain_codes`` forms one int32 code per routed id (the id, or ``~id`` where the expert was absent) and ONE host read
follows. All hit: the chain was the forward. First miss at MoE layer s: segments 0..s ran on exact inputs and are kept
(their states and outputs are device arrays the chain holds), layers < s get their all-hit policy steps, and the
forward resumes on the per-layer path at layer s (installs its misses) — the work after s is discarded. Every path
runs the same ``_segment`` executable (the others pass an identity slot map and ignore the slot ids) and the routed
experts receive int32 [T, k] slot ids either way (from the segment here, from the host in ``cached_moe``), so every
call of an accepted chain is the same executable on the same inputs as on the per-layer path: the logits are equal bit
for bit by construction, on any backend (an earlier one-jit pass was exact on the CPU only: XLA GPU compiled it
differently). Cost beyond the all-resident segmented forward: one small call (the codes) per token, the host read and
the policy steps. On the H200's host every jitted call costs ~0.1–0.25 ms to dispatch and these loops are host-bound,
so the call count matters (with a separate slot-lookup call per layer the no-miss chain ran measurably slower; moving
the routed experts into the next segment sped up the resident and chain loops, not the per-layer path, which is bound
by its 23 host syncs; results/README.md). Where chains keep missing (random routing: every token misses somewhere, and
a missed chain costs its wasted tail on top of the per-layer path), ``OffloadConfig.speculative_backoff`` runs the
next 1, 2, 4, … tokens (up to the cap) on the per-layer path after each missed chain; an accepted chain resets it.
Tracing works in both modes (the chain reads the routing weights with the codes). ``forward`` settles each chain
before it returns; ``decode`` (teacher-forced steps) pipelines by one token: step t+1's chain is dispatched on t's
speculative states before t's codes are read (its docstring).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.models import nemotron_h as nh
from hlwq_jax.nn.attention import attention
from hlwq_jax.nn.linear import linear
from hlwq_jax.nn.mamba2 import mamba2
from hlwq_jax.nn.mlp import mlp
from hlwq_jax.nn.moe import route
from hlwq_jax.nn.norms import rms_norm
from hlwq_jax.offload.bank import HostBank, _Bank
from hlwq_jax.offload.expert_cache import routed_experts
from hlwq_jax.offload.moe_stack import OffloadConfig, OffloadedMoE, encode_codes
from hlwq_jax.offload.trace import TraceRecorder


def _dense_block(config, kind, p, h, state):
    if kind == "M":
        return mamba2(p, h, config.mamba, state)
    if kind == "*":
        return attention(p, h, config.attention, state)
    if kind == "-":
        return mlp(p, h, "relu2"), None
    raise ValueError(f"offloaded Nemotron-H: block type {kind!r} is not a dense block")


class Unrouted(NamedTuple):
    """A one-token step's routed-expert call, deferred into the next segment's program (``routed_call``): the
    arguments of ``routed_experts``: h [1, D], ids int32 [1, k] into the leading axis of ``experts`` (E resident
    experts, or C cache slots), w [1, k]."""
    h: jax.Array
    ids: jax.Array
    w: jax.Array
    experts: dict


def routed_call(h: jax.Array, ids, w: jax.Array, experts: dict):
    """``routed_experts(h, ids, w, experts)``, deferred into the next ``_segment`` call when the step is ONE token
    (h [1, D]): that saves a jitted call per MoE layer (23 of 47 per decoded token), which the host-bound decode loops
    pay for (~0.1–0.25 ms each on the H200's host). Every path decides from the shape alone, so resident, per-layer
    and chain calls stay the same executables on the same inputs."""
    if h.shape[0] == 1:
        return Unrouted(h, ids, w, experts)
    return routed_experts(h, ids, w, experts)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _segment(config, kinds: tuple[str, ...], final: bool, p: dict, states: tuple, x, pending, smap):
    """kinds: block types of this segment's dense layers. p: {"emb"?, "layers": [...], "moe"?: next MoE layer's
    {"norm", "router", "router_bias", "shared"?}, "norm_f"?, "head"?}. pending: None or (routed, shared
    [N, D] | None) of the previous MoE layer, routed either computed (f32 [N, D]) or an ``Unrouted`` call run here
    first, behind an optimization barrier (XLA cannot fuse the routed sum into the residual add; on the CPU a test
    checks the result equals the separate call's). x: tokens int32 [B, T] (first segment) or hidden [B, T, D].
    "next_router" (prefetch): the following MoE layer's {"router", "router_bias"}, applied to this layer's h.
    smap: int32 [E] expert→slot map (−1 absent) giving the returned slot ids (absent → slot 0); the speculative
    chain passes the layer's cache map, every other caller the model's identity map (one executable on every
    path)."""
    eps = config.layer_norm_epsilon
    if "emb" in p:
        x = jnp.take(p["emb"], x, axis=0)
    b, t, d = x.shape
    if pending is not None:
        y, shared = pending
        if isinstance(y, Unrouted):
            y = jax.lax.optimization_barrier(routed_experts(*y))
        y = y.astype(x.dtype)
        if shared is not None:
            y = y + shared
        x = x + y.reshape(b, t, d).astype(x.dtype)
    new_states = []
    for kind, lp, st in zip(kinds, p["layers"], states):
        h = rms_norm(x, lp["norm"], eps).astype(x.dtype)
        y, st = _dense_block(config, kind, lp["mixer"], h, st)
        x = x + y.astype(x.dtype)
        new_states.append(st)
    if final:
        x = rms_norm(x, p["norm_f"], eps).astype(x.dtype)
        return linear(x, p["head"]).astype(jnp.float32), tuple(new_states)
    m = p["moe"]
    h = rms_norm(x, m["norm"], eps).astype(x.dtype).reshape(b * t, d)
    w, ids = route(m["mixer"], h, config.moe)
    shared = mlp(m["mixer"]["shared"], h, "relu2") if config.moe.shared_dim else None
    predicted = route(p["next_router"], h, config.moe)[1] if "next_router" in p else None  # prefetch guess
    slots = jnp.maximum(smap[ids], 0).astype(jnp.int32)
    return x, tuple(new_states), h, ids, w, shared, predicted, slots


@jax.jit
def _chain_codes(smaps: tuple, ids: tuple) -> jax.Array:
    """smaps: per MoE layer int32 [E]; ids: per layer int [T, k] → int32 [L, T·k] (``moe_stack.encode_codes``)."""
    return encode_codes(jnp.stack(smaps), jnp.stack([i.reshape(-1) for i in ids]).astype(jnp.int32))


class OffloadedNemotronH:
    """``forward(tokens, cache)`` like ``models.nemotron_h.forward``, with routed experts in ``banks``.

    params: the model's parameter tree; routed experts (``layers[i]["mixer"]["experts"]`` of MoE layers) are taken
    from it into pinned-host ``HostBank``s unless ``banks`` (one per MoE layer, in order) is given — then the tree may
    lack them. Nothing of ``params`` is modified. ``offload=None``: all experts stay resident in ``params`` (same
    segments and kernel, no cache) — the way to record a routing trace of a plain model run.
    """

    def __init__(self, config: nh.NemotronHConfig, params: dict, offload: OffloadConfig | None, *,
                 banks: Sequence[_Bank] | None = None, recorder: TraceRecorder | None = None):
        self.config, self.recorder = config, recorder
        kinds = config.layer_types
        moe_idx = [i for i, c in enumerate(kinds) if c == "E"]
        if offload is None:
            self.moe, self.resident = None, [params["layers"][i]["mixer"]["experts"] for i in moe_idx]
        else:
            if banks is None:
                banks = [HostBank(params["layers"][i]["mixer"]["experts"]) for i in moe_idx]
            if len(banks) != len(moe_idx):
                raise ValueError(f"offloaded Nemotron-H: {len(banks)} banks for {len(moe_idx)} MoE layers")
            self.moe = OffloadedMoE(banks, offload, routed_call, recorder)
        self._identity = jnp.arange(config.n_routed_experts, dtype=jnp.int32)  # the smap of non-chain segments
        self._skip = self._backoff = 0  # speculative backoff: tokens left on the per-layer path, current length
        head = params["embeddings"] if config.tie_word_embeddings else params["lm_head"]
        bounds = [-1] + moe_idx + [len(kinds)]
        self.segments = []  # (kinds, layer indices, final, params)
        for j in range(len(bounds) - 1):
            lo, hi = bounds[j] + 1, bounds[j + 1]
            final = j == len(bounds) - 2
            p = {"layers": [params["layers"][i] for i in range(lo, hi)]}
            if j == 0:
                p["emb"] = params["embeddings"]
            if final:
                p.update(norm_f=params["norm_f"], head=head)
            else:
                lay = params["layers"][hi]
                p["moe"] = {"norm": lay["norm"], "mixer": {k: v for k, v in lay["mixer"].items() if k != "experts"}}
                if offload is not None and offload.prefetch and j + 1 < len(moe_idx):
                    nxt = params["layers"][moe_idx[j + 1]]["mixer"]
                    p["next_router"] = {"router": nxt["router"], "router_bias": nxt["router_bias"]}
            self.segments.append((tuple(kinds[lo:hi]), tuple(range(lo, hi)), final, p))

    def forward(self, tokens: jax.Array, cache: nh.NemotronHCache | None = None, *,
                trace: tuple[str, str] | None = None):
        """Logits f32 [B, T, V] and the updated cache. ``trace=(prompt, phase)`` records routing (B must be 1;
        positions start at the cache length)."""
        if trace is not None and tokens.shape[0] != 1:
            raise ValueError(f"offloaded Nemotron-H: tracing needs batch size 1, got tokens {tokens.shape}")
        states = list(cache.layers) if cache is not None else [None] * self.config.num_layers
        tr = None if trace is None else (trace[0], trace[1], int(cache.length) if cache is not None else 0)
        if self.moe is not None and self.moe.cfg.speculative and self._speculate_next():
            logits = self._speculative(tokens, states, tr)
        else:
            logits = self._layers_from(0, tokens, None, states, tr)
        new_cache = None if cache is None else nh.NemotronHCache(tuple(states), cache.length + tokens.shape[1])
        return logits, new_cache

    def decode(self, tokens: jax.Array, cache: nh.NemotronHCache, *, trace: tuple[str, str] | None = None):
        """Teacher-forced decode of tokens int32 [B, N], one token per step (step t reads ``tokens[:, t]``) →
        (logits f32 [B, 1, V] per step, the cache after the last step); the same logits as N ``forward`` calls.
        Speculative: pipelined by one token — step t+1's chain is dispatched on step t's speculative states BEFORE
        t's codes are read, so that read, the policy steps and the next dispatch overlap device work. t accepted: t+1
        stands; t missed: t+1's chain is discarded (``SpecStats.discarded``), t resumes on the per-layer path and
        t+1 is dispatched again on the repaired states. Sound because while a chain is in flight nothing changes the
        slot maps or buffers it reads except a resume of the token before it, after which it is discarded
        (``moe_stack``'s pipelined stand-in loop rests on the same invariant). On the H200 the pipelining measured no
        gain (the loop is host-bound there; results/README.md)."""
        if trace is not None and tokens.shape[0] != 1:
            raise ValueError(f"offloaded Nemotron-H: tracing needs batch size 1, got tokens {tokens.shape}")
        n, pos0 = tokens.shape[1], int(cache.length)
        if self.moe is None or not self.moe.cfg.speculative:
            logits = []
            for t in range(n):
                lg, cache = self.forward(tokens[:, t:t + 1], cache, trace=trace)
                logits.append(lg)
            return logits, cache
        states, logits = list(cache.layers), []
        inflight = self._dispatch_chain(tokens[:, :1], states) if self._speculate_next() else None
        for t in range(n):
            cur, inflight = inflight, None
            tr = None if trace is None else (trace[0], trace[1], pos0 + t)
            if cur is None:  # backing off: this token on the per-layer path
                lg = self._layers_from(0, tokens[:, t:t + 1], None, states, tr)
                if t + 1 < n and self._speculate_next():
                    inflight = self._dispatch_chain(tokens[:, t + 1:t + 2], states)
                logits.append(lg)
                continue
            if t + 1 < n and self._speculate_next():  # on t's speculative states
                inflight = self._dispatch_chain(tokens[:, t + 1:t + 2], self._chain_states(cur, states))
            lg, accepted = self._settle_chain(cur, states, tr)
            if not accepted and inflight is not None:  # its input states and slot maps are stale
                self.moe.spec.discarded += 1
                inflight = self._dispatch_chain(tokens[:, t + 1:t + 2], states) if self._speculate_next() else None
            logits.append(lg)
        return logits, nh.NemotronHCache(tuple(states), cache.length + n)

    def _speculate_next(self) -> bool:
        """Whether the next token runs as a chain (False while backing off; consumes one backed-off token)."""
        if self._skip:
            self._skip -= 1
            return False
        return True

    def _after_chain(self, accepted: bool) -> None:
        """Backoff bookkeeping after a settled chain: reset when accepted; after a miss, the next ``_backoff``
        tokens (1, 2, 4, … up to ``speculative_backoff``; 0 disables) run on the per-layer path."""
        cap = self.moe.cfg.speculative_backoff
        if accepted:
            self._backoff = 0
        elif cap:
            self._backoff = min(cap, max(1, 2 * self._backoff))
            self._skip = self._backoff

    def _speculative(self, tokens: jax.Array, states: list, tr):
        """One chain and its settling (module docstring). Updates ``states`` in place; returns the logits."""
        return self._settle_chain(self._dispatch_chain(tokens, states), states, tr)[0]

    def _dispatch_chain(self, tokens: jax.Array, states: list) -> list:
        """Dispatch the chain on the caches' current slot maps and buffers (nothing is read or waited for). Returns
        the per-segment outputs with the codes call's result appended. The codes are dispatched, and their copy to
        the host started, before the final segment (norm, dense tail, lm_head): the read then need not wait for the
        head's matmul, the largest of the step."""
        moe = self.moe
        smaps = tuple(moe.device_slot_map(l) for l in range(len(moe.caches)))
        x, pending, outs, codes = tokens, None, [], None
        for j, (kinds, idx, final, p) in enumerate(self.segments):
            if final:
                codes = _chain_codes(smaps, tuple(o[3] for o in outs))
                codes.copy_to_host_async()
            out = _segment(self.config, kinds, final, p, tuple(states[i] for i in idx), x, pending,
                           None if final else smaps[j])
            outs.append(out)
            if final:
                break
            x, _, h, ids, w, shared, _, slots = out
            pending = (routed_call(h, slots, w, moe.caches[j].weights()), shared)
        return outs + [codes]

    def _chain_states(self, chain: list, states: list) -> list:
        """``states`` with every layer's state replaced by the chain's (speculative) new state."""
        new = list(states)
        for (_, idx, _, _), out in zip(self.segments, chain[:-1]):
            for i, st in zip(idx, out[1]):
                new[i] = st
        return new

    def _settle_chain(self, chain: list, states: list, tr):
        """The chain's one host read; accept it, or keep its exact prefix and resume on the per-layer path at the
        first MoE layer that missed. Updates ``states`` in place. Returns (logits, accepted)."""
        moe, n_moe = self.moe, len(self.moe.caches)
        outs, codes = chain[:-1], chain[-1]
        stop = moe.settle(codes, [o[4] for o in outs[:-1]], self.config.moe.top_k, tr)[0]
        for (_, idx, _, _), out in zip(self.segments[: stop + 1], outs):  # segments 0..stop ran on exact inputs
            for i, st in zip(idx, out[1]):
                states[i] = st
        self._after_chain(stop == n_moe)
        if stop == n_moe:
            return outs[-1][0], True
        x, _, h, ids, w, shared, predicted, _ = outs[stop]
        pending = (moe.routed(stop, h, ids, w, next_ids=predicted, trace=tr), shared)
        return self._layers_from(stop + 1, x, pending, states, tr), False

    def _layers_from(self, start: int, x, pending, states: list, tr):
        """The segmented forward (module docstring) from segment ``start`` on, one sync per MoE layer: x is the
        tokens (start 0) or the hidden state entering segment ``start``, ``pending`` the previous MoE layer's
        (routed, shared) outputs. Updates ``states`` in place; returns the logits."""
        for j in range(start, len(self.segments)):
            kinds, idx, final, p = self.segments[j]
            out = _segment(self.config, kinds, final, p, tuple(states[i] for i in idx), x, pending,
                           None if final else self._identity)
            for i, s in zip(idx, out[1]):
                states[i] = s
            if final:
                logits = out[0]
                break
            x, _, h, ids, w, shared, predicted, _ = out
            if self.moe is None:
                if tr is not None and self.recorder is not None:
                    self.recorder.record(*tr, j, np.asarray(ids), np.asarray(w))
                pending = (routed_call(h, ids, w, self.resident[j]), shared)
            else:
                pending = (self.moe.routed(j, h, ids, w, next_ids=predicted, trace=tr), shared)
        if self.moe is not None:
            self.moe.end_step()
        return logits


def trace_generation(model: OffloadedNemotronH, prompt: jax.Array, max_new_tokens: int, name: str,
                     cache_dtype=jnp.bfloat16) -> np.ndarray:
    """Greedy generation that records routing into ``model``'s recorder: prefill ``prompt`` [1, T0] (phase
    "prefill"), then ``max_new_tokens`` decode steps. Returns the generated ids int32 [max_new_tokens]."""
    if model.recorder is None:
        raise ValueError("trace_generation: the model has no recorder")
    cache = nh.init_cache(model.config, 1, prompt.shape[1] + max_new_tokens, cache_dtype)
    logits, cache = model.forward(prompt, cache, trace=(name, "prefill"))
    out = []
    for _ in range(max_new_tokens):
        tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
        out.append(int(tok[0, 0]))
        logits, cache = model.forward(tok, cache, trace=(name, "decode"))
    return np.asarray(out, np.int32)
