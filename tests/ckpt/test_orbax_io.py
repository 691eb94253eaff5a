"""orbax round trips of parameter pytrees with quantized leaves: structure, statics and every array bit-exact,
single-device and sharded (4 forced CPU devices, restored onto a different sharding)."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.ckpt import orbax_io as oi
from hlwq_jax.quant import baselines
from hlwq_jax.quant.hlwq import quantize

REPO = pathlib.Path(__file__).resolve().parents[2]


def _same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb  # includes every static field (bits, shape, rotation, seed, codebook name, …)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def test_round_trip_all_leaf_types(tmp_path, rng):
    w = rng.standard_normal((16, 200)).astype(np.float32)
    params = {
        "layers": [{"q": quantize(w, bits=b, block_size=64), "norm": jnp.ones(200, jnp.bfloat16)} for b in (2, 5, 8)],
        "experts": quantize(np.stack([w, -w]), bits=3, block_size=32, rotation="random-hadamard", seed=7,
                            codebook="polarengine"),
        "rtn": baselines.quantize_rtn(w, bits=4, group_size=64),
        "nf4": baselines.quantize_nf4(w, block_size=64, double_quant=True),
        "nvfp4": baselines.quantize_nvfp4(w[:, :192]),
        "host": np.arange(5, dtype=np.int64),
    }
    oi.save_params(tmp_path / "ck", params)
    back = oi.restore_params(tmp_path / "ck")
    _same(back, params)
    assert isinstance(back["host"], np.ndarray) and back["host"].dtype == np.int64  # host arrays stay host arrays
    assert isinstance(back["layers"][1]["q"].packed, jax.Array)
    np.testing.assert_array_equal(np.asarray(back["experts"].dequantize()), np.asarray(params["experts"].dequantize()))
    with pytest.raises(ValueError, match="cannot checkpoint"):
        oi.save_params(tmp_path / "bad", {"x": object()})
    with pytest.raises(ValueError, match="no checkpoint"):
        oi.restore_params(tmp_path / "missing")


SHARDED = r"""
import jax, numpy as np, jax.numpy as jnp, sys
jax.config.update("jax_num_cpu_devices", 4)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hlwq_jax.ckpt import orbax_io as oi
from hlwq_jax.quant.hlwq import quantize
mesh = Mesh(np.array(jax.devices()).reshape(4), ("x",))
rows = NamedSharding(mesh, P("x"))
w = quantize(np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32), bits=5, block_size=128)
w = jax.tree_util.tree_map(lambda a: jax.device_put(a, rows if a.ndim == 2 else NamedSharding(mesh, P())), w)
assert len(w.packed.sharding.device_set) == 4
params = {"w": w, "b": jax.device_put(jnp.arange(8.0), rows)}
oi.save_params(sys.argv[1], params)
cols = NamedSharding(mesh, P(None, "x"))
back = oi.restore_params(sys.argv[1], shardings=lambda name, shape: cols if name.endswith("packed") else NamedSharding(mesh, P()))
assert back["w"].packed.sharding.is_equivalent_to(cols, 2), back["w"].packed.sharding
assert len(back["w"].packed.addressable_shards) == 4 and back["w"].packed.addressable_shards[0].data.shape == (64, 40)
for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(back)
np.testing.assert_array_equal(np.asarray(back["w"].dequantize()), np.asarray(w.dequantize()))
print("SHARDED-OK")
"""


def test_sharded_round_trip(tmp_path):
    res = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "ck")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"), timeout=300)
    assert "SHARDED-OK" in res.stdout, res.stderr[-3000:]
