"""experiments/profile_decode.py: kernel categories, the trace reader on a real (CPU) trace, and --tiny end to end."""
import glob
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_decode as pdec

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_categories_by_kernel_name():
    assert pdec.category("hlwq_gemv_q5") == "pallas gemv"
    assert pdec.category("hlwq_dequant_q5") == "pallas other"
    assert pdec.category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "cublas / cutlass"
    assert pdec.category("gemv2T_kernel_val<int, int, __nv_bfloat16>") == "cublas / cutlass"
    assert pdec.category("loop_multiply_fusion_3") == "xla fusion"
    assert pdec.category("Memcpy DtoD") == "copy / memset"
    assert pdec.category("triton_softmax_1") == "xla triton"
    assert pdec.category("something_else") == "other"


def test_kernel_table_reads_a_trace(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((128, 128))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(4):
            f(x).block_until_ready()
    (path,) = glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)
    t = pdec.kernel_table(path, steps=4, top=5)
    assert t["events_from"] == ("gpu" if jax.default_backend() == "gpu" else "cpu")
    assert t["busy_us_per_step"] > 0 and t["events_per_step"] > 0 and len(t["kernels"]) <= 5
    us = [k["us_per_step"] for k in t["kernels"]]
    assert us == sorted(us, reverse=True)
    assert abs(sum(t["categories_us_per_step"].values()) - t["busy_us_per_step"]) < 1e-6 * t["busy_us_per_step"] + 1e-9


def test_variant_names():
    from experiments.bench_model import variant_params
    for bad in ("hlwq", "hlwq5-cuda", "fp8"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_params({}, bad)


@pytest.mark.slow
def test_tiny_profile_decode(tmp_path):
    out = tmp_path / "p.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.profile_decode", "--tiny", "--steps", "2",
           "--variants", "bf16,hlwq5-pallas-experts", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert set(saved["variants"]) == {"bf16", "hlwq5-pallas-experts"} and p.stdout.rstrip().endswith(saved["table"].splitlines()[-1])
    for v in saved["variants"].values():
        assert v["wall_ms_per_step"] > 0 and v["busy_us_per_step"] > 0 and v["kernels"]
