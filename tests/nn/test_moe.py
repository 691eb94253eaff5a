import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.nn.moe import MoEConfig, moe, moe_experts, moe_param_shapes, moe_reference, route

CFG = MoEConfig(hidden=16, num_experts=8, top_k=3, expert_dim=12, shared_dim=20, routed_scaling=2.5)


def _params(cfg, rng):
    def make(tree):
        if isinstance(tree, dict):
            return {k: make(v) for k, v in tree.items()}
        return rng.standard_normal(tree) / np.sqrt(tree[-1])
    p = make(moe_param_shapes(cfg))
    p["router_bias"] = 0.3 * rng.standard_normal(cfg.num_experts)
    return p


def _j(tree, dtype=jnp.float32):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_route_bias_selects_but_does_not_weight(rng):
    p = _params(CFG, rng)
    x = rng.standard_normal((5, CFG.hidden))
    p["router_bias"] = np.zeros(CFG.num_experts)
    p["router_bias"][6] = 100.0  # always selected
    w, ids = route(_j(p), jnp.asarray(x, jnp.float32), CFG)
    assert np.all(np.any(np.asarray(ids) == 6, axis=1))
    s = 1 / (1 + np.exp(-(x @ p["router"].T)))
    sel = np.take_along_axis(s, np.asarray(ids), 1)
    np.testing.assert_allclose(np.asarray(w), sel / sel.sum(1, keepdims=True) * 2.5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["capacity", "gather", "ragged", "reference"])
@pytest.mark.parametrize("groups", [1, 4])
def test_moe_matches_float64(rng, impl, groups):
    cfg = dataclasses.replace(CFG, n_group=groups, topk_group=2 if groups > 1 else 1)
    p = _params(cfg, rng)
    x = rng.standard_normal((2, 9, cfg.hidden))
    got = moe(_j(p), jnp.asarray(x, jnp.float32), cfg, impl=impl)
    assert _rel(got, moe_reference(p, x, cfg)) < 1e-5


def test_capacity_is_dropless_when_skewed(rng):
    p = _params(CFG, rng)
    x = jnp.asarray(rng.standard_normal((40, CFG.hidden)), jnp.float32)
    # every token picks expert 0 and 1: groups of 40 with capacity 8 -> 5 rounds; experts 3..7 stay empty
    ids = jnp.stack([jnp.zeros(40, jnp.int32), jnp.ones(40, jnp.int32), jnp.full(40, 2, jnp.int32)], 1)
    ids = ids.at[::7, 2].set(5)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (40, 3)), jnp.float32)
    ex = _j(p["experts"])
    ref = moe_experts(ex, x, ids, w, impl="reference")
    got = jax.jit(lambda *a: moe_experts(*a, impl="capacity", capacity=8))(ex, x, ids, w)
    assert _rel(got, np.asarray(ref, np.float64)) < 1e-6
    got = jax.jit(lambda *a: moe_experts(*a, impl="ragged"))(ex, x, ids, w)        # empty groups 3, 4, 6, 7
    assert _rel(got, np.asarray(ref, np.float64)) < 1e-6


def test_gather_reads_only_selected_experts(rng):
    p = _params(CFG, rng)
    ex = _j(p["experts"])
    poisoned = jax.tree.map(lambda a: a.at[4:].set(jnp.nan), ex)
    x = jnp.asarray(rng.standard_normal((3, CFG.hidden)), jnp.float32)
    ids = jnp.asarray([[0, 1, 2], [3, 2, 1], [0, 3, 1]], jnp.int32)
    w = jnp.ones((3, 3), jnp.float32)
    got = moe_experts(poisoned, x, ids, w, impl="gather")
    ref = moe_experts(ex, x, ids, w, impl="reference")
    assert np.all(np.isfinite(np.asarray(got))) and _rel(got, np.asarray(ref, np.float64)) < 1e-6


def test_slot_buffer_interface(rng):
    """An offload engine passes a slot buffer and ids mapped expert -> slot."""
    p = _params(CFG, rng)
    ex = _j(p["experts"])
    x = jnp.asarray(rng.standard_normal((4, CFG.hidden)), jnp.float32)
    ids_np = np.asarray([[7, 2, 5], [2, 5, 7], [5, 7, 2], [7, 5, 2]])
    ids = jnp.asarray(ids_np, jnp.int32)
    w = jnp.asarray(rng.uniform(size=(4, 3)), jnp.float32)
    resident = [7, 2, 5]                                   # slot i holds expert resident[i]
    buf = jax.tree.map(lambda a: a[jnp.asarray(resident)], ex)
    slot_ids = jnp.asarray(np.vectorize({e: i for i, e in enumerate(resident)}.get)(ids_np), jnp.int32)
    for impl in ("capacity", "gather", "ragged"):
        got = moe_experts(buf, x, slot_ids, w, impl=impl)
        ref = moe_experts(ex, x, ids, w, impl="reference")
        assert _rel(got, np.asarray(ref, np.float64)) < 1e-6


@pytest.mark.parametrize("hidden,inter,rotation", [(32, 64, "hadamard"), (40, 50, "random-hadamard")])
def test_quantized_experts_match_their_dequantization(rng, hidden, inter, rotation):
    """Every impl contracts HLWQ experts in the rotated domain (ins padded to the block when not a multiple)."""
    from hlwq_jax.quant.hlwq import quantize
    cfg = dataclasses.replace(CFG, hidden=hidden, expert_dim=inter, shared_dim=0)
    p = _params(cfg, rng)
    q = {k: quantize(jnp.asarray(v, jnp.float32), bits=4, block_size=32, rotation=rotation, seed=3)
         for k, v in p["experts"].items()}
    deq = {k: v.dequantize(jnp.float32) for k, v in q.items()}
    x = jnp.asarray(rng.standard_normal((5, cfg.hidden)), jnp.float32)
    w, ids = route(_j(p), x, cfg)
    ref = moe_experts(deq, x, ids, w, impl="reference")
    for impl in ("capacity", "gather", "ragged"):
        got = moe_experts(q, x, ids, w, impl=impl)
        assert _rel(got, np.asarray(ref, np.float64)) < 1e-5


@pytest.mark.parametrize("impl", ["pallas-decode", "xla"])
def test_kernel_choice_experts_match_hlwq_experts(rng, impl):
    """Experts wrapped by select_kernels (HLWQPlanes in a KernelChoice): the gather path runs the Pallas gather GEMV
    (interpret mode here) for "pallas-decode", XLA otherwise; every impl equals the same experts as HLWQArrays."""
    from hlwq_jax.nn.linear import KernelChoice, select_kernels
    from hlwq_jax.quant.hlwq import quantize
    cfg = dataclasses.replace(CFG, hidden=256, expert_dim=128, shared_dim=0)
    p = _params(cfg, rng)
    q = {k: quantize(jnp.asarray(v, jnp.float32), bits=5, block_size=128, seed=3) for k, v in p["experts"].items()}
    plain = select_kernels({"experts": q}, impl)["experts"]  # experts=False: stacked leaves left alone
    assert all(plain[name] is q[name] for name in q)
    k = select_kernels({"experts": q}, impl, experts=True, interpret=True)["experts"]
    assert all(isinstance(v, KernelChoice) and v.weight.ndim == 3 for v in k.values())
    x = jnp.asarray(rng.standard_normal((3, cfg.hidden)), jnp.float32)
    w, ids = route(_j(p), x, cfg)
    for moe_impl in ("gather", "capacity", "ragged", "reference"):
        want = moe_experts(q, x, ids, w, impl=moe_impl)
        assert _rel(moe_experts(k, x, ids, w, impl=moe_impl), np.asarray(want, np.float64)) < 1e-5, moe_impl


def test_bad_input(rng):
    p = _j(_params(CFG, rng))
    with pytest.raises(ValueError, match="unknown impl"):
        moe(p, jnp.ones((2, CFG.hidden)), CFG, impl="ragged-triton")
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(hidden=4, num_experts=2, top_k=3, expert_dim=4)


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="checks the error raised off-GPU")
def test_ragged_mgpu_raises_off_hopper(rng):
    p = _j(_params(CFG, rng), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="sm_90"):
        moe(p, jnp.ones((4, CFG.hidden), jnp.bfloat16), CFG, impl="ragged-mgpu")


@pytest.mark.gpu
def test_ragged_mgpu_matches_reference_bf16(rng):
    cfg = MoEConfig(hidden=256, num_experts=16, top_k=4, expert_dim=128)
    p = _j(_params(cfg, rng), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((300, cfg.hidden)), jnp.bfloat16)
    w, ids = route(p, x, cfg)
    ids = ids.at[:, 0].set(jnp.where(ids[:, 0] == 3, 0, ids[:, 0]))        # leave some groups empty
    ref = moe_experts(p["experts"], x, ids, w, impl="ragged")
    got = jax.jit(lambda *a: moe_experts(*a, impl="ragged-mgpu"))(p["experts"], x, ids, w)
    assert _rel(got, np.asarray(ref, np.float64)) < 1e-2


def test_capacity_candidates_and_switch(rng):
    from hlwq_jax.nn.moe import capacity_candidates
    assert capacity_candidates(4096 * 6, 128, (1.25, 1.5, 2.0)) == (240, 288, 384)
    assert capacity_candidates(6, 128, (1.25, 3.0)) == (16,)
    p = _params(CFG, rng)
    ex = _j(p["experts"])
    x = jnp.asarray(rng.standard_normal((48, CFG.hidden)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (48, 3)), jnp.float32)
    fns = [jax.jit(lambda *a, f=f: moe_experts(*a, impl="capacity", capacity_factors=f))
           for f in ((1.0, 2.0, 3.0), (1.0,))]          # candidates (32, 48, 64) and (32,)
    for skew in (0, 20, 48):  # largest group ~18, ~30, 48: branches 32, 32, 48 of the first; 1, 1, 2 rounds of the 2nd
        ids = np.stack([np.arange(48) % 8, (np.arange(48) + 1) % 8, (np.arange(48) + 2) % 8], 1)
        ids[:skew, 0] = 7
        ids[:skew, 1] = np.where(ids[:skew, 1] == 7, 6, ids[:skew, 1])
        ids[:skew, 2] = np.where(ids[:skew, 2] == 7, 5, ids[:skew, 2])
        ids[:skew, 2] = np.where(ids[:skew, 2] == ids[:skew, 1], (ids[:skew, 1] + 1) % 7, ids[:skew, 2])
        ids = jnp.asarray(ids, jnp.int32)
        ref = moe_experts(ex, x, ids, w, impl="reference")
        for fn in fns:
            assert _rel(fn(ex, x, ids, w), np.asarray(ref, np.float64)) < 1e-6
