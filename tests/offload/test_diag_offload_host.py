"""experiments/diag_offload_host.py: a small run yields one row per (bank, C, m) with every piece measured, the
steps really had m misses each (the script raises otherwise), and rows land in --out; bad arguments raise."""
import json

import pytest

from experiments import diag_offload_host as diag


def test_diag_rows(tmp_path, capsys):
    out = tmp_path / "diag.jsonl"
    prof = tmp_path / "prof.txt"
    assert diag.main(["--banks", "q5", "--slots", "8", "--misses", "0", "2", "--steps", "3", "--warmup", "1",
                      "--experts", "16", "--out", str(out), "--profile", str(prof)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["bank"], r["slots"], r["misses_per_step"]) for r in rows] == [("q5", 8, 0), ("q5", 8, 2)]
    for r in rows:
        assert all(r[f"{p}_us"] >= 0 for p in diag.PIECES if p != "rest")
        assert r["total_us"] >= r["routed_disp_us"] > 0 and r["platform"] == "cpu" and not r["real_shapes"]
    hit, miss = rows
    assert hit["install_disp_us"] == 0 and miss["install_disp_us"] > 0
    assert "install_ms" not in hit and miss["install_ms"] > 0 and miss["contig_ms"] > 0
    assert "cached_moe" in prof.read_text()
    assert "q5" in capsys.readouterr().out


def test_diag_bad_args():
    with pytest.raises(ValueError, match="misses"):
        diag.main(["--misses", "7", "--steps", "1"])
    with pytest.raises(ValueError, match="slots"):
        diag.main(["--slots", "4", "--steps", "1"])
