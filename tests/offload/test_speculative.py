"""Speculative decode (OffloadConfig.speculative): bit-exact vs all-resident for every cache size (accepts, rollbacks,
overflow), the same policy state / counters / trace as the per-layer path, and ONE host read per token when warm."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hlwq_jax.offload import trace as T
from moe_layers import D, E, F, K, L, build
from hlwq_jax.offload.moe_stack import OffloadConfig, OffloadedMoE, eager_resident_step, moe_only_decode_step

_MODEL = {}


def model():
    """The shared 3-layer test model, built once per session."""
    if not _MODEL:
        _MODEL["m"] = build(7)
    return _MODEL["m"]


def restrict(routers, n, layers=range(L)):
    """+100 selection bias on experts [0, n) of the given layers: their routing stays inside n experts."""
    return [(g, b.at[:n].add(100.0)) if l in layers else (g, b) for l, (g, b) in enumerate(routers)]


def policy_state(moe, transfers=True):
    """Everything a per-layer cache decides with: policy attributes, expert→slot map, free list, counters
    (without ``transfers``: only the policy's counters; prefetching changes how misses are transferred)."""
    moe.apply_pending()
    out = []
    for c in moe.caches:
        st_ = dataclasses.replace(c.stats, wait_s=0.0, transfer_s=0.0)
        if not transfers:
            st_ = (st_.steps, st_.groups, st_.hits, st_.misses)
        out.append((sorted(vars(c.policy).items(), key=lambda kv: kv[0]), dict(c.slot_of), list(c.free), st_))
    return out


def run(routers, xs, slots, policy, speculative, *, prefetch=False, recorder=None):
    banks, _, _ = model()
    moe = OffloadedMoE(banks, OffloadConfig(slots=slots, policy=policy, prefetch=prefetch, speculative=speculative),
                       recorder=recorder)
    outs = []
    for i, x in enumerate(xs):
        misses, rollbacks = sum(c.stats.misses for c in moe.caches), moe.spec.rollbacks
        outs.append(np.asarray(moe_only_decode_step(moe, routers, x, K, trace=("p", "decode", i))))
        if speculative:  # a token rolls back exactly when one of its layers needed an absent expert
            missed = sum(c.stats.misses for c in moe.caches) > misses
            assert (moe.spec.rollbacks > rollbacks) == missed, (i, moe.spec)
    return outs, moe


def inputs(seed, n, t=1):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((t, D)), jnp.float32) for _ in range(n)]


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), slots=st.integers(K, E), policy=st.sampled_from(["lru", "lfru", "lfu"]),
       restricted=st.sampled_from([0, 3, 4]), t=st.sampled_from([1, 3]))
def test_speculative_exact_and_same_policy_state(seed, slots, policy, restricted, t):
    """Random routings (optionally confined to a few experts so warm caches hit), every cache size K..E,
    decode (t=1) and overflowing multi-token steps (t=3): outputs bit-equal the all-resident reference and the
    caches end in exactly the per-layer path's state."""
    _, routers, full = model()
    if restricted:
        routers = restrict(routers, restricted)
    xs = inputs(seed, 6, t)
    want = [np.asarray(eager_resident_step(full, routers, x, K)) for x in xs]
    base, moe_b = run(routers, xs, slots, policy, False)
    spec, moe_s = run(routers, xs, slots, policy, True)
    for i, (b, s, w) in enumerate(zip(base, spec, want)):
        np.testing.assert_array_equal(b, w, err_msg=f"per-layer path, token {i}")
        np.testing.assert_array_equal(s, w, err_msg=f"speculative path, token {i}")
    assert policy_state(moe_s) == policy_state(moe_b)
    sp = moe_s.spec
    assert sp.tokens == len(xs) and sp.accepts + sp.rollbacks == len(xs)
    assert sp.host_reads == sp.accepts + sp.rollbacks + (sp.resumed_layers - sp.rollbacks)
    assert moe_b.spec.host_reads == len(xs) * L and moe_b.spec.accepts == moe_b.spec.rollbacks == 0


def test_every_cache_size_accepts_and_rollbacks():
    """Deterministic sweep over C = K..E with routing confined to 4 experts: small caches roll back (overflowing
    caches included), large ones accept after warm-up — both exact, with equal policy state."""
    _, routers, full = model()
    routers = restrict(routers, 4)
    xs = inputs(1, 5, 2)
    want = [np.asarray(eager_resident_step(full, routers, x, K)) for x in xs]
    seen = set()
    for slots in range(K, E + 1):
        base, moe_b = run(routers, xs, slots, "lru", False)
        spec, moe_s = run(routers, xs, slots, "lru", True)
        for s, w in zip(spec, want):
            np.testing.assert_array_equal(s, w, err_msg=f"slots={slots}")
        assert policy_state(moe_s) == policy_state(moe_b), slots
        if slots >= 4:  # every routed expert fits: only compulsory misses (≤ 4 per layer) cause rollbacks
            assert all(c.stats.misses <= 4 for c in moe_s.caches) and moe_s.spec.accepts > 0, (slots, moe_s.spec)
        seen |= {"accept"} if moe_s.spec.accepts else set()
        seen |= {"rollback"} if moe_s.spec.rollbacks else set()
        seen |= {"overflow"} if any(c.stats.groups > len(xs) for c in moe_s.caches) else set()  # split tokens
    assert seen == {"accept", "rollback", "overflow"}


def test_rollback_at_middle_layer_trace_and_prefetch(tmp_path):
    """Layer 0 confined to the warm experts, later layers free: rollbacks happen at layer ≥ 1 (layers before it
    accepted). Output exact, trace lines identical to the per-layer path's; with prefetch (used on the resumed layers
    after the first: the speculative pass predicts nothing) the policy decisions stay identical."""
    _, routers, full = model()
    routers = restrict(routers, 3, layers=(0,))
    xs = inputs(2, 6)
    want = [np.asarray(eager_resident_step(full, routers, x, K)) for x in xs]
    for prefetch in (False, True):
        rb, rs = T.TraceRecorder(), T.TraceRecorder()
        base, moe_b = run(routers, xs, 3, "lru", False, prefetch=prefetch, recorder=rb)
        spec, moe_s = run(routers, xs, 3, "lru", True, prefetch=prefetch, recorder=rs)
        for s, w in zip(spec, want):
            np.testing.assert_array_equal(s, w)
        assert policy_state(moe_s, not prefetch) == policy_state(moe_b, not prefetch)
        assert rs.records() == rb.records() and len(rs.records()) == len(xs) * L
        assert moe_s.spec.rollbacks > 0
        # a rollback at layer 0 resumes all L layers; fewer resumed layers prove some cut at a later layer
        assert moe_s.spec.resumed_layers < moe_s.spec.rollbacks * L


def test_warm_cache_one_host_read_per_token(monkeypatch):
    """Warm cache holding every needed expert: per token exactly ONE device→host read (the stack reads only through
    ``jax.device_get``, counted here; JAX's transfer guard additionally rejects implicit reads on GPU — on CPU it
    does not fire), no host→device transfer (slot maps re-sent only when changed), every token accepted."""
    _, routers, full = model()
    routers = restrict(routers, 4)
    xs = inputs(3, 8)
    banks, _, _ = model()
    moe = OffloadedMoE(banks, OffloadConfig(slots=4, speculative=True))
    for c in moe.caches:  # warm-up: one access step bringing the 4 routable experts of every layer in
        c.ensure(range(4))
    for x in xs[:3]:
        moe_only_decode_step(moe, routers, x, K)
    assert moe.spec.accepts == 3 and all(sorted(c.slot_of) == [0, 1, 2, 3] for c in moe.caches)
    gets, puts = [], []
    real_get, real_put = jax.device_get, jax.device_put
    monkeypatch.setattr(jax, "device_get", lambda x: gets.append(1) or real_get(x))
    monkeypatch.setattr(jax, "device_put", lambda *a, **kw: puts.append(1) or real_put(*a, **kw))
    before = moe.spec
    moe.spec = dataclasses.replace(before)
    outs = []
    with jax.transfer_guard_device_to_host("disallow"):
        for i, x in enumerate(xs[3:]):
            outs.append(moe_only_decode_step(moe, routers, x, K))
            assert len(gets) == i + 1
    assert puts == []
    d = moe.spec.minus(before)
    assert (d.tokens, d.accepts, d.rollbacks, d.host_reads) == (5, 5, 0, 5)
    assert all(c.stats.misses == 4 for c in moe.caches)  # only the warm-up's compulsory misses
    for o, x in zip(outs, xs[3:]):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(eager_resident_step(full, routers, x, K)))
    # the per-layer path reads once per layer (the guard lets explicit device_get through and no other read)
    gets.clear()
    base = OffloadedMoE(banks, OffloadConfig(slots=4))
    with jax.transfer_guard_device_to_host("disallow"):
        moe_only_decode_step(base, routers, xs[0], K)
    assert len(gets) == L


def test_speculative_rejected_where_not_implemented():
    from hlwq_jax.models import nemotron_h as nh
    from hlwq_jax.offload.nemotron import OffloadedNemotronH

    banks, routers, _ = model()
    cfg = nh.NemotronHConfig.from_hf(nh.NANO_30B_HF, vocab_size=16, hidden_size=D, layer_types="E",
                                     n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=F,
                                     moe_shared_expert_intermediate_size=F)
    with pytest.raises(ValueError, match="speculative"):
        OffloadedNemotronH(cfg, {"layers": [{}]}, OffloadConfig(slots=4, speculative=True), banks=banks[:1])
    moe = OffloadedMoE(banks, OffloadConfig(slots=4, speculative=True))
    with pytest.raises(ValueError, match="routers"):
        moe_only_decode_step(moe, routers[:2], inputs(0, 1)[0], K)
