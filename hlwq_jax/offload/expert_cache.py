"""Per-layer device expert cache: C device slots fed from a host bank, consulted by a pure-Python policy.

Flow of one MoE layer call (``cached_moe``):
  1. read the routed ids [T, k] to the host (one sync per layer);
  2. split the tokens into groups whose expert union fits in C slots (one group unless C is too small: prefill,
     batches) — never drop an expert;
  3. per group: one policy access step on the union (policy.py's counting rule), then the misses are brought in by
     the bank's transfer path (``bank.transfer``): ``"rows"``: ONE ``device_put`` of one contiguous uint8 row per
     expert (or taken from a prefetch), installed by ONE jitted call that donates the slot buffers: stack the rows,
     split them into fields (slice + bitcast), scatter per field; ``"stacked-jit"``: ONE jitted, donated call does
     it all from the layer's stacked host array (``_gather_install``: in-jit host→device copy per miss, split,
     scatter; miss list padded to ``bank.transfer_length`` entries, padded ones aimed at slot C and dropped);
  4. the routed FFN runs on the slot buffers with ids mapped through the expert→slot map (kept as an int32 [E] array
     updated by each install, passed to the FFN as host numpy: ``ExpertsFn``); with several groups each
     pass runs on all T tokens (same shapes as the all-resident call) and ``where`` keeps a token's result from its
     own group — so the output equals the all-resident output bit for bit (same function, same shapes).
Letters: T tokens, k experts per token, C slots, E experts, D hidden, F expert intermediate size.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.offload import policy as P
from hlwq_jax.offload.bank import FieldSpec, _Bank, gather_host_rows, split_rows, transfer_length, transfer_lengths
from hlwq_jax.nn.moe import moe_experts


# ---- the routed expert FFN (same kernel for cache and all-resident) ------------------------------------------------
@jax.jit
def routed_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, experts: dict) -> jax.Array:
    """The model's routed experts, ``hlwq_jax.nn.moe.moe_experts(impl="gather")``, in ExpertsFn argument order.

    x [T, D]; ids int32 [T, k] index the leading axis of ``experts["up_proj"]`` [N, F, D] and
    ``experts["down_proj"]`` [N, D, F] (arrays or HLWQArrays; N = E all-resident or C slots); weights [T, k].
    Returns float32 [T, D]. Only the T·k selected rows are read, and the shapes do not depend on N — so a slot
    buffer gives bit-identical results to the full stack.
    """
    return moe_experts(experts, x, ids, weights, impl="gather")


# ---- cache of one layer ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LayerStats:
    """Per-layer counters. steps: access steps (= token groups); hits / misses: policy.py's counting rule;
    transfers: host→device transfer calls (``"rows"``: device_put calls; ``"stacked-jit"``: gather-install or
    gather calls); bytes_moved: host→device bytes, prefetches and padded rows included (used or wasted); pad_rows:
    rows copied only as padding of a stacked-jit miss list (wasted); prefetched: misses served by a prefetch;
    prefetch_wasted: prefetched experts never used. ``wait_s``: host time blocked in the routing-id read and, with
    ``sync_timing``, on transfers; ``transfer_s``: dispatch-to-ready time of transfers (only measured with
    ``sync_timing``; for stacked-jit it includes the install, which is the same program)."""
    steps: int = 0
    groups: int = 0
    hits: int = 0
    misses: int = 0
    transfers: int = 0
    bytes_moved: int = 0
    pad_rows: int = 0
    prefetched: int = 0
    prefetch_wasted: int = 0
    wait_s: float = 0.0
    transfer_s: float = 0.0

    def add(self, other: "LayerStats") -> "LayerStats":
        return LayerStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                             for f in dataclasses.fields(self)})


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("specs",))
def _install(buffers, slots, rows, *, specs: tuple[FieldSpec, ...]):
    """buffers: per field [C, ...]; slots int32 [M]; rows: M uint8 expert rows [expert_nbytes]. In place."""
    new = split_rows(specs, jnp.stack(rows))
    return tuple(b.at[slots].set(n) for b, n in zip(buffers, new))


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("specs",))
def _gather_install(buffers, stacked, idx, *, specs: tuple[FieldSpec, ...]):
    """The ``"stacked-jit"`` miss path in one program. buffers: per field [C, ...] (donated: in place); stacked: the
    layer's host bank uint8 [E, expert_nbytes]; idx int32 [2, M]: expert ids (row 0) and target slots (row 1; slot C
    marks a padded entry: its row is copied, then dropped by the scatter, so no slot changes)."""
    new = split_rows(specs, gather_host_rows(stacked, idx[0]))
    return tuple(b.at[idx[1]].set(n, mode="drop") for b, n in zip(buffers, new))


class LayerCache:
    """C device slots of one MoE layer backed by ``bank``; eviction by the named policy."""

    def __init__(self, bank: _Bank, slots: int, policy: str = "lru", *, sync_timing: bool = False, **policy_kw):
        if not 1 <= slots <= bank.n_experts:
            raise ValueError(f"cache slots {slots} outside [1, {bank.n_experts}] (the bank's expert count)")
        self.bank, self.slots, self.sync_timing = bank, int(slots), sync_timing
        self.policy = P.make_policy(policy, slots, **policy_kw)
        self.slot_of: dict[int, int] = {}
        self.free = list(range(slots))
        self._smap = np.full(bank.n_experts, -1, np.int32)  # slot_of as an array, updated in place by ensure
        self.buffers = tuple(bank.empty_slots(slots))
        self._specs = tuple(bank.specs)  # static argument of the install
        self.stats = LayerStats()
        self.version = 0  # bumped whenever the expert→slot map changes
        self._built: tuple | None = None  # (buffers, weight dict) of the last ``weights()`` call
        self._staged: dict[int, jax.Array] = {}  # prefetched expert rows not yet installed

    def slot_map(self) -> np.ndarray:
        """int32 [E]: slot of each resident expert, −1 for the others (a copy of the map ``ensure`` keeps)."""
        return self._smap.copy()

    def slot_map_reference(self) -> np.ndarray:
        """``slot_map`` rebuilt from ``slot_of`` (the definition; tests check the kept map equals it)."""
        m = np.full(self.bank.n_experts, -1, np.int32)
        for e, s in self.slot_of.items():
            m[e] = s
        return m

    def slot_ids(self, host_ids: np.ndarray) -> np.ndarray:
        """Slots of routed ids: int [...] (resident experts) -> int32 [...] on the host, a new array (−1: absent)."""
        return self._smap[host_ids]

    def weights(self) -> dict:
        """The slot buffers as a weight dict with leading dimension C (feed to the routed FFN with slot ids); rebuilt
        only when the buffers were replaced (every install does)."""
        if self._built is None or self._built[0] is not self.buffers:
            self._built = (self.buffers, self.bank.build(self.buffers, self.slots))
        return self._built[1]

    def prefetch(self, experts: Sequence[int]) -> int:
        """Start ONE transfer of the predicted experts that are neither resident nor staged; they are installed
        (and counted as misses) only if a later ``ensure`` needs them. Returns the number of experts staged."""
        want = [int(e) for e in dict.fromkeys(experts) if e not in self.slot_of and e not in self._staged]
        for e, row in zip(want, self.bank.fetch(want)):
            self._staged[e] = row
        if want:
            pad = transfer_length(len(want)) - len(want) if self.bank.transfer == "stacked-jit" else 0
            self.stats.transfers += 1
            self.stats.pad_rows += pad
            self.stats.bytes_moved += (len(want) + pad) * self.bank.expert_nbytes
        return len(want)

    def ensure(self, experts: Sequence[int]) -> None:
        """One access step: make all ``experts`` (distinct, ≤ C) resident at once."""
        r = self.policy.access(experts)
        st, smap = self.stats, self._smap
        st.steps += 1
        st.hits += len(r.hits)
        st.misses += len(r.misses)
        for e in r.evicted:
            self.free.append(self.slot_of.pop(e))
            smap[e] = -1
        if not r.misses:
            return
        self.version += 1
        slots = [self.free.pop() for _ in r.misses]
        for e, s in zip(r.misses, slots):
            self.slot_of[e] = s
            smap[e] = s
        staged = [e for e in r.misses if e in self._staged]
        cold = [e for e in r.misses if e not in self._staged]
        self.stats.prefetched += len(staged)
        if self.bank.transfer == "stacked-jit":
            if staged:  # prefetched rows are already on the device: the rows install
                self._install(staged, [self.slot_of[e] for e in staged], {e: self._staged.pop(e) for e in staged})
            if cold:
                self._gather_install(cold, [self.slot_of[e] for e in cold])
            return
        t0 = time.perf_counter()
        fetched = dict(zip(cold, self.bank.fetch(cold)))
        if cold:
            self.stats.transfers += 1
            self.stats.bytes_moved += len(cold) * self.bank.expert_nbytes
        for e in staged:
            fetched[e] = self._staged.pop(e)
        if self.sync_timing:
            jax.block_until_ready([fetched[e] for e in cold])
            dt = time.perf_counter() - t0
            self.stats.transfer_s += dt
            self.stats.wait_s += dt
        self._install(list(r.misses), slots, fetched)

    def _gather_install(self, experts, slots):
        """Stacked-jit: copy and install ``experts`` into ``slots`` in one call (padded to ``transfer_length``)."""
        if max(experts) >= self.bank.n_experts or min(experts) < 0:
            self.bank._check_ids(experts)  # raises, naming the id
        m = len(experts)
        n = transfer_length(m, self.slots)
        idx = np.array([experts + [experts[-1]] * (n - m), slots + [self.slots] * (n - m)], np.int32)
        t0 = time.perf_counter()
        self.buffers = _gather_install(self.buffers, self.bank.stacked, idx, specs=self._specs)
        self.stats.transfers += 1
        self.stats.pad_rows += n - m
        self.stats.bytes_moved += n * self.bank.expert_nbytes
        if self.sync_timing:  # transfer and install are one program: timed together
            jax.block_until_ready(self.buffers)
            dt = time.perf_counter() - t0
            self.stats.transfer_s += dt
            self.stats.wait_s += dt

    def _install(self, misses, slots, fetched):
        m = len(misses)
        pad = (1 << (m - 1).bit_length()) - m  # pad M to a power of two (repeat the last pair) to bound retraces
        order = misses + [misses[-1]] * pad
        idx = np.array(slots + [slots[-1]] * pad, np.int32)  # host: moved by the jit dispatch (``ExpertsFn``)
        self.buffers = _install(self.buffers, idx, tuple(fetched[e] for e in order), specs=self._specs)

    def precompile(self) -> None:
        """Compile the install scatter for every padded miss count (powers of two ≤ C) before timing, and with
        ``"stacked-jit"`` the gather-install for every ``transfer_lengths(C)`` (all entries aimed at the padding
        slot C: dropped, nothing changes); only on an empty cache (the rows install writes zeros into the slots)."""
        if self.slot_of:
            raise ValueError("precompile() needs an empty cache")
        zero = jax.device_put(np.zeros(self.bank.expert_nbytes, np.uint8), self.bank.device_sharding)
        m = 1
        while m <= self.slots:
            self.buffers = _install(self.buffers, jnp.arange(m, dtype=jnp.int32), (zero,) * m,
                                    specs=self._specs)
            m *= 2
        if self.bank.transfer == "stacked-jit":
            for n in transfer_lengths(self.slots):
                idx = np.asarray([np.arange(n) % self.bank.n_experts, np.full(n, self.slots)], np.int32)
                self.buffers = _gather_install(self.buffers, self.bank.stacked, idx, specs=self._specs)
        jax.block_until_ready(self.buffers)

    def drop_staged(self) -> None:
        """Forget unused prefetches (counted in ``prefetch_wasted``)."""
        self.stats.prefetch_wasted += len(self._staged)
        self._staged.clear()


def plan_groups(ids: np.ndarray, slots: int) -> list[np.ndarray]:
    """Greedy split of tokens (in order) into groups whose expert union has ≤ ``slots`` experts.

    ids int [T, k] -> list of token-index arrays covering every token exactly once. A token alone needing more than
    ``slots`` experts raises ValueError.
    """
    ids = np.asarray(ids)
    groups, cur, union = [], [], set()
    for t in range(ids.shape[0]):
        need = set(int(e) for e in ids[t])
        if len(need) > slots:
            raise ValueError(f"token {t} routes to {len(need)} distinct experts but the cache has {slots} slots")
        if len(union | need) > slots:
            groups.append(np.asarray(cur, np.int64))
            cur, union = [], set()
        cur.append(t)
        union |= need
    if cur:
        groups.append(np.asarray(cur, np.int64))
    return groups


ExpertsFn = Callable[[jax.Array, jax.Array, jax.Array, dict], jax.Array]
"""(x [T, D], slot ids int32 [T, k], weights [T, k], slot-buffer weight dict) -> [T, D]. ``cached_moe`` passes the slot
ids as a host numpy array: a jitted function moves it in its C++ dispatch path (a separate ``jnp.asarray`` costs
tens of µs of host time per layer, while the device idles in the per-layer path); same dtype and shape, so the same
compiled program runs."""


def cached_moe(cache: LayerCache, x: jax.Array, ids, weights: jax.Array,
               experts_fn: ExpertsFn = routed_experts, *, host_ids: np.ndarray | None = None,
               before_compute: Callable[[], object] | None = None) -> jax.Array:
    """Routed experts of one layer through ``cache``; equal to ``experts_fn(x, ids, weights, all_resident)``.

    x [T, D]; ids int [T, k] (device or host); weights [T, k]. ``host_ids`` skips the device→host read when the
    caller already has the ids on the host. ``before_compute`` runs once after the first group's misses are issued
    and before any expert compute is dispatched (the prefetch hook: transfers issued there overlap the compute).
    """
    if host_ids is None:
        t0 = time.perf_counter()
        host_ids = np.asarray(ids)
        cache.stats.wait_s += time.perf_counter() - t0
    host_ids = np.asarray(host_ids)
    n_exp = cache.bank.n_experts
    flat = host_ids.reshape(-1).tolist()
    if host_ids.ndim != 2 or not flat or host_ids.dtype.kind not in "iu" or min(flat) < 0 \
            or max(flat) >= n_exp:
        raise ValueError(f"routed ids must be int [T, k] in [0, {n_exp}), got {host_ids.dtype} {host_ids.shape} "
                         f"range [{min(flat, default=0)}, {max(flat, default=0)}]")
    union = list(dict.fromkeys(flat))  # first-seen order, as the group loop below would list them
    if len(union) <= cache.slots:  # one group of every token (what plan_groups returns then): the decode case
        cache.stats.groups += 1
        cache.ensure(union)
        if before_compute is not None:
            before_compute()
        return experts_fn(x, cache.slot_ids(host_ids), weights, cache.weights())
    groups = plan_groups(host_ids, cache.slots)
    cache.stats.groups += len(groups)
    y = None
    for g in groups:
        cache.ensure(list(dict.fromkeys(host_ids[g].reshape(-1).tolist())))
        if before_compute is not None:
            before_compute()
            before_compute = None
        sid = cache.slot_ids(host_ids)
        mask = np.zeros(host_ids.shape[0], bool)
        mask[g] = True
        sid[~mask] = 0  # other tokens compute garbage on slot 0; ``where`` discards it
        yg = experts_fn(x, sid, weights, cache.weights())
        m = jnp.asarray(mask)[:, None]
        y = jnp.where(m, yg, jnp.zeros_like(yg) if y is None else y)
    return y
