"""bench_model --tiny on CPU: completes, JSON holds every section with sane numbers, the table prints last."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_bench_model(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "experiments.bench_model", "--tiny", "--out", str(out),
                        "--paired-decode", "bf16,hlwq5"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert p.stdout.rstrip().endswith(saved["table"].splitlines()[-1]) and saved["jax"] and "git_sha" in saved
    assert set(saved["variants"]) == {"bf16", "hlwq5"}
    bf, q5 = saved["variants"]["bf16"], saved["variants"]["hlwq5"]
    assert q5["weight_bytes"] < bf["weight_bytes"]
    for v in (bf, q5):
        assert v["prefill"]["tokens_per_s"] > 0
        assert [d["batch"] for d in v["decode"] if not d["fused"]] == [1, 4]
        assert all(d["tokens_per_s"] > 0 for d in v["decode"])
        m = v["moe"]
        assert m["routed_ms"] > 0 and m["dense_ms"] > 0 and m["max_tokens_per_expert"] >= m["mean_tokens_per_expert"]
    assert [d["batch"] for d in bf["decode"] if d["fused"]] == [1] and not any(d["fused"] for d in q5["decode"])
    assert saved["param_count"] > 0 and saved["config"]["layer_types"] == "MEM*EME"
    paired = saved["paired_decode"]
    assert paired["baseline"] == "bf16" and paired["rounds"] == 2 and paired["steps_per_round"] == 3
    assert all(len(v) == 2 and min(v) > 0 for v in paired["step_ms"].values())
    assert paired["variants"]["bf16"]["time_over_baseline_median"] == 1.0
    assert "paired fused b1 decode" in saved["table"]


def test_summarize_paired_ratios_per_round():
    from experiments.bench_model import summarize_paired
    s = summarize_paired({"bf16": [3.0, 3.3, 3.1], "q5": [3.3, 3.3, 2.79]}, steps=40)
    assert s["baseline"] == "bf16" and s["rounds"] == 3 and s["steps_per_round"] == 40
    q5 = s["variants"]["q5"]
    assert q5["time_over_baseline_median"] == pytest.approx(1.0)  # ratios 1.1, 1.0, 0.9
    assert (q5["time_over_baseline_min"], q5["time_over_baseline_max"]) == pytest.approx((0.9, 1.1))
    assert q5["tokens_per_s_median"] == pytest.approx(1e3 / 3.3) and q5["step_ms_min"] == 2.79
    assert s["variants"]["bf16"]["time_over_baseline_median"] == 1.0
    with pytest.raises(ValueError, match="same number"):
        summarize_paired({"bf16": [3.0, 3.1], "q5": [3.0]}, steps=40)


def test_bad_variant_names_fail_before_any_work(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    for args in (["--paired-decode", "bf16,hlwq5-triton"], ["--variants", "fp8"], ["--paired-rounds", "0"]):
        p = subprocess.run([sys.executable, "-m", "experiments.bench_model", "--tiny", "--out", str(tmp_path / "b.json"),
                            *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and ("unknown variant" in p.stderr or "must be ≥ 1" in p.stderr), p.stderr[-500:]
        assert not (tmp_path / "b.json").exists()
