"""Shared fixtures: the Hugging Face oracle interpreter and deterministic RNGs."""
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def hf_python() -> str:
    """Path of the Python 3.11 interpreter that has CPU torch + transformers (the `hf` oracle tier).

    Skips when absent, unless HLWQ_REQUIRE_HF=1 (CI), where absence is a failure.
    """
    path = os.environ.get("HLWQ_HF_PYTHON", str(REPO / ".venv-hf" / "bin" / "python"))
    if not pathlib.Path(path).exists():
        if os.environ.get("HLWQ_REQUIRE_HF") == "1":
            pytest.fail(f"HLWQ_REQUIRE_HF=1 but the oracle interpreter {path} does not exist (run scripts/setup)")
        pytest.skip(f"oracle interpreter {path} not found (run scripts/setup to create .venv-hf)")
    return path
