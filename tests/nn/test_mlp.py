import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.nn.mlp import mlp, mlp_reference


@pytest.mark.parametrize("act", ["relu2", "swiglu", "geglu"])
def test_mlp_matches_float64(rng, act):
    d, f = 24, 40
    p = {"up_proj": rng.standard_normal((f, d)) / 5, "down_proj": rng.standard_normal((d, f)) / 6}
    if act != "relu2":
        p["gate_proj"] = rng.standard_normal((f, d)) / 5
    x = rng.standard_normal((2, 3, d))
    got = mlp({k: jnp.asarray(v, jnp.float32) for k, v in p.items()}, jnp.asarray(x, jnp.float32), act)
    ref = mlp_reference(p, x, act)
    assert np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref) < 1e-5


def test_mlp_bad_input():
    p = {"up_proj": jnp.ones((4, 2)), "down_proj": jnp.ones((2, 4))}
    with pytest.raises(ValueError, match="gate_proj"):
        mlp(p, jnp.ones((1, 2)), "swiglu")
    with pytest.raises(ValueError, match="unknown activation"):
        mlp(p, jnp.ones((1, 2)), "gelu")
