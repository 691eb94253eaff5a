"""Perplexity protocols (window bookkeeping), NLL vs a float64 oracle, closed-form PPL, and the data hash check."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from hlwq_jax.eval import data, perplexity as P


def _scored(tokens_n, windows, bos):
    idx = []
    toks = np.arange(tokens_n)
    length = max(w.end - w.start for w in windows)
    _, targets, mask = P.make_batch(toks, windows, bos, length)
    for r in range(len(windows)):
        idx += list(targets[r][mask[r]])
    return idx


@pytest.mark.parametrize("n,win", [(1000, 100), (1050, 100), (257, 256)])
def test_chunks(n, win):
    ws = P.chunk_windows(n, win)
    assert len(ws) == n // win and all(w.end - w.start == win for w in ws)
    for bos in (None, 7):
        s = _scored(n, ws, bos)                                # tokens are their own indices
        assert s == [t for k in range(n // win) for t in range(k * win + 1, (k + 1) * win)]
    assert len(P.chunk_windows(n, win, max_windows=1)) == 1


@pytest.mark.parametrize("n,win,stride", [(5000, 2048, 512), (2048, 2048, 512), (2100, 512, 128), (30, 8, 3)])
def test_sliding_scores_every_token_once(n, win, stride):
    ws = P.sliding_windows(n, win, stride)
    assert ws[-1].end == n and all(w.end - w.start <= win for w in ws)
    for bos in (None, 0):
        assert _scored(n, ws, bos) == list(range(1, n))
    if len(ws) > 2:                                            # middle windows score exactly their last `stride`
        assert ws[1].end - ws[1].score_from == stride


def test_make_batch_bos_layout():
    toks = np.arange(10, 20)
    inp, tgt, mask = P.make_batch(toks, [P.Window(0, 5, 0)], 1, 6)
    np.testing.assert_array_equal(inp[0], [1, 10, 11, 12, 13, 0])
    np.testing.assert_array_equal(tgt[0][:5], [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(mask[0], [False, True, True, True, True, False])
    inp, tgt, mask = P.make_batch(toks, [P.Window(0, 5, 0)], None, 5)
    np.testing.assert_array_equal(inp[0], [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(mask[0], [True, True, True, True, False])


def test_token_nll_matches_float64(rng):
    logits = rng.normal(size=(2, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 7)).astype(np.int32)
    mask = rng.random((2, 7)) > 0.3
    s, c = P.token_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    rs, rc = P.token_nll_reference(logits, targets, mask)
    assert int(c) == rc
    np.testing.assert_allclose(float(s), rs, rtol=1e-5)


def test_evaluate_closed_form():
    """A model with logits = log(q) for a fixed distribution q has PPL exp(mean −log q[target])."""
    v = 13
    q = np.arange(1, v + 1, dtype=np.float64)
    q /= q.sum()
    tokens = np.random.default_rng(1).integers(0, v, size=700)

    def nll_fn(inputs, targets, mask):
        logits = jnp.broadcast_to(jnp.log(jnp.asarray(q, jnp.float32)), (*inputs.shape, v))
        return P.token_nll(logits, targets, mask)
    for proto, win in (("chunks", 64), ("sliding", 128)):
        ws = P.make_windows(proto, len(tokens), win, 32)
        r = P.evaluate(nll_fn, tokens, ws, None, 3)
        scored = np.array(_scored(len(tokens), ws, None))
        expect = math.exp(np.mean(-np.log(q[tokens[scored]])))
        assert r.tokens == len(scored)
        np.testing.assert_allclose(r.ppl, expect, rtol=1e-5)


def test_protocol_errors():
    with pytest.raises(ValueError, match="unknown perplexity protocol"):
        P.make_windows("strided", 100, 10)
    with pytest.raises(ValueError, match="no full window"):
        P.chunk_windows(10, 512)
    with pytest.raises(ValueError, match="stride"):
        P.sliding_windows(100, 10, 20)


def test_wikitext_hash(tmp_path):
    if not data.DEFAULT_WIKITEXT.is_file():
        pytest.skip("shared WikiText-2 file absent")
    text = data.load_wikitext()
    assert len(text.encode()) == 1_287_656 and "\r" not in text
    bad = tmp_path / "wiki.test.raw"
    bad.write_bytes(data.DEFAULT_WIKITEXT.read_bytes()[:-1] + b"X")
    with pytest.raises(ValueError, match="SHA-256"):
        data.load_wikitext(bad)
    with pytest.raises(FileNotFoundError, match="--data"):
        data.load_wikitext(tmp_path / "nope.raw")
