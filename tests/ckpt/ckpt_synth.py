"""Synthetic Hugging Face-style checkpoints for the conversion tests (bf16 weights, mixed dtypes, 2 shards)."""
import json
import pathlib

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

BF16 = ml_dtypes.bfloat16


def make_checkpoint(root, rng, shapes=None, n_shards=2) -> dict:
    """Write ``shapes`` ({name: shape}, bf16 unless the name ends in '.A_log', stored fp32) over ``n_shards`` files
    with an index, a config.json and a tokenizer file. Returns {name: np.ndarray as stored}."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shapes = shapes or {
        "model.embed_tokens.weight": (64, 96),
        "model.layers.0.q_proj.weight": (48, 96),
        "model.layers.0.o_proj.weight": (96, 200),
        "model.layers.0.experts.weight": (3, 40, 96),
        "model.layers.0.norm.weight": (96,),
        "model.layers.0.A_log": (8,),
        "model.layers.1.q_proj.weight": (48, 96),
        "lm_head.weight": (64, 96),
    }
    tensors = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32) * 0.05
        tensors[name] = x if name.endswith("A_log") else x.astype(BF16)
    names = list(tensors)
    per = -(-len(names) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(root / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 96}))
    (root / "tokenizer.json").write_text("{}")
    return tensors


def select_proj(bits=5, block_size=64, codebook="converged", rotation="hadamard", seed=0):
    """Quantize every ≥ 2-D '*proj.weight' / 'experts.weight' tensor: a recipe for tests."""
    def select(name, shape):
        if name.endswith("proj.weight") or name.endswith("experts.weight"):
            return {"bits": bits, "block_size": block_size, "codebook": codebook, "rotation": rotation, "seed": seed}
        return None
    return select
