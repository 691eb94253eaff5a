"""Production chunked SSD in plain XLA (fp32 einsums, group-aware: B/C are never expanded to heads).

  ssd_chunked(x, dt, A, Bm, Cm, chunk_size, initial_state=None) -> (y [B,L,H,P] f32, final_state [B,H,P,N] f32)
  ssd_step(state, x, dt, A, Bm, Cm) -> (y [B,H,P] f32, state [B,H,P,N] f32)        one decode step
Shapes and semantics as hlwq_jax.ops.ssd.reference (heads split as h = (g, r), r = H // G).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hlwq_jax.ops.ssd.reference import segsum


def ssd_chunked(x, dt, A, Bm, Cm, chunk_size: int, initial_state=None):
    b, l, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    r, q = h // g, chunk_size
    pad = (-l) % q
    c = (l + pad) // q
    f32 = jnp.float32
    with jax.named_scope("ssd_prep"):
        dtf = jnp.pad(dt.astype(f32), [(0, 0), (0, pad), (0, 0)])
        xd = jnp.pad(x.astype(f32), [(0, 0), (0, pad), (0, 0), (0, 0)]) * dtf[..., None]
        X = xd.reshape(b, c, q, g, r, p)
        Bc = jnp.pad(Bm.astype(f32), [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, c, q, g, n)
        Cc = jnp.pad(Cm.astype(f32), [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, c, q, g, n)
        dA = (dtf * A.astype(f32)).reshape(b, c, q, g, r).transpose(0, 3, 4, 1, 2)   # [b,g,r,c,q]
        cs = jnp.cumsum(dA, axis=-1)
    with jax.named_scope("ssd_intra"):
        CB = jnp.einsum("bclgn,bcsgn->bgcls", Cc, Bc)                                  # [b,g,c,q,q]
        M = CB[:, :, None] * jnp.exp(segsum(dA))                                       # [b,g,r,c,q,q]
        y_diag = jnp.einsum("bgrcls,bcsgrp->bclgrp", M, X)
    with jax.named_scope("ssd_chunk_states"):
        Xw = X * jnp.exp(cs[..., -1:] - cs).transpose(0, 3, 4, 1, 2)[..., None]        # [b,c,q,g,r,p]
        states = jnp.einsum("bclgn,bclgrp->bcgrpn", Bc, Xw)
    with jax.named_scope("ssd_inter"):
        init = (jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32))
        states = jnp.concatenate([init.reshape(b, 1, g, r, p, n), states], axis=1)     # [b,c+1,g,r,p,n]
        decay = jnp.exp(segsum(jnp.pad(cs[..., -1], [(0, 0)] * 3 + [(1, 0)])))        # [b,g,r,c+1,c+1]
        new = jnp.einsum("bgrzc,bcgrpn->bzgrpn", decay, states)
        prev, final = new[:, :-1], new[:, -1]
    with jax.named_scope("ssd_out"):
        Cw = jnp.exp(cs).transpose(0, 3, 4, 1, 2)                                     # [b,c,q,g,r]
        y_off = jnp.einsum("bclgn,bcgrpn->bclgrp", Cc, prev) * Cw[..., None]
    y = (y_diag + y_off).reshape(b, c * q, h, p)[:, :l]
    return y, final.reshape(b, h, p, n)


def ssd_step(state, x, dt, A, Bm, Cm):
    """One recurrence step. state [B,H,P,N], x [B,H,P], dt [B,H], A [H], Bm/Cm [B,G,N]."""
    b, h, p, n = state.shape
    g = Bm.shape[1]
    f32 = jnp.float32
    dtf = dt.astype(f32)
    S = state.astype(f32).reshape(b, g, h // g, p, n)
    dA = jnp.exp(dtf * A.astype(f32)).reshape(b, g, h // g)
    xd = (x.astype(f32) * dtf[..., None]).reshape(b, g, h // g, p)
    S = S * dA[..., None, None] + xd[..., None] * Bm.astype(f32)[:, :, None, None, :]
    y = jnp.einsum("bgrpn,bgn->bgrp", S, Cm.astype(f32))
    return y.reshape(b, h, p), S.reshape(b, h, p, n)
