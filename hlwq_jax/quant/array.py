"""``HLWQArray``: an HLWQ-quantized weight as a registered pytree.

Invariant (B = block_size, b = bits, n_blocks = ceil(in / B), codes = unpack(packed) [*lead, out, n_blocks, B]):

    W[..., o, k·B:(k+1)·B] ≈ norms[..., o, k] · (codebook[codes[..., o, k, :]] / √B) @ R_k

with R_k = H_B (rotation "hadamard"), H_B · diag(s_k) ("random-hadamard", s = ``random_signs(n_blocks·B, seed)``)
or I ("none"); columns ≥ in are padding and are trimmed. Leaves: ``packed`` uint8 [*lead, out, ceil(n_blocks·B·b/8)]
(LSB-first stream per row, see ``packing``), ``norms`` float16 [*lead, out, n_blocks], ``codebook`` float32 [2^b]
(always stored, ascending). Everything else is static metadata, so the array passes through ``jit``,
``device_put`` and checkpointing untouched. ``dequantize`` is the definition of the weight it stands for.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.quant import hadamard, packing

ROTATIONS = ("hadamard", "random-hadamard", "none")


class BlockGeometry:
    """Sizes derived from a blockwise-quantized weight's static ``shape`` [*lead, out, in] and ``block_size``."""

    shape: tuple[int, ...]
    block_size: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def out_features(self) -> int:
        return self.shape[-2]

    @property
    def n_blocks(self) -> int:
        return -(-self.in_features // self.block_size)

    @property
    def padded_in(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HLWQArray(BlockGeometry):
    packed: jax.Array
    norms: jax.Array
    codebook: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    rotation: str = dataclasses.field(metadata=dict(static=True), default="hadamard")
    seed: int = dataclasses.field(metadata=dict(static=True), default=0)
    codebook_name: str = dataclasses.field(metadata=dict(static=True), default="converged")

    # ---- stored size ---------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes + fp16 norms + the fp32 codebook."""
        return int(self.packed.size) + 2 * int(self.norms.size) + 4 * int(self.codebook.size)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (codes, norms and codebook) per logical weight; 5.125 + ε for Q5 with B = 128."""
        return 8.0 * self.nbytes / self.size

    # ---- the definition ------------------------------------------------------------------------------------
    def signs(self) -> jax.Array | None:
        """±1 float32 [padded_in] for "random-hadamard", else None."""
        if self.rotation == "random-hadamard":
            return jnp.asarray(hadamard.random_signs(self.padded_in, self.seed))
        return None

    def unpack_codes(self) -> jax.Array:
        """uint8 [*lead, out, n_blocks, B]."""
        codes = packing.unpack_codes(self.packed, self.bits, self.padded_in)
        return codes.reshape(*self.shape[:-1], self.n_blocks, self.block_size)

    def rotated_values(self, dtype=jnp.float32) -> jax.Array:
        """norms · codebook[codes] / √B in the rotated domain, [*lead, out, padded_in] (no H applied)."""
        vals = self.codebook.astype(jnp.float32)[self.unpack_codes()] * (1.0 / math.sqrt(self.block_size))
        vals = vals * self.norms.astype(jnp.float32)[..., None]
        return vals.reshape(*self.shape[:-1], self.padded_in).astype(dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight this array stands for, [*shape] in ``dtype`` (computed in float32)."""
        vals = self.rotated_values(jnp.float32)
        if self.rotation != "none":
            # R_k = H diag(s_k): apply H per block, then the signs.
            vals = hadamard.blockwise_rotate(vals, self.block_size)
            signs = self.signs()
            if signs is not None:
                vals = vals * signs
        return vals[..., : self.in_features].astype(dtype)

    # ---- structure -----------------------------------------------------------------------------------------
    def take(self, indices: jax.Array) -> "HLWQArray":
        """Select experts along the leading axis of a stacked [E, out, in] array → [len(indices), out, in]."""
        if self.ndim != 3:
            raise ValueError(f"take() needs a stacked [E, out, in] array, this one has shape {self.shape}")
        idx = jnp.asarray(indices)
        return dataclasses.replace(
            self,
            packed=jnp.take(self.packed, idx, axis=0),
            norms=jnp.take(self.norms, idx, axis=0),
            shape=(int(idx.shape[0]), *self.shape[1:]),
        )

    def validate(self) -> None:
        """Raise ValueError if leaves and metadata disagree."""
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits {self.bits} outside 1..8")
        hadamard.check_block_size(self.block_size)
        if self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}; expected one of {ROTATIONS}")
        lead = self.shape[:-1]
        want = {
            "packed": (lead + (packing.packed_size(self.padded_in, self.bits),), np.uint8),
            "norms": (lead + (self.n_blocks,), np.float16),
            "codebook": (((1 << self.bits),), np.float32),
        }
        for name, (shape, dtype) in want.items():
            leaf = getattr(self, name)
            if tuple(leaf.shape) != shape or leaf.dtype != dtype:
                raise ValueError(f"HLWQArray.{name}: got {leaf.dtype}{list(leaf.shape)}, expected {np.dtype(dtype)}{list(shape)}")
        cb = np.asarray(self.codebook)
        if not np.all(np.diff(cb) > 0):
            raise ValueError("HLWQArray.codebook must be strictly ascending")

    def __repr__(self) -> str:
        return (f"HLWQArray(shape={self.shape}, bits={self.bits}, block_size={self.block_size}, "
                f"rotation={self.rotation!r}, codebook={self.codebook_name!r}, bpw={self.bits_per_weight:.3f})")
