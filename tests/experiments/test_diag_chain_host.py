"""experiments/diag_chain_host.py: on the tiny model, rows for both loops with the calls a decoded token makes
(one-token steps run the routed experts inside the next segment: one ``_segment`` per segment, no separate routed
call; the chain adds one ``_chain_codes`` call and a settle), written to --out; bad arguments raise."""
import json

import pytest

from experiments import diag_chain_host as diag
from hlwq_jax.offload import nemotron as NM


def test_diag_chain_host_rows(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    assert diag.main(["--tiny", "--rounds", "1", "--runs", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["loop"], r["round"]) for r in rows] == [("resident", 0), ("chain", 0)]
    res, chain = rows
    n_seg = 3  # tiny model "ME*E": 2 MoE layers -> 3 segments
    assert res["calls_per_token"]["_segment"] == chain["calls_per_token"]["_segment"] == n_seg
    assert res["calls_per_token"]["routed_call"] == chain["calls_per_token"]["routed_call"] == n_seg - 1
    assert "_chain_codes" not in res["calls_per_token"] and chain["calls_per_token"]["_chain_codes"] == 1
    assert res["settle_us_per_token"] == 0 and chain["settle_us_per_token"] > 0
    assert all(v > 0 for r in rows for v in r["host_us_per_call"].values()) and len(res["ms_per_token_runs"]) == 2
    assert NM._segment.__name__ == "_segment"  # the wrappers were removed
    assert "chain" in capsys.readouterr().out


def test_diag_chain_host_bad_args():
    with pytest.raises(ValueError, match="--config or --tiny"):
        diag.main([])
    with pytest.raises(ValueError, match="rounds"):
        diag.main(["--tiny", "--rounds", "0"])
