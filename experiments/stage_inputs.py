"""Stage the quality-table inputs for a machine without the model packages / `gguf` (the H200 box), in pieces that
fit the device tool's 64 MiB-per-call transfer limit, and reassemble them there.

    python -m experiments.stage_inputs stage [--dir .cache/stage] [--models smollm2-135m,gemma3-270m] [--part-mib 56]
        writes DIR/upNN/ folders (each ≤ part-mib MiB): GGUF chunks + manifests, every model's tokenizer.json,
        wiki.test.raw (../shared does not travel to the device) and pylib/gguf (the pure-Python `gguf` package, needed only to read GGUF files); prints the upload plan.
    python -m experiments.stage_inputs assemble --src DIR... --dest /tmp/hlwq_stage
        copies the pieces of one or more upNN folders into DEST and, once all chunks of a model are there, joins
        them into DEST/<file>.gguf after checking every SHA-256 (raises on a mismatch or a missing chunk).
DIR is under /.cache/, which .gitignore ignores, so it travels only when named in `carry`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import sys

from hlwq_jax.ckpt import gguf_io
from hlwq_jax.eval.data import DEFAULT_WIKITEXT, REPO_ROOT, load_wikitext, sha256_file
from hlwq_jax.text import load_tokenizer, save_tokenizer_json

MIB = 1 << 20


def stage(out_dir: pathlib.Path, models: list[str], part_mib: int) -> list[pathlib.Path]:
    """Write upload folders; returns them in order."""
    import gguf  # the package to copy
    limit = part_mib * MIB
    out_dir.mkdir(parents=True, exist_ok=True)
    items: list[tuple[str, bytes | pathlib.Path, int]] = []       # (name, data or source dir, size)
    pkg = pathlib.Path(gguf.__file__).parent
    items.append(("pylib/gguf", pkg, sum(p.stat().st_size for p in pkg.rglob("*.py"))))
    load_wikitext()                                               # hash check before staging the data file
    items.append((DEFAULT_WIKITEXT.name, DEFAULT_WIKITEXT, DEFAULT_WIKITEXT.stat().st_size))
    for model in models:
        path = gguf_io.locate_model_file(model)
        contents = gguf_io.read_gguf(path, tensors=False)
        tok = load_tokenizer(path, metadata=contents.metadata)
        tj = out_dir / f"{model}.tokenizer.json"
        save_tokenizer_json(tok, tj)
        items.append((tj.name, tj, tj.stat().st_size))
        data = path.read_bytes()
        chunk = limit - 2 * MIB
        parts = [data[i:i + chunk] for i in range(0, len(data), chunk)]
        manifest = {"file": path.name, "model": model, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                    "parts": [{"name": f"{path.name}.part{k:02d}", "sha256": hashlib.sha256(p).hexdigest()}
                              for k, p in enumerate(parts)]}
        items.append((f"{path.name}.manifest.json", json.dumps(manifest, indent=1).encode(), 1000))
        items += [(m["name"], p, len(p)) for m, p in zip(manifest["parts"], parts)]
    folders, cur, used = [], None, limit
    for name, payload, size in items:
        if used + size > limit:
            cur = out_dir / f"up{len(folders):02d}"
            if cur.exists():
                shutil.rmtree(cur)
            cur.mkdir(parents=True)
            folders.append(cur)
            used = 0
        dest = cur / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(payload, bytes):
            dest.write_bytes(payload)
        elif payload.is_dir():
            shutil.copytree(payload, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(payload, dest)
        used += size
    return folders


def assemble(srcs: list[pathlib.Path], dest: pathlib.Path) -> list[pathlib.Path]:
    """Copy pieces into dest; join complete models (hash-checked). Returns the joined GGUF paths."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in srcs:
        if not src.is_dir():
            raise FileNotFoundError(f"stage folder {src} not found")
        shutil.copytree(src, dest, dirs_exist_ok=True)
    done = []
    for man_path in sorted(dest.glob("*.manifest.json")):
        man = json.loads(man_path.read_text())
        target = dest / man["file"]
        if target.is_file() and sha256_file(target) == man["sha256"]:
            done.append(target)
            continue
        missing = [p["name"] for p in man["parts"] if not (dest / p["name"]).is_file()]
        if missing:
            print(f"{man['file']}: waiting for {missing}", file=sys.stderr)
            continue
        tmp = target.with_name(target.name + ".tmp")
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for p in man["parts"]:
                b = (dest / p["name"]).read_bytes()
                if hashlib.sha256(b).hexdigest() != p["sha256"]:
                    raise ValueError(f"{dest / p['name']}: SHA-256 mismatch")
                h.update(b)
                out.write(b)
        if h.hexdigest() != man["sha256"]:
            tmp.unlink()
            raise ValueError(f"{target}: joined SHA-256 {h.hexdigest()} != {man['sha256']}")
        os.replace(tmp, target)
        for p in man["parts"]:
            (dest / p["name"]).unlink()
        done.append(target)
    return done


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.stage_inputs", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("--dir", default=str(REPO_ROOT / ".cache" / "stage"))
    s.add_argument("--models", default="smollm2-135m,gemma3-270m")
    s.add_argument("--part-mib", type=int, default=56)
    a_ = sub.add_parser("assemble")
    a_.add_argument("--src", nargs="+", required=True)
    a_.add_argument("--dest", required=True)
    a = p.parse_args(argv)
    if a.cmd == "stage":
        folders = stage(pathlib.Path(a.dir), a.models.split(","), a.part_mib)
        for f in folders:
            size = sum(x.stat().st_size for x in f.rglob("*") if x.is_file())
            rel = f.relative_to(REPO_ROOT) if f.is_relative_to(REPO_ROOT) else f
            print(f"{rel}  {size / MIB:.1f} MiB  {sorted(x.name for x in f.iterdir())}")
    else:
        for path in assemble([pathlib.Path(s) for s in a.src], pathlib.Path(a.dest)):
            print(f"ready: {path}")


if __name__ == "__main__":
    main()
