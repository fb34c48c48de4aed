"""Shared test fixtures: data comes from ../shared beside the repository root.

Tests that need a file from ../shared skip with a clear reason when it is absent.
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "models"


def shared_file(rel: str) -> Path:
    """Path of ../shared/models/<rel>, or skip the test when it is not there."""
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"test data {path} is absent (../shared beside the repo is needed)")
    return path


@pytest.fixture(scope="session")
def stories260k() -> Path:
    return shared_file("gguf/stories260K.gguf")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1, fetched once by ../shared/models/get-smollm2."""
    script = shared_file("get-smollm2")
    dest = os.environ.get("PYLLM_TEST_MODELS", str(Path.home() / ".cache" / "pyllm" / "models"))
    proc = subprocess.run(["bash", str(script), dest], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"SmolLM2 could not be fetched: {proc.stderr.strip().splitlines()[-1:]}")
    return Path(proc.stdout.strip().splitlines()[-1])
