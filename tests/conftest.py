"""Shared test fixtures: data comes from ../shared beside the repository root.

Tests that need a file from ../shared, SmolLM2, or llama.cpp's tools skip with a clear reason
when it is absent, on a developer's machine. Under CI=true (as .ci/run runs) an absent one is
a failure instead, and a missing ../shared stops the run at once: CI must never pass with the
model tests silently skipped.
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "models"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_sessionstart(session):
    if IN_CI and not SHARED.is_dir():
        raise pytest.UsageError(f"CI=true but the test data {SHARED} is absent (../shared beside the repo)")


def absent(reason: str):
    """Skip the calling test for a missing file or tool; under CI=true, fail it."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: CI must provide it)", pytrace=False)
    pytest.skip(reason)


def shared_file(rel: str) -> Path:
    """Path of ../shared/models/<rel>, or skip the test when it is not there."""
    path = SHARED / rel
    if not path.exists():
        absent(f"test data {path} is absent (../shared beside the repo is needed)")
    return path


def llama_cpp_tool(name: str) -> Path:
    """llama.cpp's binary `name` from $PYLLM_LLAMA_CPP_BIN (.ci/run builds them)."""
    bin_dir = os.environ.get("PYLLM_LLAMA_CPP_BIN")
    if not bin_dir:
        absent("PYLLM_LLAMA_CPP_BIN (a folder with llama.cpp's tools, as .ci/run builds) is not set")
    path = Path(bin_dir) / name
    if not os.access(path, os.X_OK):
        absent(f"{path} is not there (PYLLM_LLAMA_CPP_BIN)")
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
        absent(f"SmolLM2 could not be fetched: {proc.stderr.strip().splitlines()[-1:]}")
    return Path(proc.stdout.strip().splitlines()[-1])
