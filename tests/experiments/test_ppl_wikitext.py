"""experiments.ppl_wikitext / sweep / plot_quality: config expansion, result lines, targets, the CLI contract."""
import json
import subprocess
import sys

import pytest

from experiments import plot_quality, ppl_wikitext as ppl, sweep
from hlwq_jax.eval.data import REPO_ROOT


def test_quality_table_config_expands():
    runs = sweep.expand(sweep.load_config(REPO_ROOT / "configs" / "quality_table.toml"))
    for model in ("smollm2-135m", "gemma3-270m"):
        q = [r.quant for r in runs if r.model == model]
        assert len(q) == len(set(q)) == 21
        for name in ("bf16", "fp32", "hlwq3", "hlwq6-orig", "hlwq4-rnone", "hlwq4-rrandom", "hlwq4-b32", "hlwq4-b512",
                     "rtn4-g128", "nf4", "nvfp4"):
            assert name in q
    assert {(r.protocol, r.window, r.max_windows) for r in runs} == {("chunks", 512, None)}


def test_expand_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        sweep.expand({"runs": [{"quant": "bf16", "colour": "red"}]})
    with pytest.raises(ValueError, match="either quant"):
        sweep.expand({"runs": [{"quant": "nf4", "bits": 4}]})
    with pytest.raises(ValueError, match="unknown quantizer name"):
        sweep.expand({"runs": [{"quant": "int3-magic"}]})


def _rec(model, quant, ppl_, bpw):
    return {"model": model, "quant": quant, "protocol": "chunks", "window": 512, "windows": 4, "tokens": 2044,
            "ppl": ppl_, "bits_per_weight": bpw, "bos": False, "git_sha": "x", "jax_version": "0", "device": "cpu"}


def test_append_jsonl_and_table(tmp_path):
    out = tmp_path / "r" / "a.jsonl"
    recs = [_rec("m", "bf16", 10.0, 16.0), _rec("m", "hlwq4", 10.5, 4.25)]
    ppl.append_jsonl(out, recs[:1])
    ppl.append_jsonl(out, recs[1:])
    assert [json.loads(x)["quant"] for x in out.read_text().splitlines()] == ["bf16", "hlwq4"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]          # no temp file left
    table = ppl.format_table(recs)
    assert "+5.00" in table and "4.250" in table


def test_targets_and_plot(tmp_path):
    recs = [_rec("m", "bf16", 10.0, 16.0), _rec("m", "hlwq5", 10.05, 5.1), _rec("m", "hlwq4", 10.4, 4.1),
            _rec("m", "rtn4-g128", 11.0, 4.1), _rec("m", "nf4", 10.3, 4.5), _rec("m", "hlwq5-orig", 10.04, 5.1)]
    res = tmp_path / "q.jsonl"
    ppl.append_jsonl(res, recs + [{**_rec("m", "bf16", 99.0, 16.0), "smoke": True}])
    md_path, png = tmp_path / "t.md", tmp_path / "p.png"
    plot_quality.main([str(res), "--png", str(png), "--table", str(md_path)])
    md = md_path.read_text()
    assert "Q5 ΔPPL +0.500% of BF16 (target ≤ 1%): met" in md
    assert "0.6 × RTN-g128 ΔPPL +0.6000: met" in md
    assert "vs NF4 +0.3000 (target below): MISSED by 0.1000 PPL" in md
    assert "Q5 converged 10.0500 vs original codebook 10.0400 (target ≤): MISSED by 0.0100" in md
    assert "dequantized" in md and png.stat().st_size > 10_000


def test_cli_rejects_bad_quant_before_loading(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.ppl_wikitext", "--quant", "bf16,hlwq4-zz",
                        "--out", str(tmp_path / "o.jsonl")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "hlwq4-zz" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_missing_data_is_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.ppl_wikitext", "--quant", "bf16", "--data",
                        str(tmp_path / "none.raw"), "--out", str(tmp_path / "o.jsonl")], cwd=REPO_ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "WikiText-2 test file not found" in r.stderr


@pytest.mark.slow
def test_smoke_cli(tmp_path):
    out = tmp_path / "smoke.jsonl"
    r = subprocess.run([sys.executable, "-m", "experiments.ppl_wikitext", "--smoke", "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["quant"] for x in recs] == ["bf16", "hlwq4"]
    for x in recs:
        for k in ("model", "quant", "protocol", "window", "windows", "tokens", "ppl", "bits_per_weight", "config",
                  "git_sha", "jax_version", "device", "bos"):
            assert k in x
    assert recs[0]["ppl"] < recs[1]["ppl"] < 10 * recs[0]["ppl"]


def test_resume_keys(tmp_path):
    runs = sweep.expand({"base": {"window": 128, "max_windows": 1}, "runs": [{"quant": ["bf16", "nf4"]}]})
    res = tmp_path / "r.jsonl"
    ppl.append_jsonl(res, [{**_rec("smollm2-135m", "bf16", 1.0, 16.0), "config": vars_(runs[0])},
                           {**_rec("smollm2-135m", "nf4", 1.0, 4.5), "config": vars_(runs[1]), "smoke": True}])
    done = sweep.done_keys(res)
    assert [sweep._key(vars_(r)) in done for r in runs] == [True, False]


def vars_(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)


def test_float_formats_round_block_linears_only(rng):
    import jax.numpy as jnp
    import numpy as np
    w = rng.normal(size=(8, 8)).astype(np.float32)
    params = {"embed_tokens": w, "layers": [{"attn": {"q_proj": w}, "attn_norm": w[0]}]}
    for name, dt in (("bf16", jnp.bfloat16), ("fp32", jnp.float32)):
        q, summary, _ = ppl.quantize_model(params, name)
        assert q["layers"][0]["attn"]["q_proj"].dtype == dt and q["embed_tokens"].dtype == jnp.float32
        assert summary["bits_per_weight"] == 8 * jnp.dtype(dt).itemsize
    with pytest.raises(ValueError, match="unquantized formats"):
        ppl.quantize_model(params, "none")
