"""Nemotron-H forward with the routed experts offloaded: host banks + per-layer device caches.

The model is cut at its MoE layers into *segments*, each ONE jitted call: (finish the previous MoE layer: x += routed
+ shared) → the non-MoE blocks up to the next MoE layer → that layer's pre-norm, router and shared expert. Between
segments the host reads the routed ids (one sync per MoE layer) and ``OffloadedMoE`` runs the routed experts on the
cache slots (``nn.moe.moe_experts(impl="gather")``). With every cache size the logits equal those of the same
segmented forward with all experts resident, bit for bit; against ``models.nemotron_h.forward`` (one jit, other
fusion) they agree to float rounding.
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
from hlwq_jax.offload.moe_stack import OffloadConfig, OffloadedMoE
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
            if offload.speculative:
                raise ValueError("offloaded Nemotron-H: speculative decode is implemented for the MoE-only stand-in "
                                 "model only (moe_stack.speculative_decode), not for the hybrid model")
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
