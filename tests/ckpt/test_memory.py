"""Bounded memory: converting a checkpoint 6× larger than its largest tensor keeps the converter's peak RSS within
2× the largest tensor of a baseline process that converts a tiny checkpoint through the same code path."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ckpt_synth import make_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[2]


def _peak(src, dst, chunk_mb):
    out = subprocess.run([sys.executable, str(REPO / "experiments/bench_convert.py"), "--child", str(src), str(dst),
                          "--chunk-mb", str(chunk_mb)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0, out.stderr[-2000:]
    return res["peak_rss_bytes"]


@pytest.mark.slow
def test_peak_rss_bounded_by_largest_tensor(tmp_path):
    rng = np.random.default_rng(0)
    shapes = {f"model.layers.{i}.q_proj.weight": (8192, 4096) for i in range(6)}  # 64 MiB each, 384 MiB total
    make_checkpoint(tmp_path / "big", rng, shapes=shapes, n_shards=3)
    make_checkpoint(tmp_path / "tiny", rng, shapes={"model.layers.0.q_proj.weight": (64, 256)}, n_shards=1)
    largest = 8192 * 4096 * 2
    base = _peak(tmp_path / "tiny", tmp_path / "tiny_q", 8)
    peak = _peak(tmp_path / "big", tmp_path / "big_q", 8)
    print(f"baseline {base / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB")
    assert peak - base <= 2 * largest
