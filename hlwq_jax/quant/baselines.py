"""Baseline weight quantizers with the same shape of API as HLWQ (docs/hlwq.md §4), each a registered pytree.

All work on [out, in] or stacked [E, out, in] weights, group along ``in`` inside each row (``in`` zero-padded to a
multiple of the group, trimmed on dequantize), pack codes with ``packing.pack_codes`` (true b-bit, LSB-first per
row) and count every stored bit in ``bits_per_weight``.

* ``RTNArray`` — symmetric round-to-nearest INT-b, group g: scale = max|w| / (2^(b−1) − 1) rounded to fp16,
  q = clamp(round(w / scale), −2^(b−1), 2^(b−1) − 1), stored as q + 2^(b−1). INT4 g128 is CompressedTensors'
  "pack-quantized" scheme: 4 + 16/128 = 4.125 bits.   Invariant: W ≈ scale[g] · q.
* ``NF4Array`` — QLoRA NormalFloat4: 16 levels at normal quantiles, absmax per 64-block. Without double quant the
  absmax is fp32 (4.5 bits); with double quant the absmaxes minus their mean are int8-quantized per 256 with an fp32
  scale each (4 + 8/64 + 32/16384 ≈ 4.127 bits; bitsandbytes uses a non-linear 8-bit map here, we use linear int8).
  Invariant: W ≈ absmax[blk] · NF4[code].
* ``NVFP4Array`` — E2M1 values {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}; one FP8-E4M3 scale per 16 values and one FP32
  scale per matrix: s_t = amax / (6·448), s_blk = e4m3(amax_blk / 6 / s_t). 4.5 bits (+32 per matrix).
  Invariant: W ≈ s_t · s_blk · e2m1[code].
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from hlwq_jax.quant import packing
from hlwq_jax.quant.hlwq import check_weight, nearest_code


def _grouped(w: jax.Array, group: int) -> jax.Array:
    """[*lead, out, in] float32 → [*lead, out, n_groups, group] (zero padded)."""
    *lead, out, n_in = w.shape
    n_groups = -(-n_in // group)
    wf = w.astype(jnp.float32)
    if n_groups * group != n_in:
        wf = jnp.pad(wf, [(0, 0)] * (len(lead) + 1) + [(0, n_groups * group - n_in)])
    return wf.reshape(*lead, out, n_groups, group)


def _ungroup(v: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    return v.reshape(*v.shape[:-2], -1)[..., : shape[-1]].astype(dtype)


def _check_group(name: str, group: int) -> None:
    if not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"{name} must be a positive integer, got {group!r}")


class _Packed:
    """Shared accessors of the baseline arrays (fields ``packed``, static ``bits``, ``group``, ``shape``)."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def n_groups(self) -> int:
        return -(-self.shape[-1] // self.group)

    def unpack_codes(self) -> jax.Array:
        """uint8 [*lead, out, n_groups, group]."""
        codes = packing.unpack_codes(self.packed, self.bits, self.n_groups * self.group)
        return codes.reshape(*self.shape[:-1], self.n_groups, self.group)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.size


# ---------------------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RTNArray(_Packed):
    packed: jax.Array  # uint8 [*lead, out, ceil(n_groups·g·b/8)], codes q + 2^(b−1)
    scales: jax.Array  # float16 [*lead, out, n_groups]
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return int(self.packed.size) + 2 * int(self.scales.size)

    def int_values(self) -> jax.Array:
        """Signed integers q, int32 [*lead, out, n_groups, group]."""
        return self.unpack_codes().astype(jnp.int32) - (1 << (self.bits - 1))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        v = self.int_values().astype(jnp.float32) * self.scales.astype(jnp.float32)[..., None]
        return _ungroup(v, self.shape, dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group"))
def _rtn_core(w, *, bits, group):
    g = _grouped(w, group)
    qmax = (1 << (bits - 1)) - 1
    scale = (jnp.max(jnp.abs(g), axis=-1) / qmax).astype(jnp.float16)
    s32 = scale.astype(jnp.float32)
    q = jnp.where(s32[..., None] > 0, jnp.round(g / jnp.where(s32 > 0, s32, 1.0)[..., None]), 0.0)
    q = jnp.clip(q, -(qmax + 1), qmax).astype(jnp.int32) + (qmax + 1)
    codes = q.astype(jnp.uint8).reshape(*g.shape[:-2], -1)
    return packing.pack_codes(codes, bits), scale


def quantize_rtn(w, bits: int = 4, group_size: int = 128, name: str | None = None) -> RTNArray:
    """Symmetric round-to-nearest INT-``bits`` with one fp16 scale per ``group_size`` inputs."""
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    _check_group("group_size", group_size)
    w = jnp.asarray(w)
    check_weight(w, name)
    packed, scales = _rtn_core(w, bits=bits, group=group_size)
    if bool(jnp.any(jnp.isinf(scales))):
        raise ValueError(f"tensor {name!r}: a group scale exceeds the float16 range")
    return RTNArray(packed=packed, scales=scales, bits=bits, group=group_size, shape=tuple(map(int, w.shape)))


# ---------------------------------------------------------------------------------------------------------------
def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels (QLoRA): normal quantiles with offset 0.9677, an exact zero, normalised to [−1, 1]."""
    offset = 0.9677083
    pos = special.ndtri(np.linspace(offset, 0.5, 9)[:-1])
    neg = -special.ndtri(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / np.max(np.abs(v))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Array(_Packed):
    packed: jax.Array  # uint8 [*lead, out, n_groups·group/2]
    absmax: jax.Array  # float32 [*lead, out, n_groups]  (double_quant: int8 codes of absmax − offset)
    dq_scales: jax.Array  # float32 [n_dq] per 256 absmaxes (double_quant), else [0]
    dq_offset: jax.Array  # float32 [] (double_quant), else 0
    group: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    double_quant: bool = dataclasses.field(metadata=dict(static=True), default=False)
    bits = 4
    DQ_BLOCK = 256

    @property
    def nbytes(self) -> int:
        absmax_bytes = int(self.absmax.size) * (1 if self.double_quant else 4)
        extra = 4 * int(self.dq_scales.size) + (4 if self.double_quant else 0)
        return int(self.packed.size) + absmax_bytes + extra

    def block_absmax(self) -> jax.Array:
        """float32 [*lead, out, n_groups] (dequantizes the absmaxes under double quant)."""
        if not self.double_quant:
            return self.absmax
        flat = self.absmax.reshape(-1).astype(jnp.float32)
        n = flat.shape[0]
        pad = (-n) % self.DQ_BLOCK
        blocks = jnp.pad(flat, (0, pad)).reshape(-1, self.DQ_BLOCK) * self.dq_scales[:, None]
        return (blocks.reshape(-1)[:n] + self.dq_offset).reshape(self.absmax.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        levels = jnp.asarray(nf4_levels(), jnp.float32)
        v = levels[self.unpack_codes()] * self.block_absmax()[..., None]
        return _ungroup(v, self.shape, dtype)


@functools.partial(jax.jit, static_argnames=("group",))
def _nf4_core(w, *, group):
    g = _grouped(w, group)
    absmax = jnp.max(jnp.abs(g), axis=-1)
    z = g / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    codes = nearest_code(z, jnp.asarray(nf4_levels(), jnp.float32), 4)
    return packing.pack_codes(codes.reshape(*g.shape[:-2], -1), 4), absmax


def _double_quant(absmax: jax.Array, block: int):
    flat = absmax.reshape(-1)
    offset = jnp.mean(flat)
    centred = flat - offset
    pad = (-flat.shape[0]) % block
    blocks = jnp.pad(centred, (0, pad)).reshape(-1, block)
    scale = jnp.max(jnp.abs(blocks), axis=-1) / 127.0
    q = jnp.round(blocks / jnp.where(scale > 0, scale, 1.0)[:, None]).astype(jnp.int8)
    return q.reshape(-1)[: flat.shape[0]].reshape(absmax.shape), scale, offset


def quantize_nf4(w, block_size: int = 64, double_quant: bool = False, name: str | None = None) -> NF4Array:
    """NF4 with one absmax per ``block_size`` inputs (optionally double-quantized)."""
    _check_group("block_size", block_size)
    w = jnp.asarray(w)
    check_weight(w, name)
    packed, absmax = _nf4_core(w, group=block_size)
    if double_quant:
        q, scales, offset = _double_quant(absmax, NF4Array.DQ_BLOCK)
        return NF4Array(packed=packed, absmax=q, dq_scales=scales, dq_offset=offset, group=block_size,
                        shape=tuple(map(int, w.shape)), double_quant=True)
    return NF4Array(packed=packed, absmax=absmax, dq_scales=jnp.zeros((0,), jnp.float32),
                    dq_offset=jnp.zeros((), jnp.float32), group=block_size, shape=tuple(map(int, w.shape)))


# ---------------------------------------------------------------------------------------------------------------
E2M1 = np.array([-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)  # 15 distinct values
_E4M3_MAX = 448.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NVFP4Array(_Packed):
    packed: jax.Array  # uint8 [*lead, out, n_groups·16/2], codes index E2M1 (0..14)
    block_scales: jax.Array  # float8_e4m3fn [*lead, out, n_groups]
    tensor_scale: jax.Array  # float32 [*lead] (one per matrix)
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    bits = 4
    group = 16

    @property
    def nbytes(self) -> int:
        return int(self.packed.size) + int(self.block_scales.size) + 4 * int(self.tensor_scale.size)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        vals = jnp.asarray(E2M1)[self.unpack_codes()]
        scale = self.block_scales.astype(jnp.float32) * self.tensor_scale[..., None, None]
        return _ungroup(vals * scale[..., None], self.shape, dtype)


@jax.jit
def _nvfp4_core(w):
    g = _grouped(w, 16)
    amax_t = jnp.max(jnp.abs(g), axis=(-3, -2, -1))  # per matrix
    s_t = jnp.where(amax_t > 0, amax_t / (6.0 * _E4M3_MAX), 1.0)
    amax_b = jnp.max(jnp.abs(g), axis=-1)
    s_b = (amax_b / 6.0 / s_t[..., None, None]).astype(jnp.float8_e4m3fn)
    denom = s_b.astype(jnp.float32) * s_t[..., None, None]
    z = g / jnp.where(denom > 0, denom, 1.0)[..., None]
    codes = nearest_code(jnp.clip(z, -6.0, 6.0), jnp.asarray(E2M1), 4)
    codes = jnp.where(denom[..., None] > 0, codes, 7)  # index 7 is 0.0
    return packing.pack_codes(codes.reshape(*g.shape[:-2], -1), 4), s_b, s_t.astype(jnp.float32)


def quantize_nvfp4(w, name: str | None = None) -> NVFP4Array:
    """NVFP4: E2M1 codes, an E4M3 scale per 16 inputs, an FP32 scale per matrix."""
    w = jnp.asarray(w)
    check_weight(w, name)
    packed, s_b, s_t = _nvfp4_core(w)
    return NVFP4Array(packed=packed, block_scales=s_b, tensor_scale=s_t, shape=tuple(map(int, w.shape)))
