"""Host-side bookkeeping of ``LayerCache`` / ``cached_moe`` kept for speed: the incremental expert→slot map equals the
one rebuilt from ``slot_of``, the decode fast path (one group) gives the policy the same step as the group loop, the
routed FFN gets host slot ids equal to the map lookup, and a bank's planned ``build`` equals ``build_weights``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hlwq_jax.offload.bank import HostBank, build_weights
from hlwq_jax.offload.expert_cache import LayerCache, cached_moe, routed_experts
from hlwq_jax.quant.hlwq import quantize

E, D, F, K = 8, 32, 24, 2
_BANKS = {}


def bank(kind="f32"):
    if kind not in _BANKS:
        rng = np.random.default_rng(3)
        up = rng.standard_normal((E, F, D)).astype(np.float32) / np.sqrt(D)
        down = rng.standard_normal((E, D, F)).astype(np.float32) / np.sqrt(F)
        if kind == "q5":
            w = {"up_proj": quantize(jnp.asarray(up), bits=5, block_size=32),
                 "down_proj": quantize(jnp.asarray(down), bits=5, block_size=32)}
        else:
            w = {"up_proj": jnp.asarray(up), "down_proj": jnp.asarray(down)}
        _BANKS[kind] = HostBank(w)
    return _BANKS[kind]


def check_maps(cache: LayerCache):
    ref = cache.slot_map_reference()
    np.testing.assert_array_equal(cache.slot_map(), ref)
    assert sorted(cache.free + list(cache.slot_of.values())) == list(range(cache.slots))
    assert set(cache.slot_of) == cache.policy.resident
    ids = np.arange(E).reshape(2, -1)
    np.testing.assert_array_equal(cache.slot_ids(ids), ref[ids])


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), slots=st.sampled_from([2, 3, 5, E]),
       policy=st.sampled_from(["lru", "lfru", "lfru-fork", "lfu", "static"]))
def test_incremental_slot_map_equals_rebuilt(seed, slots, policy):
    rng = np.random.default_rng(seed)
    kw = {"pinned": [int(rng.integers(E))]} if policy == "static" else {}
    cache = LayerCache(bank(), slots, policy, **kw)
    check_maps(cache)
    width = slots - len(kw.get("pinned", ()))
    for _ in range(12):
        step = [int(e) for e in rng.choice(E, int(rng.integers(1, max(width, 1) + 1)), replace=False)]
        cache.ensure(step)
        check_maps(cache)
    m = cache.slot_map()
    m[:] = 7  # a copy: the kept map is not changed through it
    check_maps(cache)


def test_decode_fast_path_same_step_and_host_slot_ids():
    """One group (union ≤ C): the policy gets the union in first-seen order; the FFN gets host int32 slot ids equal
    to the map lookup; result equals the all-resident call."""
    b = bank()
    full = b.all_resident()
    seen = []

    def spy(x, ids, w, experts):
        seen.append(ids)
        return routed_experts(x, ids, w, experts)

    cache = LayerCache(b, 4, "lru")
    ids = np.asarray([[3, 1], [1, 5]], np.int32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, D)), jnp.float32)
    w = jnp.asarray([[0.5, 0.25], [1.0, 0.75]], jnp.float32)
    got = cached_moe(cache, x, jnp.asarray(ids), w, spy)
    assert list(cache.policy.last) == [3, 1, 5] and cache.stats.groups == 1
    assert isinstance(seen[0], np.ndarray) and seen[0].dtype == np.int32
    np.testing.assert_array_equal(seen[0], cache.slot_map_reference()[ids])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(routed_experts(x, jnp.asarray(ids), w, full)))


def test_cached_moe_rejects_bad_ids():
    cache = LayerCache(bank(), 4, "lru")
    x, w = jnp.ones((1, D), jnp.float32), jnp.ones((1, K), jnp.float32)
    for bad in (np.asarray([[0.0, 1.0]]), np.asarray([[0, E]]), np.asarray([[-1, 0]]), np.zeros((1, 0), np.int32),
                np.asarray([0, 1])):
        with pytest.raises(ValueError, match="routed ids"):
            cached_moe(cache, x, bad, w, host_ids=bad)
    assert cache.stats.steps == 0


@pytest.mark.parametrize("kind", ["f32", "q5"])
def test_planned_build_equals_build_weights(kind):
    b = bank(kind)
    cache = LayerCache(b, 3, "lru")
    cache.ensure([4, 0])
    got = cache.weights()
    want = build_weights(b.specs, b.layout, cache.buffers, 3)
    gl, gt = jax.tree_util.tree_flatten(got)
    wl, wt = jax.tree_util.tree_flatten(want)
    assert gt == wt and all(a is c for a, c in zip(gl, wl))
    assert got is cache.weights()  # cached until the next install
    cache.ensure([5])
    assert got is not cache.weights()
    with pytest.raises(ValueError, match="field arrays"):
        b.build(cache.buffers[:1], 3)
