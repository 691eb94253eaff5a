import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.nn.mamba2 import Mamba2Config, init_mamba2_state, mamba2, mamba2_param_shapes, mamba2_reference

CFG = Mamba2Config(hidden=16, num_heads=6, head_dim=4, state_size=5, n_groups=2, conv_kernel=4, chunk_size=4)


def _params(cfg, rng):
    p = {k: rng.standard_normal(s) / np.sqrt(s[-1]) for k, s in mamba2_param_shapes(cfg).items()}
    p["A_log"] = np.log(np.arange(1, cfg.num_heads + 1) / 2.0)
    p["D"] = 1.0 + 0.1 * rng.standard_normal(cfg.num_heads)
    p["dt_bias"] = rng.standard_normal(cfg.num_heads) - 1.0
    p["norm"] = 1.0 + 0.1 * rng.standard_normal(cfg.d_inner)
    return p


def _j(p):
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_prefill_matches_float64_recurrence(rng):
    cfg = dataclasses.replace(CFG, use_bias=True)   # the "reference" SSD impl is covered in tests/ops/test_ssd.py
    p = _params(cfg, rng)
    x = rng.standard_normal((2, 11, cfg.hidden))
    y, st = mamba2(_j(p), jnp.asarray(x, jnp.float32), cfg)
    assert st is None
    ref, _ = mamba2_reference(p, x, cfg)
    assert _rel(y, ref) < 1e-5


def test_decode_and_split_prefill_equal_full(rng):
    p = _j(_params(CFG, rng))
    x = jnp.asarray(rng.standard_normal((2, 13, CFG.hidden)), jnp.float32)
    full, _ = mamba2(p, x, CFG)
    run = jax.jit(lambda p, x, s: mamba2(p, x, CFG, s))
    # split prefill 2 + 7 (conv window shorter than K-1, then crossing chunk borders), then 4 decode steps
    st = init_mamba2_state(CFG, 2)
    outs = []
    for a, b in [(0, 2), (2, 9), (9, 10), (10, 11), (11, 12), (12, 13)]:
        y, st = run(p, x[:, a:b], st)
        outs.append(y)
    assert _rel(jnp.concatenate(outs, 1), np.asarray(full, np.float64)) < 1e-5
    _, (conv_ref, ssm_ref) = mamba2_reference({k: np.asarray(v) for k, v in p.items()}, np.asarray(x), CFG)
    assert _rel(st.ssm, ssm_ref) < 1e-5 and _rel(st.conv, conv_ref) < 1e-6


def test_dt_clamp_changes_small_dt(rng):
    cfg = dataclasses.replace(CFG, dt_clamp_min=1e-3)
    p = _params(cfg, rng)
    p["dt_bias"][:] = -12.0  # softplus(.) ~ 6e-6 << 1e-3: the clamp is active everywhere
    p["D"][:] = 0.0          # the output is then the (normalised) SSM path alone
    x = rng.standard_normal((1, 6, cfg.hidden))
    y_c, _ = mamba2(_j(p), jnp.asarray(x, jnp.float32), cfg)
    y_n, _ = mamba2(_j(p), jnp.asarray(x, jnp.float32), CFG)
    assert _rel(y_c, mamba2_reference(p, x, cfg)[0]) < 1e-5
    assert _rel(y_n, mamba2_reference(p, x, CFG)[0]) < 1e-5
    assert _rel(y_c, np.asarray(y_n, np.float64)) > 1e-2


def test_bad_params():
    p = {k: jnp.ones(s) for k, s in mamba2_param_shapes(CFG).items()}
    p["conv1d_weight"] = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="conv1d_weight"):
        mamba2(p, jnp.ones((1, 2, CFG.hidden)), CFG)
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2Config(hidden=8, num_heads=6, head_dim=2, state_size=2, n_groups=4, conv_kernel=4, chunk_size=4)
