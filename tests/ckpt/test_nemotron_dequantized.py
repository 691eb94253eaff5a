"""A tiny random Nemotron-H checkpoint → hlwq-quantize → hlwq-dequantize (float32) → transformers logits equal
hlwq_jax's forward on the quantized parameters, whose codes/norms/codebooks equal the files' bit for bit."""
import pathlib
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.ckpt import hlwq_format as hfmt
from hlwq_jax.ckpt.safetensors_io import _match
from hlwq_jax.cli import dequantize as dq
from hlwq_jax.cli import quantize as qz
from hlwq_jax.models import nemotron_h as nh
from hlwq_jax.quant.array import HLWQArray
from hlwq_jax.quant.recipe import Recipe
from hlwq_jax.quant.spec import QuantSpec

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests/fixtures/nemotron_h/all_blocks"


def _leaf(tree, path):
    for part in path.split("."):
        tree = tree[int(part)] if isinstance(tree, (list, tuple)) else tree[part]
    return tree


@pytest.mark.hf
def test_dequantized_checkpoint_logits_match_quantized_forward(tmp_path, hf_python):
    assert qz.main([str(FIXTURE), str(tmp_path / "q"), "--bits", "4", "--block-size", "32", "--no-progress"]) == 0
    assert dq.main([str(tmp_path / "q"), str(tmp_path / "d"), "--dtype", "float32", "--no-progress"]) == 0
    config, params = nh.load_pretrained(FIXTURE, dtype=jnp.float32, hf_torch_dt_clamp=True,
                                        recipe=Recipe.mamba_aware(QuantSpec(bits=4, block_size=32)))
    ck = hfmt.HLWQCheckpoint(tmp_path / "q")
    assert len(ck.quantized) > 10
    for name in ck.quantized:  # the forward's quantized leaves are exactly the stored ones
        _, path, idx, _ = _match(name, nh.KEY_MAP)
        leaf, stored = _leaf(params, path), ck.read(name)
        assert isinstance(leaf, HLWQArray), (name, path)
        for f in ("packed", "norms"):
            got = np.asarray(getattr(leaf, f))
            np.testing.assert_array_equal(got if idx is None else got[idx], np.asarray(getattr(stored, f)), err_msg=name)
        np.testing.assert_array_equal(np.asarray(leaf.codebook), np.asarray(stored.codebook))
    tokens = np.load(FIXTURE / "reference.npz")["tokens"]
    np.save(tmp_path / "tokens.npy", tokens)
    res = subprocess.run([hf_python, str(REPO / "tests/oracles/hlwq_dequantized_logits.py"), str(tmp_path / "d"),
                          str(tmp_path / "tokens.npy"), str(tmp_path / "hf.npy")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    hf = np.load(tmp_path / "hf.npy")
    ours = np.asarray(nh.forward(config, params, jnp.asarray(tokens))[0])
    rel = np.max(np.abs(ours - hf)) / np.max(np.abs(hf))
    ref = np.load(FIXTURE / "reference.npz")["logits"]  # unquantized logits: Q4 must actually change them
    print(f"max |jax - hf| / max |hf| = {rel:.2e}; quantization moved logits by {np.max(np.abs(hf - ref)):.3f}")
    assert rel <= 1e-4
    assert np.max(np.abs(hf - ref)) > 1e-3
