"""Offloaded Nemotron-H: every cache size (overflowing prefill included) gives the resident logits bit for bit;
close to models.nemotron_h.forward; prefetch and tracing do not change results."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.ckpt.safetensors_io import tree_from_paths, tree_paths
from hlwq_jax.models import nemotron_h as nh
from hlwq_jax.offload import trace as T
from hlwq_jax.offload.moe_stack import OffloadConfig
from hlwq_jax.offload.nemotron import OffloadedNemotronH, trace_generation

E, K = 8, 2


@pytest.fixture(scope="module")
def model():
    cfg = nh.NemotronHConfig.from_hf(
        nh.NANO_30B_HF, vocab_size=64, hidden_size=32, layer_types="ME*E-E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
        chunk_size=4, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, intermediate_size=24)
    return cfg, init_params_numpy(cfg)


def init_params_numpy(cfg):
    """Random parameters like nh.init_params, drawn with numpy (no per-leaf compiles: fast on CPU)."""
    rng = np.random.default_rng(0)
    paths = tree_paths(nh.abstract_params(cfg, jnp.float32))
    vals = {}
    for path, sds in paths.items():
        name = path.rsplit(".", 1)[-1]
        if name == "A_log":
            v = np.log(rng.uniform(1, 16, sds.shape))
        elif name == "dt_bias":
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), sds.shape))
            v = dt + np.log(-np.expm1(-dt))
        elif name in ("norm", "norm_f", "D"):
            v = np.ones(sds.shape)
        else:
            v = rng.standard_normal(sds.shape) * (0.02 if len(sds.shape) == 1 else 1 / np.sqrt(sds.shape[-1]))
        vals[path] = jnp.asarray(v, sds.dtype)
    return tree_from_paths(nh.abstract_params(cfg, jnp.float32), vals)


def run(cfg, params, slots, prompt, steps, **kw):
    off = OffloadedNemotronH(cfg, params, OffloadConfig(slots=slots, **kw.pop("ocfg", {})), **kw)
    cache = nh.init_cache(cfg, 1, prompt.shape[1] + steps, jnp.float32)
    logits, cache = off.forward(prompt, cache, trace=("p", "prefill"))
    outs = [logits]
    for _ in range(steps):
        tok = jnp.argmax(outs[-1][:, -1], -1)[:, None].astype(jnp.int32)
        logits, cache = off.forward(tok, cache, trace=("p", "decode"))
        outs.append(logits)
    return outs, off


@pytest.mark.parametrize("sizes", [pytest.param((K,), id="default"),
                                   pytest.param(tuple(range(K, E)), id="all", marks=pytest.mark.slow)])
def test_cache_sizes_exact(model, tmp_path, sizes):
    cfg, params = model
    prompt = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, cfg.vocab_size).astype(jnp.int32)
    rec = T.TraceRecorder()
    ref, _ = run(cfg, params, E, prompt, 3, recorder=rec)
    if len(sizes) > 1:  # compiling the one-jit model forward is slow on CPU: slow tier only
        logits, _ = nh.forward(cfg, params, prompt, moe_impl="gather")
        np.testing.assert_allclose(np.asarray(ref[0]), np.asarray(logits), rtol=1e-4, atol=1e-4)
    overflowed = False
    for slots in sizes:
        outs, off = run(cfg, params, slots, prompt, 3, ocfg={"prefetch": slots == K})
        for a, b in zip(outs, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"slots={slots}")
        st = off.moe.stats()
        overflowed |= any(s.groups > 4 for s in st)  # 4 forwards per layer; more groups = an overflow split
        if slots == K:
            assert sum(s.prefetched for s in st) + sum(s.prefetch_wasted for s in st) > 0
    assert overflowed  # some prefill at small caches needed several token groups
    rec.write(tmp_path / "t.jsonl")
    recs = T.read_trace(tmp_path / "t.jsonl")
    assert len(recs) == (6 + 3) * 3 and {r.phase for r in recs} == {"prefill", "decode"}
    assert [r.pos for r in recs if r.layer == 0] == list(range(9))


def test_resident_mode_traces_a_plain_run(model, tmp_path):
    """offload=None keeps experts in params: same logits as a cache, and its trace replays to the cache's misses."""
    cfg, params = model
    prompt = jax.random.randint(jax.random.PRNGKey(2), (1, 6), 0, cfg.vocab_size).astype(jnp.int32)
    rec_res, rec_off = T.TraceRecorder(), T.TraceRecorder()
    res = OffloadedNemotronH(cfg, params, None, recorder=rec_res)
    off = OffloadedNemotronH(cfg, params, OffloadConfig(slots=4), recorder=rec_off)
    a = trace_generation(res, prompt, 3, "q", jnp.float32)
    b = trace_generation(off, prompt, 3, "q", jnp.float32)
    np.testing.assert_array_equal(a, b)
    assert rec_res.records() == rec_off.records()
    T.write_trace(tmp_path / "q.jsonl", rec_res.records())
    dec = T.replay_records(T.read_trace(tmp_path / "q.jsonl"), "lru", 4, phase="decode")
    assert len(dec) == 3 and all(r.accesses == 3 * K for r in dec)
    with pytest.raises(ValueError, match="recorder"):
        trace_generation(OffloadedNemotronH(cfg, params, None), prompt, 1, "q")


def run_untraced(cfg, params, slots, prompt, steps, **ocfg):
    """``run`` without trace recording."""
    off = OffloadedNemotronH(cfg, params, OffloadConfig(slots=slots, **ocfg))
    cache = nh.init_cache(cfg, 1, prompt.shape[1] + steps, jnp.float32)
    logits, cache = off.forward(prompt, cache)
    outs = [logits]
    for _ in range(steps):
        tok = jnp.argmax(outs[-1][:, -1], -1)[:, None].astype(jnp.int32)
        logits, cache = off.forward(tok, cache)
        outs.append(logits)
    return outs, off


@pytest.mark.parametrize("slots", [K, E - 2, E])
def test_speculative_forward_exact(model, slots):
    """Speculative chains: logits equal the per-layer path bit for bit, with misses (C = K: resumes at the first
    missing layer) and without (C = E after the first tokens: accepted chains); every policy sees the per-layer
    path's access sequence (same per-layer hits / misses / groups)."""
    cfg, params = model
    prompt = jax.random.randint(jax.random.PRNGKey(2), (1, 5), 0, cfg.vocab_size).astype(jnp.int32)
    ref, off_ref = run_untraced(cfg, params, slots, prompt, 8)
    outs, off = run_untraced(cfg, params, slots, prompt, 8, speculative=True, speculative_backoff=0)
    for i, (a, b) in enumerate(zip(outs, ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"forward {i}, slots={slots}")
    got = [(s.hits, s.misses, s.groups, s.steps) for s in off.moe.stats()]
    want = [(s.hits, s.misses, s.groups, s.steps) for s in off_ref.moe.stats()]
    assert got == want
    sp, n_moe = off.moe.spec, len(off.moe.caches)
    assert sp.tokens == 9 and sp.accepts + sp.rollbacks == 9
    assert sp.rollbacks >= 1  # the prefill misses (cold caches)
    if slots == E:  # nothing is ever evicted: once every routed expert has been seen, chains are accepted
        assert sp.accepts >= 3
    # one read per chain, plus one per MoE layer run on the per-layer path (from the first missing layer on)
    assert sp.host_reads == sp.tokens + sp.resumed_layers
    assert sp.rollbacks <= sp.resumed_layers <= n_moe * sp.rollbacks
    if slots == E - 2:  # some chain missed after its first MoE layer and kept the layers before the miss
        assert sp.resumed_layers < n_moe * sp.rollbacks


def test_speculative_tracing_equals_per_layer(model, tmp_path):
    """Routing traces recorded by speculative chains (accepted and resumed) equal the per-layer path's."""
    cfg, params = model
    prompt = jax.random.randint(jax.random.PRNGKey(4), (1, 5), 0, cfg.vocab_size).astype(jnp.int32)
    recs = []
    for spec in (False, True):
        rec = T.TraceRecorder()
        outs, off = run(cfg, params, E - 2, prompt, 5, recorder=rec, ocfg={"speculative": spec})
        recs.append(rec.records())
    assert recs[0] == recs[1] and len(recs[0]) == (5 + 5) * 3
    assert off.moe.spec.rollbacks >= 1


@pytest.mark.parametrize("slots", [K, E - 2, E])
def test_pipelined_decode_exact(model, slots):
    """decode() with speculative chains pipelined by one token: the logits of N per-layer forward calls bit for bit,
    the same policy steps, the same routing trace; discarded in-flight chains never read (reads = chains settled +
    resumed layers)."""
    cfg, params = model
    prompt = jax.random.randint(jax.random.PRNGKey(5), (1, 5), 0, cfg.vocab_size).astype(jnp.int32)
    toks = jax.random.randint(jax.random.PRNGKey(6), (1, 8), 0, cfg.vocab_size).astype(jnp.int32)
    got = {}
    for spec in (False, True):
        rec = T.TraceRecorder()
        off = OffloadedNemotronH(cfg, params, OffloadConfig(slots=slots, speculative=spec, speculative_backoff=0),
                                 recorder=rec)
        cache = nh.init_cache(cfg, 1, 13, jnp.float32)
        first, cache = off.forward(prompt, cache, trace=("p", "prefill"))
        logits, cache = off.decode(toks, cache, trace=("p", "decode"))
        assert int(cache.length) == 13 and len(logits) == 8
        got[spec] = ([first] + logits, [(s.hits, s.misses, s.groups, s.steps) for s in off.moe.stats()],
                     rec.records(), off.moe.spec)
    for i, (a, b) in enumerate(zip(got[True][0], got[False][0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"step {i}, slots={slots}")
    assert got[True][1] == got[False][1] and got[True][2] == got[False][2]
    sp = got[True][3]
    assert sp.tokens == 9 and sp.accepts + sp.rollbacks == 9
    assert sp.host_reads == sp.tokens + sp.resumed_layers
    if slots == K:  # misses everywhere: every rollback with a chain in flight discards it
        assert sp.discarded >= 1
    if slots == E:
        assert sp.accepts >= 3


@pytest.mark.parametrize("use_decode", [False, True])
def test_speculative_backoff(model, use_decode):
    """After a chain that missed, the next 1, 2, 4, … tokens (capped) run on the per-layer path: fewer chains where
    nearly every token misses (C = K), the same logits and policy steps as the per-layer path either way."""
    cfg, params = model
    prompt = jax.random.randint(jax.random.PRNGKey(7), (1, 4), 0, cfg.vocab_size).astype(jnp.int32)
    toks = jax.random.randint(jax.random.PRNGKey(8), (1, 12), 0, cfg.vocab_size).astype(jnp.int32)
    got = {}
    for name, ocfg in (("ref", {}), ("spec", {"speculative": True, "speculative_backoff": 4})):
        off = OffloadedNemotronH(cfg, params, OffloadConfig(slots=K, **ocfg))
        cache = nh.init_cache(cfg, 1, 16, jnp.float32)
        first, cache = off.forward(prompt, cache)
        if use_decode:
            logits, cache = off.decode(toks, cache)
        else:
            logits = []
            for t in range(12):
                lg, cache = off.forward(toks[:, t:t + 1], cache)
                logits.append(lg)
        got[name] = ([first] + logits, [(s.hits, s.misses, s.groups, s.steps) for s in off.moe.stats()], off)
    for a, b in zip(got["spec"][0], got["ref"][0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert got["spec"][1] == got["ref"][1]
    sp = got["spec"][2].moe.spec
    assert sp.accepts == 0 and sp.rollbacks == sp.tokens  # C = K here: every chain misses
    # 13 forwards; chains at 0, then after 1, 2, 4, 4, ... per-layer tokens: forwards 0, 2, 5, 10 -> 4 chains
    assert sp.tokens == 4
    with pytest.raises(ValueError, match="speculative_backoff"):
        OffloadConfig(slots=K, speculative_backoff=-1)


def test_one_token_routed_call_runs_inside_next_segment(model):
    """A one-token step's routed experts are deferred into the next segment (one jitted call fewer per MoE layer);
    that segment's outputs equal those of the same segment fed the separate ``routed_experts`` call's result, bit for
    bit (the optimization barrier keeps XLA from fusing the routed sum into the residual add). Longer steps compute
    the call at once."""
    from hlwq_jax.offload.expert_cache import routed_experts
    from hlwq_jax.offload.nemotron import Unrouted, _segment, routed_call
    cfg, params = model
    off = OffloadedNemotronH(cfg, params, None)
    rng = np.random.default_rng(3)
    experts = off.resident[0]
    w = jnp.asarray(rng.uniform(0.1, 1, (1, K)), jnp.float32)
    ids = jnp.asarray(rng.choice(E, K, replace=False)[None], jnp.int32)
    h = jnp.asarray(rng.standard_normal((1, cfg.hidden_size)), jnp.float32)
    deferred = routed_call(h, ids, w, experts)
    assert isinstance(deferred, Unrouted)
    computed = routed_call(jnp.concatenate([h, h]), jnp.concatenate([ids, ids]), jnp.concatenate([w, w]), experts)
    assert isinstance(computed, jax.Array) and computed.shape == (2, cfg.hidden_size)
    kinds, idx, final, p = off.segments[1]
    cache = nh.init_cache(cfg, 1, 4, jnp.float32)
    states = tuple(cache.layers[i] for i in idx)
    x = jnp.asarray(rng.standard_normal((1, 1, cfg.hidden_size)), jnp.float32)
    shared = jnp.asarray(rng.standard_normal((1, cfg.hidden_size)), jnp.float32)
    a = _segment(cfg, kinds, final, p, states, x, (deferred, shared), off._identity)
    b = _segment(cfg, kinds, final, p, states, x, (routed_experts(h, ids, w, experts), shared), off._identity)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
