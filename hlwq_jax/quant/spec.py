"""``QuantSpec``: one quantizer configuration, its short name, and the one function that applies it to a tensor.

Names (used by experiments and configs):
  bf16                      no quantization (``parse_quant_name`` returns None)
  hlwq<b>[-b<B>][-orig|-torch|-uniform][-rnone|-rrandom]
                            HLWQ with b bits, block B (default 128), codebook converged / polarengine /
                            polarengine-torch / uniform (absmax grid), rotation hadamard / none / random-hadamard
  rtn<b>[-g<G>]             symmetric round-to-nearest INT-b, group G (default 128)
  nf4, nf4-dq               NF4 (absmax per 64), with double quantization
  nvfp4                     NVFP4 (E2M1, E4M3 per 16, FP32 per matrix)
"""
from __future__ import annotations

import dataclasses
import re

from hlwq_jax.quant import baselines
from hlwq_jax.quant.hlwq import quantize

METHODS = ("hlwq", "rtn", "nf4", "nvfp4")
_CODEBOOK_SUFFIX = {"orig": "polarengine", "torch": "polarengine-torch", "uniform": "uniform"}
_ROTATION_SUFFIX = {"rnone": "none", "rrandom": "random-hadamard", "rhadamard": "hadamard"}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor. Fields a method does not use keep their defaults."""

    method: str = "hlwq"
    bits: int = 5
    block_size: int = 128  # HLWQ block; RTN group; NF4 block
    codebook: str = "converged"
    rotation: str = "hadamard"
    seed: int = 0
    double_quant: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; expected one of {METHODS}")

    @property
    def name(self) -> str:
        """The canonical short name (inverse of ``parse_quant_name``)."""
        if self.method == "hlwq":
            s = f"hlwq{self.bits}"
            if self.block_size != 128:
                s += f"-b{self.block_size}"
            inv_cb = {v: k for k, v in _CODEBOOK_SUFFIX.items()}
            if self.codebook != "converged":
                s += f"-{inv_cb[self.codebook]}"
            if self.rotation != "hadamard":
                s += "-" + {v: k for k, v in _ROTATION_SUFFIX.items()}[self.rotation]
            return s
        if self.method == "rtn":
            return f"rtn{self.bits}-g{self.block_size}"
        if self.method == "nf4":
            return "nf4-dq" if self.double_quant else "nf4"
        return "nvfp4"


def parse_quant_name(name: str) -> QuantSpec | None:
    """Parse a short quantizer name (module docstring) → QuantSpec, or None for "bf16"."""
    s = name.strip().lower()
    if s in ("bf16", "none", "fp16", "fp32"):
        return None
    if s in ("nf4", "nf4-dq"):
        return QuantSpec(method="nf4", bits=4, block_size=64, double_quant=(s == "nf4-dq"))
    if s == "nvfp4":
        return QuantSpec(method="nvfp4", bits=4, block_size=16)
    m = re.fullmatch(r"rtn(\d)(?:-g(\d+))?", s)
    if m:
        return QuantSpec(method="rtn", bits=int(m.group(1)), block_size=int(m.group(2) or 128))
    m = re.fullmatch(r"hlwq(\d)((?:-[a-z0-9]+)*)", s)
    if m:
        kw = dict(method="hlwq", bits=int(m.group(1)))
        for part in filter(None, m.group(2).split("-")):
            if re.fullmatch(r"b\d+", part):
                kw["block_size"] = int(part[1:])
            elif part in _CODEBOOK_SUFFIX:
                kw["codebook"] = _CODEBOOK_SUFFIX[part]
            elif part in _ROTATION_SUFFIX:
                kw["rotation"] = _ROTATION_SUFFIX[part]
            else:
                raise ValueError(f"unknown part {part!r} in quantizer name {name!r}")
        return QuantSpec(**kw)
    raise ValueError(f"unknown quantizer name {name!r}; see hlwq_jax.quant.spec for the grammar")


def quantize_leaf(w, spec: QuantSpec, name: str | None = None):
    """Apply ``spec`` to one weight [out, in] or [E, out, in] → a quantized array pytree."""
    if spec.method == "hlwq":
        return quantize(w, bits=spec.bits, block_size=spec.block_size, codebook=spec.codebook,
                        rotation=spec.rotation, seed=spec.seed, name=name)
    if spec.method == "rtn":
        return baselines.quantize_rtn(w, bits=spec.bits, group_size=spec.block_size, name=name)
    if spec.method == "nf4":
        return baselines.quantize_nf4(w, block_size=spec.block_size, double_quant=spec.double_quant, name=name)
    return baselines.quantize_nvfp4(w, name=name)
