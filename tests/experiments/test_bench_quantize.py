import json

from experiments import bench_quantize


def test_bench_quantize_runs_and_appends(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_quantize, "SMALL_SHAPES", {"tiny 64x256": (64, 256)})
    out = tmp_path / "r.jsonl"
    out.write_text('{"old": 1}\n')
    bench_quantize.main(["--out", str(out), "--bits", "5", "--iters", "1"])
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines[0] == {"old": 1}
    r = lines[1]
    assert r["bits"] == 5 and r["weights"] == 64 * 256 and r["quantize_wps"] > 0 and r["jax"] and r["command"]
