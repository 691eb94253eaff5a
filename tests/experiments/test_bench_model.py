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
    p = subprocess.run([sys.executable, "-m", "experiments.bench_model", "--tiny", "--out", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
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
