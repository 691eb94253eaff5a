"""bench_offload --tiny on CPU: completes, every cached run is exact, rows are self-consistent, plot and trace."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from hlwq_jax.offload import trace as T
from hlwq_jax.offload.bank import TRANSFERS

REPO = pathlib.Path(__file__).resolve().parents[2]


def bench(tmp_path, *extra):
    out, tr, png = tmp_path / "b.jsonl", tmp_path / "t.jsonl", tmp_path / "b.png"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "experiments.bench_offload", "--tiny", "--out", out, "--trace", tr,
                        "--plot", png, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, [json.loads(line) for line in out.read_text().splitlines()], tr, png


def test_tiny_bench(tmp_path):
    """Also sweeps speculative decode (--speculative both): same hit rates, exact, one host read per token when warm;
    and both transfer paths (--transfer both): a probe row each, same policy decisions, both exact."""
    p, rows, tr, png = bench(tmp_path, "--speculative", "both", "--transfer", "both")
    assert "random weights route near-uniformly" in p.stdout and "stacked-jit preflight ok on cpu" in p.stdout
    kinds = [r["kind"] for r in rows]
    res = [r for r in rows if r["kind"] == "resident"]
    assert all(r["baseline"] == "one_jit" and set(r["ms_per_token_variants"]) == {"one_jit", "eager"} for r in res)
    assert all(set(r["variants_exact"]) == {"one_jit", "eager"} and r["variants_exact"]["eager"] is True for r in res)
    assert kinds.count("resident") == 4 and kinds.count("nomiss") == 8 and kinds.count("decode") == 16
    probes = [r for r in rows if r["kind"] == "transfer_probe"]
    assert [(r["bank"], r["transfer"]) for r in probes] == [(b, t) for b in ("bf16", "q5") for t in TRANSFERS]
    for r in probes:
        assert r["ok"] is True and r["ms_per_miss"] > 0 and r["contiguous_ms_per_expert"] > 0 and r["pad_rows"] == 0
        assert r["transfers"] == 3 + r["calls"] and r["misses_per_call"] == 2  # top_k = 2 <= C = 2: all miss
    assert all(r["transfer"] is None for r in rows if r["kind"] in ("resident", "replay"))
    assert all(r["transfer"] in TRANSFERS and r["config"]["transfer"] == list(TRANSFERS)
               for r in rows if r["kind"] in ("nomiss", "decode"))
    dec = {(r["bank"], r["slots"], r["speculative"], r["transfer"]): r for r in rows if r["kind"] == "decode"}
    for (b, c, sp, t), r in dec.items():  # the transfer path changes how experts move, not which
        keys = ("misses", "accesses", "bytes_moved", "pad_rows")
        assert [r[k] for k in keys] == [dec[b, c, sp, "rows"][k] for k in keys]
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
        keys = ("bank", "transfer", "slots", "misses", "accesses")  # speculation does not change policy decisions
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


def test_paired_decode_rows(tmp_path):
    """--decode-repeats 3 --paired-decode (whole tiny model): each decode row has 3 timings, each paired with a
    no-miss run at the same C; every per-pair estimate is (decode − its no-miss) / misses per token (fresh caches
    and fixed tokens: the same misses each repeat), the reported one their median, and the row is still exact."""
    import numpy as np

    _, rows, _, _ = bench(tmp_path, "--model", "full", "--decode-repeats", "3", "--paired-decode")
    dec = [r for r in rows if r["kind"] == "decode"]
    assert len(dec) == 4
    for r in dec:
        assert r["exact"] and len(r["ms_per_token_repeats"]) == 3 and len(r["paired_nomiss_ms"]) == 3
        assert r["ms_per_token"] == sorted(r["ms_per_token_repeats"])[1]
        want = [(m - b) / r["misses_per_token"] for m, b in zip(r["ms_per_token_repeats"], r["paired_nomiss_ms"])]
        np.testing.assert_allclose(r["eff_ms_per_miss_pairs"], want, rtol=1e-12)
        assert r["eff_ms_per_miss_paired"] == pytest.approx(float(np.median(want)))
        lo, hi = r["eff_ms_per_miss_paired_ci95"]
        assert min(want) <= lo <= r["eff_ms_per_miss_paired"] <= hi <= max(want)


def test_median_ci():
    """Bootstrap interval of a median: None under 3 values; a constant sample gives a point; otherwise the interval
    lies within the sample's range and holds the sample median; more data, a narrower interval."""
    import numpy as np
    from experiments.bench_offload import median_ci

    assert median_ci([1.0, 2.0]) is None
    assert median_ci([0.9] * 5) == [0.9, 0.9]
    rng = np.random.default_rng(0)
    small, big = rng.normal(1.0, 0.2, 7), rng.normal(1.0, 0.2, 200)
    for v in (small, big):
        lo, hi = median_ci(v)
        assert v.min() <= lo <= np.median(v) <= hi <= v.max()
    assert np.diff(median_ci(big)) < np.diff(median_ci(small))


def test_speculative_config(tmp_path):
    """Default keeps the per-layer path and the stacked-jit transfer; the H200 configs sweep both speculative modes,
    the spec config both transfers; an empty speculative list and unknown transfers are refused."""
    from experiments.bench_offload import BenchConfig, main

    assert BenchConfig().speculative == (False,) and BenchConfig.tiny().speculative == (False,)
    assert BenchConfig().transfer == ("stacked-jit",) and BenchConfig.tiny().transfer == ("stacked-jit",)
    assert BenchConfig.load(str(REPO / "configs" / "offload_h200.toml")).speculative == (False, True)
    assert BenchConfig.load(str(REPO / "configs" / "offload_h200_spec.toml")).transfer == TRANSFERS
    assert BenchConfig.load(str(REPO / "configs" / "offload_h200_full_spec.toml")).speculative == (False, True)
    (tmp_path / "s.toml").write_text('layers = 2\nspeculative = []\n')
    with pytest.raises(ValueError, match="speculative"):
        main(["--config", str(tmp_path / "s.toml"), "--out", "/nonexistent/x.jsonl"])
    (tmp_path / "c.toml").write_text('layers = 2\ntransfer = ["rows", "gather"]\n')
    with pytest.raises(ValueError, match="transfer"):
        main(["--config", str(tmp_path / "c.toml"), "--out", "/nonexistent/x.jsonl"])


def test_failed_transfer_probe_is_recorded_and_skipped(monkeypatch):
    """A stacked-jit probe that raises (e.g. the in-jit host gather does not compile on some backend) gives a probe
    row with ok=false and the error, skips that transfer's rows and is reported in ``failed`` (main exits 1); a
    failing rows probe raises."""
    import dataclasses

    import jax
    from experiments import bench_offload as B

    real = B.transfer_probe

    def probe(h, cfg, precision):
        if h.transfer == "stacked-jit":
            raise RuntimeError("cannot compile")
        return real(h, cfg, precision)

    monkeypatch.setattr(B, "transfer_probe", probe)
    monkeypatch.setattr(B, "bench_transfer", lambda h, *a: [[{"kind": "decode", "transfer": h.transfer}]])
    resident = (1.0, [], {"ms_per_token_repeats": [1.0], "host_ms_per_token": 1.0})
    monkeypatch.setattr(B, "time_resident", lambda *a, **kw: resident)  # resident rows: not under test here
    cfg = dataclasses.replace(B.BenchConfig.tiny(), transfer=TRANSFERS, tokens=2, warmup=1)
    failed = []
    rows = [r for batch in B.bench_precision(cfg, "bf16", jax.random.PRNGKey(0), {}, None, failed) for r in batch]
    got = [(r["kind"], r["transfer"], r.get("ok")) for r in rows if r["kind"] != "resident"]
    assert got == [("transfer_probe", "rows", True), ("decode", "rows", None),
                   ("transfer_probe", "stacked-jit", False)]
    assert "cannot compile" in rows[-1]["error"] and failed == ["bf16/stacked-jit"]
    monkeypatch.setattr(B, "transfer_probe", lambda *a: (_ for _ in ()).throw(RuntimeError("rows broke")))
    with pytest.raises(RuntimeError, match="rows broke"):
        list(B.bench_precision(cfg, "bf16", jax.random.PRNGKey(0), {}, None, []))


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


def test_failed_preflight_skips_stacked_jit(monkeypatch, tmp_path):
    """The stacked-jit preflight runs in a subprocess before JAX takes the device; a failure is recorded as a probe
    row (ok=false, preflight, the error), stacked-jit is dropped from the run, and main exits 1."""
    from experiments import bench_offload as B

    monkeypatch.setattr(B, "run_preflight_stacked", lambda: "exit status -6\nF0000 host_offloader CHECK failed")
    out = tmp_path / "o.jsonl"
    assert B.main(["--tiny", "--transfer", "stacked-jit", "--out", str(out)]) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["ok"] is False and rows[0]["preflight"] is True
    assert "CHECK failed" in rows[0]["error"] and rows[0]["config"]["transfer"] == ["stacked-jit"]
