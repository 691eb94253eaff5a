"""Quantize a whole parameter pytree by path rules, with per-tensor statistics.

A leaf's path is its keys joined by "." (sequence indices as numbers), e.g. ``backbone.layers.3.mixer.in_proj.weight``.
A ``Recipe`` is an ordered tuple of (regex, QuantSpec | None) rules — the first rule whose regex ``re.search``es the
path decides — plus a default spec for the rest, and a size/rank floor (ndim < 2 or < 256 elements stay as they are).
``Recipe.default()`` is the Mamba-aware recipe of docs/hlwq.md §3.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.quant.lloyd_max import gaussian_mse, lloyd_max_codebook
from hlwq_jax.quant.spec import QuantSpec, quantize_leaf

# Kept in 16 bits by the original method (docs/hlwq.md §3), matched case-insensitively anywhere in the path.
MAMBA_AWARE_KEEP = (
    r"norm",  # every RMSNorm / gated norm / q_norm / k_norm weight
    r"a_log", r"dt_bias", r"dt_proj", r"conv1d",
    r"(^|\.)D$", r"(^|\.)D\.",  # Mamba skip parameter
    r"bias$",  # 1-D biases, e_score_correction_bias
    r"(^|\.)gate(\.weight)?$", r"router",  # MoE routers (but not gate_proj)
    r"embed", r"token_embd", r"wte",  # embeddings
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    rules: tuple[tuple[str, QuantSpec | None], ...] = ()
    otherwise: QuantSpec | None = QuantSpec()  # spec for leaves no rule matches
    min_size: int = 256

    @classmethod
    def mamba_aware(cls, spec: QuantSpec = QuantSpec(), lm_head: QuantSpec | None = None) -> "Recipe":
        """docs/hlwq.md §3: quantize attention, Mamba in/out_proj and experts with ``spec``; keep norms, conv1d,
        A_log, D, dt_bias, biases, routers and embeddings; the lm_head with ``lm_head`` (None keeps it)."""
        rules = [(r"lm_head|(^|\.)output(\.weight)?$", lm_head)]
        rules += [(p, None) for p in MAMBA_AWARE_KEEP]
        return cls(rules=tuple(rules), otherwise=spec)

    @classmethod
    def default(cls, bits: int = 5, lm_head: QuantSpec | None = None) -> "Recipe":
        """The Mamba-aware recipe with HLWQ at ``bits`` (converged codebook, Hadamard, B = 128)."""
        return cls.mamba_aware(QuantSpec(bits=bits), lm_head=lm_head)

    def spec_for(self, path: str, shape: tuple[int, ...]) -> QuantSpec | None:
        """The spec for one leaf (None = keep as is)."""
        if len(shape) < 2 or math.prod(shape) < self.min_size:
            return None
        for pattern, spec in self.rules:
            if re.search(pattern, path, flags=re.IGNORECASE):
                return spec
        return self.otherwise


@dataclasses.dataclass(frozen=True)
class TensorStats:
    path: str
    method: str
    shape: tuple[int, ...]
    rel_mse: float  # ‖W − Ŵ‖² / ‖W‖²
    cosine: float
    sqnr_db: float  # −10·log10(rel_mse)
    bits_per_weight: float
    lloyd_max_ratio: float  # rel_mse / Gaussian Lloyd-Max MSE at the spec's bit width (1.0 = theory)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tensor_stats(path: str, w, wq, spec: QuantSpec) -> TensorStats:
    """Compare a weight with its quantized version (float64 on the host)."""
    a = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    b = np.asarray(wq.dequantize(jnp.float32), np.float64)
    err = float(np.sum((a - b) ** 2))
    ref = float(np.sum(a * a))
    rel = err / ref if ref > 0 else 0.0
    denom = math.sqrt(ref * float(np.sum(b * b)))
    cos = float(np.sum(a * b)) / denom if denom > 0 else 1.0
    theory = gaussian_mse(lloyd_max_codebook(spec.bits))
    return TensorStats(path=path, method=spec.name, shape=tuple(a.shape), rel_mse=rel, cosine=cos,
                       sqnr_db=(-10.0 * math.log10(rel) if rel > 0 else math.inf),
                       bits_per_weight=float(wq.bits_per_weight), lloyd_max_ratio=rel / theory)


def path_str(key_path) -> str:
    """jax key path → "a.b.0.c"."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    return ".".join(parts)


def quantize_params(params, recipe: Recipe | None = None, *, with_stats: bool = True):
    """Quantize every leaf the recipe selects.

    Args:
      params: a pytree (nested dicts / lists) of arrays.
      recipe: defaults to ``Recipe.default()`` (Mamba-aware, HLWQ Q5).
      with_stats: compute per-tensor ``TensorStats`` (needs a dequantize per tensor).
    Returns:
      (qparams, stats): the same tree with selected leaves replaced by quantized arrays, and {path: TensorStats}.
    """
    recipe = recipe if recipe is not None else Recipe.default()
    stats: dict[str, TensorStats] = {}

    def one(key_path, leaf):
        path = path_str(key_path)
        spec = recipe.spec_for(path, tuple(np.shape(leaf)))
        if spec is None:
            return leaf
        q = quantize_leaf(leaf, spec, name=path)
        if with_stats:
            stats[path] = tensor_stats(path, leaf, q, spec)
        return q

    return jax.tree_util.tree_map_with_path(one, params), stats


def summarize(stats: dict[str, TensorStats]) -> dict[str, float]:
    """Size-weighted aggregate: bits/weight, mean rel MSE, fraction within 10% of the Lloyd-Max value."""
    if not stats:
        return {"tensors": 0}
    sizes = np.array([math.prod(s.shape) for s in stats.values()], np.float64)
    ratio = np.array([s.lloyd_max_ratio for s in stats.values()])
    return {
        "tensors": len(stats),
        "weights": float(sizes.sum()),
        "bits_per_weight": float(np.sum(sizes * [s.bits_per_weight for s in stats.values()]) / sizes.sum()),
        "rel_mse_mean": float(np.mean([s.rel_mse for s in stats.values()])),
        "frac_within_10pct_lloyd_max": float(np.mean(np.abs(ratio - 1.0) <= 0.10)),
    }
