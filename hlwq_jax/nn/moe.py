"""Mixture of experts with a sigmoid router (DeepSeek-V3 / Nemotron-H style), dropless.

Public signatures:
  MoEConfig(hidden, num_experts, top_k, expert_dim, shared_dim=0, routed_scaling=1.0, norm_topk_prob=True,
            n_group=1, topk_group=1, capacity_factors=(1.25, 1.5, 1.75, 2.0, 2.5, 3.0))        frozen
  moe_param_shapes(cfg) -> nested {name: shape}:
      router [E, D], router_bias [E] (e_score_correction_bias, fp32), experts {up_proj [E, F, D], down_proj [E, D, F]},
      shared {up_proj [Fs, D], down_proj [D, Fs]} when shared_dim > 0.
  route(params, x, cfg) -> (weights [T, k] f32, expert_ids [T, k] int32)          x [T, D]
      logits = x·routerᵀ in fp32; s = sigmoid(logits); choose top-k of s + router_bias (bias used only for
      selection; group-limited when n_group > 1); weights = s[ids] / (Σ s[ids] + 1e-20) (if norm_topk_prob)
      × routed_scaling.
  moe(params, x, cfg, impl="capacity") -> y                                         x [..., D] -> [..., D]
      y = cast(moe_experts(...)) + relu2-MLP(shared)(x).
  moe_experts(experts, x, expert_ids, weights, impl="capacity", capacity=None, capacity_factors=CAPACITY_FACTORS)
      -> [T, D] f32
      The routed computation alone, y_t = Σ_j weights[t, j] · down_e(relu(up_e(x_t))²), e = expert_ids[t, j].
      `experts` = {"up_proj": [S, F, D], "down_proj": [S, D, F]} — any stack of S expert slots: expert_ids index its
      leading axis, so an offload engine can pass a device slot buffer and ids already mapped expert → slot.
      Leaves may be arrays or quantized leaves with `.take(idx)` and `.dequantize(dtype)` (HLWQArray [S, out, in]).
      impl:
        "capacity" (prefill; dropless): assignments sorted by expert give each its rank r within its expert; round
            i = 0, 1, ... processes ranks [iC, (i+1)C) of every expert as one batched matmul [S, C, D] x [S, F, D]
            (dispatch: a gather of token rows; combine: a gather of each token's k result rows, no scatter-add),
            looping (lax.while_loop) until the largest group is exhausted — no token is ever dropped, and a round
            reads every slot's weights once. C = `capacity` if given; else the smallest candidate
            ceil(f · T·k / S) (f in `capacity_factors`, rounded up to a multiple of 16, at least 16) that holds the
            largest group, chosen at run time by lax.switch among one compiled branch per candidate (the largest
            candidate loops over rounds when even it is too small), so uneven routing costs S·C rows with C just
            above the largest group instead of a second full round.
        "gather" (decode): gathers only the selected experts' weights (T·k of them) — use when T·k << S; HLWQ
            experts are contracted in the rotated domain (activations rotated, codes looked up in the reduction);
            experts wrapped by nn.linear.select_kernels(..., experts=True) with impl "pallas" / "pallas-decode"
            run the Pallas gather GEMV (ops.ragged_hlwq_matmul.gather_hlwq_matmul_pallas) instead.
        "ragged" / "ragged-mgpu" (prefill; dropless, no padding FLOPs): assignments sorted by expert, one grouped
            matmul per projection over the T·k sorted rows (hlwq_jax.ops.grouped_matmul, impl "xla" /
            "mosaic_gpu"; the latter needs an sm_90 GPU and 16-bit weights, and raises elsewhere), combine by the
            inverse permutation (a gather, no scatter-add). The expert output is rounded to x's dtype before relu²
            (as transformers' bf16 path does).
        "reference": a per-expert loop over all slots (tests).
  moe_reference(params, x, cfg) -> float64 numpy.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.nn.linear import KernelChoice, dense_weight, is_quantized
from hlwq_jax.nn.mlp import mlp, mlp_reference, relu2
from hlwq_jax.ops.grouped_matmul import grouped_matmul
from hlwq_jax.ops.hlwq_matmul.rotate import rotate_activations
from hlwq_jax.ops.hlwq_matmul.layout import HLWQPlanes
from hlwq_jax.ops.hlwq_matmul.xla import codes_and_norms
from hlwq_jax.ops.ragged_hlwq_matmul import RaggedPallasConfig, gather_hlwq_matmul_pallas
from hlwq_jax.quant.array import HLWQArray

CAPACITY_FACTORS = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
IMPLS = ("capacity", "gather", "ragged", "ragged-mgpu", "reference")
_GROUPED = {"ragged": "xla", "ragged-mgpu": "mosaic_gpu"}
HLWQ_STACKS = (HLWQArray, HLWQPlanes)
PALLAS_IMPLS = ("pallas", "pallas-decode")  # a KernelChoice expert leaf with one of these: the Pallas gather GEMV


def _unwrap(w):
    """The weight of a ``KernelChoice`` leaf (nn.linear.select_kernels), any other leaf as is."""
    return w.weight if isinstance(w, KernelChoice) else w


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    hidden: int
    num_experts: int
    top_k: int
    expert_dim: int
    shared_dim: int = 0
    routed_scaling: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    capacity_factors: tuple[float, ...] = CAPACITY_FACTORS

    def __post_init__(self):
        if not self.capacity_factors or any(f <= 0 for f in self.capacity_factors):
            raise ValueError(f"MoEConfig: capacity_factors {self.capacity_factors} must be positive and non-empty")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoEConfig: top_k {self.top_k} not in [1, num_experts={self.num_experts}]")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"MoEConfig: n_group {self.n_group} / topk_group {self.topk_group} invalid for "
                             f"{self.num_experts} experts")


def moe_param_shapes(cfg: MoEConfig) -> dict:
    e, d, f = cfg.num_experts, cfg.hidden, cfg.expert_dim
    s = {"router": (e, d), "router_bias": (e,), "experts": {"up_proj": (e, f, d), "down_proj": (e, d, f)}}
    if cfg.shared_dim:
        s["shared"] = {"up_proj": (cfg.shared_dim, d), "down_proj": (d, cfg.shared_dim)}
    return s


def route(params: dict, x: jax.Array, cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """Sigmoid router; see module docstring. x [T, D] -> (weights [T,k] f32, ids [T,k] int32)."""
    logits = x.astype(jnp.float32) @ params["router"].astype(jnp.float32).T           # [T, E]
    scores = jax.nn.sigmoid(logits)
    choice = scores + params["router_bias"].astype(jnp.float32)
    if cfg.n_group > 1:
        grouped = choice.reshape(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)                             # [T, n_group]
        keep = jax.lax.top_k(group_scores, cfg.topk_group)[1]
        gmask = jnp.zeros_like(group_scores, bool).at[jnp.arange(keep.shape[0])[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(gmask, cfg.num_experts // cfg.n_group, axis=1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, cfg.top_k)
    w = jnp.take_along_axis(scores, ids, axis=1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling, ids.astype(jnp.int32)


def _select(w, idx, dtype):
    """Rows `idx` of a stacked expert leaf, dense in dtype (only those experts are read / dequantized)."""
    w = _unwrap(w)
    if not is_quantized(w):
        return jnp.take(jnp.asarray(w), idx, axis=0).astype(dtype)
    if not hasattr(w, "take"):
        raise TypeError(f"moe: quantized expert leaf {type(w).__name__} has no take(); cannot gather experts")
    return w.take(idx).dequantize(dtype)


def _ffn(h_in, up, down, spec_up, spec_down, rot_down=lambda h: h):
    """relu2 expert FFN, fp32 accumulation; activation and output in the input dtype (as HF: bf16 expert outputs).
    rot_down maps the down projection's input rows into its weight's domain (see _operand)."""
    h = jnp.einsum(spec_up, h_in, up, preferred_element_type=jnp.float32)
    y = jnp.einsum(spec_down, rot_down(relu2(h).astype(h_in.dtype)), down, preferred_element_type=jnp.float32)
    return y.astype(h_in.dtype)


def _operand(w, dtype):
    """(stacked weight [S, out, in'] in dtype for a batched / grouped matmul, map of activation rows [..., in] →
    [..., in'] in dtype). An HLWQ stack stays in its rotated domain — Ŵ_rot = r · c[code] / √B, in' = padded in —
    and the rows are rotated instead (a [.., B] × [B, B] transform per row, not one per weight row). Other leaves are
    dequantized; dense arrays pass through."""
    w = _unwrap(w)
    if isinstance(w, HLWQ_STACKS):
        return w.rotated_values(dtype), lambda r: rotate_activations(r, w).astype(dtype)
    return dense_weight(w, dtype), lambda r: r


def _gathered_proj(w, rows, idx, dtype):
    """f32 [A, out]: row a of `rows` [A, in] times expert idx[a] of the stacked leaf w [S, out, in]. Only the selected
    experts are read; an HLWQ leaf is contracted in its rotated domain (rows rotated once, codes looked up and scaled by
    their norms inside the reduction: no inverse Hadamard on the weight, no dense weight materialised). A KernelChoice
    leaf with impl "pallas" / "pallas-decode" runs the Pallas gather GEMV (ops.ragged_hlwq_matmul) instead."""
    if isinstance(w, KernelChoice) and w.impl in PALLAS_IMPLS:
        return gather_hlwq_matmul_pallas(rows, w.weight, idx, config=w.config or RaggedPallasConfig(),
                                         interpret=w.interpret)
    w = _unwrap(w)
    if isinstance(w, HLWQ_STACKS):
        sel = w.take(idx)                                                             # [A, out, in] codes, norms
        xr = rotate_activations(rows, sel)                                            # [A, padded_in] f32
        codes, norms = codes_and_norms(sel)                                           # [A, out, nb, B], [A, out, nb]
        table = sel.codebook.astype(jnp.float32) * np.float32(1.0 / math.sqrt(sel.block_size))
        vals = table[codes] * norms[..., None]
        return jnp.sum(vals * xr.reshape(xr.shape[0], 1, sel.n_blocks, sel.block_size), axis=(-2, -1))
    return jnp.einsum("ad,afd->af", rows, _select(w, idx, dtype), preferred_element_type=jnp.float32)


def _experts_gather(experts, x, ids, w):
    t, k = ids.shape
    flat = ids.reshape(-1)
    xa = jnp.repeat(x, k, axis=0)                                                     # [A, D]
    h = relu2(_gathered_proj(experts["up_proj"], xa, flat, x.dtype)).astype(x.dtype)  # [A, F]
    y = _gathered_proj(experts["down_proj"], h, flat, x.dtype).astype(x.dtype)        # [A, D] (HF: bf16 outputs)
    return (w[..., None] * y.reshape(t, k, -1).astype(jnp.float32)).sum(1)          # elementwise: exact fp32


def _experts_capacity(experts, x, ids, w, capacities: tuple[int, ...]):
    t, k = ids.shape
    up, rot_up = _operand(experts["up_proj"], x.dtype)                                     # [S, F, D']
    down, rot_down = _operand(experts["down_proj"], x.dtype)                               # [S, D, F']
    s, d = up.shape[0], x.shape[-1]
    xr = rot_up(x)                                                                         # [T, D']
    flat_e = ids.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)                                         # assignments sorted by expert
    counts = jnp.zeros((s,), jnp.int32).at[flat_e].add(1)
    rank_sorted = jnp.arange(flat_e.shape[0], dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[flat_e[order]]
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted).reshape(t, k)     # rank within its expert
    x_pad = jnp.concatenate([xr, jnp.zeros((1, xr.shape[-1]), x.dtype)])              # row t = padding
    tok_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k)).reshape(-1)
    largest = jnp.max(counts)

    def rounds(capacity, up, down, x_pad, rank, w):
        def one_round(i, acc):
            local = rank - i * capacity
            valid = (local >= 0) & (local < capacity)
            dest = jnp.where(valid, ids * capacity + local, s * capacity)              # [T, k] slot or pad
            tok = jnp.full((s * capacity + 1,), t, jnp.int32).at[dest.reshape(-1)].set(tok_ids)[:-1]   # dispatch
            xe = x_pad[tok].reshape(s, capacity, -1)
            y = _ffn(xe, up, down, "scd,sfd->scf", "scf,sdf->scd", rot_down).reshape(s * capacity, d)
            rows = y[jnp.minimum(dest, s * capacity - 1)].astype(jnp.float32)   # [T, k, D] combine: gather, no atomics
            return acc + (jnp.where(valid, w, 0.0)[..., None] * rows.reshape(t, k, d)).sum(1)
        n_rounds = (largest + capacity - 1) // capacity
        return jax.lax.fori_loop(0, n_rounds, one_round, jnp.zeros((t, d), jnp.float32))

    branches = [functools.partial(rounds, c) for c in capacities]
    if len(branches) == 1:
        return branches[0](up, down, x_pad, rank, w)
    pick = jnp.sum(largest > jnp.asarray(capacities[:-1], jnp.int32))               # first candidate >= largest
    return jax.lax.switch(pick, branches, up, down, x_pad, rank, w)


def _experts_ragged(experts, x, ids, w, grouped_impl):
    t, k = ids.shape
    up, rot_up = _operand(experts["up_proj"], x.dtype)                               # [S, F, D']
    down, rot_down = _operand(experts["down_proj"], x.dtype)                         # [S, D, F']
    flat_e = ids.reshape(-1)                                                          # [A], A = T·k
    order = jnp.argsort(flat_e, stable=True)                                          # sorted position -> assignment
    sizes = jnp.zeros((up.shape[0],), jnp.int32).at[flat_e].add(1)                    # [S]
    xs = rot_up(x)[order // k]                                                        # [A, D'] dispatch
    h = grouped_matmul(xs, up, sizes, grouped_impl)                                   # [A, F]
    ys = grouped_matmul(rot_down(relu2(h)), down, sizes, grouped_impl)                # [A, D]
    where = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    rows = ys[where].reshape(t, k, -1).astype(jnp.float32)                            # combine: gather
    return (w[..., None] * rows).sum(1)


def _experts_reference(experts, x, ids, w):
    up, down = dense_weight(experts["up_proj"], x.dtype), dense_weight(experts["down_proj"], x.dtype)
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(up.shape[0]):
        y = _ffn(x, up[e], down[e], "td,fd->tf", "tf,df->td").astype(jnp.float32)
        out = out + y * jnp.sum(jnp.where(ids == e, w, 0.0), axis=1)[:, None]
    return out


def capacity_candidates(assignments: int, slots: int, factors: tuple[float, ...]) -> tuple[int, ...]:
    """Sorted distinct capacities ceil(f · assignments / slots), rounded up to a multiple of 16, at least 16."""
    caps = {max(16, -(-math.ceil(f * assignments / slots) // 16) * 16) for f in factors}
    return tuple(sorted(caps))


def moe_experts(experts: dict, x: jax.Array, expert_ids: jax.Array, weights: jax.Array, impl: str = "capacity",
                capacity: int | None = None, capacity_factors: tuple[float, ...] = CAPACITY_FACTORS) -> jax.Array:
    """Routed expert sum (fp32) for x [T, D]; see module docstring."""
    if expert_ids.shape != weights.shape or expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: ids {expert_ids.shape}, weights {weights.shape}, x {x.shape} disagree")
    if impl == "gather":
        return _experts_gather(experts, x, expert_ids, weights)
    if impl == "reference":
        return _experts_reference(experts, x, expert_ids, weights)
    if impl in _GROUPED:
        return _experts_ragged(experts, x, expert_ids, weights, _GROUPED[impl])
    if impl == "capacity":
        caps = (int(capacity),) if capacity is not None else capacity_candidates(
            expert_ids.size, experts["up_proj"].shape[0], capacity_factors)
        return _experts_capacity(experts, x, expert_ids, weights, caps)
    raise ValueError(f"moe_experts: unknown impl {impl!r}; expected one of {IMPLS}")


def moe(params: dict, x: jax.Array, cfg: MoEConfig, impl: str = "capacity") -> jax.Array:
    """Full MoE block for x [..., D]: routed experts + shared expert."""
    lead, d = x.shape[:-1], x.shape[-1]
    xt = x.reshape(-1, d)
    with jax.named_scope("moe_router"):
        w, ids = route(params, xt, cfg)
    with jax.named_scope("moe_experts"):
        y = moe_experts(params["experts"], xt, ids, w, impl=impl,
                        capacity_factors=cfg.capacity_factors).astype(x.dtype)
    if cfg.shared_dim:
        with jax.named_scope("moe_shared"):
            y = y + mlp(params["shared"], xt, "relu2")
    return y.reshape(*lead, d)


def moe_reference(params: dict, x, cfg: MoEConfig) -> np.ndarray:
    """float64 numpy MoE (independent top-k via argsort)."""
    x = np.asarray(x, np.float64)
    xt = x.reshape(-1, x.shape[-1])
    r = np.asarray(params["router"], np.float64)
    s = 1.0 / (1.0 + np.exp(-(xt @ r.T)))
    choice = s + np.asarray(params["router_bias"], np.float64)
    if cfg.n_group > 1:
        gs = np.sort(choice.reshape(len(xt), cfg.n_group, -1), -1)[..., -2:].sum(-1)
        drop = np.argsort(-gs, -1, kind="stable")[:, cfg.topk_group:]
        gm = np.ones_like(gs, bool)
        np.put_along_axis(gm, drop, False, -1)
        choice = np.where(np.repeat(gm, cfg.num_experts // cfg.n_group, 1), choice, -np.inf)
    ids = np.argsort(-choice, -1, kind="stable")[:, :cfg.top_k]
    w = np.take_along_axis(s, ids, 1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    w = w * cfg.routed_scaling
    up, down = (np.asarray(params["experts"][n], np.float64) for n in ("up_proj", "down_proj"))
    y = np.zeros_like(xt)
    for t in range(len(xt)):
        for j in range(cfg.top_k):
            e = ids[t, j]
            y[t] += w[t, j] * (down[e] @ (np.maximum(up[e] @ xt[t], 0.0) ** 2))
    if cfg.shared_dim:
        y += mlp_reference(params["shared"], xt, "relu2")
    return y.reshape(x.shape)
