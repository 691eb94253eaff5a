"""Oracle (run with the .venv-hf interpreter): decompress a CompressedTensors pack-quantized checkpoint with the REAL
``compressed-tensors`` package, and (for a Llama config) load it through transformers with dequantize=True.

usage: python compressed_tensors_decompress.py CKPT_DIR OUT.npz
OUT.npz holds, per quantized module M: "ct/M" (PackedQuantizationCompressor.decompress, float32) and, when the model
loads, "hf/M" (the transformers-loaded weight, float32); plus "scheme/M" = group size used by the matching scheme.
"""
import glob
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import is_match


def main(ckpt: str, out: str) -> None:
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])  # schema check by the package itself
    assert qc.format == "pack-quantized" and qc.quant_method == "compressed-tensors", qc
    tensors = {}
    for f in sorted(glob.glob(os.path.join(ckpt, "*.safetensors"))):
        tensors.update(load_file(f))
    probe = torch.nn.Linear(1, 1)
    result = {}
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        mod = key[: -len(".weight_packed")]
        schemes = [s for s in qc.config_groups.values() if is_match(mod, probe, s.targets, qc.ignore or [])]
        assert len(schemes) == 1, (mod, len(schemes))
        sd = {"weight_packed": tensors[key], "weight_scale": tensors[mod + ".weight_scale"],
              "weight_shape": tensors[mod + ".weight_shape"]}
        w = PackedQuantizationCompressor.decompress(sd, schemes[0])["weight"]
        result["ct/" + mod] = w.float().numpy()
        result["scheme/" + mod] = np.array(schemes[0].weights.group_size)
    for mod in qc.ignore or []:  # ignored modules must not be matched by any group
        assert mod + ".weight" in tensors, mod
    if cfg.get("model_type") == "llama":
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                     dtype=torch.bfloat16)
        sd = model.state_dict()
        for key in list(result):
            if key.startswith("ct/"):
                result["hf/" + key[3:]] = sd[key[3:] + ".weight"].float().numpy()
        ids = torch.arange(8)[None]
        result["logits"] = model(ids).logits.float().detach().numpy()
    np.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
