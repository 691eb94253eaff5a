"""Benchmark harnesses for experiments/bench_offload.py: random-weight models with host expert banks.

Both harnesses expose: ``banks``, ``top_k``, ``n_experts``; ``resident(restricted) -> [(name, run, is_reference)]``
(all-resident variants; the first is the primary baseline, the reference one uses the cached path's exact calls);
``cached(slots, policy, prefetch, restricted, speculative=False) -> (run, OffloadedMoE)``; ``record(recorder)``;
``drop_resident()``. ``run(start, n)`` decodes tokens start .. start+n−1 (start = 0 begins a fresh sequence, else it
must continue where the previous call stopped) and returns their outputs as device arrays, without waiting for them
(the caller times a whole run: batch-1 decode loops overlap host dispatch with device work where they can).
``MoEOnlyHarness.speculative_pass(moe)``: a ``run`` of bare speculative passes (the pipelined loop's device floor).
``use_transfer(t)`` rebuilds the banks for transfer path ``t`` (bank.py's ``TRANSFERS``; same bytes, the old banks
released first: a bf16 bank set is 58.75 GB of pinned host memory). ``restricted`` adds a +100 selection bias to
experts ``restricted_experts`` = [0, min slots) in every router, so
routing stays inside the smallest cache (the no-miss measurement; the benchmark preloads them before timing).
"""
from __future__ import annotations

import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.models import nemotron_h as nh
from hlwq_jax.offload.bank import HostBank, check_transfer, expert_row, split_layer
from hlwq_jax.offload.expert_cache import routed_experts
from hlwq_jax.offload.moe_stack import (OffloadConfig, OffloadedMoE, eager_resident_step, moe_only_decode,
                                        resident_decode_step, residual_add, route_layer, speculative_stack,
                                        token_input)
from hlwq_jax.offload.nemotron import OffloadedNemotronH
from hlwq_jax.quant.hlwq import quantize


def build_banks(n_layers: int, n_experts: int, hidden: int, inter: int, precision: str, key, *, unique: int,
                q_block: int = 128, transfer: str = "stacked-jit") -> list[HostBank]:
    """One pinned-host bank per layer whose entries cycle over ``unique`` random experts
    ({"up_proj" [F, D], "down_proj" [D, F]}, bf16 or HLWQ Q5), laid out for ``transfer`` (per-expert rows, or one
    stacked [E, expert_nbytes] array per layer). The same key gives the same bytes for every transfer path."""
    check_transfer(transfer, "build_banks")
    k1, k2 = jax.random.split(key)
    up = (jax.random.normal(k1, (unique, inter, hidden), jnp.float32) / np.sqrt(hidden)).astype(jnp.bfloat16)
    down = (jax.random.normal(k2, (unique, hidden, inter), jnp.float32) / np.sqrt(inter)).astype(jnp.bfloat16)
    if precision == "q5":
        weights = {"up_proj": quantize(up, bits=5, block_size=q_block),
                   "down_proj": quantize(down, bits=5, block_size=q_block)}
    elif precision == "bf16":
        weights = {"up_proj": up, "down_proj": down}
    else:
        raise ValueError(f"unknown bank precision {precision!r} (bf16 | q5)")
    specs, arrays, layout, _ = split_layer(weights)
    rows = [expert_row([a[u] for a in arrays]) for u in range(unique)]
    dev = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    banks, staged = [], {}
    for l in range(n_layers):
        order = tuple((l * n_experts + e) % unique for e in range(n_experts))
        lay = {k: dict(v) for k, v in layout.items()}
        if transfer == "rows":
            placed = jax.device_put([rows[u] for u in order], host)  # one call
            banks.append(HostBank.from_rows(specs, lay, placed, device=dev))
        else:  # numpy staging per distinct expert order (never written after), copied into one host array per layer
            if order not in staged:
                staged[order] = np.stack([rows[u] for u in order])
            banks.append(HostBank.from_stacked(specs, lay, staged[order], device=dev))
    jax.block_until_ready([b.host_arrays for b in banks])
    return banks


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype, scale):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_dense_params(config: nh.NemotronHConfig, key, dtype=jnp.bfloat16) -> dict:
    """Random parameters of every leaf except the routed experts (compiled once per distinct shape)."""
    counter = iter(range(1 << 30))

    def leaf(name, sds):
        k = jax.random.fold_in(key, next(counter))
        if name == "A_log":
            return jnp.log(jax.random.uniform(k, sds.shape, jnp.float32, 1.0, 16.0))
        if name == "dt_bias":
            dt = jnp.exp(jax.random.uniform(k, sds.shape, jnp.float32, np.log(1e-3), np.log(0.1)))
            return dt + jnp.log(-jnp.expm1(-dt))
        if name in ("norm", "norm_f", "D"):
            return jnp.ones(sds.shape, sds.dtype)
        return _normal(k, sds.shape, sds.dtype, 0.02 if len(sds.shape) == 1 else float(1 / np.sqrt(sds.shape[-1])))

    def walk(t, name=""):
        if isinstance(t, dict):
            return {k: walk(v, k) for k, v in t.items() if k != "experts"}
        if isinstance(t, (list, tuple)):
            return [walk(v, name) for v in t]
        return leaf(name, t)

    return walk(nh.abstract_params(config, dtype))


def _use_transfer(h, transfer: str) -> None:
    """Rebuild ``h.banks`` for ``transfer`` (no-op if already so); the old banks are released before the new ones are
    built (callers must hold no cache of the old banks)."""
    check_transfer(transfer, "harness")
    if transfer == h.transfer:
        return
    h.banks = None
    gc.collect()
    h.banks = build_banks(*h._bank_args, unique=h.cfg.unique_experts, q_block=h.cfg.q_block, transfer=transfer)
    h.transfer = transfer


def _restrict_bias(bias, n):
    return bias.at[:n].add(100.0)


def _runner(decode):
    """``run(start, n)`` over ``decode(start, n)``, checking that runs continue where the previous one stopped."""
    state = {"next": 0}

    def run(start, n):
        if start not in (0, state["next"]):
            raise ValueError(f"harness: run(start={start}) must start at 0 or continue at {state['next']}")
        outs = decode(start, n)
        state["next"] = start + n
        return outs

    return run


def _chain(xs, decode_n):
    """``run`` for the stand-in model: ``decode_n(embeds, prev)`` over the token embeddings ``xs[start:start + n]``,
    carrying the last output between runs (``moe_stack.token_input``)."""
    last = {}

    def decode(start, n):
        if start + n > len(xs):
            raise ValueError(f"harness: tokens {start}..{start + n - 1} requested, {len(xs)} embeddings built")
        outs = decode_n(xs[start:start + n], last["y"] if start else None)
        last["y"] = outs[-1]
        return outs

    return _runner(decode)


def _loop(step):
    """decode_n for a one-token step function x -> out: chained calls, not waited for."""
    def decode_n(embeds, prev):
        outs = []
        for e in embeds:
            prev = step(token_input(e, prev))
            outs.append(prev)
        return outs

    return decode_n


class MoEOnlyHarness:
    """The MoE layers alone (moe_stack's stand-in model); token embeddings: random hidden states [1, D], fixed per
    position; each token's input also carries the previous token's output (``moe_stack.token_input``)."""

    def __init__(self, cfg, precision: str, key, transfer: str = "stacked-jit"):
        kb, kr, kx = jax.random.split(key, 3)
        self.cfg, self.top_k, self.n_experts = cfg, cfg.top_k, cfg.experts
        self._bank_args = (cfg.layers, cfg.experts, cfg.hidden, cfg.inter, precision, kb)
        self.transfer = transfer
        self.banks = build_banks(*self._bank_args, unique=cfg.unique_experts, q_block=cfg.q_block, transfer=transfer)
        self.routers = []
        for k in jax.random.split(kr, cfg.layers):
            gate = jax.random.normal(k, (cfg.experts, cfg.hidden), jnp.float32) / np.sqrt(cfg.hidden)
            self.routers.append((gate.astype(jnp.bfloat16), jnp.zeros(cfg.experts, jnp.float32)))
        self.restricted_experts = list(range(min(cfg.slots)))
        self.restricted = [(g, _restrict_bias(b, min(cfg.slots))) for g, b in self.routers]
        n = cfg.warmup + cfg.tokens
        self.xs = [x[None] for x in jax.random.normal(kx, (n, cfg.hidden), jnp.bfloat16)]
        self.full = [b.all_resident() for b in self.banks]

    def _routers(self, restricted):
        return self.restricted if restricted else self.routers

    def resident(self, restricted):
        rt, k, full = self._routers(restricted), self.top_k, self.full
        return [("one_jit", _chain(self.xs, _loop(lambda x: resident_decode_step(full, rt, x, k=k))), False),
                ("eager", _chain(self.xs, _loop(lambda x: eager_resident_step(full, rt, x, k))), True)]

    def cached(self, slots, policy, prefetch, restricted=False, speculative=False):
        moe = OffloadedMoE(self.banks, OffloadConfig(slots=slots, policy=policy, prefetch=prefetch,
                                                     speculative=speculative))
        rt = self._routers(restricted)
        return _chain(self.xs, lambda embeds, prev: moe_only_decode(moe, rt, embeds, self.top_k, prev=prev)), moe

    def speculative_pass(self, moe: OffloadedMoE, restricted=True):
        """``run`` of bare chained ``speculative_stack`` calls on ``moe``'s current slots (no host read, no policy,
        no repair): the device-side floor of the pipelined speculative loop (diagnostic; outputs are exact only while
        every layer hits)."""
        rt, k = self._routers(restricted), self.top_k
        return _chain(self.xs, _loop(lambda x: speculative_stack(x, rt, moe.device_slot_maps(),
                                                                 [c.weights() for c in moe.caches], k=k)[0]))

    def record(self, recorder):
        prev = None
        for pos, e in enumerate(self.xs):
            x, y = token_input(e, prev), None
            for l, ((gate, bias), wl) in enumerate(zip(self.routers, self.full)):
                x, h, ids, w = route_layer(x, y, gate, bias, k=self.top_k)
                recorder.record("bench", "decode", pos, l, np.asarray(ids), np.asarray(w))
                y = routed_experts(h, ids, w, wl)
            prev = residual_add(x, y)

    def drop_resident(self):
        self.full = None

    def use_transfer(self, transfer: str) -> None:
        _use_transfer(self, transfer)


class FullModelHarness:
    """The whole Nemotron-H (Nano-30B shapes, or a tiny config) with random weights; prefill ``cfg.prompt`` tokens at
    step 0, then one token per step, teacher-forced with fixed random tokens (identical inputs for every run)."""

    def __init__(self, cfg, precision: str, key, transfer: str = "stacked-jit"):
        if cfg.warmup < 1:
            raise ValueError("full-model bench: warmup must be >= 1 (step 0 includes the prefill)")
        if cfg.tiny_model:
            self.config = nh.NemotronHConfig.from_hf(
                nh.NANO_30B_HF, vocab_size=128, hidden_size=cfg.hidden, layer_types="ME*E", num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                n_groups=2, chunk_size=8, n_routed_experts=cfg.experts, num_experts_per_tok=cfg.top_k,
                moe_intermediate_size=cfg.inter, moe_shared_expert_intermediate_size=2 * cfg.inter)
        else:
            self.config = nh.NemotronHConfig.from_hf(nh.NANO_30B_HF)
        c = self.config
        self.cfg, self.top_k, self.n_experts = cfg, c.num_experts_per_tok, c.n_routed_experts
        self.moe_layers = [i for i, t in enumerate(c.layer_types) if t == "E"]
        kp, kb, kt = jax.random.split(key, 3)
        self.params = random_dense_params(c, kp)
        self._bank_args = (len(self.moe_layers), c.n_routed_experts, c.hidden_size, c.moe_intermediate_size,
                           precision, kb)
        self.transfer = transfer
        self.banks = build_banks(*self._bank_args, unique=cfg.unique_experts, q_block=cfg.q_block, transfer=transfer)
        n = cfg.prompt + cfg.warmup + cfg.tokens
        self.tokens = np.asarray(jax.random.randint(kt, (1, n), 0, c.vocab_size, jnp.int32))
        self.restricted_experts = list(range(min(cfg.slots)))
        self.restricted_params = self._with_bias(self.params, min(cfg.slots))
        self.full = self._with_experts(self.params, [b.all_resident() for b in self.banks])
        self._fwd = jax.jit(nh.forward, static_argnums=0, static_argnames="moe_impl")

    def _with_bias(self, params, n):
        layers = list(params["layers"])
        for i in self.moe_layers:
            mixer = dict(layers[i]["mixer"], router_bias=_restrict_bias(layers[i]["mixer"]["router_bias"], n))
            layers[i] = dict(layers[i], mixer=mixer)
        return dict(params, layers=layers)

    def _with_experts(self, params, experts):
        layers = list(params["layers"])
        for i, ex in zip(self.moe_layers, experts):
            layers[i] = dict(layers[i], mixer=dict(layers[i]["mixer"], experts=ex))
        return dict(params, layers=layers)

    def _decoder(self, forward, decode=None):
        """run(start, n) over ``forward(tokens, cache, phase)`` (prefill at start 0, then one call per token) or, with
        ``decode(tokens [1, n], cache)`` (→ logits per token, cache), one decode call per run (the offloaded model's
        ``decode``: pipelined speculative chains)."""
        c, p0 = self.config, self.cfg.prompt
        state = {}

        def run(start, n):
            if start == 0:
                cache = nh.init_cache(c, 1, self.tokens.shape[1], jnp.bfloat16)
                _, state["cache"] = forward(jnp.asarray(self.tokens[:, :p0]), cache, "prefill")
            if decode is not None:
                logits, state["cache"] = decode(jnp.asarray(self.tokens[:, p0 + start:p0 + start + n]), state["cache"])
                return logits
            out = []
            for i in range(start, start + n):
                logits, state["cache"] = forward(jnp.asarray(self.tokens[:, p0 + i:p0 + i + 1]), state["cache"],
                                                 "decode")
                out.append(logits)
            return out

        return _runner(run)

    def resident(self, restricted):
        full = self._with_bias(self.full, min(self.cfg.slots)) if restricted else self.full
        seg = OffloadedNemotronH(self.config, full, None)
        out = [("segmented", self._decoder(lambda toks, cache, phase: seg.forward(toks, cache)), True)]
        if self.cfg.full_one_jit:
            out.insert(0, ("one_jit", self._decoder(lambda toks, cache, phase: self._fwd(self.config, full, toks,
                                                                                             cache)), False))
        return out

    def cached(self, slots, policy, prefetch, restricted=False, speculative=False, recorder=None):
        params = self.restricted_params if restricted else self.params
        ocfg = OffloadConfig(slots=slots, policy=policy, prefetch=prefetch, speculative=speculative)
        off = OffloadedNemotronH(self.config, params, ocfg,
                                 banks=self.banks, recorder=recorder)
        def tr(phase):
            return ("bench", phase) if recorder is not None else None

        return self._decoder(lambda toks, cache, phase: off.forward(toks, cache, trace=tr(phase)),
                             lambda toks, cache: off.decode(toks, cache, trace=tr("decode"))), off.moe

    def record(self, recorder):
        run, _ = self.cached(max(s for s in self.cfg.slots if s <= self.n_experts), "lru", False,
                             recorder=recorder)
        run(0, self.cfg.warmup + self.cfg.tokens)

    def drop_resident(self):
        self.full = None

    def use_transfer(self, transfer: str) -> None:
        _use_transfer(self, transfer)
