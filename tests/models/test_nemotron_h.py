"""Nemotron-H: config parsing, loader checks, cache consistency, generation, shapes of the real 30B config.

Numeric parity with transformers lives in test_nemotron_h_golden.py (fixtures) and test_nemotron_h_hf.py (live).
"""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hlwq_jax.ckpt.safetensors_io import open_checkpoint, save_safetensors, save_sharded, to_checkpoint, tree_paths
from hlwq_jax.models import nemotron_h as nh

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "nemotron_h"


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny():
    """The all_blocks fixture (M * E M - E; 8 Mamba heads in 2 groups; chunk 8; 8 experts top-3)."""
    return nh.load_pretrained(FIX / "all_blocks", hf_torch_dt_clamp=True)


@pytest.fixture(scope="module")
def fwd():
    return nh.forward_jit            # shared with generate(): each (config, shapes) compiles once


# ---- config --------------------------------------------------------------------------------------------------------
def test_config_spellings_agree():
    base = json.loads((FIX / "all_blocks" / "config.json").read_text())
    base.pop("layers_block_type")
    new = {**base, "layers_block_type": ["linear_attention", "full_attention", "moe", "linear_attention", "mlp", "moe"]}
    old = {**base, "layers_block_type": ["mamba", "attention", "moe", "mamba", "mlp", "moe"]}
    pat = {**base, "hybrid_override_pattern": "M*EM-E"}
    cfgs = [nh.NemotronHConfig.from_hf(c) for c in (new, old, pat)]
    assert cfgs[0] == cfgs[1] == cfgs[2] and cfgs[0].layer_types == "M*EM-E"
    assert cfgs[0].dt_clamp_min == 0.0 and cfgs[0].dt_clamp_max == float("inf")  # {"__float__": "Infinity"} parsed
    assert nh.NemotronHConfig.from_hf(pat, hf_torch_dt_clamp=True).dt_clamp_min == 1e-3


def test_config_rejects_unknown_block_type():
    base = json.loads((FIX / "all_blocks" / "config.json").read_text())
    with pytest.raises(ValueError, match="'rnn' at layer 2"):
        nh.NemotronHConfig.from_hf({**base, "layers_block_type": ["mamba", "moe", "rnn"]})
    base.pop("layers_block_type")
    with pytest.raises(ValueError, match="'X' at layer 1"):
        nh.NemotronHConfig.from_hf({**base, "hybrid_override_pattern": "MX*"})
    with pytest.raises(ValueError, match="moe_latent_size"):
        nh.NemotronHConfig.from_hf({**base, "hybrid_override_pattern": "ME", "moe_latent_size": 16})


# ---- real-size shapes ----------------------------------------------------------------------------------------------
def test_nano_30b_abstract_shapes_and_budget():
    from hlwq_jax import Recipe
    cfg = nh.NemotronHConfig.from_hf(nh.NANO_30B_HF)
    assert cfg.layer_types.count("M") == 23 and cfg.layer_types.count("E") == 23 and cfg.layer_types.count("*") == 6
    ab = nh.abstract_params(cfg, jnp.bfloat16)
    n = nh.param_count(ab)
    assert abs(n / 31.6e9 - 1) < 0.005, n
    assert ab["layers"][0]["mixer"]["in_proj"].shape == (10304, 2688)
    assert ab["layers"][1]["mixer"]["experts"]["up_proj"].shape == (128, 1856, 2688)
    bf16 = nh.param_bytes(ab)
    q5 = nh.param_bytes(nh.abstract_quantized(ab, Recipe.default(5)))
    # bf16 is 2 bytes/weight except fp32 1-D tensors; Q5 ~5.125 bits on the quantized weights, embeddings and
    # lm_head (2 x 352M) stay bf16
    assert 63.0e9 < bf16 < 63.3e9
    emb = 2 * 131072 * 2688 * 2
    # + padding: down_proj rows have 1856 = 14.5 blocks of 128, padded to 15 (+3.4% on half the expert weights)
    assert 0.01 < (q5 - emb) / ((n - 2 * 131072 * 2688) * 5.125 / 8) - 1 < 0.02, q5
    # the forward traces at full size without allocating
    out = jax.eval_shape(lambda p, t: nh.forward(cfg, p, t)[0], ab, jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert out.shape == (1, 8, 131072) and out.dtype == jnp.float32


# ---- loader --------------------------------------------------------------------------------------------------------
def _write(tmp_path, tensors, cfg_src=FIX / "all_blocks"):
    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    shutil.copy(cfg_src / "config.json", d / "config.json")
    save_safetensors(d / "model.safetensors", tensors)
    return d


def _fixture_tensors(name="all_blocks"):
    ck = open_checkpoint(FIX / name)
    return {k: ck.read(k) for k in ck.tensors}


def test_loader_names_missing_extra_and_misshapen_keys(tmp_path):
    t = _fixture_tensors()
    k_missing = "backbone.layers.2.mixer.experts.5.down_proj.weight"
    bad = {k: v for k, v in t.items() if k != k_missing}
    with pytest.raises(ValueError, match=r"experts\.5\.down_proj"):
        nh.load_pretrained(_write(tmp_path, bad))
    bad = dict(t, **{"backbone.layers.1.mixer.in_proj.weight": t["backbone.layers.0.mixer.in_proj.weight"]})
    with pytest.raises(ValueError, match=r"layers\.1\.mixer\.in_proj"):      # layer 1 is attention
        nh.load_pretrained(_write(tmp_path, bad))
    bad = dict(t, **{"backbone.layers.0.mixer.rotary.inv_freq": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="unknown tensor key.*rotary"):
        nh.load_pretrained(_write(tmp_path, bad))
    bad = dict(t, **{"backbone.layers.3.mixer.conv1d.weight": np.ones((128, 1, 3), np.float32)})
    with pytest.raises(ValueError, match=r"layers\.3\.mixer\.conv1d\.weight.*shape"):
        nh.load_pretrained(_write(tmp_path, bad))
    bad = dict(t, **{"backbone.layers.2.mixer.experts.8.up_proj.weight": np.ones((16, 32), np.float32)})
    with pytest.raises(ValueError, match=r"experts\.8\.up_proj.*out of range"):
        nh.load_pretrained(_write(tmp_path, bad))
    bad = dict(t, **{"backbone.embedding.weight": t["backbone.embeddings.weight"]})   # old + new spelling at once
    with pytest.raises(ValueError, match="already filled"):
        nh.load_pretrained(_write(tmp_path, bad))


def test_loader_dtypes_from_header_and_sharding(tmp_path, tiny):
    cfg, params = tiny
    leaves = {p: np.asarray(v) for p, v in tree_paths(params).items()}
    mixed = {p: (v.astype(ml_dtypes.bfloat16) if v.ndim >= 2 else v) for p, v in leaves.items()}
    tensors = to_checkpoint(mixed, nh.KEY_MAP)
    assert set(tensors) == set(open_checkpoint(FIX / "all_blocks").tensors)    # the inverse map is exact
    d = tmp_path / "sharded"
    save_sharded(d, tensors, max_shard_bytes=20_000)
    shutil.copy(FIX / "all_blocks" / "config.json", d / "config.json")
    assert len(list(d.glob("*.safetensors"))) > 3
    _, p_as_is = nh.load_pretrained(d)
    assert p_as_is["layers"][0]["mixer"]["in_proj"].dtype == jnp.bfloat16
    assert p_as_is["layers"][0]["mixer"]["A_log"].dtype == jnp.float32
    _, p_f32 = nh.load_pretrained(d, dtype=jnp.float32)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(p_f32))
    _, p_bf = nh.load_pretrained(d, dtype=jnp.bfloat16)
    assert p_bf["layers"][0]["mixer"]["D"].dtype == jnp.float32           # fp32 1-D tensors stay fp32
    np.testing.assert_array_equal(np.asarray(p_f32["layers"][2]["mixer"]["experts"]["up_proj"]),
                                  np.asarray(mixed["layers.2.mixer.experts.up_proj"], np.float32))


# ---- caches --------------------------------------------------------------------------------------------------------
def test_decode_and_split_prefill_equal_full_forward(tiny, fwd):
    cfg, params = tiny
    tokens = jnp.asarray(np.load(FIX / "all_blocks" / "reference.npz")["tokens"])     # [2, 21]
    full, none = fwd(cfg, params, tokens)
    assert none is None
    cache = nh.init_cache(cfg, 2, 21, jnp.float32)
    a, cache_a = fwd(cfg, params, tokens[:, :13], cache)                          # split prefill: 13 + 8
    b, _ = fwd(cfg, params, tokens[:, 13:], cache_a)
    assert _rel(jnp.concatenate([a, b], 1), full) < 1e-4
    steps, c = [], cache_a                                                     # decode the last 8 one by one
    for i in range(13, 21):
        y, c = fwd(cfg, params, tokens[:, i:i + 1], c)
        steps.append(y)
    assert int(c.length) == 21
    assert _rel(jnp.concatenate(steps, 1), full[:, 13:]) < 1e-4


def test_greedy_generate_is_argmax_of_forward(tiny, fwd):
    cfg, params = tiny
    prompt = jnp.asarray(np.load(FIX / "all_blocks" / "reference.npz")["tokens"])[:, :13]
    out = nh.generate(cfg, params, prompt, 8)                  # same shapes as the test above: no new compiles
    assert out.shape == (2, 21) and np.array_equal(out[:, :13], prompt)
    logits, _ = fwd(cfg, params, out)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 12:20], -1)), np.asarray(out[:, 13:]))
    # nucleus with a tiny top_p keeps only the arg-max; full sampling gives valid, seed-dependent tokens
    tiny_p = nh.generate(cfg, params, prompt, 8, temperature=1.0, top_p=1e-6, key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(tiny_p), np.asarray(out))
    s1 = nh.generate(cfg, params, prompt, 8, temperature=1.5, key=jax.random.PRNGKey(1))
    s2 = nh.generate(cfg, params, prompt, 8, temperature=1.5, key=jax.random.PRNGKey(2))
    assert np.all((np.asarray(s1) >= 0) & (np.asarray(s1) < cfg.vocab_size))
    assert not np.array_equal(np.asarray(s1), np.asarray(s2))


def test_sample_top_p_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(nh.sample(logits, jax.random.PRNGKey(i), 1.0, 0.7)[0]) for i in range(200)}
    assert draws == {0, 1}                              # 0.5 < 0.7 needs the second; the rest are cut
    with pytest.raises(ValueError, match="top_p"):
        nh.sample(logits, jax.random.PRNGKey(0), 1.0, 0.0)


# ---- quantized leaves ----------------------------------------------------------------------------------------------
def _tokens():
    return jnp.asarray(np.load(FIX / "all_blocks" / "reference.npz")["tokens"])


def test_quantized_leaves_run_the_model(tiny, fwd):
    """HLWQ leaves (default Mamba-aware recipe) give the logits of their own dequantized weights."""
    from hlwq_jax import QuantSpec, Recipe, quantize_params
    from hlwq_jax.quant.array import HLWQArray
    cfg, params = tiny
    q, _ = quantize_params(params, Recipe.mamba_aware(QuantSpec(bits=4, block_size=32)), with_stats=False)
    mix = q["layers"][0]["mixer"]
    assert isinstance(q["layers"][2]["mixer"]["experts"]["up_proj"], HLWQArray)
    assert isinstance(mix["in_proj"], HLWQArray) and isinstance(q["layers"][1]["mixer"]["q_proj"], HLWQArray)
    assert not any(isinstance(mix[k], HLWQArray) for k in ("conv1d_weight", "A_log", "norm"))
    assert not isinstance(q["layers"][2]["mixer"]["router"], HLWQArray) and not isinstance(q["lm_head"], HLWQArray)
    deq = jax.tree.map(lambda w: w.dequantize(jnp.float32) if isinstance(w, HLWQArray) else w, q,
                       is_leaf=lambda w: isinstance(w, HLWQArray))
    got, _ = fwd(cfg, q, _tokens())
    want, _ = fwd(cfg, deq, _tokens())
    full, _ = fwd(cfg, params, _tokens())
    assert _rel(got, want) < 1e-4
    assert 1e-3 < _rel(got, full) < 1.0


def test_kernels_selected_per_leaf(tiny, fwd):
    """select_kernels: the dense HLWQ projections run the Pallas decode GEMV (interpret mode here) for a one-token
    step and impl="xla" for a longer one; with experts=True the stacked experts run the Pallas gather GEMV on the MoE
    gather path (one token) and their XLA form on the capacity path (5 tokens); the logits equal those of the same
    leaves on XLA."""
    from hlwq_jax import QuantSpec, Recipe, quantize_params
    from hlwq_jax.nn.linear import KernelChoice, select_kernels
    from hlwq_jax.quant.array import HLWQArray
    cfg, params = tiny
    q, _ = quantize_params(params, Recipe.mamba_aware(QuantSpec(bits=5, block_size=128)), with_stats=False)
    assert isinstance(select_kernels(q, "pallas-decode")["layers"][2]["mixer"]["experts"]["up_proj"], HLWQArray)
    k = select_kernels(q, "pallas-decode", experts=True, interpret=True)
    assert isinstance(k["layers"][0]["mixer"]["in_proj"], KernelChoice)
    experts = k["layers"][2]["mixer"]["experts"]["up_proj"]
    assert isinstance(experts, KernelChoice) and experts.weight.ndim == 3 and experts.config is None
    assert 5 * cfg.num_experts_per_tok > cfg.n_routed_experts >= cfg.num_experts_per_tok  # capacity / gather paths
    for tokens in (_tokens()[:1, :1], _tokens()[:1, :5]):
        got, _ = fwd(cfg, k, tokens)
        want, _ = fwd(cfg, q, tokens)
        assert _rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="unknown hlwq_matmul impl"):
        select_kernels(q, "cuda")


@pytest.mark.slow
def test_quantized_logit_error_falls_with_bits(tiny, fwd):
    from hlwq_jax import QuantSpec, Recipe, quantize_params
    cfg, params = tiny
    ref, _ = fwd(cfg, params, _tokens())
    errs = []
    for bits in range(3, 9):
        q, _ = quantize_params(params, Recipe.mamba_aware(QuantSpec(bits=bits, block_size=32)), with_stats=False)
        got, _ = fwd(cfg, q, _tokens())
        errs.append(_rel(got, ref))
    print("relative logit error, bits 3..8:", ["%.2e" % e for e in errs])
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.05 and errs[0] > 10 * errs[-1]


def test_quantize_on_load_equals_quantize_after(tiny):
    from hlwq_jax import QuantSpec, Recipe, quantize_params
    from hlwq_jax.quant.array import HLWQArray
    recipe = Recipe.mamba_aware(QuantSpec(bits=4, block_size=32))
    _, on_load = nh.load_pretrained(FIX / "all_blocks", recipe=recipe)
    after, _ = quantize_params(tiny[1], recipe, with_stats=False)
    is_q = lambda w: isinstance(w, HLWQArray)
    a, b = tree_paths(on_load), tree_paths(after)
    assert a.keys() == b.keys() and sum(map(is_q, a.values())) == sum(map(is_q, b.values())) > 10
    for p in a:
        assert is_q(a[p]) == is_q(b[p]), p
        if is_q(a[p]):
            np.testing.assert_array_equal(np.asarray(a[p].packed), np.asarray(b[p].packed))
            np.testing.assert_array_equal(np.asarray(a[p].norms), np.asarray(b[p].norms))
        else:
            np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]))


def test_layerwise_forward_equals_fused(tiny, fwd):
    cfg, params = tiny
    full, _ = fwd(cfg, params, _tokens())
    lw, _ = nh.forward_layerwise(cfg, params, _tokens())
    assert _rel(lw, full) < 1e-5


@pytest.mark.slow
def test_layerwise_with_caches(tiny, fwd):
    cfg, params = tiny
    tokens = _tokens()
    full, _ = fwd(cfg, params, tokens)
    cache = nh.init_cache(cfg, 2, 21, jnp.float32)
    a, cache = nh.forward_layerwise(cfg, params, tokens[:, :20], cache)
    b, cache = nh.forward_layerwise(cfg, params, tokens[:, 20:], cache)
    assert int(cache.length) == 21 and _rel(jnp.concatenate([a, b], 1), full) < 1e-4


def test_bf16_model_runs_close_to_f32(tiny, fwd):
    cfg, params = tiny
    _, p16 = nh.load_pretrained(FIX / "all_blocks", dtype=jnp.bfloat16, hf_torch_dt_clamp=True)
    assert p16["layers"][0]["mixer"]["in_proj"].dtype == jnp.bfloat16
    full, _ = fwd(cfg, params, _tokens())
    got, cache = fwd(cfg, p16, _tokens(), nh.init_cache(cfg, 2, 24, jnp.bfloat16))
    assert got.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(got)))
    assert cache.layers[1].k.dtype == jnp.bfloat16 and cache.layers[0].ssm.dtype == jnp.float32
    # bf16 rounding flips the top-k routing of a token now and then (1 of 42 here), so compare per token
    per_tok = np.linalg.norm(np.asarray(got) - np.asarray(full), axis=-1) / np.linalg.norm(np.asarray(full), axis=-1)
    assert np.median(per_tok) < 3e-2 and np.mean(per_tok < 5e-2) > 0.8, per_tok
