"""Parity with transformers' NemotronHForCausalLM through committed golden fixtures (no torch needed).

The fixtures are written by tests/oracles/nemotron_h_oracle.py (transformers 5.17.0, CPU torch, float32); the `hf`
tier (test_nemotron_h_hf.py) regenerates them live and runs the same comparison.
"""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.models import nemotron_h as nh

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "nemotron_h"
NAMES = ("all_blocks", "chunks_sharded", "group_routing")


def compare(directory: pathlib.Path, hf_torch_dt_clamp: bool = True) -> float:
    """Relative L2 error of hlwq_jax logits vs the reference logits stored beside the checkpoint."""
    ref = np.load(directory / "reference.npz")
    cfg, params = nh.load_pretrained(directory, hf_torch_dt_clamp=hf_torch_dt_clamp)
    logits, _ = nh.forward_jit(cfg, params, jnp.asarray(ref["tokens"]))
    a, b = np.asarray(logits, np.float64), ref["logits"].astype(np.float64)
    assert a.shape == b.shape
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers(name):
    err = compare(FIX / name)
    assert err <= 1e-4, f"{name}: ||Δ||/||ref|| = {err:.3e}"


def test_dt_clamp_flag_is_what_matches():
    """all_blocks has heads with dt ≈ 1.2e-4 < time_step_min: without the HF torch-path clamp the logits differ."""
    err = compare(FIX / "all_blocks", hf_torch_dt_clamp=False)
    assert err > 1e-3, err
