"""HLWQ fused code-lookup matmul: ``hlwq_matmul(x, w, impl="reference" | "xla" | "pallas")``.

Shapes: M tokens, in / out features, B block size, b bits. See api.py for the dispatch, layout.py for the
kernel-friendly bit-plane layout (``repack``), rotate.py for the shared activation rotation.
"""
from hlwq_jax.ops.hlwq_matmul.api import hlwq_matmul, implementations, register
from hlwq_jax.ops.hlwq_matmul.gemv_triton import GemvConfig
from hlwq_jax.ops.hlwq_matmul.layout import HLWQPlanes, repack
from hlwq_jax.ops.hlwq_matmul.pallas_triton import PallasConfig, plan
from hlwq_jax.ops.hlwq_matmul.rotate import rotate_activations
from hlwq_jax.ops.hlwq_matmul.xla import XlaConfig

__all__ = ["hlwq_matmul", "implementations", "register", "GemvConfig", "HLWQPlanes", "repack", "PallasConfig", "plan",
           "rotate_activations", "XlaConfig"]
