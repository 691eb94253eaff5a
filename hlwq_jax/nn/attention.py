"""Causal grouped-query attention with an optional preallocated KV cache (pure functions).

Public signatures:
  AttentionConfig(num_heads, num_kv_heads, head_dim, rope_theta=None, partial_rotary_factor=1.0, qk_norm=False,
                  qk_norm_eps=1e-6, qk_norm_scale_in_fp32=False, sliding_window=None, qkv_bias=False, scale=None,
                  softcap=None)                                       frozen; rope_theta None = no positional encoding
  attention_param_shapes(cfg, hidden) -> {name: shape}                the exact key set `attention` expects
  init_kv_cache(cfg, batch, max_len, dtype) -> KVCache(k, v, length)   k, v [B, max_len, kv, hd], length int32 []
  attention(params, x, cfg, cache=None) -> (y, cache)                  x [B, T, D] -> y [B, T, D]
      params: q_proj [H*hd, D], k_proj/v_proj [kv*hd, D], o_proj [D, H*hd]; with qkv_bias q_bias/k_bias/v_bias;
      with qk_norm q_norm/k_norm [hd] (RMSNorm per head, applied before RoPE).
      cache None: plain causal attention over x (positions 0..T-1). With a cache holding `length` tokens, x holds
      positions length..length+T-1; its keys/values are written at those rows and attention runs over rows
      < length + T (causal, windowed). The caller keeps length + T <= max_len (XLA would clamp the write).
  attention_reference(params, x, cfg, start=0, past_kv=None) -> y    float64 numpy, same definition.
Scores: (q . k) * scale (+ softcap*tanh(s/softcap)) in fp32; softmax fp32; probabilities cast to the value dtype.
Sliding window W: key position j is visible from query position i iff i - W < j <= i (HF convention).
RoPE: rotate-half on the first rotary_dim = int(head_dim * partial_rotary_factor) channels,
inv_freq_i = theta^(-2i / rotary_dim).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.nn.linear import linear
from hlwq_jax.nn.norms import rms_norm


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None = None
    partial_rotary_factor: float = 1.0
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    qk_norm_scale_in_fp32: bool = False
    sliding_window: int | None = None
    qkv_bias: bool = False
    scale: float | None = None
    softcap: float | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"AttentionConfig: num_heads {self.num_heads} not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.rope_theta is not None and (self.rotary_dim % 2 or self.rotary_dim <= 0):
            raise ValueError(f"AttentionConfig: rotary_dim {self.rotary_dim} must be a positive even number")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"AttentionConfig: sliding_window {self.sliding_window} must be >= 1")

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5 if self.scale is None else self.scale


class KVCache(NamedTuple):
    k: jax.Array        # [B, S, kv, hd]
    v: jax.Array        # [B, S, kv, hd]
    length: jax.Array   # int32 [], filled rows


def attention_param_shapes(cfg: AttentionConfig, hidden: int) -> dict[str, tuple[int, ...]]:
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {"q_proj": (h * hd, hidden), "k_proj": (kv * hd, hidden), "v_proj": (kv * hd, hidden),
              "o_proj": (hidden, h * hd)}
    if cfg.qkv_bias:
        shapes.update(q_bias=(h * hd,), k_bias=(kv * hd,), v_bias=(kv * hd,))
    if cfg.qk_norm:
        shapes.update(q_norm=(hd,), k_norm=(hd,))
    return shapes


def init_kv_cache(cfg: AttentionConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def _check_params(params, cfg, hidden):
    want = attention_param_shapes(cfg, hidden)
    if set(params) != set(want):
        raise ValueError(f"attention: params keys {sorted(params)} != expected {sorted(want)}")
    for k, s in want.items():
        if tuple(params[k].shape) != s:
            raise ValueError(f"attention: {k} has shape {tuple(params[k].shape)}, expected {s}")


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, rotary_dim: int) -> jax.Array:
    """Rotate-half RoPE on x [B, T, heads, hd] at integer positions [T] (or [B, T]); fp32 math."""
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq                     # [(B,) T, half]
    if ang.ndim == 2:
        ang = ang[None]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def _project(params, x, cfg):
    b, t, _ = x.shape
    q, k, v = (linear(x, params[n]) for n in ("q_proj", "k_proj", "v_proj"))
    if cfg.qkv_bias:
        q, k, v = q + params["q_bias"], k + params["k_bias"], v + params["v_bias"]
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, params["q_norm"], cfg.qk_norm_eps, scale_in_fp32=cfg.qk_norm_scale_in_fp32).astype(q.dtype)
        k = rms_norm(k, params["k_norm"], cfg.qk_norm_eps, scale_in_fp32=cfg.qk_norm_scale_in_fp32).astype(k.dtype)
    return q, k, v


def _attend(q, k, v, q_pos, k_pos, k_valid, cfg):
    """q [B,T,H,hd], k/v [B,S,kv,hd]; q_pos [T], k_pos [S], k_valid [S] bool -> [B,T,H,hd]."""
    b, t, _, hd = q.shape
    qg = q.reshape(b, t, cfg.num_kv_heads, cfg.groups, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * cfg.softmax_scale
    if cfg.softcap is not None:
        s = cfg.softcap * jnp.tanh(s / cfg.softcap)
    mask = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
    if cfg.sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - cfg.sliding_window
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, cfg.num_heads, hd).astype(q.dtype)


def attention(params: dict, x: jax.Array, cfg: AttentionConfig,
              cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Causal GQA attention; see module docstring. Returns (y [B,T,D], updated cache or None)."""
    b, t, d = x.shape
    _check_params(params, cfg, d)
    start = jnp.zeros((), jnp.int32) if cache is None else cache.length
    q_pos = start + jnp.arange(t, dtype=jnp.int32)
    q, k, v = _project(params, x, cfg)
    if cfg.rope_theta is not None:
        q = apply_rope(q, q_pos, cfg.rope_theta, cfg.rotary_dim)
        k = apply_rope(k, q_pos, cfg.rope_theta, cfg.rotary_dim)
    if cache is None:
        o = _attend(q, k, v, q_pos, q_pos, jnp.ones((t,), bool), cfg)
        new_cache = None
    else:
        ck = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0))
        k_pos = jnp.arange(ck.shape[1], dtype=jnp.int32)
        o = _attend(q, ck.astype(q.dtype), cv.astype(q.dtype), q_pos, k_pos, k_pos < start + t, cfg)
        new_cache = KVCache(ck, cv, start + t)
    y = linear(o.reshape(b, t, cfg.num_heads * cfg.head_dim), params["o_proj"])
    return y, new_cache


def attention_reference(params: dict, x, cfg: AttentionConfig, start: int = 0, past_kv=None) -> np.ndarray:
    """float64 numpy attention for x [B, T, D] at positions start..start+T-1.

    past_kv: optional (k, v) float arrays [B, start, kv, hd] of earlier positions (post-norm, post-RoPE)."""
    p = {n: np.asarray(a, np.float64) for n, a in params.items()}
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = x @ p["q_proj"].T, x @ p["k_proj"].T, x @ p["v_proj"].T
    if cfg.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
    if cfg.qk_norm:
        nrm = lambda a, w: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + cfg.qk_norm_eps) * w
        q, k = nrm(q, p["q_norm"]), nrm(k, p["k_norm"])
    pos = np.arange(start, start + t)
    if cfg.rope_theta is not None:
        rd, half = cfg.rotary_dim, cfg.rotary_dim // 2
        ang = pos[:, None] * cfg.rope_theta ** (-np.arange(0, rd, 2) / rd)
        c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        def rope(a):
            a1, a2 = a[..., :half], a[..., half:rd]
            return np.concatenate([a1 * c - a2 * s, a2 * c + a1 * s, a[..., rd:]], -1)
        q, k = rope(q), rope(k)
    if past_kv is not None:
        k = np.concatenate([np.asarray(past_kv[0], np.float64), k], 1)
        v = np.concatenate([np.asarray(past_kv[1], np.float64), v], 1)
    kpos = np.arange(k.shape[1])
    out = np.zeros((b, t, h, hd))
    for head in range(h):
        kh = head // cfg.groups
        sc = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, kh]) * cfg.softmax_scale
        if cfg.softcap is not None:
            sc = cfg.softcap * np.tanh(sc / cfg.softcap)
        ok = kpos[None, :] <= pos[:, None]
        if cfg.sliding_window is not None:
            ok &= kpos[None, :] > pos[:, None] - cfg.sliding_window
        sc = np.where(ok[None], sc, -np.inf)
        w = np.exp(sc - sc.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bts,bsd->btd", w, v[:, :, kh])
    return out.reshape(b, t, h * hd) @ p["o_proj"].T
