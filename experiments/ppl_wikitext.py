"""WikiText-2 test perplexity of real GGUF models (SmolLM2-135M, Gemma-3-270M) under weight quantizers.

    python -m experiments.ppl_wikitext                          # SmolLM2-135M, full test split, DEFAULT_QUANTS
    python -m experiments.ppl_wikitext --model gemma3-270m --quant bf16,hlwq5,hlwq4 --max-windows 4
    python -m experiments.ppl_wikitext --smoke                  # < 2 min on 2 CPU cores
    python -m experiments.ppl_wikitext --gguf M.gguf --tokenizer tok.json   # pre-staged inputs (GPU box)

What is quantized: every linear weight inside the blocks (attention q/k/v/o, MLP gate/up/down). Token embeddings
(= the tied LM head), norms and biases stay unquantized (float32). "bf16" rounds those same block weights to bf16
("fp32" keeps them as dequantized from the GGUF, "fp16" rounds them to fp16).
Compute: activations in float32 with "highest" matmul precision (no TF32), logits and log-softmax in float32.
Caveat: the "BF16 baseline" is a 4-bit GGUF model dequantized (SmolLM2: Q4_1; Gemma-3: Q4_K_M mix), so methods
whose grid contains the original 4-bit grid (asymmetric 4-bit with 32-blocks, say) are favoured.
Expected (CPU, first 4 chunks of 512): SmolLM2 BF16 30.2, Gemma-3-270M BF16 (BOS) 22.7. Full split: ~600 windows.
Each result is one JSON line appended atomically to --out (default results/ppl_wikitext.jsonl).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.ckpt import gguf_io
from hlwq_jax.eval import data as eval_data
from hlwq_jax.eval import perplexity
from hlwq_jax.models import gemma3, llama
from hlwq_jax.provenance import code_version
from hlwq_jax.quant.recipe import Recipe, path_str, quantize_params, summarize
from hlwq_jax.quant.spec import parse_quant_name
from hlwq_jax.text import load_tokenizer

REPO = eval_data.REPO_ROOT
DEFAULT_OUT = REPO / "results" / "ppl_wikitext.jsonl"
DEFAULT_QUANTS = "bf16,hlwq5,hlwq4,rtn4-g128,nf4,nvfp4"
SMOKE = dict(model="smollm2-135m", quants="bf16,hlwq4", window=256, max_windows=2)
LINEAR_RE = r"^layers\.\d+\.(attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
UNQUANTIZED_NOTE = "block linears quantized; embeddings/tied head, norms, biases unquantized (float32)"
FAMILIES = {"llama": llama, "qwen2": llama, "gemma3": gemma3}
FLOAT_FORMATS = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One perplexity evaluation (the resolved config stored with every result line)."""
    model: str = "smollm2-135m"
    quant: str = "bf16"
    protocol: str = "chunks"
    window: int = 512
    stride: int = 512
    max_windows: int | None = None
    batch_size: int | None = None      # None: 8192 tokens per batch on GPU, 512 on CPU
    bos: bool | None = None            # None: the tokenizer's add_bos (Gemma True, SmolLM2 False)
    data: str | None = None
    gguf: str | None = None
    tokenizer: str | None = None


@dataclasses.dataclass(eq=False)
class LoadedModel:
    name: str
    family: object
    cfg: object
    params: dict                       # float32 numpy
    tokenizer: object
    gguf_path: pathlib.Path
    gguf_sha256: str


@functools.lru_cache(maxsize=2)
def load_model(model: str, gguf: str | None = None, tokenizer: str | None = None) -> LoadedModel:
    """Read the GGUF (given path or the installed package's file) and its tokenizer (given json or rebuilt)."""
    path = pathlib.Path(gguf) if gguf else gguf_io.locate_model_file(model)
    contents = gguf_io.read_gguf(path)
    family = FAMILIES.get(contents.architecture)
    if family is None:
        raise ValueError(f"{path}: architecture {contents.architecture!r} not supported ({sorted(FAMILIES)})")
    cfg, params = family.params_from_gguf(contents)
    tok = load_tokenizer(path, tokenizer_json=tokenizer, metadata=contents.metadata)
    return LoadedModel(model, family, cfg, params, tok, path, eval_data.sha256_file(path))


@functools.lru_cache(maxsize=4)
def load_tokens(model: LoadedModel, data: str | None) -> np.ndarray:
    return np.asarray(model.tokenizer.encode(eval_data.load_wikitext(data)), np.int32)


def quantize_model(params: dict, quant: str):
    """(params with block linears quantized as `quant`, summary dict, per-tensor stats)."""
    spec = parse_quant_name(quant)
    if spec is None:                                   # unquantized: block linears rounded to a float format
        dtype = FLOAT_FORMATS.get(quant.strip().lower())
        if dtype is None:
            raise ValueError(f"quantizer name {quant!r}: unquantized formats are {sorted(FLOAT_FORMATS)}")
        cast = lambda path, w: w.astype(dtype) if _is_linear(path) else w
        q = jax.tree_util.tree_map_with_path(lambda kp, w: cast(_path(kp), jnp.asarray(w)), params)
        lin = [w for kp, w in jax.tree_util.tree_leaves_with_path(params) if _is_linear(_path(kp))]
        bits = 8.0 * jnp.dtype(dtype).itemsize
        return q, {"tensors": len(lin), "weights": float(sum(w.size for w in lin)), "bits_per_weight": bits}, {}
    recipe = Recipe(rules=((LINEAR_RE, spec),), otherwise=None)
    q, stats = quantize_params(jax.tree.map(jnp.asarray, params), recipe)
    if len(stats) != 7 * len(params["layers"]):
        raise ValueError(f"quantize_model: {len(stats)} tensors quantized, expected 7 per layer")
    return q, summarize(stats), stats


def _path(kp) -> str:
    return path_str(kp)


def _is_linear(path: str) -> bool:
    return re.match(LINEAR_RE, path) is not None


def append_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Append lines atomically: write old content + new lines to a temp file, then os.replace."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(old + b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records))
    os.replace(tmp, path)


def _default_batch(window: int) -> int:
    on_gpu = jax.devices()[0].platform != "cpu"
    return max(1, (8192 if on_gpu else 512) // window)


def make_nll_fn(family, cfg, params: dict):
    """(inputs, targets, mask) -> (nll_sum, count) for a model family's forward, with embed / one block per layer
    kind / head+NLL each jitted once (layers of a kind share a compile; logits never leave the device)."""
    emb = jax.jit(family.embed, static_argnums=2)
    blk = jax.jit(family.block, static_argnums=(2, 3))
    head = jax.jit(lambda p, h, t, k: perplexity.token_nll(family.logits(p, h, cfg), t, k))
    top = {k: v for k, v in params.items() if k != "layers"}
    kinds = [family.layer_kind(cfg, i) for i in range(len(params["layers"]))]

    def nll(inputs, targets, mask):
        h = emb(top, inputs, cfg)
        for lp, kind in zip(params["layers"], kinds):
            h = blk(lp, h, cfg, kind)
        return head(top, h, targets, mask)
    return nll


def run_one(cfg: RunConfig, progress=None, with_tensor_stats: bool = False) -> dict:
    """Evaluate one (model, quant, protocol) configuration; returns the result record."""
    t0 = time.time()
    m = load_model(cfg.model, cfg.gguf, cfg.tokenizer)
    tokens = load_tokens(m, cfg.data)
    bos = m.tokenizer.add_bos if cfg.bos is None else cfg.bos
    if bos and m.tokenizer.bos_id is None:
        raise ValueError(f"model {cfg.model}: BOS requested but the tokenizer has no bos_id")
    windows = perplexity.make_windows(cfg.protocol, len(tokens), cfg.window, cfg.stride, cfg.max_windows)
    qparams, summary, stats = quantize_model(m.params, cfg.quant)
    t_quant = time.time() - t0
    batch = cfg.batch_size or _default_batch(cfg.window)
    res = perplexity.evaluate(make_nll_fn(m.family, m.cfg, qparams), tokens, windows,
                              m.tokenizer.bos_id if bos else None, batch, progress)
    rec = {"model": cfg.model, "quant": cfg.quant, "protocol": cfg.protocol, "window": cfg.window,
           "stride": cfg.stride if cfg.protocol == "sliding" else None, "windows": res.windows,
           "tokens": res.tokens, "ppl": res.ppl, "nll_sum": res.nll_sum, "bos": bool(bos),
           "bits_per_weight": summary.get("bits_per_weight"), "quantized_tensors": summary.get("tensors"),
           "rel_mse_mean": summary.get("rel_mse_mean"),
           "frac_within_10pct_lloyd_max": summary.get("frac_within_10pct_lloyd_max"),
           "quantized": UNQUANTIZED_NOTE, "compute_dtype": "float32", "batch_size": batch,
           "config": dataclasses.asdict(cfg), "gguf": m.gguf_path.name, "gguf_sha256": m.gguf_sha256,
           "tokenizer": m.tokenizer.source, "test_tokens": int(len(tokens)), **code_version(),
           "jax_version": jax.__version__, "device": str(jax.devices()[0].device_kind),
           "platform": jax.devices()[0].platform, "quant_seconds": round(t_quant, 2),
           "seconds": round(time.time() - t0, 2), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if with_tensor_stats:
        rec["tensor_stats"] = [s.as_dict() for s in stats.values()]
    return rec


def format_table(records: list[dict]) -> str:
    """Plain-text table with ΔPPL against the bf16 row of the same model/protocol/window."""
    base = {(r["model"], r["protocol"], r["window"], r["windows"]): r["ppl"] for r in records if r["quant"] == "bf16"}
    lines = [f"{'model':<14} {'quant':<18} {'protocol':<8} {'win':>5} {'windows':>7} {'tokens':>8} "
             f"{'bits/w':>7} {'PPL':>9} {'dPPL%':>7}"]
    for r in records:
        b = base.get((r["model"], r["protocol"], r["window"], r["windows"]))
        d = f"{100 * (r['ppl'] / b - 1):+.2f}" if b else "-"
        bpw = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] is not None else "-"
        lines.append(f"{r['model']:<14} {r['quant']:<18} {r['protocol']:<8} {r['window']:>5} {r['windows']:>7} "
                     f"{r['tokens']:>8} {bpw:>7} {r['ppl']:>9.4f} {d:>7}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.ppl_wikitext", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help=f"one of {sorted(gguf_io.MODEL_PACKAGES)}")
    p.add_argument("--quant", default=DEFAULT_QUANTS, help="comma-separated quantizer names (hlwq_jax.quant.spec)")
    p.add_argument("--window", type=int, default=None, help="window length L (default 512; 2048 for sliding)")
    p.add_argument("--stride", type=int, default=512, help="sliding protocol stride (scores the last STRIDE)")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--protocol", choices=perplexity.PROTOCOLS, default="chunks")
    p.add_argument("--data", default=None, help="wiki.test.raw path (default ../shared/data/wikitext-2-raw/)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--bos", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--gguf", default=None, help="GGUF file to use instead of the installed package's")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (from experiments.stage_inputs) to load")
    p.add_argument("--smoke", action="store_true", help=f"tiny run: {SMOKE}")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    jax.config.update("jax_default_matmul_precision", "highest")
    from tqdm import tqdm
    a = parse_args(argv)
    model, quants, max_windows = a.model, a.quant, a.max_windows
    window = a.window or (2048 if a.protocol == "sliding" else 512)
    if a.smoke:
        model, quants, window, max_windows = SMOKE["model"], SMOKE["quants"], SMOKE["window"], SMOKE["max_windows"]
    names = [q.strip() for q in quants.split(",") if q.strip()]
    for q in names:                                           # fail before any work on a bad name
        if parse_quant_name(q) is None and q.lower() not in FLOAT_FORMATS:
            raise ValueError(f"quantizer name {q!r}: unquantized formats are {sorted(FLOAT_FORMATS)}")
    bos = {"auto": None, "yes": True, "no": False}[a.bos]
    cfgs = [RunConfig(model=model, quant=q, protocol=a.protocol, window=window, stride=a.stride,
                      max_windows=max_windows, batch_size=a.batch_size, bos=bos, data=a.data, gguf=a.gguf,
                      tokenizer=a.tokenizer) for q in names]
    eval_data.load_wikitext(a.data)                           # clear error on a missing/altered file, before loading
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    m = load_model(model, a.gguf, a.tokenizer)
    n_win = len(perplexity.make_windows(a.protocol, len(load_tokens(m, a.data)), window, a.stride, max_windows))
    records = []
    with tqdm(total=n_win * len(cfgs), unit="win", desc=model) as bar:
        for c in cfgs:
            bar.set_postfix_str(c.quant)
            rec = run_one(c, progress=bar.update)
            rec["smoke"] = bool(a.smoke)
            append_jsonl(a.out, [rec])
            records.append(rec)
    print(format_table(records))
    print(f"({UNQUANTIZED_NOTE}; protocol {a.protocol}, BOS {'prepended' if records[0]['bos'] else 'not prepended'}; "
          f"appended {len(records)} lines to {a.out})")
    return records


if __name__ == "__main__":
    main()
