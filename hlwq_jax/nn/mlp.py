"""Dense MLP blocks.

Public signatures:
  mlp(params, x, activation) -> y                x [..., D] -> [..., D]
      activation "relu2"     (Nemotron-H `-` block / shared expert): params {up_proj [F,D], down_proj [D,F]},
                             y = down(relu(up(x))^2)
      activation "swiglu"    (Llama):  params {gate_proj [F,D], up_proj [F,D], down_proj [D,F]},
                             y = down(silu(gate(x)) * up(x))
      activation "geglu"     (Gemma, gelu tanh approximation): same params, y = down(gelu_tanh(gate(x)) * up(x))
  ACTIVATIONS: the names above.  mlp_reference(params, x, activation): float64 numpy.
Leaves may be arrays [out, in] or quantized leaves (through hlwq_jax.nn linear).
"""
from __future__ import annotations

import jax
import numpy as np

from hlwq_jax.nn.linear import linear

ACTIVATIONS = ("relu2", "swiglu", "geglu")
_KEYS = {"relu2": {"up_proj", "down_proj"}, "swiglu": {"gate_proj", "up_proj", "down_proj"},
         "geglu": {"gate_proj", "up_proj", "down_proj"}}


def relu2(x: jax.Array) -> jax.Array:
    r = jax.nn.relu(x)
    return r * r


def _check(params, activation):
    if activation not in _KEYS:
        raise ValueError(f"mlp: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if set(params) != _KEYS[activation]:
        raise ValueError(f"mlp({activation}): params keys {sorted(params)} != {sorted(_KEYS[activation])}")


def mlp(params: dict, x: jax.Array, activation: str) -> jax.Array:
    """Dense MLP; see module docstring."""
    _check(params, activation)
    if activation == "relu2":
        h = relu2(linear(x, params["up_proj"]))
    else:
        g = linear(x, params["gate_proj"])
        act = jax.nn.silu(g) if activation == "swiglu" else jax.nn.gelu(g, approximate=True)
        h = act * linear(x, params["up_proj"])
    return linear(h, params["down_proj"])


def mlp_reference(params: dict, x, activation: str) -> np.ndarray:
    """float64 numpy MLP."""
    _check(params, activation)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    if activation == "relu2":
        h = np.maximum(x @ p["up_proj"].T, 0.0) ** 2
    else:
        g = x @ p["gate_proj"].T
        if activation == "swiglu":
            act = g / (1.0 + np.exp(-g))
        else:
            act = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3)))
        h = act * (x @ p["up_proj"].T)
    return h @ p["down_proj"].T
