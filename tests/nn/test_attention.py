import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.nn.attention import (AttentionConfig, attention, attention_param_shapes, attention_reference,
                                   init_kv_cache)

D = 32
CONFIGS = {
    "nemotron": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
    "llama": AttentionConfig(num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=1e5),
    "gemma": AttentionConfig(num_heads=4, num_kv_heads=1, head_dim=16, rope_theta=1e4, qk_norm=True,
                             qk_norm_scale_in_fp32=True, sliding_window=3, scale=0.3, softcap=5.0),
    "partial_bias": AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16, rope_theta=1e4,
                                    partial_rotary_factor=0.5, qkv_bias=True),
}


def _params(cfg, rng):
    p = {k: rng.standard_normal(s) / np.sqrt(s[-1]) for k, s in attention_param_shapes(cfg, D).items()}
    for k in ("q_norm", "k_norm"):
        if k in p:
            p[k] = 1.0 + 0.3 * rng.standard_normal(p[k].shape)
    return p


def _j(p):
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_matches_float64(rng, name):
    cfg = CONFIGS[name]
    p = _params(cfg, rng)
    x = rng.standard_normal((2, 7, D))
    y, cache = attention(_j(p), jnp.asarray(x, jnp.float32), cfg)
    assert cache is None
    assert _rel(y, attention_reference(p, x, cfg)) < 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_prefill_then_decode_equals_full(rng, name):
    cfg = CONFIGS[name]
    p = _j(_params(cfg, rng))
    x = jnp.asarray(rng.standard_normal((2, 9, D)), jnp.float32)
    full, _ = attention(p, x, cfg)
    step = jax.jit(lambda p, x, c: attention(p, x, cfg, c))
    cache = init_kv_cache(cfg, 2, 12, jnp.float32)
    y0, cache = step(p, x[:, :5], cache)
    outs = [y0]
    for i in range(5, 9):
        yi, cache = step(p, x[:, i:i + 1], cache)
        outs.append(yi)
    assert int(cache.length) == 9
    got = jnp.concatenate(outs, 1)
    assert _rel(got, np.asarray(full, np.float64)) < 1e-5


def test_first_token_sees_only_itself(rng):
    cfg = CONFIGS["nemotron"]
    p = _params(cfg, rng)
    x = rng.standard_normal((1, 4, D))
    y, _ = attention(_j(p), jnp.asarray(x, jnp.float32), cfg)
    # position 0 attends only to itself: output = o_proj(v_0 repeated per group)
    v0 = (x[0, 0] @ p["v_proj"].T).reshape(2, 16)
    expect = np.repeat(v0, 2, axis=0).reshape(-1) @ p["o_proj"].T
    np.testing.assert_allclose(np.asarray(y[0, 0]), expect, rtol=1e-4, atol=1e-5)


def test_sliding_window_forgets(rng):
    cfg = dataclasses.replace(CONFIGS["llama"], sliding_window=2)
    p = _j(_params(cfg, rng))
    x = rng.standard_normal((1, 6, D))
    x2 = x.copy()
    x2[0, 0] += 3.0  # beyond the window of positions >= 2
    y1, _ = attention(p, jnp.asarray(x, jnp.float32), cfg)
    y2, _ = attention(p, jnp.asarray(x2, jnp.float32), cfg)
    np.testing.assert_allclose(np.asarray(y1[0, 2:]), np.asarray(y2[0, 2:]), atol=1e-6)
    assert not np.allclose(np.asarray(y1[0, 1]), np.asarray(y2[0, 1]), atol=1e-3)


def test_bad_params_and_config():
    cfg = CONFIGS["nemotron"]
    p = {k: jnp.ones(s) for k, s in attention_param_shapes(cfg, D).items()}
    p["k_proj"] = jnp.ones((31, D))
    with pytest.raises(ValueError, match="k_proj"):
        attention(p, jnp.ones((1, 2, D)), cfg)
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttentionConfig(num_heads=3, num_kv_heads=2, head_dim=8)
