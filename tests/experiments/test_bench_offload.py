"""bench_offload --tiny on CPU: completes, every cached run is exact, rows are self-consistent, plot and trace."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from hlwq_jax.offload import trace as T

REPO = pathlib.Path(__file__).resolve().parents[2]


def bench(tmp_path, *extra):
    out, tr, png = tmp_path / "b.jsonl", tmp_path / "t.jsonl", tmp_path / "b.png"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "experiments.bench_offload", "--tiny", "--out", out, "--trace", tr,
                        "--plot", png, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, [json.loads(line) for line in out.read_text().splitlines()], tr, png


def test_tiny_bench(tmp_path):
    """Also sweeps speculative decode (--speculative both): same hit rates, exact, one host read per token when warm."""
    p, rows, tr, png = bench(tmp_path, "--speculative", "both")
    assert "random weights route near-uniformly" in p.stdout
    kinds = [r["kind"] for r in rows]
    res = [r for r in rows if r["kind"] == "resident"]
    assert all(r["baseline"] == "one_jit" and set(r["ms_per_token_variants"]) == {"one_jit", "eager"} for r in res)
    assert all(set(r["variants_exact"]) == {"one_jit", "eager"} and r["variants_exact"]["eager"] is True for r in res)
    assert kinds.count("resident") == 4 and kinds.count("nomiss") == 4 and kinds.count("decode") == 8
    for r in rows:
        assert r["model"] == "moe_only" and r["config"]["layers"] == 2 and "git_sha" in r and "jax" in r
    for r in (r for r in rows if r["kind"] in ("decode", "nomiss")):
        assert r["exact"] is True, r
    for r in (r for r in rows if r["kind"] == "decode"):
        tokens, layers, k = r["config"]["tokens"], r["config"]["layers"], r["config"]["top_k"]
        assert r["accesses"] == tokens * layers * k
        assert abs(r["hit_rate"] - (1 - r["misses"] / r["accesses"])) < 1e-12
        assert r["bytes_moved"] == r["misses"] * r["expert_bytes"]
        assert r["slot_bytes"] == layers * r["slots"] * r["expert_bytes"]
        assert "do not represent" in r["note"]
    q5 = next(r for r in rows if r["kind"] == "decode" and r["bank"] == "q5")
    bf = next(r for r in rows if r["kind"] == "decode" and r["bank"] == "bf16")
    assert q5["expert_bytes"] < bf["expert_bytes"] / 2  # 48 -> 64 padding at tiny shapes; ~3.1x at real shapes
    assert all(r["misses"] == r["spec_rollbacks"] == r["spec_discarded"] == 0 for r in rows if r["kind"] == "nomiss")
    for r in (r for r in rows if r["kind"] in ("decode", "nomiss")):
        tokens, layers = r["config"]["tokens"], r["config"]["layers"]
        assert r["config"]["speculative"] == [False, True]
        if r["speculative"]:
            assert r["spec_accepts"] + r["spec_rollbacks"] == tokens
            assert r["host_reads"] == tokens + r["spec_resumed_layers"] - r["spec_rollbacks"]
            assert (r["spec_rollbacks"] > 0) == (r["misses"] > 0)
            assert 0 <= r["spec_discarded"] <= r["spec_rollbacks"]  # the last timed token has no next in flight
            assert r["spec_discarded"] >= r["spec_rollbacks"] - 1
        else:
            assert r["host_reads"] == tokens * layers and r["spec_accepts"] == r["spec_rollbacks"] == 0
            assert r["spec_discarded"] == 0
        if r["kind"] == "nomiss":  # warm cache, nothing missing: every token accepted with one read
            assert (r["spec_pass_ms"] > 0 and r["spec_pass_exact"] is True) if r["speculative"] else \
                "spec_pass_ms" not in r
            assert r["host_reads_per_token"] == (1 if r["speculative"] else layers)
            assert r["spec_accepts"] == (tokens if r["speculative"] else 0)
    for a, b in zip(*[[r for r in rows if r["kind"] == "decode" and r["speculative"] == s] for s in (False, True)]):
        keys = ("bank", "slots", "misses", "accesses")  # speculation does not change the policy's decisions
        assert [a[k] for k in keys] == [b[k] for k in keys]
    replay = {(r["slots"], r["policy"]): r["hit_rate"] for r in rows if r["kind"] == "replay"}
    assert {p for _, p in replay} == {"lru", "lfru", "lfru-fork", "lfu", "static", "belady"}
    assert all(0 <= hr <= 1 for hr in replay.values())  # counted after warm-up, like the measured rows
    for r in (r for r in rows if r["kind"] == "decode" and r["bank"] == "bf16"):  # the trace is the bf16 run's
        assert r["hit_rate"] == replay[(r["slots"], "lru")]  # live cache == offline replay of its trace
    for r in (r for r in rows if r["kind"] == "replay"):
        assert r["accesses"] == 4 * 2 * 2  # timed tokens × layers × top-k
    assert len(T.read_trace(tr)) == (2 + 4) * 2  # (warm-up + timed tokens) × layers of the first cached run
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_tiny_bench_full_model(tmp_path):
    """The whole hybrid model (tiny config): cached logits equal the all-resident segmented model's bit for bit;
    the trace has prefill and decode lines."""
    _, rows, tr, _ = bench(tmp_path, "--model", "full")
    dec = [r for r in rows if r["kind"] == "decode"]
    assert len(dec) == 4 and all(r["exact"] for r in dec)
    assert all(r["misses"] == 0 and r["exact"] for r in rows if r["kind"] == "nomiss")
    assert {r["baseline"] for r in rows if r["kind"] == "resident"} == {"segmented"}
    recs = T.read_trace(tr)
    assert {r.phase for r in recs} == {"prefill", "decode"}


def test_speculative_config():
    """Default keeps the per-layer path; the H200 config sweeps both; the full model refuses speculation."""
    from experiments.bench_offload import BenchConfig, main

    assert BenchConfig().speculative == (False,) and BenchConfig.tiny().speculative == (False,)
    assert BenchConfig.load(str(REPO / "configs" / "offload_h200.toml")).speculative == (False, True)
    with pytest.raises(ValueError, match="speculative"):
        main(["--tiny", "--model", "full", "--speculative", "true", "--out", "/nonexistent/x.jsonl"])


def test_check_miss_free():
    """A no-miss row whose timed window had a miss, a rollback or a discarded call raises; a clean one passes."""
    from experiments.bench_offload import check_miss_free
    from hlwq_jax.offload import LayerStats, SpecStats

    clean = [LayerStats(hits=12), LayerStats(hits=12)]
    check_miss_free("clean", clean, SpecStats(tokens=4, accepts=4, host_reads=4))
    for stats, sp in (([LayerStats(hits=11, misses=1), LayerStats(hits=12)], SpecStats()),
                      (clean, SpecStats(rollbacks=1, resumed_layers=2)), (clean, SpecStats(discarded=1))):
        with pytest.raises(RuntimeError, match="not miss-free"):
            check_miss_free("row", stats, sp)
