"""Evaluation text: the WikiText-2 raw test split, hash-checked (see ../shared/data/wikitext-2-raw/README.md).

Public signatures:
  REPO_ROOT, DEFAULT_WIKITEXT (= REPO_ROOT/../shared/data/wikitext-2-raw/wiki.test.raw)
  sha256_file(path) -> str
  load_wikitext(path=None) -> str      bytes SHA-256 checked, CRLF -> LF, normalised text SHA-256 checked
"""
from __future__ import annotations

import hashlib
import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_WIKITEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT_RAW_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
WIKITEXT_TEXT_SHA256 = "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_wikitext(path: str | os.PathLike | None = None) -> str:
    """The WikiText-2 raw test text with LF line ends; ValueError if the file is not the expected one."""
    path = pathlib.Path(path) if path is not None else DEFAULT_WIKITEXT
    if not path.is_file():
        raise FileNotFoundError(
            f"WikiText-2 test file not found at {path}. Expected ../shared/data/wikitext-2-raw/wiki.test.raw "
            "beside the repository (pass --data PATH for another copy).")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WIKITEXT_RAW_SHA256:
        raise ValueError(f"{path}: SHA-256 {digest} != expected {WIKITEXT_RAW_SHA256} "
                         "(wikitext-2-raw-v1 test split, CRLF, no empty rows)")
    text = raw.decode("utf-8").replace("\r\n", "\n")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != WIKITEXT_TEXT_SHA256:
        raise ValueError(f"{path}: text after CRLF->LF does not have SHA-256 {WIKITEXT_TEXT_SHA256}")
    return text
