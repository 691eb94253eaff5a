"""Grouped matmul on Hopper through JAX's Pallas Mosaic GPU kernel `ragged_dot_mgpu` (TMA + wgmma, persistent over
the 132 SMs), with the weights used in their stored [G, N, K] layout (`transpose_rhs=True`: no copy).

    grouped_matmul_mosaic_gpu(x [M, K], w [G, N, K], group_sizes int [G], config=None) -> [M, N] in x dtype
Runs only on an sm_90 GPU (RuntimeError elsewhere; there is no CPU interpret mode for this kernel).
Checked (ValueError): x and w of one 16-bit float dtype; K % block_k == 0; N % (block_n · grid_block_n) == 0.
The caller guarantees Σ group_sizes == M: the kernel writes only rows that belong to a group.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MosaicGroupedConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 1


# Best of a grid on the H200 for the Nemotron-H expert shapes (experiments/bench_moe.py --tune, 4096 tokens × top-6
# over 128 experts; results/bench_moe_h200.jsonl), keyed by (N, K): up 1.71 ms (143 TFLOP/s; N = 1856 admits only
# 64-wide tiles), down 1.09 ms (226 TFLOP/s). The kernel runs one warpgroup per tile and re-computes tiles shared by
# two groups, so it stays below the capacity formulation of nn.moe at these shapes (same file).
TUNED: dict[tuple[int, int], MosaicGroupedConfig] = {
    (1856, 2688): MosaicGroupedConfig(block_m=128, block_n=64, block_k=64, max_concurrent_steps=6, grid_block_n=1),
    (2688, 1856): MosaicGroupedConfig(block_m=128, block_n=128, block_k=64, max_concurrent_steps=6, grid_block_n=3),
}


def default_config(n: int, k: int) -> MosaicGroupedConfig:
    """The tuned config for (N, K) if there is one, else 128-wide tiles narrowed to 64 where N or K needs it."""
    if (n, k) in TUNED:
        return TUNED[(n, k)]
    return MosaicGroupedConfig(block_n=128 if n % 128 == 0 else 64, block_k=64)


def check_device() -> None:
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if dev.platform != "gpu" or cc is None or not str(cc).startswith("9"):
        raise RuntimeError(f"grouped_matmul impl 'mosaic_gpu' needs an sm_90 (Hopper) GPU; default device is "
                           f"{dev.platform} {getattr(dev, 'device_kind', '')} (compute capability {cc}). "
                           f"Use impl='xla' or 'reference' here.")


def grouped_matmul_mosaic_gpu(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                              config: MosaicGroupedConfig | None = None) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    m, k = x.shape
    g, n, k2 = w.shape
    cfg = config or default_config(n, k)
    check_device()
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"grouped_matmul mosaic_gpu: x {x.dtype} and w {w.dtype} must share a 16-bit float dtype")
    if k != k2 or k % cfg.block_k or n % cfg.block_n or n % (cfg.block_n * cfg.grid_block_n):
        raise ValueError(f"grouped_matmul mosaic_gpu: x [M={m}, K={k}], w [G={g}, N={n}, K={k2}] do not fit {cfg} "
                         f"(need K % block_k == 0 and N % (block_n·grid_block_n) == 0)")
    return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes.astype(jnp.int32), transpose_rhs=True,
                                      **dataclasses.asdict(cfg))
