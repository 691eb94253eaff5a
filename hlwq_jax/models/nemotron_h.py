"""Nemotron-H (hybrid Mamba2 / MoE / attention / MLP decoder): config, parameters, checkpoint loading, forward,
generation.

Public entry points:
  NemotronHConfig (frozen);  NemotronHConfig.from_hf(config_json_dict_or_path, hf_torch_dt_clamp=False)
      layer_types is a pattern string over M (Mamba2), E (MoE), * (attention), - (dense relu2 MLP); built from
      `hybrid_override_pattern` or `layers_block_type` / `layer_types` lists (names "mamba"/"linear_attention",
      "attention"/"full_attention", "moe", "mlp"). hf_torch_dt_clamp=True reproduces HF transformers' pure-torch
      Mamba path, which clamps dt >= time_step_min (default: config.time_step_limit, (0, inf) for Nemotron-3).
  NANO_30B_HF: the HF config.json fields of Nemotron-3-Nano-30B-A3B (for shapes / eval_shape / benchmarks).
  param_shapes(config) -> nested dict of shape tuples;  abstract_params(config, dtype) -> ShapeDtypeStruct tree
  init_params(config, key, dtype) -> random params (on the default device, one leaf at a time)
  load_pretrained(path, dtype=None, recipe=None, *, hf_torch_dt_clamp=False, ignore=()) -> (config, params)
      path: directory with config.json and safetensors (sharded with model.safetensors.index.json, or not).
      Each key goes through the declarative KEY_MAP; every key and shape is checked (errors name the key). Each
      tensor keeps its header dtype unless `dtype` is given: then matrices become `dtype` and 1-D tensors
      promote(header, dtype) (fp32 norms / A_log / biases stay fp32). With a recipe, each leaf is quantized right
      after it is read (hlwq_jax.quantize_params on a one-leaf tree), so the whole bf16 model never sits in RAM.
  init_cache(config, batch, max_len, dtype=jnp.bfloat16) -> NemotronHCache
  forward(config, params, tokens, cache=None, *, moe_impl=None) -> (logits f32 [B, T, V], cache or None)
      tokens int32 [B, T]. With a cache, tokens continue the cached sequence (prefill in pieces or decode).
      moe_impl None: "gather" (reads only the selected experts) when B*T*top_k <= n_routed_experts, else
      "capacity" (dropless sorted-token batched matmul); see hlwq_jax.nn.moe.
  forward_jit: jax.jit(forward) with config (and moe_impl) static.
  forward_layerwise(config, params, tokens, cache=None, *, moe_impl=None): forward as one jitted call per layer
      (compiles once per block kind and shape: fast to compile for the 52-layer model; donates cache entries).
  generate(config, params, prompt, max_new_tokens, *, temperature=0.0, top_p=1.0, key=None) -> int32 [B, T0 + N]
  param_count(tree) / param_bytes(tree): over arrays, ShapeDtypeStructs and quantized leaves (their stored bytes).
  abstract_quantized(abstract, recipe) -> the quantized tree's ShapeDtypeStructs (byte budget of the 30B model).
Parameter tree: {"embeddings" [V, D], "layers": [{"norm" [D], "mixer": {...}}, ...], "norm_f" [D], "lm_head" [V, D]
(absent when tied)}; mixer dicts as hlwq_jax.nn.{mamba2, moe, attention, mlp} param shapes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hlwq_jax.ckpt.safetensors_io import (KeyRule, load_leaves, open_checkpoint, plan_load, tree_from_paths,
                                          tree_paths)
from hlwq_jax.nn.linear import linear
from hlwq_jax.nn.attention import AttentionConfig, attention, attention_param_shapes, init_kv_cache
from hlwq_jax.nn.mamba2 import Mamba2Config, init_mamba2_state, mamba2, mamba2_param_shapes
from hlwq_jax.nn.mlp import mlp
from hlwq_jax.nn.moe import CAPACITY_FACTORS, MoEConfig, moe, moe_param_shapes
from hlwq_jax.nn.norms import rms_norm

BLOCK_CODES = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
_TYPE_NAMES = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "moe": "E",
               "mlp": "-"}
_HF_ALIASES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_chunk_size": "chunk_size",
               "mamba_dt_min": "time_step_min", "mamba_dt_limit": "time_step_limit", "mamba_conv_bias": "use_conv_bias"}

NANO_30B_HF = {
    "model_type": "nemotron_h", "vocab_size": 131072, "hidden_size": 2688, "tie_word_embeddings": False,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "mamba_num_heads": 64,
    "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4, "chunk_size": 128,
    "use_conv_bias": True, "mamba_proj_bias": False, "n_routed_experts": 128, "num_experts_per_tok": 6,
    "moe_intermediate_size": 1856, "n_shared_experts": 1, "moe_shared_expert_intermediate_size": 3712,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "n_group": 1, "topk_group": 1, "mlp_hidden_act": "relu2",
    "layer_norm_epsilon": 1e-5, "time_step_limit": [0.0, float("inf")], "time_step_min": 1e-3,
    "intermediate_size": 1856,
}


@dataclasses.dataclass(frozen=True)
class NemotronHConfig:
    vocab_size: int
    hidden_size: int
    layer_types: str
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    intermediate_size: int = 0
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    dt_clamp_min: float = 0.0
    dt_clamp_max: float = float("inf")
    ssd_impl: str = "xla"
    moe_capacity_factors: tuple[float, ...] = CAPACITY_FACTORS

    def __post_init__(self):
        for i, c in enumerate(self.layer_types):
            if c not in BLOCK_CODES:
                raise ValueError(f"NemotronHConfig: unknown block type {c!r} at layer {i} of {self.layer_types!r}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def mamba(self) -> Mamba2Config:
        return Mamba2Config(hidden=self.hidden_size, num_heads=self.mamba_num_heads, head_dim=self.mamba_head_dim,
                            state_size=self.ssm_state_size, n_groups=self.n_groups, conv_kernel=self.conv_kernel,
                            chunk_size=self.chunk_size, eps=self.layer_norm_epsilon, use_conv_bias=self.use_conv_bias,
                            use_bias=self.mamba_proj_bias, dt_clamp_min=self.dt_clamp_min,
                            dt_clamp_max=self.dt_clamp_max, ssd_impl=self.ssd_impl)

    @property
    def moe(self) -> MoEConfig:
        return MoEConfig(hidden=self.hidden_size, num_experts=self.n_routed_experts, top_k=self.num_experts_per_tok,
                         expert_dim=self.moe_intermediate_size, shared_dim=self.moe_shared_expert_intermediate_size,
                         routed_scaling=self.routed_scaling_factor, norm_topk_prob=self.norm_topk_prob,
                         n_group=self.n_group, topk_group=self.topk_group, capacity_factors=self.moe_capacity_factors)

    @property
    def attention(self) -> AttentionConfig:
        return AttentionConfig(num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
                               head_dim=self.head_dim)

    @classmethod
    def from_hf(cls, hf: dict | str | pathlib.Path, hf_torch_dt_clamp: bool = False, **overrides) -> "NemotronHConfig":
        if not isinstance(hf, dict):
            p = pathlib.Path(hf)
            hf = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        hf = {_HF_ALIASES.get(k, k): v for k, v in hf.items()}
        if hf.get("model_type", "nemotron_h") != "nemotron_h":
            raise ValueError(f"config: model_type {hf['model_type']!r} is not 'nemotron_h'")
        for field, ok in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
            if hf.get(field, ok) != ok:
                raise ValueError(f"config: {field}={hf[field]!r} is not supported (only {ok!r})")
        for field in ("moe_latent_size", "sliding_window"):
            if hf.get(field) is not None:
                raise ValueError(f"config: {field}={hf[field]!r} is not supported")
        lo, hi = (_float(v) for v in hf.get("time_step_limit", (0.0, float("inf"))))
        if hf_torch_dt_clamp:
            lo, hi = float(hf.get("time_step_min", 1e-3)), float("inf")
        names = [f.name for f in dataclasses.fields(cls)]
        kw = {k: hf[k] for k in names if k in hf and k != "layer_types"}
        kw.update(layer_types=_layer_pattern(hf), dt_clamp_min=lo, dt_clamp_max=hi)
        missing = [n for n in names if n not in kw and dataclasses.fields(cls)[names.index(n)].default
                   is dataclasses.MISSING]
        if missing:
            raise ValueError(f"config: missing fields {missing}")
        return cls(**{**kw, **overrides})


def _float(v) -> float:
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


def _layer_pattern(hf: dict) -> str:
    types = hf.get("layers_block_type", hf.get("layer_types"))
    if types is not None:
        out = []
        for i, t in enumerate(types):
            if t not in _TYPE_NAMES:
                raise ValueError(f"config: unknown block type {t!r} at layer {i} (known {sorted(_TYPE_NAMES)})")
            out.append(_TYPE_NAMES[t])
        return "".join(out)
    if "hybrid_override_pattern" in hf:
        return hf["hybrid_override_pattern"]
    raise ValueError("config: none of hybrid_override_pattern / layers_block_type / layer_types is present")


# ---- parameters --------------------------------------------------------------------------------------------------
def param_shapes(config: NemotronHConfig) -> dict:
    d = config.hidden_size
    mixers = {"M": lambda: mamba2_param_shapes(config.mamba), "E": lambda: moe_param_shapes(config.moe),
              "*": lambda: attention_param_shapes(config.attention, d),
              "-": lambda: {"up_proj": (config.intermediate_size, d), "down_proj": (d, config.intermediate_size)}}
    tree = {"embeddings": (config.vocab_size, d),
            "layers": [{"norm": (d,), "mixer": mixers[t]()} for t in config.layer_types],
            "norm_f": (d,)}
    if not config.tie_word_embeddings:
        tree["lm_head"] = (config.vocab_size, d)
    return tree


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract_params(config: NemotronHConfig, dtype=jnp.bfloat16) -> dict:
    """ShapeDtypeStructs: matrices in dtype, 1-D tensors in float32."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype if len(s) >= 2 else jnp.float32),
                        param_shapes(config), is_leaf=_is_shape)


def _init_kind(path: str, ndim: int) -> str:
    name = path.rsplit(".", 1)[-1]
    if name in ("A_log", "dt_bias", "embeddings"):
        return name
    if name in ("norm", "norm_f", "D", "q_norm", "k_norm"):
        return "ones"
    return "small" if ndim == 1 else "matrix"


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_leaf(kind: str, shape, dtype, key):
    if kind == "A_log":
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0))
    if kind == "dt_bias":
        dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(1e-3), math.log(0.1)))
        return dt + jnp.log(-jnp.expm1(-dt))                                       # inverse softplus
    if kind == "ones":
        return jnp.ones(shape, jnp.float32)
    if kind == "small":
        return 0.02 * jax.random.normal(key, shape, jnp.float32)
    if kind == "embeddings":
        return jax.random.normal(key, shape, dtype)
    return (jax.random.normal(key, shape, jnp.float32) * shape[-1] ** -0.5).astype(dtype)


def init_params(config: NemotronHConfig, key: jax.Array, dtype=jnp.bfloat16) -> dict:
    """Random parameters with real shapes, made on the default device (one compiled generator per kind and shape):
    matrices N(0, 1/fan_in), embeddings N(0, 1), norms and D ones, A = -U(1, 16), dt in [1e-3, 0.1]."""
    abstract = abstract_params(config, dtype)
    vals = {p: _init_leaf(_init_kind(p, len(s.shape)), s.shape, s.dtype, jax.random.fold_in(key, i))
            for i, (p, s) in enumerate(tree_paths(abstract).items())}
    return tree_from_paths(abstract, vals)


def param_count(tree) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "dequantize"))
    return int(sum(math.prod(getattr(x, "shape")) for x in leaves))


def param_bytes(tree) -> int:
    total = 0
    for x in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "dequantize")):
        if hasattr(x, "dequantize"):
            total += sum(int(math.prod(l.shape)) * np.dtype(l.dtype).itemsize for l in jax.tree.leaves(x))
        else:
            total += int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def abstract_quantized(abstract: dict, recipe) -> dict:
    """The tree quantize_params(abstract, recipe) would return, as ShapeDtypeStructs (HLWQ specs only), without
    touching data: for byte budgets of full-size models (jax.eval_shape cannot trace the quantizer's input checks)."""
    from hlwq_jax.quant.array import HLWQArray
    from hlwq_jax.quant.packing import packed_size

    def one(path, sds):
        spec = recipe.spec_for(path, tuple(sds.shape))
        if spec is None:
            return sds
        if spec.method != "hlwq":
            raise ValueError(f"abstract_quantized: {path!r}: only HLWQ specs are supported, got {spec.name}")
        *lead, n_in = sds.shape
        n_blocks = -(-n_in // spec.block_size)
        return HLWQArray(packed=jax.ShapeDtypeStruct((*lead, packed_size(n_blocks * spec.block_size, spec.bits)),
                                                     jnp.uint8),
                         norms=jax.ShapeDtypeStruct((*lead, n_blocks), jnp.float16),
                         codebook=jax.ShapeDtypeStruct((1 << spec.bits,), jnp.float32), bits=spec.bits,
                         block_size=spec.block_size, shape=tuple(sds.shape), rotation=spec.rotation, seed=spec.seed,
                         codebook_name=spec.codebook)

    flat = tree_paths(abstract)
    return tree_from_paths(abstract, {p: one(p, v) for p, v in flat.items()})


# ---- checkpoint key map ------------------------------------------------------------------------------------------
def _rules() -> list[KeyRule]:
    L, P = "backbone.layers.{layer}", "layers.{layer}"
    conv_leaf, conv_disk = (lambda a: a.reshape(a.shape[0], a.shape[-1])), (lambda a: a[:, None, :])
    r = [KeyRule("backbone.embeddings.weight", "embeddings"), KeyRule("backbone.embedding.weight", "embeddings"),
         KeyRule("backbone.norm_f.weight", "norm_f"), KeyRule("lm_head.weight", "lm_head"),
         KeyRule(f"{L}.norm.weight", f"{P}.norm"),
         KeyRule(f"{L}.mixer.conv1d.weight", f"{P}.mixer.conv1d_weight", to_leaf=conv_leaf, to_disk=conv_disk),
         KeyRule(f"{L}.mixer.conv1d.bias", f"{P}.mixer.conv1d_bias"),
         KeyRule(f"{L}.mixer.norm.weight", f"{P}.mixer.norm"),
         KeyRule(f"{L}.mixer.gate.weight", f"{P}.mixer.router"),
         KeyRule(f"{L}.mixer.gate.e_score_correction_bias", f"{P}.mixer.router_bias"),
         KeyRule(f"{L}.mixer.experts.{{expert}}.up_proj.weight", f"{P}.mixer.experts.up_proj", stack="expert"),
         KeyRule(f"{L}.mixer.experts.{{expert}}.down_proj.weight", f"{P}.mixer.experts.down_proj", stack="expert"),
         KeyRule(f"{L}.mixer.experts.up_proj", f"{P}.mixer.experts.up_proj"),       # fused [E, F, D] layout
         KeyRule(f"{L}.mixer.experts.down_proj", f"{P}.mixer.experts.down_proj"),
         KeyRule(f"{L}.mixer.shared_experts.up_proj.weight", f"{P}.mixer.shared.up_proj"),
         KeyRule(f"{L}.mixer.shared_experts.down_proj.weight", f"{P}.mixer.shared.down_proj")]
    r += [KeyRule(f"{L}.mixer.{n}", f"{P}.mixer.{n}") for n in ("A_log", "D", "dt_bias")]
    r += [KeyRule(f"{L}.mixer.{n}.weight", f"{P}.mixer.{n}")
          for n in ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")]
    r += [KeyRule(f"{L}.mixer.{n}.bias", f"{P}.mixer.{n}_bias") for n in ("in_proj", "out_proj")]
    return r


KEY_MAP = _rules()


def _target_dtype(path: str, header_dtype, dtype, ndim: int):
    if dtype is None:
        return header_dtype
    return jnp.promote_types(header_dtype, dtype) if ndim < 2 else jnp.dtype(dtype)


def load_pretrained(path, dtype=None, recipe=None, *, hf_torch_dt_clamp: bool = False,
                    ignore: tuple[str, ...] = ()) -> tuple[NemotronHConfig, dict]:
    """Load a Hugging Face Nemotron-H checkpoint directory; see module docstring. `ignore`: regexes of keys to skip."""
    root = pathlib.Path(path)
    config = NemotronHConfig.from_hf(root, hf_torch_dt_clamp=hf_torch_dt_clamp)
    ckpt = open_checkpoint(root)
    shapes = {k: s for k, s in ckpt.shapes().items() if not any(re.fullmatch(p, k) for p in ignore)}
    template = param_shapes(config)
    expected = tree_paths(template)
    plan = plan_load(shapes, KEY_MAP, expected)
    quantize_params = None
    if recipe is not None:
        from hlwq_jax import quantize_params  # the lead's recipe API; ImportError if it has not landed

    def convert(p: str, arr: np.ndarray):
        leaf = jnp.asarray(arr.astype(_target_dtype(p, arr.dtype, dtype, arr.ndim)))
        if quantize_params is None:
            return leaf
        one: dict = {}
        node = one
        parts = p.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
        q, _ = quantize_params(one, recipe)
        for part in parts:
            q = q[part]
        return q

    values = dict(load_leaves(ckpt, plan, expected, convert, KEY_MAP))
    return config, tree_from_paths(template, values)


# ---- forward -----------------------------------------------------------------------------------------------------
class NemotronHCache(NamedTuple):
    layers: tuple          # per layer: Mamba2State (M), KVCache (*), or None (E, -)
    length: jax.Array      # int32 [], tokens seen


def init_cache(config: NemotronHConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> NemotronHCache:
    per = []
    for t in config.layer_types:
        if t == "M":
            per.append(init_mamba2_state(config.mamba, batch))
        elif t == "*":
            per.append(init_kv_cache(config.attention, batch, max_len, dtype))
        else:
            per.append(None)
    return NemotronHCache(tuple(per), jnp.zeros((), jnp.int32))


def _block(config, t, layer, h, state, moe_impl):
    if t == "M":
        return mamba2(layer, h, config.mamba, state)
    if t == "*":
        return attention(layer, h, config.attention, state)
    if t == "E":
        return moe(layer, h, config.moe, impl=moe_impl), None
    return mlp(layer, h, "relu2"), None


def forward(config: NemotronHConfig, params: dict, tokens: jax.Array, cache: NemotronHCache | None = None,
            *, moe_impl: str | None = None) -> tuple[jax.Array, NemotronHCache | None]:
    """Logits (float32) [B, T, V] for tokens int32 [B, T]; see module docstring."""
    b, t = tokens.shape
    emb = params["embeddings"]
    if not isinstance(emb, jax.Array):
        raise TypeError(f"forward: embeddings must be a plain array, got {type(emb).__name__}")
    if moe_impl is None:
        moe_impl = "gather" if b * t * config.num_experts_per_tok <= config.n_routed_experts else "capacity"
    x = jnp.take(emb, tokens, axis=0)
    eps = config.layer_norm_epsilon
    new_states = []
    for i, (kind, layer) in enumerate(zip(config.layer_types, params["layers"])):
        with jax.named_scope(f"layer{i}_{BLOCK_CODES[kind]}"):
            h = rms_norm(x, layer["norm"], eps).astype(x.dtype)
            state = None if cache is None else cache.layers[i]
            y, state = _block(config, kind, layer["mixer"], h, state, moe_impl)
            x = x + y.astype(x.dtype)
            new_states.append(state)
    x = rms_norm(x, params["norm_f"], eps).astype(x.dtype)
    head = params["embeddings"] if config.tie_word_embeddings else params["lm_head"]
    logits = linear(x, head).astype(jnp.float32)
    new_cache = None if cache is None else NemotronHCache(tuple(new_states), cache.length + t)
    return logits, new_cache


@functools.partial(jax.jit, static_argnums=(0, 1, 5), donate_argnums=(4,))
def _layer_jit(config, kind, layer, x, state, moe_impl):
    h = rms_norm(x, layer["norm"], config.layer_norm_epsilon).astype(x.dtype)
    y, state = _block(config, kind, layer["mixer"], h, state, moe_impl)
    return x + y.astype(x.dtype), state


@functools.partial(jax.jit, static_argnums=0)
def _head_jit(config, params_head, norm_f, x):
    x = rms_norm(x, norm_f, config.layer_norm_epsilon).astype(x.dtype)
    return linear(x, params_head).astype(jnp.float32)


def forward_layerwise(config: NemotronHConfig, params: dict, tokens: jax.Array, cache: NemotronHCache | None = None,
                      *, moe_impl: str | None = None) -> tuple[jax.Array, NemotronHCache | None]:
    """Same result as forward, run as one jitted call per layer: layers of one kind and shape share one compiled
    program (a handful of small compiles instead of one 52-layer program), at the cost of a host dispatch per layer.
    Donates each layer's cache entry (the input cache must not be reused)."""
    b, t = tokens.shape
    if moe_impl is None:
        moe_impl = "gather" if b * t * config.num_experts_per_tok <= config.n_routed_experts else "capacity"
    x = jnp.take(params["embeddings"], tokens, axis=0)
    states = []
    for i, (kind, layer) in enumerate(zip(config.layer_types, params["layers"])):
        x, st = _layer_jit(config, kind, layer, x, None if cache is None else cache.layers[i], moe_impl)
        states.append(st)
    head = params["embeddings"] if config.tie_word_embeddings else params["lm_head"]
    logits = _head_jit(config, head, params["norm_f"], x)
    return logits, (None if cache is None else NemotronHCache(tuple(states), cache.length + t))


# ---- generation --------------------------------------------------------------------------------------------------
def sample(logits: jax.Array, key, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """Next tokens int32 [B] from logits [B, V]: greedy when temperature == 0, else top-p (nucleus) sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p {top_p} not in (0, 1]")
    z = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-z, axis=-1)
    zs = jnp.take_along_axis(z, order, axis=-1)
    probs = jax.nn.softmax(zs, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p                               # always keeps the first
    choice = jax.random.categorical(key, jnp.where(keep, zs, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def generate(config: NemotronHConfig, params: dict, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, key=None, cache_dtype=None) -> jax.Array:
    """Prefill the prompt [B, T0], then decode max_new_tokens tokens one at a time with caches."""
    b, t0 = prompt.shape
    if temperature > 0.0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a PRNG key")
    key = jax.random.PRNGKey(0) if key is None else key
    dtype = cache_dtype or params["embeddings"].dtype
    cache = init_cache(config, b, t0 + max_new_tokens, dtype)
    step = forward_jit
    logits, cache = step(config, params, prompt, cache)
    out = [prompt]
    for i in range(max_new_tokens):
        tok = sample(logits[:, -1], jax.random.fold_in(key, i), temperature, top_p)
        out.append(tok[:, None])
        if i + 1 < max_new_tokens:
            logits, cache = step(config, params, tok[:, None], cache)
    return jnp.concatenate(out, axis=1)


forward_jit = jax.jit(forward, static_argnums=0, static_argnames=("moe_impl",))
forward_jit.__doc__ = "jax.jit(forward) with the config static (one compiled function per config and shapes)."
