"""hlwq_jax.provenance: the source digest of a tree equals the one computed from its commit in git, and changes with
any source byte; git_sha marks a dirty tree; outside git it says "unknown"."""
from __future__ import annotations

import subprocess

import pytest

from hlwq_jax import provenance


def _git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "hlwq_jax" / "ops").mkdir(parents=True)
    (tmp_path / "hlwq_jax" / "__init__.py").write_text("")
    (tmp_path / "hlwq_jax" / "ops" / "k.py").write_text("X = 1\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "bench.py").write_text("print(1)\n")
    (tmp_path / "README.md").write_text("not source\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "c")
    return tmp_path


def test_digest_of_tree_matches_its_commit_and_ignores_non_sources(repo):
    d = provenance.source_digest(repo)
    assert d == provenance.commit_digest("HEAD", repo) and len(d) == 16
    (repo / "hlwq_jax" / "__pycache__").mkdir()
    (repo / "hlwq_jax" / "__pycache__" / "k.py").write_text("cached")  # not a source
    (repo / "README.md").write_text("changed\n")
    (repo / "scripts").mkdir()
    (repo / "scripts" / "notes.txt").write_text("x")
    assert provenance.source_digest(repo) == d
    assert provenance.git_sha(repo).endswith("+dirty")  # README is tracked and changed


def test_digest_changes_with_a_byte_or_a_path(repo):
    d = provenance.source_digest(repo)
    (repo / "hlwq_jax" / "ops" / "k.py").write_text("X = 2\n")
    d2 = provenance.source_digest(repo)
    assert d2 != d
    (repo / "hlwq_jax" / "ops" / "k.py").rename(repo / "hlwq_jax" / "ops" / "j.py")
    assert provenance.source_digest(repo) not in (d, d2)
    assert provenance.commit_digest("HEAD", repo) == d  # the commit is unchanged


def test_git_sha_clean_and_outside_git(repo, tmp_path_factory):
    sha = provenance.git_sha(repo)
    assert len(sha) == 40 and "+" not in sha
    bare = tmp_path_factory.mktemp("nogit")
    (bare / "hlwq_jax").mkdir()
    (bare / "hlwq_jax" / "a.py").write_text("")
    assert provenance.code_version(bare)["git_sha"] == "unknown"


def test_errors_name_the_problem(repo, tmp_path_factory):
    with pytest.raises(ValueError, match="no-such-commit"):
        provenance.commit_digest("no-such-commit", repo)
    with pytest.raises(FileNotFoundError, match="no \\*.py files"):
        provenance.source_digest(tmp_path_factory.mktemp("empty"))
