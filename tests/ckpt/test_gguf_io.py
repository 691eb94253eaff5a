"""GGUF reader: key maps, the llama Q/K permutation, and a synthetic GGUF file written with gguf.GGUFWriter."""
import numpy as np
import pytest

from hlwq_jax.ckpt import gguf_io
from hlwq_jax.models import llama
from hlwq_jax.nn.attention import apply_rope

gguf = pytest.importorskip("gguf")


def _adjacent_pair_rope(x, pos, theta):
    """Interleaved RoPE (pairs 2i, 2i+1), float64 numpy: x [T, hd]."""
    hd = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)
    c, s = np.cos(ang), np.sin(ang)
    out = x.copy()
    out[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
    out[:, 1::2] = x[:, 1::2] * c + x[:, 0::2] * s
    return out


def test_permute_roundtrip(rng):
    w = rng.normal(size=(3 * 8, 5))
    p = gguf_io.permute_qk(w, 3)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(p, 3), w)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(gguf_io.permute_qk(w[:, 0], 3), 3), w[:, 0])
    with pytest.raises(ValueError, match="not divisible"):
        gguf_io.unpermute_qk(w[:22], 3)


def test_unpermute_is_the_right_handling(rng):
    """GGUF rows + adjacent-pair RoPE == unpermuted rows + rotate-half RoPE; raw rows + rotate-half differ."""
    hd, d, t, theta = 16, 12, 7, 100.0
    w_hf = rng.normal(size=(hd, d))
    x = rng.normal(size=(t, d))
    pos = np.arange(t, dtype=np.float64)
    w_gguf = gguf_io.permute_qk(w_hf, 1)                          # what a llama GGUF file stores

    def scores(w, rope):
        q = rope(x @ w.T)
        return q @ q.T

    half = lambda a: np.asarray(apply_rope(a[None, :, None, :].astype(np.float32), np.arange(t), theta, hd))[0, :, 0]
    oracle = scores(w_gguf, lambda a: _adjacent_pair_rope(a, pos, theta))
    np.testing.assert_allclose(scores(gguf_io.unpermute_qk(w_gguf, 1), half), oracle, rtol=2e-4, atol=2e-3)
    assert np.max(np.abs(scores(w_gguf, half) - oracle)) > 0.1


def _write_tiny_llama(path, rng, n_layers=2, hidden=16, heads=4, kv=2, ffn=24, vocab=40):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1e4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    hd = hidden // heads
    hf = {}
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(n_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (heads * hd, hidden), f"blk.{i}.attn_k.weight": (kv * hd, hidden),
                       f"blk.{i}.attn_v.weight": (kv * hd, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    for name, shape in shapes.items():
        a = rng.normal(size=shape).astype(np.float32)
        hf[name] = a
        if "attn_q" in name:
            a = gguf_io.permute_qk(a, heads)
        elif "attn_k" in name:
            a = gguf_io.permute_qk(a, kv)
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_synthetic_llama_gguf(tmp_path, rng):
    hf = _write_tiny_llama(tmp_path / "tiny.gguf", rng)
    contents = gguf_io.read_gguf(tmp_path / "tiny.gguf")
    assert contents.architecture == "llama"
    assert contents.tensors["blk.0.ffn_down.weight"].shape == (16, 24)            # [out, in]
    cfg, params = llama.params_from_gguf(contents)
    assert (cfg.n_layers, cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate) == (2, 16, 4, 2,
                                                                                                        4, 24)
    assert cfg.tie_embeddings
    np.testing.assert_array_equal(params["layers"][1]["attn"]["q_proj"], hf["blk.1.attn_q.weight"])
    np.testing.assert_array_equal(params["layers"][0]["attn"]["k_proj"], hf["blk.0.attn_k.weight"])
    np.testing.assert_array_equal(params["layers"][0]["mlp"]["down_proj"], hf["blk.0.ffn_down.weight"])
    np.testing.assert_array_equal(params["embed_tokens"], hf["token_embd.weight"])


def test_key_map_errors(rng):
    rules = [gguf_io.KeyRule(r"blk\.(\d+)\.a", "layers.{i}.a"), gguf_io.KeyRule(r"e", "e")]
    t = {"blk.0.a": np.zeros(2), "blk.1.a": np.zeros(2), "e": np.zeros(1)}
    assert len(gguf_io.map_tensors(t, rules, 2)["layers"]) == 2
    with pytest.raises(ValueError, match="'zzz' matched 0"):
        gguf_io.map_tensors({**t, "zzz": np.zeros(1)}, rules, 2)
    with pytest.raises(ValueError, match="layer 2"):
        gguf_io.map_tensors({**t, "blk.2.a": np.zeros(2)}, rules, 2)
    with pytest.raises(ValueError, match="layer 1"):
        gguf_io.map_tensors({"blk.0.a": np.zeros(2), "e": np.zeros(1)}, rules, 2)


def test_locate_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        gguf_io.locate_model_file("gpt-17")
    with pytest.raises(FileNotFoundError):
        gguf_io.read_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        gguf_io.read_gguf(bad)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HLWQ_CACHE", str(tmp_path / "c"))
    assert gguf_io.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
