"""Nemotron-H forward with the routed experts offloaded: host banks + per-layer device caches.

The model is cut at its MoE layers into *segments*, each ONE jitted call: (finish the previous MoE layer: x += routed
+ shared) → the non-MoE blocks up to the next MoE layer → that layer's pre-norm, router and shared expert. Between
segments the host reads the routed ids (one sync per MoE layer) and ``OffloadedMoE`` runs the routed experts on the
cache slots (``nn.moe.moe_experts(impl="gather")``). With every cache size the logits equal those of the same
segmented forward with all experts resident, bit for bit; against ``models.nemotron_h.forward`` (one jit, other
fusion) they agree to float rounding.

Speculative mode (``OffloadConfig.speculative``): the segmented forward syncs once per MoE layer (23 host reads per
token for Nano-30B) and its no-miss decode ran at a third of the all-resident speed on the H200. Instead
``_speculative_pass`` runs every segment and every routed-expert call of one forward in ONE jitted call on the slot
buffers as they are (absent experts read slot 0: garbage, detected), and returns the logits, the new layer states
and one int32 code per routed id (the id, or ``~id`` where the expert is absent); ONE host read of the codes follows.
All hit: the pass is the forward — the states become the new cache and each MoE layer's policy gets the access step
the per-layer path would have made (queued, ``OffloadedMoE.apply_pending``). Any miss: the pass is discarded and the
token runs through the per-layer path from the same cache (which installs the misses). Each segment and routed call
is the same jitted function either way, kept apart by optimization barriers (as in ``moe_stack.speculative_stack``).
Exactness: on the CPU the output equals the per-layer path's bit for bit (tests/offload/test_nemotron_offload.py);
on the H200 the accepted passes did NOT (results/offload_h200_full_spec.jsonl, ``exact`` false in both no-miss
speculative rows; the size of the difference was not recorded — the benchmark now writes ``max_abs_diff``): XLA
compiles the one-call pass differently somewhere (GEMM choice or fusion of barrier-independent work are the
suspects; the MoE-only stand-in's pass is exact there). So speculative decode of the hybrid model agrees with the
per-layer path to float rounding, like ``models.nemotron_h.forward``, and is opt-in. Not pipelined (token t+1 is
dispatched after t's read); routing traces are recorded on the per-layer path only.
"""
from __future__ import annotations

import functools
from typing import Sequence

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
from hlwq_jax.offload.moe_stack import OffloadConfig, OffloadedMoE, decode_codes, encode_codes
from hlwq_jax.offload.trace import TraceRecorder


def _dense_block(config, kind, p, h, state):
    if kind == "M":
        return mamba2(p, h, config.mamba, state)
    if kind == "*":
        return attention(p, h, config.attention, state)
    if kind == "-":
        return mlp(p, h, "relu2"), None
    raise ValueError(f"offloaded Nemotron-H: block type {kind!r} is not a dense block")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _segment(config, kinds: tuple[str, ...], final: bool, p: dict, states: tuple, x, pending):
    """kinds: block types of this segment's dense layers. p: {"emb"?, "layers": [...], "moe"?: next MoE layer's
    {"norm", "router", "router_bias", "shared"?}, "norm_f"?, "head"?}. pending: None or (routed f32 [N, D], shared
    [N, D] | None) of the previous MoE layer. x: tokens int32 [B, T] (first segment) or hidden [B, T, D].
    "next_router" (prefetch): the following MoE layer's {"router", "router_bias"}, applied to this layer's h."""
    eps = config.layer_norm_epsilon
    if "emb" in p:
        x = jnp.take(p["emb"], x, axis=0)
    b, t, d = x.shape
    if pending is not None:
        y = pending[0].astype(x.dtype)
        if pending[1] is not None:
            y = y + pending[1]
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
    return x, tuple(new_states), h, ids, w, shared, predicted


@functools.partial(jax.jit, static_argnums=(0, 1))
def _speculative_pass(config, layout: tuple, seg_params: tuple, seg_states: tuple, tokens, smaps, slot_weights):
    """One forward: every segment (``layout``: (kinds, final) per segment, with its params and states) and, between
    them, the routed experts of each MoE layer j on its slot buffers ``slot_weights[j]`` through the slot map
    ``smaps[j]`` (int32 [L, E], −1 absent). → (logits f32 [B, T, V], new states per segment, codes int32
    [L, B·T·k]: routed ids, ``~id`` where the expert is absent — ``moe_stack.decode_codes``)."""
    barrier = jax.lax.optimization_barrier  # keeps each call's fusions as compiled alone (bit-identical results)
    slots = jnp.maximum(smaps, 0)
    x, pending, new_states, ids_l = tokens, None, [], []
    for j, ((kinds, final), p, st) in enumerate(zip(layout, seg_params, seg_states)):
        out = barrier(_segment(config, kinds, final, p, st, x, pending))
        new_states.append(out[1])
        if final:
            logits = out[0]
            break
        x, _, h, ids, w, shared, _ = out
        pending = (barrier(routed_experts(h, slots[j][ids], w, slot_weights[j])), shared)
        ids_l.append(ids.reshape(-1))
    ids = jnp.stack(ids_l).astype(jnp.int32)
    return logits, tuple(new_states), encode_codes(smaps, ids)


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
            self.moe = OffloadedMoE(banks, offload, routed_experts, recorder)
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
        if self.moe is not None and self.moe.cfg.speculative:
            if trace is not None:
                raise ValueError("offloaded Nemotron-H: routing traces are recorded on the per-layer path; use "
                                 "speculative=False to record")
            return self._speculative_forward(tokens, cache)
        return self._forward_layers(tokens, cache, trace)

    def _speculative_forward(self, tokens: jax.Array, cache: nh.NemotronHCache | None):
        """One ``_speculative_pass`` and one host read; the per-layer path from the same cache if a layer missed."""
        moe, n_moe = self.moe, len(self.moe.caches)
        states = list(cache.layers) if cache is not None else [None] * self.config.num_layers
        layout = tuple((kinds, final) for kinds, _, final, _ in self.segments)
        logits, seg_states, codes = _speculative_pass(
            self.config, layout, tuple(p for *_, p in self.segments),
            tuple(tuple(states[i] for i in idx) for _, idx, _, _ in self.segments), tokens,
            moe.device_slot_maps(), [c.weights() for c in moe.caches])
        moe.apply_pending()  # the previous token's policy steps, while the pass runs (hits: no slot map changes)
        (codes_h,) = moe._read((codes,))
        ids_h, hit = decode_codes(codes_h, self.config.moe.top_k)
        moe.spec.tokens += 1
        if not hit.all():
            moe.spec.rollbacks += 1
            moe.spec.resumed_layers += n_moe
            return self._forward_layers(tokens, cache, None)
        moe.spec.accepts += 1
        for l in range(n_moe):  # every routed expert resident: one access step per layer, all hits
            moe.queue_hits(l, ids_h[l])
        moe.end_step()
        for (_, idx, _, _), st in zip(self.segments, seg_states):
            for i, s in zip(idx, st):
                states[i] = s
        new_cache = None if cache is None else nh.NemotronHCache(tuple(states), cache.length + tokens.shape[1])
        return logits, new_cache

    def _forward_layers(self, tokens: jax.Array, cache: nh.NemotronHCache | None, trace):
        """The segmented forward: one sync per MoE layer (module docstring)."""
        b, t = tokens.shape
        states = list(cache.layers) if cache is not None else [None] * self.config.num_layers
        pos0 = int(cache.length) if cache is not None else 0
        x, pending = tokens, None
        for j, (kinds, idx, final, p) in enumerate(self.segments):
            st = tuple(states[i] for i in idx)
            out = _segment(self.config, kinds, final, p, st, x, pending)
            for i, s in zip(idx, out[1]):
                states[i] = s
            if final:
                logits = out[0]
                break
            x, _, h, ids, w, shared, predicted = out
            tr = None if trace is None else (trace[0], trace[1], pos0)
            if tr is not None and b != 1:
                raise ValueError("offloaded Nemotron-H: tracing needs batch size 1")
            if self.moe is None:
                if tr is not None and self.recorder is not None:
                    self.recorder.record(*tr, j, np.asarray(ids), np.asarray(w))
                pending = (routed_experts(h, ids, w, self.resident[j]), shared)
            else:
                pending = (self.moe.routed(j, h, ids, w, next_ids=predicted, trace=tr), shared)
        if self.moe is not None:
            self.moe.end_step()
        new_cache = None if cache is None else nh.NemotronHCache(tuple(states), cache.length + t)
        return logits, new_cache


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
