"""Hugging Face oracle for the dense GGUF families (llama / qwen2 / gemma3 text): logits of a given weight set.

Run with the .venv-hf interpreter (CPU torch + transformers), never imported by JAX tests:
    .venv-hf/bin/python tests/oracles/dense_lm_oracle.py IN.npz OUT.npz
IN.npz holds `config` (a JSON string: family + sizes), `ids` int [B, T] and every weight under its HF state-dict
name. OUT.npz gets `logits` float32 [B, T, V] from the eager float32 torch path.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402


def build(cfg: dict):
    fam = cfg.pop("family")
    common = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                  num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                  num_key_value_heads=cfg["n_kv_heads"], head_dim=cfg["head_dim"], rms_norm_eps=cfg["eps"],
                  tie_word_embeddings=cfg.get("tie", True), attn_implementation="eager")
    if fam == "llama":
        c = transformers.LlamaConfig(**common, rope_theta=cfg["rope_theta"], attention_bias=False)
        return transformers.LlamaForCausalLM(c)
    if fam == "qwen2":
        c = transformers.Qwen2Config(**common, rope_theta=cfg["rope_theta"], use_sliding_window=False)
        return transformers.Qwen2ForCausalLM(c)
    if fam == "gemma3":
        c = transformers.Gemma3TextConfig(
            **common, rope_theta=cfg["rope_theta_global"], rope_local_base_freq=cfg["rope_theta_local"],
            sliding_window=cfg["sliding_window"], layer_types=cfg["layer_types"],
            query_pre_attn_scalar=int(cfg["query_pre_attn_scalar"]), hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=None, attn_logit_softcapping=None)
        return transformers.Gemma3ForCausalLM(c)
    raise ValueError(f"unknown family {fam!r}")


def main(src: str, dst: str) -> None:
    z = np.load(src)
    cfg = json.loads(str(z["config"]))
    model = build(cfg).float().eval()
    state = {k: torch.from_numpy(np.asarray(z[k], np.float32)) for k in z.files if k not in ("config", "ids")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") and "rotary" not in m]
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(z["ids"], np.int64))).logits
    np.savez(dst, logits=out.float().numpy())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
