"""CompressedTensors INT4 g128 export: packing and scales against a float64/loop oracle; the `hf` test has the REAL
compressed-tensors package (and transformers) decompress our files and compares with our INT4 dequantization."""
import json
import pathlib
import subprocess

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from hlwq_jax.cli import convert as cv
from hlwq_jax.ckpt import compressed_tensors as ct
from hlwq_jax.quant.hlwq import quantize
from ckpt_synth import make_checkpoint, select_proj

REPO = pathlib.Path(__file__).resolve().parents[2]
_dequant = jax.jit(lambda w: w.dequantize())  # the HLWQArray definition, compiled once per shape


def _oracle_int4(w, g, scale_dtype):
    """Loop-level definition: s = max|w_group|/7 rounded to the scale dtype; q = clamp(rint(w/s), −8, 7);
    word j // 8 of a row holds (q_j + 8) at bits 4·(j mod 8)."""
    w = np.asarray(w, np.float64)
    rows, n = w.shape
    s = (np.abs(w.reshape(rows, n // g, g)).max(-1) / 7.0).astype(np.float32).astype(scale_dtype)
    sf = s.astype(np.float64)
    q = np.clip(np.rint(w / np.where(sf > 0, sf, 1.0).repeat(g, 1)), -8, 7).astype(np.int64)
    words = np.zeros((rows, n // 8), np.uint64)
    for j in range(n):  # column by column: element j goes to word j // 8 at bit 4·(j mod 8)
        words[:, j // 8] |= (q[:, j] + 8).astype(np.uint64) << np.uint64(4 * (j % 8))
    return words.astype(np.uint32).view(np.int32), s, q


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16", "float32"])
def test_int4_pack_matches_oracle(rng, scale_dtype):
    w = rng.standard_normal((5, 256)).astype(np.float32)
    w[1, :128] = 0.0  # an all-zero group
    packed, s = ct.quantize_int4(w, 128, scale_dtype)
    want_p, want_s, q = _oracle_int4(w, 128, ct.SCALE_DTYPES[scale_dtype])
    np.testing.assert_array_equal(packed, want_p)
    np.testing.assert_array_equal(s.view(np.uint8), want_s.view(np.uint8))
    deq = ct.dequantize_int4(packed, s, w.shape)
    np.testing.assert_array_equal(deq.astype(np.float64),
                                  (q * want_s.astype(np.float64).repeat(128, 1)).astype(want_s.dtype).astype(np.float64))
    assert np.max(np.abs(deq.astype(np.float32) - w)) <= np.abs(w).max() / 7 * 0.5 * 1.02


def test_group_size_and_targets():
    assert ct.group_size_for(2688, 128) == 128 and ct.group_size_for(1856, 128) == 64
    with pytest.raises(ValueError, match="1000"):
        ct.group_size_for(1000, 128)
    cfg = ct.quantization_config({128: ["m.layers.0.a_proj", "m.layers.1.a_proj"], 64: ["m.layers.0.b_proj"]},
                                 ignore=["lm_head"])
    g0, g1 = cfg["config_groups"]["group_0"], cfg["config_groups"]["group_1"]
    assert g0["weights"]["group_size"] == 128 and g0["targets"] == [r"re:^m\.layers\.\d+\.a_proj$"]
    assert g1["targets"] == [r"re:^m\.layers\.\d+\.b_proj$"] and cfg["ignore"] == ["lm_head"]
    # When generalising would capture a module of another group, targets fall back to exact names.
    clash = ct.quantization_config({128: ["x.0.p"], 64: ["x.1.p"]}, ignore=[])
    assert clash["config_groups"]["group_0"]["targets"] == [r"re:^x\.0\.p$"]


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 192,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "hidden_act": "silu", "rope_theta": 10000.0}


def llama_shapes(c=LLAMA):
    d, f, v, kv = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_key_value_heads"] * c["head_dim"]
    s = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                  p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                  p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                  p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                  p + "post_attention_layernorm.weight": (d,)})
    return s


def _export(tmp_path, rng, source="hlwq"):
    src = make_checkpoint(tmp_path / "src", rng, shapes=llama_shapes())
    (tmp_path / "src" / "config.json").write_text(json.dumps(LLAMA))
    sel = select_proj(bits=5, block_size=64)
    opts = cv.ConvertOptions(select=lambda n, s: dict(sel(n, s), source=source) if sel(n, s) else None,
                             export="compressed-tensors", chunk_bytes=32768)
    cv.convert_checkpoint(tmp_path / "src", tmp_path / "ct", opts, progress=False)
    return src


@pytest.mark.parametrize("source", ["hlwq", "weights"])
def test_export_files(tmp_path, rng, source):
    src = _export(tmp_path, rng, source)
    out = {}
    for f in (tmp_path / "ct").glob("*.safetensors"):
        out.update(load_file(str(f)))
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head", "model.embed_tokens"]
    for name, x in src.items():
        if not name.endswith("proj.weight"):
            np.testing.assert_array_equal(out[name], x)
            continue
        m = name[: -len(".weight")]
        g = 64 if "down_proj" in name else 128
        dense = np.asarray(x, np.float32)
        if source == "hlwq":
            dense = np.asarray(_dequant(quantize(dense, bits=5, block_size=64)))
        want_p, want_s, _ = _oracle_int4(dense, g, ml_dtypes.bfloat16)
        np.testing.assert_array_equal(out[m + ".weight_packed"], want_p)
        np.testing.assert_array_equal(out[m + ".weight_scale"].view(np.uint16), want_s.view(np.uint16))
        np.testing.assert_array_equal(out[m + ".weight_shape"], np.array(x.shape))


@pytest.mark.hf
def test_real_compressed_tensors_decompresses_our_files(tmp_path, rng, hf_python):
    _export(tmp_path, rng)
    res = subprocess.run([hf_python, str(REPO / "tests/oracles/compressed_tensors_decompress.py"),
                          str(tmp_path / "ct"), str(tmp_path / "o.npz")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = np.load(tmp_path / "o.npz")
    out = {}
    for f in (tmp_path / "ct").glob("*.safetensors"):
        out.update(load_file(str(f)))
    mods = [k[3:] for k in got.files if k.startswith("ct/")]
    assert len(mods) == 14  # 7 linears × 2 layers; lm_head ignored
    for m in mods:
        ours = ct.dequantize_int4(out[m + ".weight_packed"], out[m + ".weight_scale"], out[m + ".weight_shape"])
        np.testing.assert_array_equal(got["ct/" + m], ours.astype(np.float32), err_msg=m)
        np.testing.assert_array_equal(got["hf/" + m], ours.astype(np.float32), err_msg=m)
        assert int(got["scheme/" + m]) == (64 if "down_proj" in m else 128)
    assert np.isfinite(got["logits"]).all()
