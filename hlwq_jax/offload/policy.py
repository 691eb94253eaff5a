"""Expert-cache eviction policies — pure Python, no JAX.

Counting rule (used by every policy, the replay tool and the JAX cache)
-----------------------------------------------------------------------
One *access step* is the set S of distinct experts that must be resident **at the same time** for one computation:
one token's top-k at one MoE layer (trace replay, batch-1 decode), or the expert union of one token group of a
forward (the JAX cache). For a step S on a cache of C slots (|S| <= C, else ValueError):

1. hits   = S ∩ resident, processed in the order given: the policy is told of each hit;
2. misses = S \\ resident, in the order given: each is *brought in* (one miss each, compulsory misses included);
   when the cache is full a victim is chosen among resident experts **not in S** (the step's own experts are
   protected, so all of S is resident when the step ends);
3. accesses += |S|, misses += |misses|; hit rate = 1 - misses / accesses.

Policies: ``lru``, ``lfru`` (upstream vLLM PR #37190 variant), ``lfru-fork`` (decayed-frequency fork variant),
``lfu``, ``static`` (pinned most-frequent experts + LRU in the remaining slots) and ``belady`` (offline optimum:
evict the resident expert whose next use is furthest in the future). Ties are broken by the lowest expert id unless
stated otherwise. ``make_policy(name, slots, **kw)`` is the registry.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Outcome of one access step: hits and misses in processing order, and the experts evicted (one per miss at
    most, ``evicted[i]`` made room for some miss; ``len(evicted) <= len(misses)``)."""
    hits: tuple[int, ...]
    misses: tuple[int, ...]
    evicted: tuple[int, ...]


def _check_step(experts: Sequence[int], slots: int) -> tuple[int, ...]:
    step = tuple(map(int, experts))
    if not step:
        raise ValueError("access step is empty")
    if len(set(step)) != len(step):
        raise ValueError(f"access step {step} repeats an expert")
    if min(step) < 0:
        raise ValueError(f"access step {step} has a negative expert id")
    if len(step) > slots:
        raise ValueError(f"access step needs {len(step)} experts at once but the cache has only {slots} slots")
    return step


class EvictionPolicy:
    """Base class: implements the counting rule; subclasses implement the hooks.

    Hooks: ``_begin_step(step)``, ``_on_hit(e)``, ``_on_insert(e)``, ``_victim(candidates) -> e``, ``_on_evict(e)``;
    optionally ``_choose_victim(protected) -> e``, a faster search equal to ``_victim`` of the sorted candidates.
    """
    name = "base"

    def __init__(self, slots: int):
        if int(slots) < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = int(slots)
        self.resident: set[int] = set()
        self.accesses = 0
        self.misses = 0

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _begin_step(self, step: tuple[int, ...]) -> None:
        pass

    def _on_hit(self, e: int) -> None:
        raise NotImplementedError

    def _on_insert(self, e: int) -> None:
        raise NotImplementedError

    def _victim(self, candidates: list[int]) -> int:
        raise NotImplementedError

    def _on_evict(self, e: int) -> None:
        pass

    # -- driver ----------------------------------------------------------------------------------------------------
    def access(self, experts: Sequence[int]) -> StepResult:
        """Make every expert of ``experts`` resident at once; returns hits, misses and evictions."""
        step = _check_step(experts, self.slots)
        self._begin_step(step)
        resident = self.resident
        misses = tuple(e for e in step if e not in resident)
        if not misses:  # all hits (a decode loop's common case): the loop below would do nothing
            for e in step:
                self._on_hit(e)
            self.accesses += len(step)
            return StepResult(step, (), ())
        hits = tuple(e for e in step if e in resident)
        for e in hits:
            self._on_hit(e)
        protected = set(step)
        evicted = []
        for e in misses:
            if len(self.resident) >= self.slots:
                victim = self._choose_victim(protected)
                self.resident.remove(victim)
                self._on_evict(victim)
                evicted.append(victim)
            self.resident.add(e)
            self._on_insert(e)
        self.accesses += len(step)
        self.misses += len(misses)
        return StepResult(hits, misses, tuple(evicted))

    def _choose_victim(self, protected: set[int]) -> int:
        """The victim among resident experts not in ``protected`` (the definition: ``_victim`` of the sorted
        candidates; a subclass may override it with an equivalent faster search)."""
        candidates = sorted(self.resident - protected)
        victim = self._victim(candidates)
        if victim not in candidates:
            raise AssertionError(f"{self.name} chose victim {victim} outside {candidates}")
        return victim

    @property
    def hit_rate(self) -> float:
        return 1.0 - self.misses / self.accesses if self.accesses else float("nan")


class LRU(EvictionPolicy):
    """Least recently used: a clock ticks on every hit and insert; evict the smallest last-access time.

    ``last`` (expert -> clock at its last access) holds exactly the resident experts and is kept in ascending clock
    order (a touch moves its key to the end), so the victim is the first key not protected: O(k) per miss instead of
    sorting the C residents (``_victim`` stays the definition; tests check both agree)."""
    name = "lru"

    def __init__(self, slots: int):
        super().__init__(slots)
        self.clock = 0
        self.last: dict[int, int] = {}

    def _touch(self, e: int) -> None:
        self.clock += 1
        self.last.pop(e, None)
        self.last[e] = self.clock

    _on_hit = _touch
    _on_insert = _touch

    def _victim(self, candidates):
        return min(candidates, key=lambda e: (self.last[e], e))

    def _choose_victim(self, protected):
        for e in self.last:  # least recent first
            if e not in protected:
                return e
        raise AssertionError(f"{self.name}: every resident expert is protected")

    def _on_evict(self, e):
        del self.last[e]


class LFRUUpstream(EvictionPolicy):
    """LFRU as in the upstream PR: per resident expert ``freq`` (starts at 1 on insert, +1 per hit) and ``last``
    (clock at last access); the clock advances on every hit and insert; evict argmin freq / (clock - last + 1)
    (ties: least recent, then lowest id); no decay; history forgotten on eviction."""
    name = "lfru"

    def __init__(self, slots: int):
        super().__init__(slots)
        self.clock = 0
        self.freq: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def _on_hit(self, e):
        self.clock += 1
        self.freq[e] += 1
        self.last[e] = self.clock

    def _on_insert(self, e):
        self.clock += 1
        self.freq[e] = 1
        self.last[e] = self.clock

    def score(self, e: int) -> float:
        return self.freq[e] / (self.clock - self.last[e] + 1)

    def _victim(self, candidates):
        return min(candidates, key=lambda e: (self.score(e), self.last[e], e))

    def _on_evict(self, e):
        del self.freq[e], self.last[e]


class LFRUFork(EvictionPolicy):
    """LFRU as in the fork: decayed frequency f <- decay * f + 1 on every access (hit or insert), kept for every
    expert ever seen (survives eviction); a step counter advances once per access step (= once per forward at a
    layer); evict argmin f / (1 + step - last) (ties: least recent, then lowest id)."""
    name = "lfru-fork"

    def __init__(self, slots: int, decay: float = 0.95):
        super().__init__(slots)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.step = 0
        self.f: dict[int, float] = {}
        self.last: dict[int, int] = {}

    def _begin_step(self, step):
        self.step += 1

    def _touch(self, e):
        self.f[e] = self.decay * self.f.get(e, 0.0) + 1.0
        self.last[e] = self.step

    _on_hit = _touch
    _on_insert = _touch

    def score(self, e: int) -> float:
        return self.f[e] / (1 + self.step - self.last[e])

    def _victim(self, candidates):
        return min(candidates, key=lambda e: (self.score(e), self.last[e], e))


class LFU(EvictionPolicy):
    """Least frequently used with full history: access counts of every expert ever seen (survive eviction); evict
    the smallest count, ties by least recent then lowest id."""
    name = "lfu"

    def __init__(self, slots: int):
        super().__init__(slots)
        self.clock = 0
        self.count: collections.Counter[int] = collections.Counter()
        self.last: dict[int, int] = {}

    def _touch(self, e):
        self.clock += 1
        self.count[e] += 1
        self.last[e] = self.clock

    _on_hit = _touch
    _on_insert = _touch

    def _victim(self, candidates):
        return min(candidates, key=lambda e: (self.count[e], self.last[e], e))


class StaticPinned(LRU):
    """Static pinning: the experts in ``pinned`` are never evicted once loaded; the other slots run LRU.

    ``pinned`` is usually the most frequent experts of a profile (``most_frequent``). A step whose unpinned experts
    do not fit into ``slots - len(pinned)`` raises ValueError.
    """
    name = "static"

    def __init__(self, slots: int, pinned: Iterable[int] = ()):
        super().__init__(slots)
        self.pinned = frozenset(int(e) for e in pinned)
        if len(self.pinned) > self.slots:
            raise ValueError(f"static: {len(self.pinned)} pinned experts exceed {self.slots} slots")

    def _victim(self, candidates):
        free = [e for e in candidates if e not in self.pinned]
        if not free:
            self._all_pinned()
        return super()._victim(free)

    def _choose_victim(self, protected):
        for e in self.last:  # least recent first (LRU's order), skipping pinned experts
            if e not in protected and e not in self.pinned:
                return e
        self._all_pinned()

    def _all_pinned(self):
        raise ValueError(f"static: every evictable expert is pinned ({len(self.pinned)} pinned, "
                         f"{self.slots} slots) — pin fewer experts")


def most_frequent(steps: Iterable[Sequence[int]], n: int) -> list[int]:
    """The ``n`` experts used most often in ``steps`` (ties: lowest id)."""
    count: collections.Counter[int] = collections.Counter()
    for s in steps:
        count.update(int(e) for e in s)
    return sorted(count, key=lambda e: (-count[e], e))[: max(int(n), 0)]


class Belady(EvictionPolicy):
    """Belady's MIN for offline replay: knows the whole future sequence of steps; evicts the resident expert whose
    next use is furthest away (never used again = infinitely far; ties: lowest id). ``access`` must be called with
    exactly the steps of ``future`` in order."""
    name = "belady"

    def __init__(self, slots: int, future: Sequence[Sequence[int]]):
        super().__init__(slots)
        self.future = [tuple(int(e) for e in s) for s in future]
        # uses[e] = ascending step indices where e is used; ptr[e] = index of the next not-yet-past use
        self.uses: dict[int, list[int]] = collections.defaultdict(list)
        for t, s in enumerate(self.future):
            for e in s:
                self.uses[e].append(t)
        self.ptr: dict[int, int] = collections.defaultdict(int)
        self.t = -1

    def _begin_step(self, step):
        self.t += 1
        if self.t >= len(self.future) or tuple(step) != self.future[self.t]:
            raise ValueError(f"belady: step {self.t} is {step}, but the future given at construction says "
                             f"{self.future[self.t] if self.t < len(self.future) else 'end of trace'}")
        for e in step:
            self.ptr[e] += 1  # uses[e][ptr[e] - 1] == self.t

    def next_use(self, e: int) -> float:
        u, p = self.uses.get(e, []), self.ptr[e]
        return u[p] if p < len(u) else float("inf")

    def _on_hit(self, e):
        pass

    def _on_insert(self, e):
        pass

    def _victim(self, candidates):
        return min(candidates, key=lambda e: (-self.next_use(e), e))


_REGISTRY: dict[str, Callable[..., EvictionPolicy]] = {
    "lru": LRU, "lfru": LFRUUpstream, "lfru-fork": LFRUFork, "lfu": LFU, "static": StaticPinned, "belady": Belady,
}
POLICIES = tuple(_REGISTRY)


def make_policy(name: str, slots: int, **kwargs) -> EvictionPolicy:
    """Registry: a policy by name (``POLICIES``). ``static`` takes ``pinned=``; ``belady`` takes ``future=``;
    ``lfru-fork`` takes ``decay=``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}")
    return _REGISTRY[name](slots, **kwargs)


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    accesses: int
    misses: int

    @property
    def hit_rate(self) -> float:
        return 1.0 - self.misses / self.accesses if self.accesses else float("nan")


def replay(steps: Sequence[Sequence[int]], policy: str, slots: int, *, static_pinned: Sequence[int] | None = None,
           count_from: int = 0, **kwargs) -> ReplayResult:
    """Replay one cache's step sequence against a fresh policy. ``belady`` gets ``future=steps``; ``static`` pins
    ``static_pinned`` (default: the in-sample most frequent ``slots - max|step|`` experts). Only steps with index
    >= ``count_from`` are counted (the earlier ones warm the cache)."""
    steps = [tuple(s) for s in steps]
    if policy == "belady":
        kwargs["future"] = steps
    elif policy == "static":
        if static_pinned is None:
            width = max((len(s) for s in steps), default=0)
            static_pinned = most_frequent(steps, slots - width)
        kwargs["pinned"] = static_pinned
    p = make_policy(policy, slots, **kwargs)
    acc0 = mis0 = 0
    for i, s in enumerate(steps):
        if i == count_from:
            acc0, mis0 = p.accesses, p.misses
        p.access(s)
    if count_from >= len(steps):
        return ReplayResult(0, 0)
    return ReplayResult(p.accesses - acc0, p.misses - mis0)
