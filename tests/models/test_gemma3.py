"""Gemma-3 decoder: jnp forward vs float64 numpy on a tiny config with local/global layers; Gemma-3-270M anchor."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.models import gemma3

TINY = gemma3.Gemma3Config(vocab_size=60, hidden=32, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=16,
                           intermediate=40, eps=1e-6, sliding_window=4, rope_theta_global=1e6, global_every=2,
                           query_pre_attn_scalar=12.0)


def _random_params(cfg, rng):
    def make(shape):
        if len(shape) == 1:
            return (1.0 + 0.2 * rng.normal(size=shape)).astype(np.float32)
        return (rng.normal(size=shape) / np.sqrt(shape[-1])).astype(np.float32)
    return jax.tree.map(make, gemma3.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))


def test_layer_types():
    cfg = dataclasses.replace(TINY, n_layers=18, global_every=6)
    assert [i for i in range(18) if cfg.layer_is_global(i)] == [5, 11, 17]
    assert cfg.attention(0).sliding_window == 4 and cfg.attention(0).rope_theta == 1e4
    assert cfg.attention(5).sliding_window is None and cfg.attention(5).rope_theta == 1e6


def test_forward_matches_float64_reference(rng):
    params = _random_params(TINY, rng)
    ids = rng.integers(0, TINY.vocab_size, size=(2, 9))        # longer than the sliding window
    with jax.default_matmul_precision("highest"):
        got = np.asarray(gemma3.forward(jax.tree.map(jnp.asarray, params), jnp.asarray(ids), TINY))
    want = gemma3.forward_reference(params, ids, TINY)
    err = np.max(np.abs(got - want))
    assert err < 2e-4 * np.max(np.abs(want)), f"max abs err {err}"
    # the window matters: a full-attention model gives different logits at the last position
    full = gemma3.forward_reference(params, ids, dataclasses.replace(TINY, sliding_window=64))
    assert np.max(np.abs(full[:, -1] - want[:, -1])) > 1e-3


@pytest.mark.slow
def test_gemma3_anchor_4_windows():
    """models.md §3: first 4 non-overlapping 512-token windows, BOS prepended: PPL 22.7 ± 0.3."""
    from experiments import ppl_wikitext as ppl
    try:
        rec = ppl.run_one(ppl.RunConfig(model="gemma3-270m", quant="bf16", window=512, max_windows=4, batch_size=1))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert rec["bos"] is True and rec["tokens"] == 4 * 511
    assert abs(rec["ppl"] - 22.7) <= 0.3, rec["ppl"]


@pytest.mark.hf
def test_matches_hf(hf_python, tmp_path, rng):
    from tests.models.test_llama import run_hf_oracle
    params = _random_params(TINY, rng)
    ids = rng.integers(0, TINY.vocab_size, size=(2, 9))
    cfg_json = dict(family="gemma3", **dataclasses.asdict(TINY),
                    layer_types=["full_attention" if TINY.layer_is_global(i) else "sliding_attention"
                                 for i in range(TINY.n_layers)])
    want = run_hf_oracle(hf_python, tmp_path, params, ids, cfg_json, gemma=True)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(gemma3.forward(jax.tree.map(jnp.asarray, params), jnp.asarray(ids), TINY))
    err = np.max(np.abs(got - want))
    assert err < 1e-3 * np.max(np.abs(want)), f"max abs err {err}"
