"""hlwq_jax.text: tokenizers rebuilt offline from GGUF metadata (see tokenizer.py)."""
from hlwq_jax.text.tokenizer import TextTokenizer, build_tokenizer, load_tokenizer, load_tokenizer_json, save_tokenizer_json

__all__ = ["TextTokenizer", "build_tokenizer", "load_tokenizer", "load_tokenizer_json", "save_tokenizer_json"]
