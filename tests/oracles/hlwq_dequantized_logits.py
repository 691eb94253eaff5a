"""Oracle (run with the .venv-hf interpreter): logits of a (dequantized) checkpoint as transformers loads it.

usage: python hlwq_dequantized_logits.py CKPT_DIR TOKENS.npy OUT.npy
Loads CKPT_DIR with AutoModelForCausalLM (float32, eager attention, CPU), runs tokens int32 [B, T], saves float32
logits [B, T, V]. Fails if transformers reports missing / unexpected / mismatched weights.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main(ckpt: str, tokens: str, out: str) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"transformers could not load {ckpt} cleanly: {bad}")
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(np.load(tokens)).long()).logits.float().numpy()
    np.save(out, logits)


if __name__ == "__main__":
    main(*sys.argv[1:4])
