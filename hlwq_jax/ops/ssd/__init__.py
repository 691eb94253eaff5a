"""SSD (state-space duality) scan for Mamba2.

  ssd(x, dt, A, Bm, Cm, *, chunk_size, initial_state=None, impl="xla") -> (y, final_state)
  ssd_step(state, x, dt, A, Bm, Cm) -> (y, state)
impl: "xla" (production, hlwq_jax.ops.ssd.xla) or "reference" (the paper's four steps). Unknown names raise.
Shapes: see hlwq_jax.ops.ssd.reference.
"""
from __future__ import annotations

from hlwq_jax.ops.ssd import reference, xla
from hlwq_jax.ops.ssd.xla import ssd_step

IMPLS = {"xla": xla.ssd_chunked, "reference": reference.ssd_reference}


def ssd(x, dt, A, Bm, Cm, *, chunk_size: int, initial_state=None, impl: str = "xla"):
    if impl not in IMPLS:
        raise ValueError(f"ssd: unknown impl {impl!r}; available {sorted(IMPLS)}")
    h, g = x.shape[2], Bm.shape[2]
    if h % g or Bm.shape != Cm.shape or dt.shape != x.shape[:3] or A.shape != (h,):
        raise ValueError(f"ssd: inconsistent shapes x {x.shape} dt {dt.shape} A {A.shape} B {Bm.shape} C {Cm.shape}")
    return IMPLS[impl](x, dt, A, Bm, Cm, chunk_size, initial_state)


__all__ = ["ssd", "ssd_step", "IMPLS"]
