"""Host-offload expert cache for MoE layers.

- ``policy``: eviction policies as pure Python (LRU, LFRU upstream / fork, LFU, static pinning, Belady) + registry.
- ``trace``: routing traces as JSON lines (docs/offload_traces.md): writer, validating reader, recorder, replay.
- ``bank``: per-layer expert banks in pinned host memory (``HostBank``) or memory-mapped files (``DiskBank``);
  transfer paths ``TRANSFERS``: per-expert rows + device_put ("rows") or one stacked host array read inside one
  jitted gather-install ("stacked-jit").
- ``expert_cache``: device slots per layer, batched transfers, donated install, exact token-group overflow.
- ``moe_stack``: multi-layer driver (prefetch, tracing, pipelined speculative one-read-per-token decode), MoE-only
  stand-in model.
- ``nemotron``: Nemotron-H forward with offloaded routed experts.  ``harness``: benchmark setups.
"""
from hlwq_jax.offload.bank import TRANSFERS, DiskBank, HostBank
from hlwq_jax.offload.expert_cache import LayerCache, LayerStats, cached_moe, plan_groups, routed_experts
from hlwq_jax.offload.moe_stack import OffloadConfig, OffloadedMoE, SpecStats, moe_only_decode, speculative_decode
from hlwq_jax.offload.policy import POLICIES, make_policy, replay
from hlwq_jax.offload.trace import TraceRecord, TraceRecorder, read_trace, replay_records, write_trace

__all__ = ["TRANSFERS", "DiskBank", "HostBank", "LayerCache", "LayerStats", "cached_moe", "plan_groups",
           "routed_experts", "OffloadConfig", "OffloadedMoE", "SpecStats", "moe_only_decode", "speculative_decode",
           "POLICIES", "make_policy", "replay", "TraceRecord", "TraceRecorder", "read_trace", "replay_records",
           "write_trace"]
