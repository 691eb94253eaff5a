"""Eviction policies on hand-made traces with hand-derived answers, and Belady's optimality (brute force + Zipf)."""
import functools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hlwq_jax.offload import policy as P


def run(name, slots, steps, **kw):
    return P.replay(steps, name, slots, **kw)


def test_lru_known_answer():
    # slots 2: [0]m [1]m [0]h [2]m(evict 1) [1]m(evict 0) [0]m(evict 2) -> 5 misses of 6
    r = run("lru", 2, [[0], [1], [0], [2], [1], [0]])
    assert (r.accesses, r.misses) == (6, 5)


def test_belady_known_answer():
    # slots 2: [0]m [1]m [0]h [2]m: next use 0 @5, 1 @4 -> evict 0; [1]h; [0]m -> 4 misses
    r = run("belady", 2, [[0], [1], [0], [2], [1], [0]])
    assert (r.accesses, r.misses) == (6, 4)


def test_lfru_upstream_vs_lru_known_answer():
    # upstream LFRU: 0 reaches freq 3; at [2] clock=4: score(0)=3/(4-3+1)=1.5 > score(1)=1/1 -> evict 1; [0] hits.
    steps = [[0], [0], [0], [1], [2], [0]]
    assert run("lfru", 2, steps).misses == 3
    assert run("lru", 2, steps).misses == 4


def test_lfru_variants_differ_known_answer():
    # Derivation in the module docstring's terms (slots 2):
    # upstream: [3]m [2]m [0]m evict 3 (0.5<1) [2]h [2]h (f2=3) [3]m evict 0 (1/3<3) [0]m evict 3 (1<1.5) [2]h -> 5
    # fork:     ... [3]m evict 0 (0.25<1.43), f3 = 0.95*1+1 = 1.95 survives eviction;
    #           [0] at step 7: score2 = 2.8525/3 = 0.951 < score3 = 1.95/2 -> evict 2; [2]m -> 6
    steps = [[3], [2], [0], [2], [2], [3], [0], [2]]
    assert run("lfru", 2, steps).misses == 5
    assert run("lfru-fork", 2, steps).misses == 6
    assert run("lru", 2, steps).misses == 6


def test_multi_expert_step_counting_and_protection():
    p = P.make_policy("lru", 3)
    assert p.access([0, 1]) == P.StepResult(hits=(), misses=(0, 1), evicted=())
    assert p.access([2, 1]) == P.StepResult(hits=(1,), misses=(2,), evicted=())
    # clock: 0@1 1@2, then 1@3 2@4; victim for 3: least recent of {0,1,2} = 0; for 4: least recent of {1,2} = 1
    r = p.access([3, 4])
    assert r.misses == (3, 4) and r.evicted == (0, 1)
    assert p.resident == {2, 3, 4}
    assert (p.accesses, p.misses) == (6, 5)
    # a step's own experts are never evicted to make room for its misses
    p2 = P.make_policy("lru", 2)
    p2.access([0])
    p2.access([1])
    r = p2.access([0, 2])  # 1 must go, although 0 is older
    assert r.evicted == (1,) and p2.resident == {0, 2}


def test_lfu_and_static():
    steps = [[0], [0], [1], [2], [3], [0]]
    # lfu slots 2: 0 count 2; [2] evicts 1 (count 1); [3] evicts 2 (count 1, 0 has 2); [0] hits -> 4 misses
    assert run("lfu", 2, steps).misses == 4
    # static pins 0 (in-sample most frequent; slots 2 - width 1 = 1 pinned); the free slot cycles 1, 2, 3
    assert run("static", 2, steps).misses == 4
    assert run("static", 2, steps, static_pinned=[1]).misses == 5
    assert P.most_frequent([[1, 2], [2, 3], [2]], 2) == [2, 1]


def test_bad_input():
    with pytest.raises(ValueError, match="only 2 slots"):
        P.make_policy("lru", 2).access([0, 1, 2])
    with pytest.raises(ValueError, match="repeats"):
        P.make_policy("lru", 4).access([1, 1])
    with pytest.raises(ValueError, match="unknown eviction policy"):
        P.make_policy("fifo", 4)
    with pytest.raises(ValueError, match="future"):
        b = P.make_policy("belady", 2, future=[[0], [1]])
        b.access([1])
    with pytest.raises(ValueError, match="pinned"):
        p = P.make_policy("static", 1, pinned=[0])
        p.access([0])
        p.access([1])


def brute_force_min_misses(steps, slots):
    """Exhaustive search over every eviction choice (the independent oracle for Belady on set steps)."""
    steps = tuple(tuple(s) for s in steps)

    @functools.lru_cache(maxsize=None)
    def go(t, resident):
        if t == len(steps):
            return 0
        need = set(steps[t])
        misses = [e for e in steps[t] if e not in resident]
        free = slots - len(resident)
        n_evict = max(0, len(misses) - free)
        candidates = sorted(set(resident) - need)
        best = None
        import itertools
        for ev in itertools.combinations(candidates, n_evict):
            nxt = frozenset((set(resident) - set(ev)) | need)
            v = len(misses) + go(t + 1, nxt)
            best = v if best is None else min(best, v)
        return best

    return go(0, frozenset())


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_belady_equals_brute_force_optimum(data):
    slots = data.draw(st.integers(2, 3))
    width = data.draw(st.integers(1, slots))
    steps = data.draw(st.lists(st.lists(st.integers(0, 5), min_size=width, max_size=width, unique=True),
                               min_size=1, max_size=9))
    assert run("belady", slots, steps).misses == brute_force_min_misses(steps, slots)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_experts=st.integers(8, 32), k=st.integers(1, 4),
       slots_extra=st.integers(0, 12), alpha=st.floats(0.5, 1.5))
def test_belady_beats_every_policy_on_zipf(seed, n_experts, k, slots_extra, alpha):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_experts + 1) ** alpha
    p = p[rng.permutation(n_experts)]
    p /= p.sum()
    steps = [list(rng.choice(n_experts, size=k, replace=False, p=p)) for _ in range(120)]
    slots = min(k + slots_extra, n_experts)
    best = run("belady", slots, steps)
    for name in P.POLICIES:
        r = run(name, slots, steps)
        assert r.accesses == best.accesses
        assert best.misses <= r.misses, (name, best.misses, r.misses)


class _RefLRU(P.LRU):
    """LRU with the base class's victim search (sorted candidates, ``_victim``): the definition."""
    _choose_victim = P.EvictionPolicy._choose_victim


class _RefStatic(P.StaticPinned):
    _choose_victim = P.EvictionPolicy._choose_victim


def _outcome(policy, step):
    try:
        return policy.access(step)
    except ValueError as e:
        return f"ValueError: {e}"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_lru_fast_victim_search_equals_definition(data):
    """LRU / static keep ``last`` in recency order and pick the first unprotected key; same steps as the sorted
    search of the definition, and ``last`` holds exactly the resident experts in ascending clock order."""
    n_exp = data.draw(st.integers(2, 12))
    slots = data.draw(st.integers(1, n_exp))
    width = data.draw(st.integers(1, slots))
    steps = data.draw(st.lists(st.lists(st.integers(0, n_exp - 1), min_size=1, max_size=width, unique=True),
                               min_size=1, max_size=40))
    pinned = data.draw(st.lists(st.integers(0, n_exp - 1), max_size=slots, unique=True))
    for fast, ref in ((P.LRU(slots), _RefLRU(slots)), (P.StaticPinned(slots, pinned), _RefStatic(slots, pinned))):
        for s in steps:
            got, want = _outcome(fast, s), _outcome(ref, s)
            assert got == want, (type(fast).__name__, s)
            if isinstance(got, str):
                break
            assert set(fast.last) == fast.resident
            clocks = list(fast.last.values())
            assert clocks == sorted(clocks)
        assert (fast.accesses, fast.misses, fast.resident) == (ref.accesses, ref.misses, ref.resident)
