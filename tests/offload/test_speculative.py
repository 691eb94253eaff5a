"""Speculative decode (OffloadConfig.speculative), pipelined by one token: bit-exact vs all-resident for every cache
size (accepts, rollbacks, overflow), rollbacks at exactly the per-layer path's first missing layer, the same policy
state / counters / trace as the per-layer path, in-flight calls never see a changed slot map, and ONE host read per
token when warm."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hlwq_jax.offload import moe_stack as M
from hlwq_jax.offload import trace as T
from moe_layers import D, E, F, K, L, build
from hlwq_jax.offload.bank import TRANSFERS
from hlwq_jax.offload.moe_stack import (OffloadConfig, OffloadedMoE, eager_resident_step, moe_only_decode,
                                        moe_only_decode_step, token_input)

_MODEL = {}


def model(transfer="rows"):
    """The shared 3-layer test model, built once per session and transfer path (same weights for every path)."""
    if transfer not in _MODEL:
        _MODEL[transfer] = build(7, transfer)
    return _MODEL[transfer]


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


def reference(routers, embeds):
    """The all-resident stand-in model over the token embeddings, outputs carried by ``token_input`` (host copies)."""
    _, _, full = model()
    outs, prev = [], None
    for e in embeds:
        prev = eager_resident_step(full, routers, token_input(e, prev), K)
        outs.append(np.asarray(prev))
    return outs


def per_layer(routers, embeds, slots, policy, *, prefetch=False, recorder=None, transfer="rows"):
    """The per-layer path token by token (chained); also each token's first layer with a miss (None: all hit)."""
    banks, _, _ = model(transfer)
    moe = OffloadedMoE(banks, OffloadConfig(slots=slots, policy=policy, prefetch=prefetch), recorder=recorder)
    outs, first_miss, prev = [], [], None
    for t, e in enumerate(embeds):
        before = [c.stats.misses for c in moe.caches]
        prev = moe_only_decode(moe, routers, [e], K, prev=prev, trace=("p", "decode", t))[0]
        outs.append(np.asarray(prev))
        grew = [l for l, (c, b) in enumerate(zip(moe.caches, before)) if c.stats.misses > b]
        first_miss.append(grew[0] if grew else None)
    assert moe.spec.host_reads == len(embeds) * L and moe.spec.accepts == moe.spec.rollbacks == 0
    return outs, first_miss, moe


class Spy:
    """Wraps the pipeline's steps: every settled (not discarded) speculative call must find the slot maps and slot
    buffers exactly as they were when it was dispatched, also after its accepted policy steps are applied; logs
    each repair as (token, layer)."""

    def __init__(self, monkeypatch, moe):
        self.moe, self.repairs, self.dispatched, self.settled = moe, [], {}, 0
        real_dispatch, real_settle, real_repair = M._dispatch, M._settle, M._repair

        def dispatch(m, routers, x, k, *with_weights):
            res = real_dispatch(m, routers, x, k, *with_weights)
            self.dispatched[id(res[0])] = (res[0], self.state())
            return res

        def settle(m, routers, spec, k, trace):
            _, at_dispatch = self.dispatched.pop(id(spec[0]))
            self.check(at_dispatch)
            out = real_settle(m, routers, spec, k, trace)
            if out is spec[0]:
                m.apply_pending()
                self.check(at_dispatch)
            self.settled += 1
            return out

        def repair(m, routers, spec, ids_h, ws_h, stop, k, trace):
            self.repairs.append((m.spec.tokens - 1, stop))
            return real_repair(m, routers, spec, ids_h, ws_h, stop, k, trace)

        monkeypatch.setattr(M, "_dispatch", dispatch)
        monkeypatch.setattr(M, "_settle", settle)
        monkeypatch.setattr(M, "_repair", repair)

    def state(self):
        return [(dict(c.slot_of), c.buffers) for c in self.moe.caches]

    def check(self, then):
        for (smap, buf), (smap0, buf0) in zip(self.state(), then):
            assert smap == smap0 and buf is buf0, "a settled speculative call's slot map / buffers changed in flight"


def speculative(routers, embeds, slots, policy, *, prefetch=False, recorder=None, monkeypatch=None, calls=(None,),
                transfer="rows"):
    """The pipelined speculative path over the embeddings, split over decode calls of the given sizes (None: the
    rest; the output carried from call to call)."""
    banks, _, _ = model(transfer)
    moe = OffloadedMoE(banks, OffloadConfig(slots=slots, policy=policy, prefetch=prefetch, speculative=True),
                       recorder=recorder)
    spy = Spy(monkeypatch, moe) if monkeypatch is not None else None
    outs, done, prev = [], 0, None
    for c in calls:
        m = len(embeds) - done if c is None else c
        got = moe_only_decode(moe, routers, embeds[done:done + m], K, prev=prev, trace=("p", "decode", done))
        prev, done = got[-1], done + m
        outs += [np.asarray(o) for o in got]
    assert done == len(embeds)
    return outs, moe, spy


def inputs(seed, n, t=1):
    """n token embeddings [t, D]."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((t, D)), jnp.float32) for _ in range(n)]


def check_counters(moe, first_miss, calls_last):
    """Rollbacks exactly at the per-layer path's missing tokens; one discarded in-flight call per rollback that is
    not the last token of a decode call (``calls_last``: those token indices)."""
    sp, n = moe.spec, len(first_miss)
    rolled = [t for t, f in enumerate(first_miss) if f is not None]
    assert sp.tokens == n and sp.accepts == n - len(rolled) and sp.rollbacks == len(rolled)
    assert sp.resumed_layers == sum(L - first_miss[t] for t in rolled)
    assert sp.host_reads == sp.accepts + sp.rollbacks + (sp.resumed_layers - sp.rollbacks)
    assert sp.discarded == len([t for t in rolled if t not in calls_last])


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), slots=st.integers(K, E), policy=st.sampled_from(["lru", "lfru", "lfu"]),
       restricted=st.sampled_from([0, 3, 4]), t=st.sampled_from([1, 3]))
def test_speculative_exact_and_same_policy_state(seed, slots, policy, restricted, t):
    """Random routings (optionally confined to a few experts so warm caches hit), every cache size K..E, decode
    (t=1) and overflowing multi-token steps (t=3), chained tokens: outputs bit-equal the all-resident reference,
    rollbacks happen at exactly the tokens where the per-layer path missed, and the caches end in exactly the
    per-layer path's state."""
    _, routers, _ = model()
    if restricted:
        routers = restrict(routers, restricted)
    xs = inputs(seed, 6, t)
    want = reference(routers, xs)
    base, first_miss, moe_b = per_layer(routers, xs, slots, policy)
    spec, moe_s, _ = speculative(routers, xs, slots, policy)
    for i, (b, s, w) in enumerate(zip(base, spec, want)):
        np.testing.assert_array_equal(b, w, err_msg=f"per-layer path, token {i}")
        np.testing.assert_array_equal(s, w, err_msg=f"speculative path, token {i}")
    assert policy_state(moe_s) == policy_state(moe_b)
    check_counters(moe_s, first_miss, {len(xs) - 1})


def test_pipeline_misses_at_every_layer_and_consecutive_tokens(monkeypatch):
    """A trace with rollbacks at layers 0, 1 and 2, on consecutive tokens and right after accepted ones, decoded in
    several calls (pipelines restart at call boundaries): each rollback at exactly the per-layer path's (token,
    first missing layer), exact outputs, same policy state and trace lines, and every settled call ran on unchanged
    slot maps and buffers."""
    _, routers, _ = model()
    routers = restrict(routers, 4)
    xs, calls = inputs(11, 24), (5, 1, None)
    n = len(xs)
    want = reference(routers, xs)
    rb, rs = T.TraceRecorder(), T.TraceRecorder()
    base, first_miss, moe_b = per_layer(routers, xs, 3, "lru", recorder=rb)
    spec, moe_s, spy = speculative(routers, xs, 3, "lru", recorder=rs, monkeypatch=monkeypatch, calls=calls)
    for i, (s, w) in enumerate(zip(spec, want)):
        np.testing.assert_array_equal(s, w, err_msg=f"token {i}")
    assert policy_state(moe_s) == policy_state(moe_b)
    assert rs.records() == rb.records() and len(rs.records()) == n * L
    assert spy.repairs == [(t, f) for t, f in enumerate(first_miss) if f is not None]
    check_counters(moe_s, first_miss, {4, 5, n - 1})
    assert spy.settled == n and len(spy.dispatched) == moe_s.spec.discarded > 0  # the rest: discarded, never read
    rolled = [f is not None for f in first_miss]
    assert {f for f in first_miss if f is not None} == set(range(L)), first_miss
    assert any(a and b for a, b in zip(rolled, rolled[1:])), first_miss  # consecutive rollbacks
    assert any(not a and b for a, b in zip(rolled, rolled[1:])), first_miss  # a rollback after an accept
    assert any(a and not b for a, b in zip(rolled, rolled[1:])), first_miss  # an accept after a rollback


def test_every_cache_size_accepts_and_rollbacks():
    """Deterministic sweep over C = K..E with routing confined to 4 experts: small caches roll back (overflowing
    caches included), large ones accept after warm-up — both exact, with equal policy state."""
    _, routers, _ = model()
    routers = restrict(routers, 4)
    xs = inputs(1, 5, 2)
    n = len(xs)
    want = reference(routers, xs)
    seen = set()
    for slots in range(K, E + 1):
        _, first_miss, moe_b = per_layer(routers, xs, slots, "lru")
        spec, moe_s, _ = speculative(routers, xs, slots, "lru")
        for s, w in zip(spec, want):
            np.testing.assert_array_equal(s, w, err_msg=f"slots={slots}")
        assert policy_state(moe_s) == policy_state(moe_b), slots
        check_counters(moe_s, first_miss, {n - 1})
        if slots >= 4:  # every routed expert fits: only compulsory misses (≤ 4 per layer) cause rollbacks
            assert all(c.stats.misses <= 4 for c in moe_s.caches) and moe_s.spec.accepts > 0, (slots, moe_s.spec)
        seen |= {"accept"} if moe_s.spec.accepts else set()
        seen |= {"rollback"} if moe_s.spec.rollbacks else set()
        seen |= {"overflow"} if any(c.stats.groups > n for c in moe_s.caches) else set()  # split tokens
    assert seen == {"accept", "rollback", "overflow"}


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_rollback_at_middle_layer_trace_and_prefetch(transfer):
    """Layer 0 confined to the warm experts, later layers free: rollbacks happen at layer ≥ 1 (layers before it
    accepted). Output exact, trace lines identical to the per-layer path's; with prefetch (used on the resumed layers
    after the first: the speculative pass predicts nothing) the policy decisions stay identical. Both transfer paths
    (the repairs install through the bank's path)."""
    _, routers, _ = model()
    routers = restrict(routers, 3, layers=(0,))
    xs = inputs(2, 6)
    n = len(xs)
    want = reference(routers, xs)
    for prefetch in (False, True):
        rb, rs = T.TraceRecorder(), T.TraceRecorder()
        _, first_miss, moe_b = per_layer(routers, xs, 3, "lru", prefetch=prefetch, recorder=rb, transfer=transfer)
        spec, moe_s, _ = speculative(routers, xs, 3, "lru", prefetch=prefetch, recorder=rs, transfer=transfer)
        for s, w in zip(spec, want):
            np.testing.assert_array_equal(s, w)
        assert policy_state(moe_s, not prefetch) == policy_state(moe_b, not prefetch)
        assert rs.records() == rb.records() and len(rs.records()) == n * L
        check_counters(moe_s, first_miss, {n - 1})
        # a rollback at layer 0 resumes all L layers; fewer resumed layers prove some cut at a later layer
        assert moe_s.spec.rollbacks > 0 and moe_s.spec.resumed_layers < moe_s.spec.rollbacks * L


def test_warm_cache_one_host_read_per_token(monkeypatch):
    """Warm cache holding every needed expert: per token exactly ONE device→host read (the stack reads only through
    ``jax.device_get``, counted here; JAX's transfer guard additionally rejects implicit reads on GPU — on CPU it
    does not fire), no host→device transfer (slot maps re-sent only when changed), every token accepted, nothing
    discarded."""
    banks, routers, _ = model()
    routers = restrict(routers, 4)
    xs = inputs(3, 8)
    want = reference(routers, xs)
    moe = OffloadedMoE(banks, OffloadConfig(slots=4, speculative=True))
    for c in moe.caches:  # warm-up: one access step bringing the 4 routable experts of every layer in
        c.ensure(range(4))
    warm = moe_only_decode(moe, routers, xs[:3], K)
    assert moe.spec.accepts == 3 and all(sorted(c.slot_of) == [0, 1, 2, 3] for c in moe.caches)
    gets, puts = [], []
    real_get, real_put = jax.device_get, jax.device_put
    monkeypatch.setattr(jax, "device_get", lambda x: gets.append(1) or real_get(x))
    monkeypatch.setattr(jax, "device_put", lambda *a, **kw: puts.append(1) or real_put(*a, **kw))
    before = dataclasses.replace(moe.spec)
    with jax.transfer_guard_device_to_host("disallow"):
        outs = moe_only_decode(moe, routers, xs[3:], K, prev=warm[-1])
    assert len(gets) == 5 and puts == []
    d = moe.spec.minus(before)
    assert (d.tokens, d.accepts, d.rollbacks, d.host_reads, d.discarded) == (5, 5, 0, 5, 0)
    assert all(c.stats.misses == 4 for c in moe.caches)  # only the warm-up's compulsory misses
    for o, w in zip(warm + outs, want):
        np.testing.assert_array_equal(np.asarray(o), w)
    # the per-layer path reads once per layer (the guard lets explicit device_get through and no other read)
    gets.clear()
    base = OffloadedMoE(banks, OffloadConfig(slots=4))
    with jax.transfer_guard_device_to_host("disallow"):
        moe_only_decode_step(base, routers, xs[0], K)
    assert len(gets) == L


def test_apply_pending_refuses_a_step_that_moves_an_expert():
    """The pipeline's invariant is checked, not assumed: a queued 'accepted' step that would install raises."""
    banks, _, _ = model()
    moe = OffloadedMoE(banks, OffloadConfig(slots=4, speculative=True))
    moe._pending.append((1, [0, 1]))  # nothing is resident: this step would miss and install
    with pytest.raises(RuntimeError, match="changed the slot map"):
        moe.apply_pending()


def test_stand_in_rejects_bad_arguments():
    banks, routers, _ = model()
    moe = OffloadedMoE(banks, OffloadConfig(slots=4, speculative=True))
    with pytest.raises(ValueError, match="routers"):
        moe_only_decode(moe, routers[:2], inputs(0, 2), K)
    with pytest.raises(ValueError, match="at least one"):
        moe_only_decode(moe, routers, [], K)


def test_speculative_call_outputs_only_out_and_codes():
    """The speculative call returns (out [T, D], codes int32 [L, T·k]) and nothing else — no per-layer states (a
    rollback recomputes them) — plus the routing weights [L, T, k] only when a trace is recorded. The codes equal an
    oracle (the all-resident per-layer path's ids, negated with ``~`` where the numpy slot map has no slot) for every
    layer up to the first missing one, and ``decode_codes`` flags exactly those layers."""
    banks, routers, full = model()
    routers = restrict(routers, 4, layers=(0,))  # layer 0 hits; later layers miss at random
    moe = OffloadedMoE(banks, OffloadConfig(slots=4, speculative=True))
    moe.preload(range(4))
    smaps = np.stack([c.slot_map() for c in moe.caches])
    args = (routers, moe.device_slot_maps(), [c.weights() for c in moe.caches])
    t = 3
    shapes = jax.eval_shape(lambda x: M.speculative_stack(x, *args, k=K), inputs(0, 1, t)[0])
    assert [(s.shape, s.dtype) for s in shapes] == [((t, D), jnp.float32), ((L, t * K), jnp.int32)]
    shapes = jax.eval_shape(lambda x: M.speculative_stack(x, *args, k=K, with_weights=True), inputs(0, 1, t)[0])
    assert [s.shape for s in shapes] == [(t, D), (L, t * K), (L, t, K)]
    first = set()
    for x in inputs(9, 6, t):
        _, codes = M.speculative_stack(x, *args, k=K)
        ids, hit = M.decode_codes(np.asarray(codes), K)
        xl, y = x, None
        for l, ((gate, bias), wl) in enumerate(zip(routers, full)):
            xl, h, want, w = M.route_layer(xl, y, gate, bias, k=K)
            want = np.asarray(want)
            absent = smaps[l][want] < 0
            np.testing.assert_array_equal(np.asarray(codes)[l], np.where(absent, -1 - want, want).reshape(-1))
            np.testing.assert_array_equal(ids[l], want)
            assert hit[l] == (not absent.any())
            if absent.any():
                first.add(l)
                break
            y = M.routed_experts(h, jnp.asarray(want), w, wl)
    assert 0 not in first and first, first  # layer 0 always hits; some pass missed at a later layer


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_preload_makes_restricted_decode_miss_free(transfer):
    """``preload`` installs the routable experts of every layer through the normal access step (policy and counters
    as after ``ensure``), after which routing confined to them never misses: per-layer and speculative decode both
    exact, no rollback, no discarded call. Both transfer paths."""
    banks, routers, _ = model(transfer)
    routers = restrict(routers, 4)
    xs = inputs(4, 5)
    want = reference(routers, xs)
    for spec in (False, True):
        moe = OffloadedMoE(banks, OffloadConfig(slots=4, speculative=spec))
        moe.preload(range(4))
        assert all((c.stats.steps, c.stats.misses, sorted(c.slot_of)) == (1, 4, [0, 1, 2, 3]) for c in moe.caches)
        outs = moe_only_decode(moe, routers, xs, K)
        for o, w in zip(outs, want):
            np.testing.assert_array_equal(np.asarray(o), w)
        assert all(s.misses == 4 for s in moe.stats())
        assert (moe.spec.rollbacks, moe.spec.discarded, moe.spec.accepts) == (0, 0, len(xs) if spec else 0)
