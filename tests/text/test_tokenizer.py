"""Tokenizers rebuilt from GGUF metadata: merges-from-scores vs a plain SentencePiece-BPE loop; real round trips."""
import json

import numpy as np
import pytest

from hlwq_jax.text import tokenizer as T

SP = "\u2581"


def spm_bpe_reference(text, pieces, scores):
    """SentencePiece BPE, written out: merge the adjacent pair whose merged piece scores highest (leftmost on ties)."""
    syms = list(text.replace(" ", SP))
    ids = {p: i for i, p in enumerate(pieces)}
    while True:
        best = None
        for j in range(len(syms) - 1):
            m = syms[j] + syms[j + 1]
            if m in ids and (best is None or scores[ids[m]] > best[0]):
                best = (scores[ids[m]], j)
        if best is None:
            return [ids[s] for s in syms]
        j = best[1]
        syms[j:j + 2] = [syms[j] + syms[j + 1]]


def _toy_meta(rng):
    chars = list("abcd" + SP)
    pieces = list(chars)
    while len(pieces) < 40:                                   # random merged pieces, built from existing ones
        a, b = rng.choice(pieces), rng.choice(pieces)
        if a + b not in pieces and len(a + b) <= 5:
            pieces.append(a + b)
    control = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokens = control + pieces + [f"<0x{b:02X}>" for b in range(256)]
    types = [3] * 4 + [1] * len(pieces) + [6] * 256
    scores = [-1000.0] * 4 + list(-np.arange(len(pieces), dtype=float)) + [0.0] * 256
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": False}
    return meta, tokens, scores


def test_sentencepiece_bpe_matches_reference(rng):
    meta, tokens, scores = _toy_meta(rng)
    tok = T.TextTokenizer(T.build_tokenizer(meta), 2, True, "toy")
    for _ in range(30):
        text = "".join(rng.choice(list("abcd "), size=int(rng.integers(1, 25))))
        assert tok.encode(text) == spm_bpe_reference(text, tokens, scores), text
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("ab\u00e9")                               # é is not a piece: byte fallback, exact round trip
    assert tokens[ids[-1]] == "<0xA9>" and tok.decode(ids) == "ab\u00e9"


def test_merges_from_scores_order():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    merges = T.merges_from_scores(tokens, [0, 0, 0, -2, -1, -3], [1] * 6)
    assert merges == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_json_roundtrip_and_errors(tmp_path, rng):
    meta, _, _ = _toy_meta(rng)
    tok = T.TextTokenizer(T.build_tokenizer(meta), 2, True, "toy")
    p = T.save_tokenizer_json(tok, tmp_path / "t.json")
    back = T.load_tokenizer_json(p)
    assert (back.bos_id, back.add_bos) == (2, True) and back.encode("abc dab") == tok.encode("abc dab")
    d = json.loads(p.read_text())
    del d["hlwq"]
    (tmp_path / "plain.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="hlwq"):
        T.load_tokenizer_json(tmp_path / "plain.json")
    with pytest.raises(ValueError, match="not supported"):
        T.build_tokenizer({"tokenizer.ggml.model": "rwkv"})


@pytest.fixture(scope="module")
def wikitext():
    from hlwq_jax.eval.data import load_wikitext
    try:
        return load_wikitext()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _real_tokenizer(model):
    from hlwq_jax.ckpt import gguf_io
    try:
        path = gguf_io.locate_model_file(model)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return T.load_tokenizer(path)


def test_smollm2_round_trip_whole_test_text(wikitext):
    tok = _real_tokenizer("smollm2-135m")
    ids = tok.encode(wikitext)
    assert len(ids) == 301_948                               # docs/data.md
    assert tok.decode(ids) == wikitext
    assert (tok.bos_id, tok.add_bos) == (1, False)
    assert tok.tokenizer.id_to_token(ids[1]) == "\u0120Robert"
    assert [tok.tokenizer.id_to_token(i) for i in tok.encode(" 2009")] == ["\u0120", "2", "0", "0", "9"]


@pytest.mark.slow
def test_gemma3_round_trip_and_reference(wikitext):
    from hlwq_jax.ckpt import gguf_io
    tok = _real_tokenizer("gemma3-270m")
    ids = tok.encode(wikitext)
    assert tok.decode(ids) == wikitext
    assert (tok.bos_id, tok.add_bos) == (2, True)
    meta = gguf_io.read_metadata(gguf_io.locate_model_file("gemma3-270m"))
    pieces = [T._spm_piece(t, y) for t, y in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])]
    scores, types = meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    normal = [p if y == 1 else "\0" + p for p, y in zip(pieces, types)]          # the BPE vocabulary only
    for line in wikitext[:6000].split("\n")[1:12]:                               # newline = user-defined piece
        if line:
            assert tok.encode(line) == spm_bpe_reference(line, normal, scores), line
