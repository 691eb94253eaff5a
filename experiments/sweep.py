"""Config-driven perplexity sweeps: `python -m experiments.sweep CONFIG.toml [--out FILE.jsonl]`.

A config (see configs/quality_table.toml) has `[base]` (RunConfig fields), `[grid]` (lists → cartesian product)
and `[[runs]]` (each entry: lists expand as a product; `quant` directly, or method/bits/block_size/codebook/rotation
that are turned into the canonical quantizer name). The run list is grid × runs, deduplicated, grouped per model
(each GGUF read once). Every result appends one JSON line to --out; for quantizers named in `tensor_stats_for`
the per-tensor statistics go to --stats-out. Pre-staged inputs (GPU box): --gguf MODEL=PATH, --tokenizer MODEL=PATH.
--models / --quants pick a subset; --resume FILE skips runs already recorded in FILE (to continue after a timeout).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import sys
import tomllib

import jax

from experiments import ppl_wikitext as ppl
from hlwq_jax.eval import perplexity
from hlwq_jax.quant.spec import QuantSpec, parse_quant_name

SPEC_KEYS = ("method", "bits", "block_size", "codebook", "rotation", "seed", "double_quant")
RUN_KEYS = {f.name for f in dataclasses.fields(ppl.RunConfig)}


def _product(entry: dict) -> list[dict]:
    keys = list(entry)
    vals = [v if isinstance(v, list) else [v] for v in entry.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*vals)]


def _resolve(point: dict, where: str) -> dict:
    """Turn method/bits/... keys into `quant`; reject unknown keys."""
    point = dict(point)
    spec_kw = {k: point.pop(k) for k in SPEC_KEYS if k in point}
    if spec_kw:
        if "quant" in point:
            raise ValueError(f"{where}: give either quant or {sorted(spec_kw)}, not both")
        point["quant"] = QuantSpec(**spec_kw).name
    unknown = set(point) - RUN_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (RunConfig fields or {SPEC_KEYS})")
    if "quant" in point:
        spec = parse_quant_name(point["quant"])
        if spec is None and point["quant"].strip().lower() not in ppl.FLOAT_FORMATS:
            raise ValueError(f"{where}: unquantized format {point['quant']!r} not in {sorted(ppl.FLOAT_FORMATS)}")
        point["quant"] = point["quant"].strip().lower() if spec is None else spec.name
    return point


def expand(config: dict, overrides: dict | None = None) -> list[ppl.RunConfig]:
    """All RunConfigs of a sweep config (base + grid × runs + overrides), in order, without duplicates."""
    extra = set(config) - {"base", "grid", "runs", "tensor_stats_for"}
    if extra:
        raise ValueError(f"sweep config: unknown top-level keys {sorted(extra)}")
    base = _resolve(config.get("base", {}), "[base]")
    grid = [_resolve(g, "[grid]") for g in _product(config.get("grid", {}))]
    runs = [_resolve(r, f"[[runs]] #{i}") for i, e in enumerate(config.get("runs", [{}])) for r in _product(e)]
    out, seen = [], set()
    for g, r in itertools.product(grid, runs):
        cfg = ppl.RunConfig(**{**base, **g, **r, **(overrides or {})})
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def load_config(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} not found")
    with open(path, "rb") as f:
        return tomllib.load(f)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for s in items or []:
        if "=" not in s:
            raise ValueError(f"{flag} expects MODEL=PATH, got {s!r}")
        k, v = s.split("=", 1)
        out[k] = v
    return out


def _key(cfg: dict) -> tuple:
    return tuple(cfg.get(k) for k in ("model", "quant", "protocol", "window", "stride", "max_windows", "bos"))


def done_keys(path) -> set[tuple]:
    """Keys (model, quant, protocol, window, stride, max_windows, bos) of the non-smoke lines of a results file."""
    path = pathlib.Path(path)
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if not r.get("smoke") and "config" in r:
                out.add(_key(r["config"]))
    return out


def main(argv=None) -> list[dict]:
    jax.config.update("jax_default_matmul_precision", "highest")
    from tqdm import tqdm
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--out", default=str(ppl.REPO / "results" / "sweep.jsonl"))
    p.add_argument("--stats-out", default=None, help="per-tensor stats jsonl (default: <out stem>_tensor_stats.jsonl)")
    p.add_argument("--models", default=None, help="comma-separated subset of the config's models")
    p.add_argument("--quants", default=None, help="comma-separated subset of the config's quantizer names")
    p.add_argument("--resume", default=None, help="results jsonl: skip runs that already have a line there")
    p.add_argument("--gguf", action="append", help="MODEL=PATH of a pre-staged GGUF file")
    p.add_argument("--tokenizer", action="append", help="MODEL=PATH of a pre-staged tokenizer.json")
    p.add_argument("--data", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-windows", type=int, default=None, help="override (quick checks)")
    a = p.parse_args(argv)
    config = load_config(a.config)
    overrides = {k: v for k, v in dict(data=a.data, batch_size=a.batch_size, max_windows=a.max_windows).items()
                 if v is not None}
    runs = expand(config, overrides)
    if a.models:
        keep = set(a.models.split(","))
        runs = [r for r in runs if r.model in keep]
    if a.quants:
        keep = set(a.quants.split(","))
        runs = [r for r in runs if r.quant in keep]
    if a.resume:
        done = done_keys(a.resume)
        runs = [r for r in runs if _key(dataclasses.asdict(r)) not in done]
    ggufs, toks = _pairs(a.gguf, "--gguf"), _pairs(a.tokenizer, "--tokenizer")
    runs = [dataclasses.replace(r, gguf=ggufs.get(r.model, r.gguf), tokenizer=toks.get(r.model, r.tokenizer))
            for r in runs]
    stats_for = set(config.get("tensor_stats_for", []))
    stats_out = a.stats_out or str(pathlib.Path(a.out).with_name(pathlib.Path(a.out).stem + "_tensor_stats.jsonl"))
    records = []
    models = list(dict.fromkeys(r.model for r in runs))
    for model in models:
        mine = [r for r in runs if r.model == model]
        print(f"loading {model} ...", file=sys.stderr, flush=True)
        m = ppl.load_model(model, mine[0].gguf, mine[0].tokenizer)
        n_tok = len(ppl.load_tokens(m, mine[0].data))
        total = sum(len(perplexity.make_windows(r.protocol, n_tok, r.window, r.stride, r.max_windows)) for r in mine)
        with tqdm(total=total, unit="win", desc=model) as bar:
            for r in mine:
                bar.set_postfix_str(r.quant)
                rec = ppl.run_one(r, progress=bar.update, with_tensor_stats=r.quant in stats_for)
                rec["sweep"] = str(a.config)
                tstats = rec.pop("tensor_stats", None)
                ppl.append_jsonl(a.out, [rec])
                if tstats:
                    ppl.append_jsonl(stats_out, [{"model": model, "quant": r.quant, "git_sha": rec["git_sha"], **s}
                                                 for s in tstats])
                records.append(rec)
        ppl.load_model.cache_clear()
        ppl.load_tokens.cache_clear()
    print(ppl.format_table(records))
    print(f"({ppl.UNQUANTIZED_NOTE}; appended {len(records)} lines to {a.out})")
    return records


if __name__ == "__main__":
    main()
