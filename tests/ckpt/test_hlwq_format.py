"""The own hlwq format: bit-exact round trips for every bit width 2..8, every rotation, matrices and stacked experts;
stored layout matches docs/format.md; incomplete or inconsistent directories are refused."""
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from hlwq_jax.ckpt import hlwq_format as hfmt
from hlwq_jax.quant.hadamard import random_signs
from hlwq_jax.quant.hlwq import quantize


def _same(a, b):
    assert (a.bits, a.block_size, a.shape, a.rotation, a.seed, a.codebook_name) == \
        (b.bits, b.block_size, b.shape, b.rotation, b.seed, b.codebook_name)
    for leaf in ("packed", "norms", "codebook"):
        x, y = np.asarray(getattr(a, leaf)), np.asarray(getattr(b, leaf))
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_every_bit_width(tmp_path, rng, bits):
    w2 = rng.standard_normal((5, 100)).astype(np.float32)
    w3 = rng.standard_normal((3, 4, 64)).astype(np.float32)
    params = {"a.weight": quantize(w2, bits=bits, block_size=32),
              "e.weight": quantize(w3, bits=bits, block_size=64, rotation="random-hadamard", seed=bits,
                                   codebook="polarengine"),
              "n.weight": quantize(w2, bits=bits, block_size=32, rotation="none", codebook="uniform"),
              "plain": rng.standard_normal(7).astype(ml_dtypes.bfloat16)}
    hfmt.save_hlwq(tmp_path, params, shard_bytes=300)
    back = hfmt.load_hlwq(tmp_path)
    assert set(back) == set(params)
    for k in ("a.weight", "e.weight", "n.weight"):
        _same(back[k], params[k])
    np.testing.assert_array_equal(back["plain"], params["plain"])


def test_layout_on_disk(tmp_path, rng):
    w = quantize(rng.standard_normal((3, 40)).astype(np.float32), bits=3, block_size=16,
                 rotation="random-hadamard", seed=5)
    hfmt.save_hlwq(tmp_path, {"m.weight": w})
    t = {}
    for f in tmp_path.glob("*.safetensors"):
        t.update(load_file(str(f)))
    assert t["m.weight.hlwq.packed"].shape == (3, 18) and t["m.weight.hlwq.packed"].dtype == np.uint8  # 48·3/8
    assert t["m.weight.hlwq.norms"].shape == (3, 3) and t["m.weight.hlwq.norms"].dtype == np.float16
    assert t["m.weight.hlwq.codebook"].shape == (8,)
    np.testing.assert_array_equal(t["m.weight.hlwq.signs"], random_signs(48, 5).astype(np.int8))
    cfg = json.loads((tmp_path / "hlwq_config.json").read_text())
    assert cfg["tensors"]["m.weight"]["shape"] == [3, 40] and cfg["packing"] == "lsb-row"
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "polarengine" and qc["bits"] == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(t)


def test_refuses_incomplete_or_inconsistent(tmp_path, rng):
    w = quantize(rng.standard_normal((3, 40)).astype(np.float32), bits=4, block_size=16)
    hfmt.save_hlwq(tmp_path, {"m.weight": w})
    manifest = (tmp_path / hfmt.MANIFEST_FILE).read_text()
    (tmp_path / hfmt.MANIFEST_FILE).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        hfmt.HLWQCheckpoint(tmp_path)
    (tmp_path / hfmt.MANIFEST_FILE).write_text(manifest)
    cfg = json.loads((tmp_path / "hlwq_config.json").read_text())
    cfg["tensors"]["m.weight"]["bits"] = 5  # now the stored packed shape disagrees with the config
    (tmp_path / "hlwq_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")  # same size
    with pytest.raises(ValueError, match="m.weight.hlwq.packed"):
        hfmt.HLWQCheckpoint(tmp_path)
    shard = next(tmp_path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match="wrong size"):
        hfmt.HLWQCheckpoint(tmp_path)
