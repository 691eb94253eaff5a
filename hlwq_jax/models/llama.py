"""Llama-family decoder (SmolLM2; Qwen2 with q/k/v biases) built from the library's GQA attention and SwiGLU MLP.

Public signatures:
  LlamaConfig(vocab_size, hidden, n_layers, n_heads, n_kv_heads, head_dim, intermediate, rope_theta, eps,
              tie_embeddings=True, qkv_bias=False)      frozen; .attention -> AttentionConfig
  LlamaConfig.from_gguf(metadata)                       from GGUF key/values (arch "llama" or "qwen2")
  param_shapes(cfg) -> nested dict of shapes            the exact tree `forward` expects
  params_from_gguf(contents) -> (cfg, params)           float32 numpy tree; llama Q/K rows un-permuted
  forward(params, ids, cfg) -> logits                   ids int [B, T] -> float32 [B, T, V]
      = logits(params, block(layers[i], ... block(layers[0], embed(params, ids, cfg), cfg, kind) ...), cfg);
      layer_kind(cfg, i) names the layers that share one compiled block (experiments jit block once per kind)
  forward_reference(params, ids, cfg) -> np.ndarray     float64 numpy, same definition

Params: {"embed_tokens" [V, D], "layers": [{"attn_norm" [D], "attn": {q_proj, k_proj, v_proj, o_proj (+ q/k/v_bias)},
"mlp_norm" [D], "mlp": {gate_proj, up_proj, down_proj}}, ...], "final_norm" [D], ("lm_head" [V, D] if untied)}.
Block: h += attn(rms(h)); h += mlp(rms(h)); logits = rms(h) @ E.T (fp32). Linear leaves may be quantized.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.ckpt import gguf_io
from hlwq_jax.nn.attention import AttentionConfig, attention, attention_param_shapes, attention_reference
from hlwq_jax.nn.mlp import mlp, mlp_reference
from hlwq_jax.nn.norms import rms_norm, rms_norm_reference

ARCHS = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    rope_theta: float
    eps: float
    tie_embeddings: bool = True
    qkv_bias: bool = False

    @property
    def attention(self) -> AttentionConfig:
        return AttentionConfig(self.n_heads, self.n_kv_heads, self.head_dim, rope_theta=self.rope_theta,
                               qkv_bias=self.qkv_bias)

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names=()) -> "LlamaConfig":
        arch = meta.get("general.architecture")
        if arch not in ARCHS:
            raise ValueError(f"LlamaConfig: GGUF general.architecture {arch!r} not in {ARCHS}")

        def get(key):
            if f"{arch}.{key}" not in meta:
                raise ValueError(f"LlamaConfig: GGUF field {arch}.{key} missing")
            return meta[f"{arch}.{key}"]
        hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        vocab = int(meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))))
        return cls(vocab_size=vocab, hidden=hidden, n_layers=int(get("block_count")), n_heads=n_heads,
                   n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
                   head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // n_heads)),
                   intermediate=int(get("feed_forward_length")),
                   rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                   eps=float(get("attention.layer_norm_rms_epsilon")),
                   tie_embeddings="output.weight" not in tensor_names, qkv_bias=arch == "qwen2")


def param_shapes(cfg: LlamaConfig) -> dict:
    layer = {"attn_norm": (cfg.hidden,), "attn": attention_param_shapes(cfg.attention, cfg.hidden),
             "mlp_norm": (cfg.hidden,),
             "mlp": {"gate_proj": (cfg.intermediate, cfg.hidden), "up_proj": (cfg.intermediate, cfg.hidden),
                     "down_proj": (cfg.hidden, cfg.intermediate)}}
    tree = {"embed_tokens": (cfg.vocab_size, cfg.hidden), "layers": [layer] * cfg.n_layers,
            "final_norm": (cfg.hidden,)}
    if not cfg.tie_embeddings:
        tree["lm_head"] = (cfg.vocab_size, cfg.hidden)
    return tree


def gguf_rules(cfg: LlamaConfig, permuted: bool) -> list[gguf_io.KeyRule]:
    """Key map GGUF → params. permuted: undo llama.cpp's Q/K row permutation (arch "llama")."""
    uq = (lambda w: gguf_io.unpermute_qk(w, cfg.n_heads)) if permuted else None
    uk = (lambda w: gguf_io.unpermute_qk(w, cfg.n_kv_heads)) if permuted else None
    b = r"blk\.(\d+)\."
    return [gguf_io.KeyRule(r"token_embd\.weight", "embed_tokens"),
            gguf_io.KeyRule(r"output_norm\.weight", "final_norm"),
            gguf_io.KeyRule(r"output\.weight", "lm_head"),
            gguf_io.KeyRule(b + r"attn_norm\.weight", "layers.{i}.attn_norm"),
            gguf_io.KeyRule(b + r"ffn_norm\.weight", "layers.{i}.mlp_norm"),
            gguf_io.KeyRule(b + r"attn_q\.weight", "layers.{i}.attn.q_proj", uq),
            gguf_io.KeyRule(b + r"attn_k\.weight", "layers.{i}.attn.k_proj", uk),
            gguf_io.KeyRule(b + r"attn_v\.weight", "layers.{i}.attn.v_proj"),
            gguf_io.KeyRule(b + r"attn_output\.weight", "layers.{i}.attn.o_proj"),
            gguf_io.KeyRule(b + r"attn_q\.bias", "layers.{i}.attn.q_bias", uq),
            gguf_io.KeyRule(b + r"attn_k\.bias", "layers.{i}.attn.k_bias", uk),
            gguf_io.KeyRule(b + r"attn_v\.bias", "layers.{i}.attn.v_bias"),
            gguf_io.KeyRule(b + r"ffn_gate\.weight", "layers.{i}.mlp.gate_proj"),
            gguf_io.KeyRule(b + r"ffn_up\.weight", "layers.{i}.mlp.up_proj"),
            gguf_io.KeyRule(b + r"ffn_down\.weight", "layers.{i}.mlp.down_proj")]


def check_shapes(params: dict, want: dict, label: str) -> None:
    """ValueError naming the first leaf whose path or shape differs from the expected tree."""
    got, exp = gguf_io.tree_shapes(params), gguf_io.tree_shapes(
        jax.tree.map(lambda s: np.empty(s, np.int8), want, is_leaf=lambda s: isinstance(s, tuple)))
    if set(got) != set(exp):
        raise ValueError(f"{label}: params missing {sorted(set(exp) - set(got))[:5]}, "
                         f"unexpected {sorted(set(got) - set(exp))[:5]}")
    for k, s in exp.items():
        if got[k] != s:
            raise ValueError(f"{label}: {k} has shape {got[k]}, expected {s}")


def params_from_gguf(contents: gguf_io.GGUFContents) -> tuple[LlamaConfig, dict]:
    """(config, float32 numpy params) from a read GGUF file of arch llama/qwen2."""
    cfg = LlamaConfig.from_gguf(contents.metadata, tuple(contents.tensors))
    params = gguf_io.map_tensors(contents.tensors, gguf_rules(cfg, permuted=contents.architecture == "llama"),
                                 cfg.n_layers)
    check_shapes(params, param_shapes(cfg), f"{contents.path}")
    return cfg, params


def embed(params: dict, ids: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """ids int [B, T] -> h [B, T, D] in the dtype of the embedding table."""
    return jnp.take(params["embed_tokens"], ids, axis=0)


def layer_kind(cfg: LlamaConfig, i: int) -> str:
    """Layers that share a kind share one compiled `block` (all llama layers are alike)."""
    return "full"


def block(lp: dict, h: jax.Array, cfg: LlamaConfig, kind: str = "full") -> jax.Array:
    """One decoder layer: h += attn(rms(h)); h += mlp(rms(h)). h [B, T, D]."""
    a, _ = attention(lp["attn"], rms_norm(h, lp["attn_norm"], cfg.eps), cfg.attention)
    h = h + a
    return h + mlp(lp["mlp"], rms_norm(h, lp["mlp_norm"], cfg.eps), "swiglu")


def logits(params: dict, h: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Final norm and LM head: h [B, T, D] -> float32 [B, T, V]."""
    h = rms_norm(h, params["final_norm"], cfg.eps)
    head = params["embed_tokens"] if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("btd,vd->btv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)


def forward(params: dict, ids: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """ids int [B, T] -> logits float32 [B, T, V]; activations in the dtype of the embedding table."""
    h = embed(params, ids, cfg)                                                         # [B, T, D]
    for i, lp in enumerate(params["layers"]):
        with jax.named_scope(f"layer{i}"):
            h = block(lp, h, cfg, layer_kind(cfg, i))
    return logits(params, h, cfg)


def forward_reference(params: dict, ids, cfg: LlamaConfig) -> np.ndarray:
    """float64 numpy forward of the same definition (plain arrays only)."""
    f64 = lambda a: np.asarray(a, np.float64)
    h = f64(params["embed_tokens"])[np.asarray(ids)]
    for lp in params["layers"]:
        h = h + attention_reference(lp["attn"], rms_norm_reference(h, lp["attn_norm"], cfg.eps), cfg.attention)
        h = h + mlp_reference(lp["mlp"], rms_norm_reference(h, lp["mlp_norm"], cfg.eps), "swiglu")
    h = rms_norm_reference(h, params["final_norm"], cfg.eps)
    head = params["embed_tokens"] if cfg.tie_embeddings else params["lm_head"]
    return h @ f64(head).T
