"""Mamba2 mixer (pure functions; conv and SSM states in fp32).

Public signatures:
  Mamba2Config(hidden, num_heads, head_dim, state_size, n_groups, conv_kernel, chunk_size, eps=1e-5,
               use_conv_bias=True, use_bias=False, dt_clamp_min=0.0, dt_clamp_max=inf, ssd_impl="xla")   frozen
      dt = clip(softplus(dt_raw + dt_bias), dt_clamp_min, dt_clamp_max) (HF time_step_limit). (0, inf) = no clamp
      (the reference CUDA kernels, Nemotron's time_step_limit); HF transformers' pure-torch path clamps at
      config.time_step_min (1e-3) in its chunked scan (not in its decode step) — set dt_clamp_min=time_step_min to
      match it. We apply it in both paths so that decode stays equal to prefill.
  mamba2_param_shapes(cfg) -> {name: shape}:  in_proj [d_inner + conv_dim + H, D], conv1d_weight [conv_dim, K],
      conv1d_bias [conv_dim] (if use_conv_bias), A_log/D/dt_bias [H], norm [d_inner], out_proj [D, d_inner]
      (+ in_proj_bias/out_proj_bias if use_bias). conv_dim = d_inner + 2 G N, d_inner = H P.
  Mamba2State(conv [B, K-1, conv_dim] f32, ssm [B, H, P, N] f32);  init_mamba2_state(cfg, batch)
  mamba2(params, x, cfg, state=None) -> (y [B,T,D], new state or None)
      state None: fresh sequence, no state returned.  With a state: T == 1 takes the single-step recurrence, T > 1
      the chunked SSD starting from state.ssm with the conv window continued from state.conv.
  mamba2_reference(params, x, cfg, state=None) -> (y, (conv, ssm))   float64 numpy, token-by-token recurrence.
Dataflow: in_proj -> z | xBC | dt;  xBC = silu(causal depthwise conv1d(xBC) + bias);  x [T,H,P], B, C [T,G,N];
A = -exp(A_log);  dt = softplus(dt + dt_bias);  y = SSD(x, dt, A, B, C) + D x;
y = gated_rms_norm(y, z, norm, group = d_inner / G);  out_proj.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.nn.linear import dense_weight, linear
from hlwq_jax.nn.norms import gated_rms_norm, gated_rms_norm_reference
from hlwq_jax.ops.ssd import ssd, ssd_step


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    hidden: int
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    eps: float = 1e-5
    use_conv_bias: bool = True
    use_bias: bool = False
    dt_clamp_min: float = 0.0
    dt_clamp_max: float = float("inf")
    ssd_impl: str = "xla"

    def __post_init__(self):
        if self.num_heads % self.n_groups:
            raise ValueError(f"Mamba2Config: num_heads {self.num_heads} not a multiple of n_groups {self.n_groups}")
        if self.conv_kernel < 1 or self.chunk_size < 1:
            raise ValueError(f"Mamba2Config: conv_kernel {self.conv_kernel}, chunk_size {self.chunk_size} must be >= 1")

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.state_size


class Mamba2State(NamedTuple):
    conv: jax.Array   # [B, K-1, conv_dim] f32: last K-1 conv inputs
    ssm: jax.Array    # [B, H, P, N] f32


def mamba2_param_shapes(cfg: Mamba2Config) -> dict[str, tuple[int, ...]]:
    h = cfg.num_heads
    s = {"in_proj": (cfg.d_inner + cfg.conv_dim + h, cfg.hidden), "conv1d_weight": (cfg.conv_dim, cfg.conv_kernel),
         "A_log": (h,), "D": (h,), "dt_bias": (h,), "norm": (cfg.d_inner,), "out_proj": (cfg.hidden, cfg.d_inner)}
    if cfg.use_conv_bias:
        s["conv1d_bias"] = (cfg.conv_dim,)
    if cfg.use_bias:
        s.update(in_proj_bias=(s["in_proj"][0],), out_proj_bias=(cfg.hidden,))
    return s


def init_mamba2_state(cfg: Mamba2Config, batch: int) -> Mamba2State:
    return Mamba2State(jnp.zeros((batch, cfg.conv_kernel - 1, cfg.conv_dim), jnp.float32),
                       jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.state_size), jnp.float32))


def _check_params(params, cfg):
    want = mamba2_param_shapes(cfg)
    if set(params) != set(want):
        raise ValueError(f"mamba2: params keys {sorted(params)} != expected {sorted(want)}")
    for k, s in want.items():
        if tuple(params[k].shape) != s:
            raise ValueError(f"mamba2: {k} has shape {tuple(params[k].shape)}, expected {s}")


def _conv(params, xbc, conv_state, cfg):
    """Causal depthwise conv over xbc [B,T,C] continuing conv_state [B,K-1,C]; fp32. -> (silu out, new state)."""
    k, t = cfg.conv_kernel, xbc.shape[1]
    xp = jnp.concatenate([conv_state, xbc.astype(jnp.float32)], axis=1)             # [B, K-1+T, C]
    w = dense_weight(params["conv1d_weight"], jnp.float32)                           # [C, K]
    out = sum(xp[:, i:i + t] * w[:, i] for i in range(k))
    if cfg.use_conv_bias:
        out = out + params["conv1d_bias"].astype(jnp.float32)
    return jax.nn.silu(out), xp[:, xp.shape[1] - (k - 1):]


def mamba2(params: dict, x: jax.Array, cfg: Mamba2Config,
           state: Mamba2State | None = None) -> tuple[jax.Array, Mamba2State | None]:
    """Mamba2 mixer; see module docstring. x [B, T, D]."""
    _check_params(params, cfg)
    b, t, _ = x.shape
    h, p, g, n = cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size
    st = init_mamba2_state(cfg, b) if state is None else state
    with jax.named_scope("mamba_in_proj"):
        zxbcdt = linear(x, params["in_proj"])
        if cfg.use_bias:
            zxbcdt = zxbcdt + params["in_proj_bias"]
        z, xbc, dt = jnp.split(zxbcdt, [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)
    with jax.named_scope("mamba_conv"):
        xbc, conv_state = _conv(params, xbc, st.conv, cfg)
    xs = xbc[..., :cfg.d_inner].reshape(b, t, h, p)
    Bm = xbc[..., cfg.d_inner:cfg.d_inner + g * n].reshape(b, t, g, n)
    Cm = xbc[..., cfg.d_inner + g * n:].reshape(b, t, g, n)
    A = -jnp.exp(params["A_log"].astype(jnp.float32))
    dt = jax.nn.softplus(dt.astype(jnp.float32) + params["dt_bias"].astype(jnp.float32))
    if cfg.dt_clamp_min > 0.0 or cfg.dt_clamp_max < float("inf"):
        dt = jnp.clip(dt, cfg.dt_clamp_min, cfg.dt_clamp_max)
    with jax.named_scope("mamba_ssd"):
        if state is not None and t == 1:
            y, ssm = ssd_step(st.ssm, xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])
            y = y[:, None]
        else:
            y, ssm = ssd(xs, dt, A, Bm, Cm, chunk_size=cfg.chunk_size, initial_state=st.ssm, impl=cfg.ssd_impl)
        y = y + params["D"].astype(jnp.float32)[:, None] * xs
    with jax.named_scope("mamba_out"):
        y = gated_rms_norm(y.reshape(b, t, cfg.d_inner), z, params["norm"], cfg.d_inner // g, cfg.eps)
        out = linear(y.astype(x.dtype), params["out_proj"])
        if cfg.use_bias:
            out = out + params["out_proj_bias"]
    return out, (None if state is None else Mamba2State(conv_state, ssm))


def mamba2_reference(params: dict, x, cfg: Mamba2Config, state=None):
    """float64 numpy Mamba2 mixer, token by token. state: optional (conv [B,K-1,C], ssm [B,H,P,N])."""
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    h, hp, g, n, k = cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size, cfg.conv_kernel
    di, cd = cfg.d_inner, cfg.conv_dim
    conv = np.zeros((b, k - 1, cd)) if state is None else np.array(state[0], np.float64)
    S = np.zeros((b, h, hp, n)) if state is None else np.array(state[1], np.float64)
    zx = x @ p64["in_proj"].T + (p64["in_proj_bias"] if cfg.use_bias else 0.0)
    z, xbc, dtr = zx[..., :di], zx[..., di:di + cd], zx[..., di + cd:]
    A = -np.exp(p64["A_log"])
    ys = np.zeros((b, t, di))
    for i in range(t):
        win = np.concatenate([conv, xbc[:, i:i + 1]], 1)                              # [b,K,C]
        conv = win[:, 1:]
        c = np.einsum("bkc,ck->bc", win, p64["conv1d_weight"]) + (p64["conv1d_bias"] if cfg.use_conv_bias else 0)
        c = c / (1.0 + np.exp(-c))
        xs = c[:, :di].reshape(b, h, hp)
        Bm, Cm = c[:, di:di + g * n].reshape(b, g, n), c[:, di + g * n:].reshape(b, g, n)
        dt = np.logaddexp(0.0, dtr[:, i] + p64["dt_bias"])
        dt = np.clip(dt, cfg.dt_clamp_min, cfg.dt_clamp_max)
        Bh, Ch = np.repeat(Bm, h // g, 1), np.repeat(Cm, h // g, 1)
        S = np.exp(dt * A)[..., None, None] * S + (dt[..., None] * xs)[..., None] * Bh[:, :, None]
        ys[:, i] = (np.einsum("bhpn,bhn->bhp", S, Ch) + p64["D"][:, None] * xs).reshape(b, di)
    y = gated_rms_norm_reference(ys, z, p64["norm"], di // g, cfg.eps)
    out = y @ p64["out_proj"].T + (p64["out_proj_bias"] if cfg.use_bias else 0.0)
    return out, (conv, S)
