"""The multi-layer driver: cached decode == all-resident decode bit for bit; prefetch changes transfers, not results;
recorded traces replay to exactly the live cache's miss counts; the router matches a numpy oracle."""
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.offload import trace as T
from moe_layers import D, E, K, L, build
from hlwq_jax.offload.bank import TRANSFERS
from hlwq_jax.offload.moe_stack import (OffloadConfig, OffloadedMoE, eager_resident_step, moe_only_decode_step,
                                        resident_decode_step, sigmoid_topk_route)



def model(seed=0, transfer="rows"):
    return build(seed, transfer)


def test_router_matches_numpy(rng):
    h = rng.standard_normal((4, D)).astype(np.float32)
    gate = rng.standard_normal((E, D)).astype(np.float32)
    bias = rng.standard_normal(E).astype(np.float32)
    ids, w = sigmoid_topk_route(jnp.asarray(h), jnp.asarray(gate), jnp.asarray(bias), k=K)
    s = 1 / (1 + np.exp(-(h.astype(np.float64) @ gate.T)))
    want_ids = np.argsort(-(s + bias), axis=-1)[:, :K]
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    sel = np.take_along_axis(s, want_ids, -1)
    np.testing.assert_allclose(np.asarray(w), sel / sel.sum(-1, keepdims=True) * 2.5, rtol=1e-5)


def eager_resident(full, routers, x):
    return eager_resident_step(full, routers, x, K)


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_decode_exact_prefetch_and_trace_replay(rng, tmp_path, transfer):
    banks, routers, full = model(transfer=transfer)
    xs = [jnp.asarray(rng.standard_normal((1, D)), jnp.float32) for _ in range(8)]
    want = [eager_resident(full, routers, x) for x in xs]
    rec = T.TraceRecorder()
    runs = {}
    for prefetch in (False, True):
        moe = OffloadedMoE(banks, OffloadConfig(slots=3, policy="lru", prefetch=prefetch),
                           recorder=rec if not prefetch else None)
        for pos, (x, ref) in enumerate(zip(xs, want)):
            got = moe_only_decode_step(moe, routers, x, K, trace=("p0", "decode", pos))
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        runs[prefetch] = moe.stats()
    no_pf, pf = runs[False], runs[True]
    assert [s.misses for s in no_pf] == [s.misses for s in pf]  # prefetch does not change the policy's decisions
    assert sum(s.prefetched for s in pf) > 0 and sum(s.prefetched for s in no_pf) == 0
    assert pf[0].prefetched == 0  # nothing predicts layer 0
    np.testing.assert_allclose(np.asarray(resident_decode_step(full, routers, xs[0], k=K)), np.asarray(want[0]),
                               rtol=1e-5, atol=1e-5)
    rec.write(tmp_path / "t.jsonl")
    replayed = T.replay_records(T.read_trace(tmp_path / "t.jsonl"), "lru", 3)
    assert [(r.accesses, r.misses) for r in replayed] == [(s.hits + s.misses, s.misses) for s in no_pf]


def test_static_policy_from_trace_profile_and_policy_module_is_pure(tmp_path):
    import ast
    import pathlib

    banks, routers, full = model(1)
    rec = T.TraceRecorder()
    xs = [jnp.asarray(np.random.default_rng(i).standard_normal((1, D)), jnp.float32) for i in range(6)]
    moe = OffloadedMoE(banks, OffloadConfig(slots=4), recorder=rec)
    for pos, x in enumerate(xs):
        moe_only_decode_step(moe, routers, x, K, trace=("p", "decode", pos))
    pins = T.static_pins(rec.records(), 4)
    assert len(pins) == L and all(len(p) == 4 - K for p in pins)
    static = OffloadedMoE(banks, OffloadConfig(slots=4, policy="static"), policy_kw=[{"pinned": p} for p in pins])
    for x in xs:
        np.testing.assert_array_equal(np.asarray(moe_only_decode_step(static, routers, x, K)),
                                      np.asarray(eager_resident(full, routers, x)))
    for c, p in zip(static.caches, pins):  # pinned experts stay resident once loaded
        assert set(p) <= set(np.flatnonzero(c.slot_map() >= 0))
    src = pathlib.Path(__file__).resolve().parents[2] / "hlwq_jax" / "offload" / "policy.py"
    tree = ast.parse(src.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "collections", "dataclasses", "typing"}, imported


def test_token_input_matches_numpy(rng):
    """The stand-in model's carried input: e + rms(prev) / 16 (float64 oracle); no previous token: e itself."""
    from hlwq_jax.offload.moe_stack import token_input

    e = rng.standard_normal((3, D)).astype(np.float32)
    prev = (50 * rng.standard_normal((3, D))).astype(np.float32)
    p64 = prev.astype(np.float64)
    want = e + p64 / np.sqrt(np.mean(p64 * p64, -1, keepdims=True) + 1e-5) / 16
    np.testing.assert_allclose(np.asarray(token_input(jnp.asarray(e), jnp.asarray(prev))), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(token_input(jnp.asarray(e), None)), e)
