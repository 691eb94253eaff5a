"""Dropless grouped HLWQ matmul for MoE experts: ``ragged_hlwq_matmul(x_sorted, w_experts, group_sizes, impl=...)``."""
from hlwq_jax.ops.ragged_hlwq_matmul.api import implementations, ragged_hlwq_matmul, register
from hlwq_jax.ops.ragged_hlwq_matmul.pallas_triton import RaggedPallasConfig, gather_hlwq_matmul_pallas, plan

__all__ = ["ragged_hlwq_matmul", "implementations", "register", "RaggedPallasConfig", "gather_hlwq_matmul_pallas",
           "plan"]
