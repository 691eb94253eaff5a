"""experiments.stage_inputs.assemble: joins hash-checked chunks; refuses corrupted or incomplete uploads."""
import hashlib
import json

import pytest

from experiments import stage_inputs


def _stage(tmp_path, data: bytes, n: int):
    parts = [data[k * len(data) // n:(k + 1) * len(data) // n] for k in range(n)]
    man = {"file": "m.gguf", "model": "m", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
           "parts": [{"name": f"m.gguf.part{k:02d}", "sha256": hashlib.sha256(p).hexdigest()}
                     for k, p in enumerate(parts)]}
    ups = []
    for k, p in enumerate(parts):
        up = tmp_path / f"up{k:02d}"
        up.mkdir()
        (up / f"m.gguf.part{k:02d}").write_bytes(p)
        ups.append(up)
    (ups[0] / "m.gguf.manifest.json").write_text(json.dumps(man))
    return ups


def test_assemble_in_two_uploads(tmp_path):
    data = bytes(range(256)) * 50
    ups = _stage(tmp_path, data, 3)
    dest = tmp_path / "dest"
    assert stage_inputs.assemble(ups[:2], dest) == []                 # incomplete: waits
    (out,) = stage_inputs.assemble(ups[2:], dest)
    assert out.read_bytes() == data and not list(dest.glob("*.part*"))
    assert stage_inputs.assemble([], dest) == [out]                   # idempotent


def test_assemble_rejects_corrupt_chunk(tmp_path):
    ups = _stage(tmp_path, b"x" * 1000 + b"y" * 1000, 2)
    (ups[1] / "m.gguf.part01").write_bytes(b"z" * 1000)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        stage_inputs.assemble(ups, tmp_path / "dest")
