"""Shared test model: L MoE layers of E float32 experts (up [F, D], down [D, F]) in pinned-host banks, random routers."""
import jax.numpy as jnp
import numpy as np

from hlwq_jax.offload.bank import HostBank

L, E, D, F, K = 3, 8, 32, 16, 2


def build(seed: int, transfer: str = "rows"):
    """→ (banks [HostBank] * L, routers [(gate [E, D], bias [E])] * L, full expert dicts * L); ``transfer``: the
    banks' transfer path (same weights for every path)."""
    rng = np.random.default_rng(seed)
    banks, routers, full = [], [], []
    for _ in range(L):
        w = {"up_proj": jnp.asarray(rng.standard_normal((E, F, D)) / np.sqrt(D), jnp.float32),
             "down_proj": jnp.asarray(rng.standard_normal((E, D, F)) / np.sqrt(F), jnp.float32)}
        banks.append(HostBank(w, transfer=transfer))
        full.append(w)
        routers.append((jnp.asarray(rng.standard_normal((E, D)), jnp.float32),
                        jnp.asarray(rng.standard_normal(E) * 0.1, jnp.float32)))
    return banks, routers, full
