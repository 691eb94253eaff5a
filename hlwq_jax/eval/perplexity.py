"""Perplexity over a token stream under a named protocol.

Protocols (always reported by name, with whether BOS is prepended):
  "chunks"  non-overlapping windows of L tokens (GPTQ style); the tail shorter than L is dropped. The first token
            of each window is context only (L−1 scored per window). With BOS the model sees [BOS] + the window
            (its last token dropped: nothing to predict) and BOS is extra context only, never a scored prediction,
            so with or without BOS exactly the same tokens are scored (the convention of the anchors in models.md).
  "sliding" windows of W tokens starting every S tokens (HF convention): window k covers [kS, min(kS+W, n)) and
            scores only the tokens after the previous window's end (the last S of each window after the first);
            ends when a window reaches the end of the stream. The HLWQ paper's protocol is W=2048, S=512.

Public signatures:
  Window(start, end, score_from)                      text-token indices; scored t in [max(score_from, start+1), end)
  chunk_windows(n, window, max_windows=None) / sliding_windows(n, window=2048, stride=512, max_windows=None)
  make_windows(protocol, n, window, stride=512, max_windows=None) -> list[Window]
  make_batch(tokens, windows, bos_id, length) -> (inputs, targets, mask)   int32 / int32 / bool [B, length]
  token_nll(logits, targets, mask) -> (nll_sum f32, count int32)           jnp; logits [B, T, V]
  token_nll_reference(logits, targets, mask) -> (float, int)              float64 numpy
  evaluate(nll_fn, tokens, windows, bos_id, batch_size, progress=None) -> PPLResult
      nll_fn(inputs, targets, mask) -> (nll_sum, count); batches are padded with masked rows to batch_size.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

PROTOCOLS = ("chunks", "sliding")


@dataclasses.dataclass(frozen=True)
class Window:
    start: int
    end: int
    score_from: int


@dataclasses.dataclass(frozen=True)
class PPLResult:
    ppl: float
    nll_sum: float
    tokens: int
    windows: int


def chunk_windows(n: int, window: int, max_windows: int | None = None) -> list[Window]:
    if window < 2:
        raise ValueError(f"chunks protocol: window {window} must be >= 2")
    count = n // window if max_windows is None else min(n // window, max_windows)
    if count < 1:
        raise ValueError(f"chunks protocol: {n} tokens hold no full window of {window}")
    return [Window(i * window, (i + 1) * window, i * window) for i in range(count)]


def sliding_windows(n: int, window: int = 2048, stride: int = 512, max_windows: int | None = None) -> list[Window]:
    if not 1 <= stride <= window:
        raise ValueError(f"sliding protocol: stride {stride} must be in [1, window={window}]")
    if n < 2:
        raise ValueError(f"sliding protocol: {n} tokens are too few")
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n)
        out.append(Window(begin, end, prev_end))
        prev_end = end
        if end == n or (max_windows is not None and len(out) >= max_windows):
            return out
        begin += stride


def make_windows(protocol: str, n: int, window: int, stride: int = 512, max_windows: int | None = None):
    if protocol == "chunks":
        return chunk_windows(n, window, max_windows)
    if protocol == "sliding":
        return sliding_windows(n, window, stride, max_windows)
    raise ValueError(f"unknown perplexity protocol {protocol!r}; expected one of {PROTOCOLS}")


def make_batch(tokens: np.ndarray, windows: list[Window], bos_id: int | None, length: int):
    """Model inputs, next-token targets and score mask for a batch of windows (rows past len(windows) masked)."""
    b = len(windows)
    inputs = np.zeros((b, length), np.int32)
    targets = np.zeros((b, length), np.int32)
    mask = np.zeros((b, length), bool)
    for r, w in enumerate(windows):
        seq = np.asarray(tokens[w.start:w.end], np.int32)
        if bos_id is not None:
            inp, tgt, idx = np.concatenate([[bos_id], seq[:-1]]), seq, np.arange(w.start, w.end)
        else:
            inp, tgt, idx = seq, np.append(seq[1:], 0), np.arange(w.start + 1, w.end + 1)
        if len(inp) > length:
            raise ValueError(f"make_batch: window of {len(inp)} tokens exceeds length {length}")
        inputs[r, :len(inp)], targets[r, :len(inp)] = inp, tgt
        mask[r, :len(inp)] = (idx >= max(w.score_from, w.start + 1)) & (idx < w.end)
    return inputs, targets, mask


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Sum of −log p(target) over masked positions (fp32 log-softmax) and the number of scored positions."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)                                              # [B, T]
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jnp.where(mask, lse - picked, 0.0)
    return jnp.sum(nll), jnp.sum(mask.astype(jnp.int32))


def token_nll_reference(logits, targets, mask):
    lg = np.asarray(logits, np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(lg, np.asarray(targets)[..., None], -1)[..., 0]
    mask = np.asarray(mask, bool)
    return float(np.sum((lse - picked)[mask])), int(mask.sum())


def evaluate(nll_fn: Callable, tokens, windows: list[Window], bos_id: int | None, batch_size: int,
             progress: Callable | None = None) -> PPLResult:
    """Perplexity exp(Σ nll / Σ count) over all windows; progress(n_windows_done) called after each batch."""
    tokens = np.asarray(tokens)
    length = max(w.end - w.start for w in windows)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        inputs, targets, mask = make_batch(tokens, chunk, bos_id, length)
        if len(chunk) < batch_size:                                                      # fixed shapes: pad rows
            pad = batch_size - len(chunk)
            inputs, targets, mask = (np.concatenate([a, np.zeros((pad, length), a.dtype)])
                                     for a in (inputs, targets, mask))
        s, c = nll_fn(jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask))
        total += float(s)
        count += int(c)
        if progress is not None:
            progress(len(chunk))
    if count == 0:
        raise ValueError("perplexity: no scored tokens")
    return PPLResult(math.exp(total / count), total, count, len(windows))
