"""Test helper: the Triton IR that Pallas-Triton lowers a jitted function's kernels to for CUDA, on any host."""
from __future__ import annotations

import jax


def lowered_triton_ir(monkeypatch, fn, *arg_specs) -> list[str]:
    """One Triton-IR text per pallas_call in fn(*arg_specs) (ShapeDtypeStructs), lowered for CUDA as on an H100 /
    H200 (the GPU query is answered without a GPU)."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg

    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    texts = []
    lower = reg.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        texts.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", capture)
    jax.jit(fn).trace(*arg_specs).lower(lowering_platforms=("cuda",))
    return texts
