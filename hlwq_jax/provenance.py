"""Which code produced a result: the git commit, and a digest of the Python sources themselves.

The digest is what to trust where the checkout's git metadata may not match its files: the device machine runs a
copy of the working tree whose ``.git`` stays as it was when the session started (the tenth session's results were
labelled "5790e2a+uncommitted changes" while the tree was 2219998). Match a result to a commit with
    python -m hlwq_jax.provenance --at 2219998        # the digest that commit's files give
    python -m hlwq_jax.provenance                     # the working tree's
The digest is sha256 over the relative path and the sha256 of the bytes of every ``*.py`` under hlwq_jax/,
experiments/ and scripts/ (sorted by path; the directories a checkout lacks are left out), first 16 hex digits.
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("hlwq_jax", "experiments", "scripts")


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return h.hexdigest()[:16]


def source_digest(root: pathlib.Path = REPO) -> str:
    """Digest of the ``*.py`` files under ``root``'s SOURCE_DIRS as they are on disk."""
    files = {}
    for d in SOURCE_DIRS:
        for f in (root / d).rglob("*.py"):
            if "__pycache__" not in f.parts:
                files[f.relative_to(root).as_posix()] = f.read_bytes()
    if not files:
        raise FileNotFoundError(f"no *.py files under {root} / {SOURCE_DIRS}")
    return _digest(files)


def commit_digest(commit: str, root: pathlib.Path = REPO) -> str:
    """The digest ``source_digest`` gives on a checkout of ``commit`` (read from git, nothing checked out)."""
    def git(*args) -> bytes:
        run = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=60)
        if run.returncode:
            raise ValueError(f"git {' '.join(args)}: {run.stderr.decode().strip()}")
        return run.stdout

    paths = [p for p in git("ls-tree", "-r", "--name-only", commit, "--", *SOURCE_DIRS).decode().splitlines()
             if p.endswith(".py")]
    if not paths:
        raise ValueError(f"commit {commit} has no *.py files under {SOURCE_DIRS}")
    return _digest({p: git("show", f"{commit}:{p}") for p in paths})


def git_sha(root: pathlib.Path = REPO) -> str:
    """HEAD's sha, with "+dirty" when tracked files differ from it; "unknown" without git. Where the files may not
    match the git metadata (a copied tree), ``source_digest`` says which code it was."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode:
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def code_version(root: pathlib.Path = REPO) -> dict:
    """{"git_sha": ..., "source_digest": ...} for a result's header."""
    return {"git_sha": git_sha(root), "source_digest": source_digest(root)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--at", metavar="COMMIT", help="the digest of this commit's files instead of the working tree's")
    args = ap.parse_args(argv)
    print(commit_digest(args.at) if args.at else source_digest())


if __name__ == "__main__":
    main()
