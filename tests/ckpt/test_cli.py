"""hlwq-quantize / hlwq-dequantize end to end: recipe selection on Nemotron-H names, dequantized values against the
HLWQArray definition, original formats through the dequantizer, and a SIGKILLed CLI run resumed to identical files."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from hlwq_jax.ckpt import hlwq_format as hfmt
from hlwq_jax.ckpt import polarengine as pe
from hlwq_jax.cli import dequantize as dq
from hlwq_jax.cli import quantize as qz
from hlwq_jax.quant.hlwq import quantize
from ckpt_synth import make_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[2]
_dequant = jax.jit(lambda w: w.dequantize())  # the HLWQArray definition, compiled once per shape
NEMO = {
    "backbone.embeddings.weight": (64, 128), "backbone.norm_f.weight": (128,), "lm_head.weight": (64, 128),
    "backbone.layers.0.norm.weight": (128,),
    "backbone.layers.0.mixer.in_proj.weight": (80, 128), "backbone.layers.0.mixer.out_proj.weight": (128, 64),
    "backbone.layers.0.mixer.conv1d.weight": (48, 1, 4), "backbone.layers.0.mixer.conv1d.bias": (48,),
    "backbone.layers.0.mixer.A_log": (8,), "backbone.layers.0.mixer.D": (8,), "backbone.layers.0.mixer.dt_bias": (8,),
    "backbone.layers.0.mixer.norm.weight": (64,),
    "backbone.layers.1.mixer.gate.weight": (4, 128), "backbone.layers.1.mixer.experts.0.up_proj.weight": (40, 128),
    "backbone.layers.1.mixer.experts.0.down_proj.weight": (128, 40),
    "backbone.layers.2.mixer.q_proj.weight": (64, 128), "backbone.layers.2.mixer.k_proj.weight": (32, 128),
}
QUANTIZED = {"backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.out_proj.weight",
             "backbone.layers.1.mixer.experts.0.up_proj.weight", "backbone.layers.1.mixer.experts.0.down_proj.weight",
             "backbone.layers.2.mixer.q_proj.weight", "backbone.layers.2.mixer.k_proj.weight"}


def test_quantize_cli_nemotron_recipe_then_dequantize(tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", rng, shapes=NEMO)
    assert qz.main([str(tmp_path / "src"), str(tmp_path / "q"), "--bits", "4", "--block-size", "64",
                    "--recipe", "nemotron-h", "--no-progress"]) == 0
    ck = hfmt.HLWQCheckpoint(tmp_path / "q")
    assert set(ck.quantized) == QUANTIZED
    assert dq.main([str(tmp_path / "q"), str(tmp_path / "d"), "--dtype", "float32", "--no-progress"]) == 0
    out = {}
    for f in (tmp_path / "d").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert set(out) == set(src)
    for name, x in src.items():
        if name in QUANTIZED:
            want = np.asarray(_dequant(quantize(np.asarray(x, np.float32), bits=4, block_size=64)))
            assert out[name].dtype == np.float32 and out[name].shape == x.shape
            np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
            rel = np.sum((out[name] - x.astype(np.float32)) ** 2) / np.sum(x.astype(np.float32) ** 2)
            assert rel < 0.02  # Q4 HLWQ ≈ 0.0095 on Gaussian weights
        else:
            assert out[name].dtype == x.dtype
            np.testing.assert_array_equal(out[name], x)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "toy"
    hfmt.verify_manifest(tmp_path / "d", check_hashes=True)
    # default dtype is bf16
    assert dq.main([str(tmp_path / "q"), str(tmp_path / "d16"), "--no-progress"]) == 0
    assert load_file(str(next((tmp_path / "d16").glob("*.safetensors"))))["lm_head.weight"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("layout", ["triplets", "streams"])
def test_dequantize_original_formats(tmp_path, rng, layout):
    w = quantize(rng.standard_normal((12, 128)).astype(np.float32), bits=5, block_size=64, codebook="polarengine")
    params = {"m.proj.weight": w, "m.norm.weight": rng.standard_normal(128).astype(np.float16)}
    (pe.save_polar_triplets if layout == "triplets" else pe.save_hlwq_streams)(tmp_path / "o", params)
    assert dq.main([str(tmp_path / "o"), str(tmp_path / "d"), "--dtype", "float32", "--no-progress"]) == 0
    out = load_file(str(next((tmp_path / "d").glob("*.safetensors"))))
    np.testing.assert_allclose(out["m.proj.weight"], np.asarray(w.dequantize()), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out["m.norm.weight"], params["m.norm.weight"])


def test_cli_errors_are_messages(tmp_path, capsys):
    assert qz.main([str(tmp_path / "nowhere"), str(tmp_path / "q"), "--no-progress"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    (tmp_path / "e").mkdir()
    assert dq.main([str(tmp_path / "e"), str(tmp_path / "d"), "--no-progress"]) == 2


@pytest.mark.slow
def test_sigkill_then_resume_is_identical(tmp_path, rng):
    """A real process killed mid-conversion; the rerun finishes and matches an uninterrupted run byte for byte."""
    shapes = {f"model.layers.{i}.q_proj.weight": (512, 1024) for i in range(12)}
    make_checkpoint(tmp_path / "src", rng, shapes=shapes, n_shards=3)
    cmd = [sys.executable, "-m", "hlwq_jax.cli.quantize", str(tmp_path / "src"), None, "--recipe", "all",
           "--shard-gb", str(1.5 / 1024), "--chunk-mb", "0.5", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(cmd[:4] + [str(tmp_path / "clean")] + cmd[5:], check=True, env=env, cwd=REPO)
    proc = subprocess.Popen(cmd[:4] + [str(tmp_path / "dst")] + cmd[5:], env=env, cwd=REPO)
    dst = tmp_path / "dst"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(dst.glob("model-*.safetensors"))) < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (dst / hfmt.MANIFEST_FILE).exists()
    assert 0 < len(list(dst.glob("model-*.safetensors"))) < len(list((tmp_path / "clean").glob("model-*.safetensors")))
    subprocess.run(cmd[:4] + [str(dst)] + cmd[5:], check=True, env=env, cwd=REPO)
    names = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert names == sorted(p.name for p in dst.iterdir())
    for n in names:
        assert (dst / n).read_bytes() == (tmp_path / "clean" / n).read_bytes(), n
