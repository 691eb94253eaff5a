"""The quantizers: HLWQ (``quantize`` → ``HLWQArray``), baselines, codebooks, packing and whole-tree recipes."""
from hlwq_jax.quant.array import HLWQArray
from hlwq_jax.quant.baselines import NF4Array, NVFP4Array, RTNArray, quantize_nf4, quantize_nvfp4, quantize_rtn
from hlwq_jax.quant.hadamard import blockwise_rotate, fwht, hadamard_matrix, random_signs
from hlwq_jax.quant.hlwq import hlwq_matmul, quantize, rotate_activations
from hlwq_jax.quant.lloyd_max import gaussian_mse, lloyd_max_codebook
from hlwq_jax.quant.packing import pack_codes, unpack_codes
from hlwq_jax.quant.recipe import Recipe, TensorStats, quantize_params, summarize
from hlwq_jax.quant.spec import QuantSpec, parse_quant_name, quantize_leaf
