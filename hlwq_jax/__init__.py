"""hlwq_jax — Hadamard-Lloyd Weight Quantization (HLWQ) for hybrid Mamba2 + MoE + attention models, in JAX.

Einsum letters used across the package: b batch, l/t sequence positions, d hidden (model) size, h heads (query or
SSM), k key/value heads, p head dim, g SSM groups, n SSM state size, e experts, o output features, i input features,
c chunks, q positions inside a chunk, B quantization block size.

Public API: ``quantize`` (→ ``HLWQArray``), ``lloyd_max_codebook``, ``hlwq_matmul``, the baselines
``quantize_rtn`` / ``quantize_nf4`` / ``quantize_nvfp4``, and ``quantize_params`` with a ``Recipe`` of ``QuantSpec``s.
"""
from hlwq_jax.quant import (
    HLWQArray,
    NF4Array,
    NVFP4Array,
    QuantSpec,
    Recipe,
    RTNArray,
    TensorStats,
    gaussian_mse,
    hlwq_matmul,
    lloyd_max_codebook,
    parse_quant_name,
    quantize,
    quantize_leaf,
    quantize_nf4,
    quantize_nvfp4,
    quantize_params,
    quantize_rtn,
    summarize,
)

__version__ = "0.1.0"
