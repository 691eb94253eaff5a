import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax import HLWQArray, QuantSpec, Recipe, parse_quant_name, quantize_params, summarize
from hlwq_jax.nn.linear import linear
from hlwq_jax.quant.baselines import NF4Array, NVFP4Array, RTNArray


def nemotron_like(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {
        "backbone": {
            "embeddings": {"weight": f(64, 32)},
            "layers": [
                {"norm": {"weight": f(32)}, "mixer": {"in_proj": {"weight": f(80, 32)}, "conv1d": {"weight": f(48, 1, 4), "bias": f(48)},
                                                      "A_log": f(4), "D": f(4), "dt_bias": f(4), "norm": {"weight": f(64)},
                                                      "out_proj": {"weight": f(32, 64)}}},
                {"mixer": {"gate": {"weight": f(8, 32), "e_score_correction_bias": f(8)},
                           "experts": {"up_proj": f(8, 24, 32), "down_proj": f(8, 32, 24)},
                           "shared_experts": {"up_proj": {"weight": f(48, 32)}}}},
                {"mixer": {"q_proj": {"weight": f(64, 32)}, "gate_proj": {"weight": f(64, 32)}}},
            ],
            "norm_f": {"weight": f(32)},
        },
        "lm_head": {"weight": f(64, 32)},
    }


def test_mamba_aware_default_recipe_selects_the_right_leaves():
    params = nemotron_like(np.random.default_rng(0))
    q, stats = quantize_params(params, Recipe.default(bits=4))
    L = q["backbone"]["layers"]
    quantized = {p for p in stats}
    assert quantized == {
        "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.out_proj.weight",
        "backbone.layers.1.mixer.experts.up_proj", "backbone.layers.1.mixer.experts.down_proj",
        "backbone.layers.1.mixer.shared_experts.up_proj.weight",
        "backbone.layers.2.mixer.q_proj.weight", "backbone.layers.2.mixer.gate_proj.weight",
    }
    assert isinstance(L[1]["mixer"]["experts"]["up_proj"], HLWQArray) and L[1]["mixer"]["experts"]["up_proj"].shape == (8, 24, 32)
    for kept in (q["backbone"]["embeddings"]["weight"], L[1]["mixer"]["gate"]["weight"], q["lm_head"]["weight"],
                 L[0]["mixer"]["conv1d"]["weight"], L[0]["mixer"]["D"]):
        assert isinstance(kept, np.ndarray)
    s = stats["backbone.layers.0.mixer.in_proj.weight"]
    assert s.method == "hlwq4" and 0.9 < s.cosine < 1 and s.sqnr_db == pytest.approx(-10 * np.log10(s.rel_mse))
    assert 0.5 < s.lloyd_max_ratio < 1.5
    summary = summarize(stats)
    assert summary["tensors"] == 7 and 0 <= summary["frac_within_10pct_lloyd_max"] <= 1


def test_lm_head_rule_and_custom_rules():
    params = nemotron_like(np.random.default_rng(1))
    q, _ = quantize_params(params, Recipe.mamba_aware(QuantSpec(bits=5), lm_head=QuantSpec(bits=6)), with_stats=False)
    assert q["lm_head"]["weight"].bits == 6
    r = Recipe(rules=((r"experts", QuantSpec(method="nvfp4", bits=4)), (r"q_proj", None)), otherwise=QuantSpec(method="rtn", bits=4))
    q, stats = quantize_params(params, r)
    assert isinstance(q["backbone"]["layers"][1]["mixer"]["experts"]["up_proj"], NVFP4Array)
    assert isinstance(q["backbone"]["layers"][2]["mixer"]["q_proj"]["weight"], np.ndarray)
    assert isinstance(q["lm_head"]["weight"], RTNArray)


def test_stats_oracle():
    w = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    q, stats = quantize_params({"w": w}, Recipe(otherwise=QuantSpec(bits=3)))
    d = np.asarray(q["w"].dequantize(), np.float64)
    s = stats["w"]
    assert s.rel_mse == pytest.approx(np.sum((w - d) ** 2) / np.sum(w.astype(np.float64) ** 2), rel=1e-9)
    w64 = w.astype(np.float64).ravel()
    assert s.cosine == pytest.approx(np.dot(w64, d.ravel()) / np.linalg.norm(w64) / np.linalg.norm(d), rel=1e-9)
    assert s.bits_per_weight == q["w"].bits_per_weight


@pytest.mark.parametrize("name", ["hlwq5", "hlwq4-b64", "hlwq3-orig", "hlwq4-torch-rnone", "hlwq4-uniform-rrandom",
                                  "rtn4-g128", "rtn8-g32", "nf4", "nf4-dq", "nvfp4"])
def test_quant_names_roundtrip(name):
    assert parse_quant_name(name).name == name


def test_quant_name_parsing_details():
    assert parse_quant_name("bf16") is None
    s = parse_quant_name("hlwq4-b64-orig-rrandom")
    assert (s.bits, s.block_size, s.codebook, s.rotation) == (4, 64, "polarengine", "random-hadamard")
    assert parse_quant_name("rtn4").block_size == 128
    for bad in ("hlwq5-zz", "int4", "hlwq"):
        with pytest.raises(ValueError, match="quantizer name"):
            parse_quant_name(bad)


@pytest.mark.parametrize("name", ["hlwq5", "rtn4-g128", "nf4-dq", "nvfp4"])
def test_linear_dispatch_matches_dense(name):
    from hlwq_jax import quantize_leaf
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 200)).astype(np.float32)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    q = quantize_leaf(w, parse_quant_name(name))
    ref = x.astype(np.float64) @ np.asarray(q.dequantize(), np.float64).T
    y = np.asarray(linear(jnp.asarray(x), q, bias=jnp.ones(40)), np.float64) - 1.0
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


def test_linear_selects_the_hlwq_implementation():
    from hlwq_jax import quantize
    from hlwq_jax.ops.hlwq_matmul.layout import repack
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((2, 256)).astype(np.float32))
    q = quantize(w, bits=4)
    ref = np.asarray(linear(x, q, impl="reference"))
    np.testing.assert_allclose(np.asarray(linear(x, q)), ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(linear(x, repack(q))), ref, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="unknown hlwq_matmul impl"):
        linear(x, q, impl="cuda")
    with pytest.raises(RuntimeError):  # no hidden fallback: the GPU kernel cannot run on the CPU backend
        linear(x, repack(q), impl="pallas")
