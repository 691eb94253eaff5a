"""Weight error vs output error of each quantizer on real activations: does equal weight MSE mean equal harm?

    python -m experiments.output_error [--model smollm2-135m] [--quants hlwq4,nf4,nvfp4,rtn4-g128] [--tokens 1024]
        [--out results/output_error_cpu.jsonl]
(2 CPU cores: ~3 min for SmolLM2-135M, ~6 min for Gemma-3-270M.)

The BF16 model runs eagerly on the first --tokens tokens of the WikiText-2 test text (non-overlapping 512-token
windows, BOS as the model family wants); the input X [N, in] of every block linear is recorded. For each linear W
[out, in] and quantizer Q (its own dequantization, float64 here):
    weight_rel = ‖W − Q‖² / ‖W‖²            what the quantizer optimises (per-tensor statistics elsewhere)
    output_rel = ‖X (W − Q)ᵀ‖² / ‖X Wᵀ‖²     what the next layer sees
    diag_rel   = Σ_i a_i ‖(W − Q)[:, i]‖² / Σ_i a_i ‖W[:, i]‖²,  a_i = mean over tokens of x_i²
                                             output error if errors were uncorrelated across input channels
    amp = output_rel / weight_rel           > 1: the error lands where the activations are large
One JSON line per (model, quant) with means over tensors, per projection kind, and per tensor; a table is printed.
The activations come from the unquantized model only (each layer's inputs are exact), so this isolates the weight
error of one layer at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import ppl_wikitext as pw
from hlwq_jax.eval import perplexity
from hlwq_jax.nn import attention, mlp
from hlwq_jax.provenance import code_version
from hlwq_jax.quant.spec import parse_quant_name, quantize_leaf


@contextlib.contextmanager
def record_linear_inputs(store: dict):
    """Patch the `linear` used by nn.attention and nn.mlp to append x (as float64 [N, in]) to store[id(w)]."""
    originals = attention.linear, mlp.linear

    def spy(x, w, *args, **kwargs):
        store.setdefault(id(w), []).append(np.asarray(x, np.float64).reshape(-1, x.shape[-1]))
        return originals[0](x, w, *args, **kwargs)
    attention.linear = mlp.linear = spy
    try:
        yield
    finally:
        attention.linear, mlp.linear = originals


def capture(m, tokens: np.ndarray, n_tokens: int) -> dict[str, np.ndarray]:
    """{path: X [N, in]} for every block linear of model m on the first n_tokens test tokens."""
    windows = perplexity.make_windows("chunks", len(tokens), 512, 512, max(1, n_tokens // 512))
    bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
    inputs, _, _ = perplexity.make_batch(tokens, windows, bos, 512)
    params = jax.tree.map(jnp.asarray, m.params)
    names = {id(w): name for name, w in _linears(params)}
    store: dict[int, list] = {}
    with record_linear_inputs(store):
        h = m.family.embed({k: v for k, v in params.items() if k != "layers"}, jnp.asarray(inputs), m.cfg)
        for i, lp in enumerate(params["layers"]):
            h = m.family.block(lp, h, m.cfg, m.family.layer_kind(m.cfg, i))
    return {names[k]: np.concatenate(v) for k, v in store.items() if k in names}


def _linears(params):
    for kp, w in jax.tree_util.tree_leaves_with_path(params):
        name = pw._path(kp)
        if re.match(pw.LINEAR_RE, name):
            yield name, w


def errors(w: np.ndarray, q: np.ndarray, x: np.ndarray) -> dict:
    e = w - q
    a = np.mean(x * x, axis=0)                                            # [in]
    xw, xe = x @ w.T, x @ e.T
    return {"weight_rel": float(np.sum(e * e) / np.sum(w * w)),
            "output_rel": float(np.sum(xe * xe) / np.sum(xw * xw)),
            "diag_rel": float(np.sum(a * np.sum(e * e, 0)) / np.sum(a * np.sum(w * w, 0)))}


def run(model: str, quants: list[str], n_tokens: int) -> list[dict]:
    m = pw.load_model(model)
    xs = capture(m, pw.load_tokens(m, None), n_tokens)
    weights = {name: np.asarray(w, np.float64) for name, w in _linears(m.params)}
    out = []
    for quant in quants:
        spec = parse_quant_name(quant)
        if spec is None:
            raise ValueError(f"--quants: {quant!r} is not a quantizer")
        per = []
        for name, w in weights.items():
            q = np.asarray(quantize_leaf(jnp.asarray(w, jnp.float32), spec, name=name).dequantize(jnp.float32),
                           np.float64)
            per.append({"tensor": name, "kind": name.split(".")[-1], **errors(w, q, xs[name])})
        mean = {k: float(np.mean([p[k] for p in per])) for k in ("weight_rel", "output_rel", "diag_rel")}
        kinds = sorted({p["kind"] for p in per})
        by_kind = {k: {s: float(np.mean([p[s] for p in per if p["kind"] == k]))
                       for s in ("weight_rel", "output_rel", "diag_rel")} for k in kinds}
        out.append({"model": model, "quant": quant, "tokens": int(next(iter(xs.values())).shape[0]),
                    "tensors": len(per), **mean, "amp": mean["output_rel"] / mean["weight_rel"],
                    "by_kind": by_kind, "per_tensor": per})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quants", default="hlwq4,nf4,nvfp4,rtn4-g128")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    t0 = time.time()
    recs = run(a.model, a.quants.split(","), a.tokens)
    env = {"command": "python -m experiments.output_error " + " ".join(argv or __import__("sys").argv[1:]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jax_version": jax.__version__,
           "device": jax.devices()[0].device_kind, **code_version(), "seconds": round(time.time() - t0, 1)}
    if a.out:
        pw.append_jsonl(a.out, [{**env, **r} for r in recs])
    print(f"{'model':14s} {'quant':10s} {'weight_rel':>10s} {'output_rel':>10s} {'diag_rel':>9s} {'amp':>5s}")
    for r in recs:
        print(f"{r['model']:14s} {r['quant']:10s} {r['weight_rel']:10.5f} {r['output_rel']:10.5f} "
              f"{r['diag_rel']:9.5f} {r['amp']:5.2f}")
        for k, v in r["by_kind"].items():
            print(f"{'':14s}   {k:8s} {v['weight_rel']:10.5f} {v['output_rel']:10.5f} {v['diag_rel']:9.5f} "
                  f"{v['output_rel'] / v['weight_rel']:5.2f}")


if __name__ == "__main__":
    main()
