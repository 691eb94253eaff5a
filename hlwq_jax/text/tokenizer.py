"""Tokenizers rebuilt offline from GGUF metadata with the `tokenizers` package, cached as tokenizer.json.

Public signatures:
  build_tokenizer(metadata) -> tokenizers.Tokenizer
      tokenizer.ggml.model "gpt2"  (SmolLM2, Qwen): byte-level BPE over tokens + merges; pre-tokenizer "smollm" =
                                   single-digit split then the GPT-2 byte-level regex (checked on WikiText-2);
                                   "qwen2" = Qwen2's split regex (written from its tokenizer.json layout, not checked
                                   on a real file here); control tokens become special added tokens.
      tokenizer.ggml.model "llama" (Gemma-3): SentencePiece-BPE with byte fallback. Merges are derived from the piece
                                   scores: every split of a normal piece p into two normal pieces (a, b) is a merge,
                                   ranked by score(p) descending (SentencePiece merges the pair whose result scores
                                   highest). " " is normalised to "▁"; user-defined pieces (newline runs, space runs
                                   stored with real spaces) are added tokens matched before BPE; no space prefix.
  merges_from_scores(tokens, scores, types) -> list[(a, b)]
  TextTokenizer(tokenizer, bos_id, add_bos, source)   .encode(text) -> list[int] (no BOS), .decode(ids) -> str
  load_tokenizer(gguf_path=None, tokenizer_json=None, metadata=None) -> TextTokenizer
      tokenizer_json given: load it (the GPU path: no GGUF, no `gguf` package needed; BOS settings are stored in the
      json's "hlwq" block). Else rebuild from the GGUF metadata, cached under cache_dir()/tokenizers/<key>.json where
      key hashes the vocabulary, merges/scores and types.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np

GGUF_TOKEN_NORMAL, GGUF_TOKEN_UNKNOWN, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER, GGUF_TOKEN_UNUSED, GGUF_TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)
_SPM_SPACE = "\u2581"


def _tk():
    import tokenizers
    return tokenizers


def _byte_level_bpe(meta: dict):
    tk = _tk()
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"GGUF tokenizer.ggml.merges: entries not of the form 'a b': {bad[:3]}")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens has duplicate entries")
    pre = meta.get("tokenizer.ggml.pre")
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
            [tk.pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("qwen2",):
        # Qwen2: the cl100k-style split (digits one at a time) then byte mapping without its own regex.
        pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
            [tk.pre_tokenizers.Split(tk.Regex(pat), behavior="isolated"),
             tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} not supported (known: smollm, qwen2)")
    tok.decoder = tk.decoders.ByteLevel()
    special = [tk.AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == GGUF_TOKEN_CONTROL]
    user = [tk.AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == GGUF_TOKEN_USER]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


def _spm_piece(token: str, ttype: int) -> str:
    """GGUF stores SentencePiece user-defined whitespace pieces with real spaces; the model sees "▁"."""
    if ttype == GGUF_TOKEN_USER and token and token.strip(" ") == "":
        return _SPM_SPACE * len(token)
    return token


def merges_from_scores(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece-BPE scores: (a, b) for every normal piece p = a + b with a, b normal
    pieces; ordered by score(p) descending, then by the id of p, then by len(a) descending (stable)."""
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == GGUF_TOKEN_NORMAL}
    scores = np.asarray(scores, np.float64)
    cand = []
    for piece, pid in normal.items():
        for cut in range(len(piece) - 1, 0, -1):
            a, b = piece[:cut], piece[cut:]
            if a in normal and b in normal:
                cand.append((-scores[pid], pid, -len(a), a, b))
    cand.sort()
    return [(a, b) for *_, a, b in cand]


def _sentencepiece_bpe(meta: dict):
    tk = _tk()
    raw, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF tokenizer.ggml.model 'llama' without tokenizer.ggml.scores: cannot derive merges")
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise ValueError("GGUF tokenizer.ggml.add_space_prefix=True is not supported (Gemma-3 has False)")
    tokens = [_spm_piece(t, ty) for t, ty in zip(raw, types)]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 0))]
    merges = merges_from_scores(tokens, scores, types)
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = tk.normalizers.Replace(" ", _SPM_SPACE)
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace(_SPM_SPACE, " "), tk.decoders.ByteFallback(),
                                        tk.decoders.Fuse()])
    special = [tk.AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == GGUF_TOKEN_CONTROL]
    # user-defined pieces are matched on the normalised text (spaces already "▁"), atomically, before BPE
    user = [tk.AddedToken(tokens[i], special=False, normalized=True)
            for i, t in enumerate(types) if t == GGUF_TOKEN_USER]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


def build_tokenizer(metadata: dict):
    """A tokenizers.Tokenizer from GGUF key/values (see module docstring)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return _byte_level_bpe(metadata)
    if kind == "llama":
        return _sentencepiece_bpe(metadata)
    raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} not supported (gpt2 byte-level BPE, llama SentencePiece)")


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A tokenizers.Tokenizer plus the BOS convention of its model."""
    tokenizer: object
    bos_id: int | None
    add_bos: bool
    source: str

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS (callers prepend bos_id when add_bos)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _bos_settings(meta: dict) -> tuple[int | None, bool]:
    bos = meta.get("tokenizer.ggml.bos_token_id")
    default_add = meta.get("tokenizer.ggml.model") == "llama"
    return (None if bos is None else int(bos)), bool(meta.get("tokenizer.ggml.add_bos_token", default_add))


BUILDER_VERSION = 1                     # bump when build_tokenizer changes: it is part of the cache key


def _cache_key(meta: dict) -> str:
    h = hashlib.sha256(f"hlwq-tokenizer-v{BUILDER_VERSION}".encode())
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
              "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.add_bos_token"):
        h.update(k.encode())
        h.update(json.dumps(meta.get(k)).encode())
    return h.hexdigest()[:20]


def save_tokenizer_json(tok: TextTokenizer, path: str | os.PathLike) -> pathlib.Path:
    """Write the tokenizer (with its BOS settings in an "hlwq" block) atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(tok.tokenizer.to_str())
    data["hlwq"] = {"bos_id": tok.bos_id, "add_bos": tok.add_bos}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def load_tokenizer_json(path: str | os.PathLike) -> TextTokenizer:
    """Load a tokenizer.json written by save_tokenizer_json (needs its "hlwq" BOS block)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found")
    data = json.loads(path.read_text())
    if "hlwq" not in data:
        raise ValueError(f"{path}: no 'hlwq' block with bos_id/add_bos (write it with save_tokenizer_json)")
    extra = data.pop("hlwq")
    tok = _tk().Tokenizer.from_str(json.dumps(data))
    return TextTokenizer(tok, extra["bos_id"], bool(extra["add_bos"]), str(path))


def load_tokenizer(gguf_path=None, tokenizer_json=None, metadata: dict | None = None) -> TextTokenizer:
    """Tokenizer from a cached/given tokenizer.json, or rebuilt from GGUF metadata (then cached)."""
    if tokenizer_json is not None:
        return load_tokenizer_json(tokenizer_json)
    from hlwq_jax.ckpt import gguf_io
    if metadata is None:
        if gguf_path is None:
            raise ValueError("load_tokenizer needs gguf_path, metadata or tokenizer_json")
        metadata = gguf_io.read_metadata(gguf_path)
    cached = gguf_io.cache_dir() / "tokenizers" / f"{_cache_key(metadata)}.json"
    if cached.is_file():
        return load_tokenizer_json(cached)
    bos, add_bos = _bos_settings(metadata)
    tok = TextTokenizer(build_tokenizer(metadata), bos, add_bos, f"gguf:{gguf_path or 'metadata'}")
    save_tokenizer_json(tok, cached)
    return dataclasses.replace(tok, source=str(cached))
