"""Hugging Face oracle for Nemotron-H: writes tiny random NemotronHForCausalLM checkpoints + reference logits.

Run with the .venv-hf interpreter (CPU torch + transformers 5.17.0), never imported by JAX tests:
    .venv-hf/bin/python tests/oracles/nemotron_h_oracle.py --out tests/fixtures/nemotron_h [--configs a,b]
For each config NAME it writes NAME/config.json, NAME/*.safetensors (+ index when sharded) via save_pretrained, and
NAME/reference.npz with tokens int32 [B, T] and logits float32 [B, T, V] from the pure-torch path (eager attention,
torch Mamba scan, float32). Weights are re-drawn at unit scale (HF's 0.02 init would make logits nearly constant).
The logits come from the checkpoint as re-loaded by from_pretrained (and are checked against the in-memory model, a
guard against transformers re-initialising weights on load). Deterministic: fixed seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402

BASE = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            ssm_state_size=8, mamba_head_dim=8, conv_kernel=4, n_routed_experts=8, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=24, intermediate_size=40, layer_norm_epsilon=1e-5,
            time_step_limit=(0.0, float("inf")), time_step_min=1e-3, tie_word_embeddings=False)

CONFIGS = {
    # n_groups < heads, all four block types, 3 experts per token, seq 21 over chunk 8 (not a multiple); some heads
    # get dt below time_step_min so HF's torch-path clamp is active.
    "all_blocks": dict(hybrid_override_pattern="M*EM-E", mamba_num_heads=8, n_groups=2, chunk_size=8,
                       num_experts_per_tok=3, routed_scaling_factor=2.5, seq=21, batch=2, small_dt_heads=3),
    # several chunks (chunk 4, seq 19), one B/C group for all heads, list-style layers_block_type, sharded files.
    "chunks_sharded": dict(layers_block_type=["mamba", "mamba", "moe", "mamba", "attention", "moe"],
                           mamba_num_heads=4, n_groups=1, chunk_size=4, num_experts_per_tok=2,
                           routed_scaling_factor=1.0, seq=19, batch=1, shard="40KB", small_dt_heads=0),
    # group-limited routing (n_group 2, topk_group 1), 4 experts per token, heads == groups, tied nothing.
    "group_routing": dict(hybrid_override_pattern="EM*-ME", mamba_num_heads=4, n_groups=4, chunk_size=16,
                          num_experts_per_tok=4, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                          norm_topk_prob=True, seq=37, batch=2, small_dt_heads=1),
}


def _randomise(model: NemotronHForCausalLM, gen: torch.Generator, small_dt_heads: int) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1))
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.rand(p.shape, generator=gen) * (np.log(0.1) - np.log(1e-3)) + np.log(1e-3))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
                p[:small_dt_heads] = -9.0            # softplus ~ 1.2e-4 < time_step_min
            elif name.endswith(".D"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def build(name: str, out: pathlib.Path) -> None:
    spec = dict(CONFIGS[name])
    seq, batch, shard, small = spec.pop("seq"), spec.pop("batch"), spec.pop("shard", None), spec.pop("small_dt_heads")
    cfg = NemotronHConfig(**{**BASE, **spec})
    cfg._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    model = NemotronHForCausalLM(cfg).float().eval()
    _randomise(model, gen, small)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = pathlib.Path(tmp) / name
        kw = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(tmp, **kw)
        reloaded = NemotronHForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            ref = reloaded(tokens).logits.float().numpy()
            mem = model(tokens).logits.float().numpy()
        if not np.allclose(ref, mem, rtol=0, atol=0):
            raise RuntimeError(f"{name}: logits of the reloaded checkpoint differ from the in-memory model "
                               f"(max {np.abs(ref - mem).max():.3g}): transformers re-initialised weights on load")
        np.savez(tmp / "reference.npz", tokens=tokens.numpy().astype(np.int32), logits=ref.astype(np.float32))
        (tmp / "generation_config.json").unlink(missing_ok=True)
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    print(f"{name}: {sorted(p.name for p in final.iterdir())} logits {ref.shape} |logits| {np.abs(ref).mean():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; known {sorted(CONFIGS)}")
        build(name, out)
    print(json.dumps({"transformers": __import__("transformers").__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
