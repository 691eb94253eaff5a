"""Gemma-3 text decoder (Gemma-3-270M) built from the library's GQA attention and GeGLU MLP.

Public signatures:
  Gemma3Config(vocab_size, hidden, n_layers, n_heads, n_kv_heads, head_dim, intermediate, eps, sliding_window,
               rope_theta_global, rope_theta_local=10000., global_every=6, query_pre_attn_scalar=None)  frozen
      .layer_is_global(i) -> bool      every `global_every`-th layer (i+1 multiple) is full attention
      .attention(i) / .attention_kind("local"|"global") -> AttentionConfig (qk norm; window/theta per kind)
  Gemma3Config.from_gguf(metadata)
  param_shapes(cfg), params_from_gguf(contents) -> (cfg, params), forward(params, ids, cfg) -> logits [B, T, V] f32,
  embed / layer_kind / block / logits: the pieces of forward (as in models.llama),
  forward_reference(params, ids, cfg) -> float64 numpy.

Params: {"embed_tokens" [V, D], "layers": [{"attn_norm", "attn": {q/k/v/o_proj, q_norm, k_norm}, "post_attn_norm",
"mlp_norm", "mlp": {gate_proj, up_proj, down_proj}, "post_mlp_norm"}], "final_norm"}. Every norm weight holds the
full multiplier (1 + w of HF), which is how Gemma GGUF files store it; norms multiply in fp32 (HF Gemma3RMSNorm).
Block (sandwich norms): h += post_attn_norm(attn(attn_norm(h))); h += post_mlp_norm(mlp(mlp_norm(h))).
Embeddings are multiplied by sqrt(hidden) (in the activation dtype); the LM head is the tied embedding; no softcap.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.ckpt import gguf_io
from hlwq_jax.models.llama import check_shapes
from hlwq_jax.nn.attention import AttentionConfig, attention, attention_param_shapes, attention_reference
from hlwq_jax.nn.mlp import mlp, mlp_reference
from hlwq_jax.nn.norms import rms_norm, rms_norm_reference


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    sliding_window: int
    rope_theta_global: float
    rope_theta_local: float = 10000.0
    global_every: int = 6
    query_pre_attn_scalar: float | None = None

    def layer_is_global(self, i: int) -> bool:
        return (i + 1) % self.global_every == 0

    def attention(self, i: int) -> AttentionConfig:
        return self.attention_kind("global" if self.layer_is_global(i) else "local")

    def attention_kind(self, kind: str) -> AttentionConfig:
        if kind not in ("global", "local"):
            raise ValueError(f"Gemma3Config: layer kind {kind!r} not in ('global', 'local')")
        glob = kind == "global"
        scale = None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar ** -0.5
        return AttentionConfig(self.n_heads, self.n_kv_heads, self.head_dim,
                               rope_theta=self.rope_theta_global if glob else self.rope_theta_local,
                               qk_norm=True, qk_norm_eps=self.eps, qk_norm_scale_in_fp32=True,
                               sliding_window=None if glob else self.sliding_window, scale=scale)

    @classmethod
    def from_gguf(cls, meta: dict) -> "Gemma3Config":
        if meta.get("general.architecture") != "gemma3":
            raise ValueError(f"Gemma3Config: GGUF general.architecture {meta.get('general.architecture')!r} "
                             "!= 'gemma3'")

        def get(key, default=None):
            v = meta.get(f"gemma3.{key}", default)
            if v is None:
                raise ValueError(f"Gemma3Config: GGUF field gemma3.{key} missing")
            return v
        n_heads = int(get("attention.head_count"))
        return cls(vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden=int(get("embedding_length")),
                   n_layers=int(get("block_count")), n_heads=n_heads,
                   n_kv_heads=int(get("attention.head_count_kv", n_heads)),
                   head_dim=int(get("attention.key_length")), intermediate=int(get("feed_forward_length")),
                   eps=float(get("attention.layer_norm_rms_epsilon")),
                   sliding_window=int(get("attention.sliding_window")),
                   rope_theta_global=float(get("rope.freq_base", 1e6)))


def param_shapes(cfg: Gemma3Config) -> dict:
    d, f = cfg.hidden, cfg.intermediate
    layer = {"attn_norm": (d,), "attn": attention_param_shapes(cfg.attention(0), d), "post_attn_norm": (d,),
             "mlp_norm": (d,), "mlp": {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)},
             "post_mlp_norm": (d,)}
    return {"embed_tokens": (cfg.vocab_size, d), "layers": [layer] * cfg.n_layers, "final_norm": (d,)}


def gguf_rules() -> list[gguf_io.KeyRule]:
    """Key map GGUF → params (Gemma-3 files are not Q/K permuted; norms already hold 1 + w)."""
    b = r"blk\.(\d+)\."
    r = gguf_io.KeyRule
    return [r(r"token_embd\.weight", "embed_tokens"), r(r"output_norm\.weight", "final_norm"),
            r(b + r"attn_norm\.weight", "layers.{i}.attn_norm"),
            r(b + r"post_attention_norm\.weight", "layers.{i}.post_attn_norm"),
            r(b + r"ffn_norm\.weight", "layers.{i}.mlp_norm"),
            r(b + r"post_ffw_norm\.weight", "layers.{i}.post_mlp_norm"),
            r(b + r"attn_q\.weight", "layers.{i}.attn.q_proj"), r(b + r"attn_k\.weight", "layers.{i}.attn.k_proj"),
            r(b + r"attn_v\.weight", "layers.{i}.attn.v_proj"),
            r(b + r"attn_output\.weight", "layers.{i}.attn.o_proj"),
            r(b + r"attn_q_norm\.weight", "layers.{i}.attn.q_norm"),
            r(b + r"attn_k_norm\.weight", "layers.{i}.attn.k_norm"),
            r(b + r"ffn_gate\.weight", "layers.{i}.mlp.gate_proj"), r(b + r"ffn_up\.weight", "layers.{i}.mlp.up_proj"),
            r(b + r"ffn_down\.weight", "layers.{i}.mlp.down_proj")]


def params_from_gguf(contents: gguf_io.GGUFContents) -> tuple[Gemma3Config, dict]:
    cfg = Gemma3Config.from_gguf(contents.metadata)
    params = gguf_io.map_tensors(contents.tensors, gguf_rules(), cfg.n_layers)
    check_shapes(params, param_shapes(cfg), f"{contents.path}")
    return cfg, params


def _norm(x, w, eps):
    return rms_norm(x, w, eps, scale_in_fp32=True)


def embed(params: dict, ids: jax.Array, cfg: Gemma3Config) -> jax.Array:
    """ids int [B, T] -> h [B, T, D] = E[ids] * sqrt(hidden) in the dtype of the embedding table."""
    emb = params["embed_tokens"]
    return jnp.take(emb, ids, axis=0) * jnp.asarray(cfg.hidden ** 0.5, emb.dtype)


def layer_kind(cfg: Gemma3Config, i: int) -> str:
    """"global" (full attention, global RoPE theta) or "local" (sliding window, local theta)."""
    return "global" if cfg.layer_is_global(i) else "local"


def block(lp: dict, h: jax.Array, cfg: Gemma3Config, kind: str) -> jax.Array:
    """One sandwich-norm decoder layer of the given kind. h [B, T, D]."""
    a, _ = attention(lp["attn"], _norm(h, lp["attn_norm"], cfg.eps), cfg.attention_kind(kind))
    h = h + _norm(a, lp["post_attn_norm"], cfg.eps)
    m = mlp(lp["mlp"], _norm(h, lp["mlp_norm"], cfg.eps), "geglu")
    return h + _norm(m, lp["post_mlp_norm"], cfg.eps)


def logits(params: dict, h: jax.Array, cfg: Gemma3Config) -> jax.Array:
    """Final norm and tied LM head: h [B, T, D] -> float32 [B, T, V]."""
    h = _norm(h, params["final_norm"], cfg.eps)
    return jnp.einsum("btd,vd->btv", h, params["embed_tokens"].astype(h.dtype), preferred_element_type=jnp.float32)


def forward(params: dict, ids: jax.Array, cfg: Gemma3Config) -> jax.Array:
    """ids int [B, T] -> logits float32 [B, T, V]; activations in the dtype of the embedding table."""
    h = embed(params, ids, cfg)                                                         # [B, T, D]
    for i, lp in enumerate(params["layers"]):
        with jax.named_scope(f"layer{i}"):
            h = block(lp, h, cfg, layer_kind(cfg, i))
    return logits(params, h, cfg)


def forward_reference(params: dict, ids, cfg: Gemma3Config) -> np.ndarray:
    """float64 numpy forward of the same definition (plain arrays only)."""
    emb = np.asarray(params["embed_tokens"], np.float64)
    h = emb[np.asarray(ids)] * cfg.hidden ** 0.5
    nrm = lambda x, w: rms_norm_reference(x, w, cfg.eps)
    for i, lp in enumerate(params["layers"]):
        h = h + nrm(attention_reference(lp["attn"], nrm(h, lp["attn_norm"]), cfg.attention(i)), lp["post_attn_norm"])
        h = h + nrm(mlp_reference(lp["mlp"], nrm(h, lp["mlp_norm"]), "geglu"), lp["post_mlp_norm"])
    return nrm(h, params["final_norm"]) @ emb.T
