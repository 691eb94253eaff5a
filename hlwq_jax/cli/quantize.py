"""``hlwq-quantize SRC DST``: stream a Hugging Face safetensors checkpoint into HLWQ (or CompressedTensors INT4).

    python -m hlwq_jax.cli.quantize SRC DST --bits 5 --recipe nemotron-h
    python -m hlwq_jax.cli.quantize SRC DST --bits 5 --export compressed-tensors     # HLWQ Q5, then INT4 g128

In row chunks (small tensors of one shape share a chunk; host memory ≈ a few chunks + constants), with a progress
bar. Shards are written atomically; re-running the same command after an interruption resumes (finished shards are
kept) and yields files identical to an uninterrupted run; ``hlwq_manifest.json`` appears last and marks the output
complete.
Recipes: ``nemotron-h`` (alias ``mamba-aware``) — the Mamba-aware selection of docs/hlwq.md §3 (attention, Mamba
in/out_proj and experts quantized; norms, conv1d, A_log, D, dt_bias, biases, routers, embeddings kept;
lm_head kept unless ``--lm-head-bits``); ``all`` — every tensor with ≥ 2 dims and ≥ 256 elements.
"""
from __future__ import annotations

import argparse
import sys

from hlwq_jax.cli.convert import EXPORTS, ConvertOptions, convert_checkpoint, limit_heap_growth
from hlwq_jax.quant.hlwq import CODEBOOKS
from hlwq_jax.quant.array import ROTATIONS
from hlwq_jax.quant.recipe import Recipe
from hlwq_jax.quant.spec import QuantSpec

RECIPES = ("nemotron-h", "mamba-aware", "all")


def make_recipe(name: str, spec: QuantSpec, lm_head_bits: int | None) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {RECIPES}")
    if name == "all":
        return Recipe(rules=(), otherwise=spec)
    lm = None if lm_head_bits is None else QuantSpec(bits=lm_head_bits, block_size=spec.block_size,
                                                      codebook=spec.codebook, rotation=spec.rotation, seed=spec.seed)
    return Recipe.mamba_aware(spec, lm_head=lm)


def make_select(recipe: Recipe, source: str = "hlwq"):
    """Recipe → ``ConvertOptions.select``: (name, shape) → {bits, block_size, codebook, rotation, seed} | None."""
    def select(name: str, shape) -> dict | None:
        spec = recipe.spec_for(name, tuple(shape))
        if spec is None:
            return None
        if spec.method != "hlwq":
            raise ValueError(f"tensor {name!r}: the recipe asks for {spec.name}; checkpoints store HLWQ tensors only")
        return {"bits": spec.bits, "block_size": spec.block_size, "codebook": spec.codebook,
                "rotation": spec.rotation, "seed": spec.seed, "source": source}
    return select


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hlwq-quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="Hugging Face checkpoint directory (*.safetensors [+ index], config.json)")
    p.add_argument("dst", help="output directory (created; an interrupted run in it is resumed)")
    p.add_argument("--bits", type=int, default=5, help="HLWQ bits per code, 2..8 (default 5)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--codebook", default="converged", choices=list(CODEBOOKS))
    p.add_argument("--rotation", default="hadamard", choices=list(ROTATIONS))
    p.add_argument("--seed", type=int, default=0, help="sign seed for --rotation random-hadamard")
    p.add_argument("--recipe", default="nemotron-h", choices=list(RECIPES))
    p.add_argument("--lm-head-bits", type=int, default=None, help="also quantize lm_head at these bits")
    p.add_argument("--export", default="hlwq", choices=list(EXPORTS))
    p.add_argument("--ct-source", default="hlwq", choices=("hlwq", "weights"),
                   help="compressed-tensors: INT4 of the HLWQ-dequantized weight (default) or of the source weight")
    p.add_argument("--ct-group-size", type=int, default=128)
    p.add_argument("--shard-gb", type=float, default=2.0, help="output shard size (GiB)")
    p.add_argument("--chunk-mb", type=float, default=16.0, help="rows processed at once (MiB of float32)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    limit_heap_growth()
    try:
        spec = QuantSpec(bits=a.bits, block_size=a.block_size, codebook=a.codebook, rotation=a.rotation, seed=a.seed)
        recipe = make_recipe(a.recipe, spec, a.lm_head_bits)
        opts = ConvertOptions(select=make_select(recipe, a.ct_source), recipe=f"{a.recipe}:{spec.name}",
                              export=a.export, shard_bytes=int(a.shard_gb * (1 << 30)),
                              chunk_bytes=int(a.chunk_mb * (1 << 20)), ct_group_size=a.ct_group_size)
        stats = convert_checkpoint(a.src, a.dst, opts, progress=not a.no_progress)
    except ValueError as e:
        print(f"hlwq-quantize: error: {e}", file=sys.stderr)
        return 2
    gb = stats["input_bytes"] / 1e9
    print(f"hlwq-quantize: {a.dst} complete ({gb:.3f} GB converted in {stats['seconds']:.1f} s, "
          f"{stats['skipped_shards']} shard(s) resumed)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
