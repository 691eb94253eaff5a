"""Plain SSD references (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060, Listing 1).

Shapes: x [B, L, H, P] (un-discretised input), dt [B, L, H] (after softplus/clamp), A [H] (negative),
Bm, Cm [B, L, G, N] with head h reading group h // (H // G), initial_state [B, H, P, N].
The model is, per head:  S_t = exp(dt_t A) S_{t-1} + dt_t x_t (x) B_t ;  y_t = S_t C_t   (no D skip here).

  ssd_reference(x, dt, A, Bm, Cm, chunk_size, initial_state=None) -> (y [B,L,H,P] f32, final_state [B,H,P,N] f32)
      the paper's four chunked steps, readable, no speed tricks (groups expanded to heads).
  ssd_recurrence_numpy(x, dt, A, Bm, Cm, initial_state=None) -> (y, final_state)   float64 sequential scan.
  segsum(a) -> [..., Q, Q]: out[..., i, j] = sum_{j < k <= i} a[..., k] for j <= i, -inf above the diagonal,
      computed stably (mask, then cumsum; not a difference of cumsums).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def segsum(a: jnp.ndarray) -> jnp.ndarray:
    q = a.shape[-1]
    rep = jnp.broadcast_to(a[..., None], (*a.shape, q))            # rep[..., k, j] = a[..., k]
    strict = jnp.tril(jnp.ones((q, q), bool), -1)
    rep = jnp.where(strict, rep, 0.0)                               # keep k > j
    out = jnp.cumsum(rep, axis=-2)                                  # out[..., i, j] = sum_{j<k<=i} a_k
    return jnp.where(jnp.tril(jnp.ones((q, q), bool)), out, -jnp.inf)


def _chunk(t, n_chunks, q):
    return t.reshape(t.shape[0], n_chunks, q, *t.shape[2:])


def ssd_reference(x, dt, A, Bm, Cm, chunk_size: int, initial_state=None):
    """Chunked SSD, four steps; see module docstring."""
    b, l, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    q = chunk_size
    pad = (-l) % q
    f32 = jnp.float32
    rep = h // g
    # 0. discretise, expand groups to heads, pad L with dt = 0 (padded steps neither decay nor write the state)
    xd = x.astype(f32) * dt.astype(f32)[..., None]                         # [b,l,h,p]
    dA = dt.astype(f32) * A.astype(f32)                                     # [b,l,h]
    Bh = jnp.repeat(Bm.astype(f32), rep, axis=2)                            # [b,l,h,n]
    Ch = jnp.repeat(Cm.astype(f32), rep, axis=2)
    xd, dA, Bh, Ch = (jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (xd, dA, Bh, Ch))
    c = (l + pad) // q
    X, Bc, Cc = _chunk(xd, c, q), _chunk(Bh, c, q), _chunk(Ch, c, q)        # [b,c,q,h,*]
    Ac = jnp.moveaxis(_chunk(dA, c, q), 3, 1)                               # [b,h,c,q]
    A_cum = jnp.cumsum(Ac, axis=-1)

    # 1. intra-chunk (diagonal blocks): Y = (C B^T ⊙ L) X
    L = jnp.exp(segsum(Ac))                                                 # [b,h,c,q,q]
    Y_diag = jnp.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, L, X)

    # 2. state at the end of each chunk, from that chunk's inputs only
    decay_states = jnp.exp(A_cum[..., -1:] - A_cum)                         # [b,h,c,q]
    states = jnp.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_states, X)

    # 3. inter-chunk recurrence over chunk boundaries (with the carried initial state)
    if initial_state is None:
        initial_state = jnp.zeros((b, h, p, n), f32)
    states = jnp.concatenate([initial_state.astype(f32)[:, None], states], axis=1)   # [b,c+1,h,p,n]
    decay_chunk = jnp.exp(segsum(jnp.pad(A_cum[..., -1], [(0, 0), (0, 0), (1, 0)])))  # [b,h,c+1,c+1]
    new_states = jnp.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. state -> output at each position (off-diagonal blocks)
    Y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, jnp.exp(A_cum))
    y = (Y_diag + Y_off).reshape(b, c * q, h, p)[:, :l]
    return y, final_state


def ssd_recurrence_numpy(x, dt, A, Bm, Cm, initial_state=None):
    """float64 token-by-token recurrence (the definition)."""
    x, dt, A = (np.asarray(t, np.float64) for t in (x, dt, A))
    Bm, Cm = np.asarray(Bm, np.float64), np.asarray(Cm, np.float64)
    b, l, h, p = x.shape
    rep = h // Bm.shape[2]
    S = np.zeros((b, h, p, Bm.shape[3])) if initial_state is None else np.array(initial_state, np.float64)
    y = np.zeros_like(x)
    for t in range(l):
        Bh, Ch = np.repeat(Bm[:, t], rep, 1), np.repeat(Cm[:, t], rep, 1)          # [b,h,n]
        S = np.exp(dt[:, t] * A)[..., None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None]
        y[:, t] = np.einsum("bhpn,bhn->bhp", S, Ch)
    return y, S
