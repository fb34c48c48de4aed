"""Files pyllm writes load in llama.cpp and decode the same greedy text; quantized bytes match.

Needs llama.cpp's binaries (llama-simple, llama-quantize): set PYLLM_LLAMA_CPP_BIN to the
folder holding them (a cmake build's bin/). Skipped otherwise, so CI needs no C++ build.
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pyllm.runtime.gguf_file import GGUFFile

from conftest import shared_file

BIN = os.environ.get("PYLLM_LLAMA_CPP_BIN")
pytestmark = pytest.mark.skipif(not BIN, reason="PYLLM_LLAMA_CPP_BIN (llama.cpp's build/bin) is not set")


def run(*cmd) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def pyllm(*args) -> str:
    return run("pyllm", *args)


@pytest.fixture(scope="module")
def stories_f32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compat") / "stories-f32.gguf"
    pyllm("convert", shared_file("derived/stories260K-hf"), "-o", out, "--outtype", "f32")
    return out


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_decodes_our_conversion_like_pyllm(tmp_path, outtype):
    model = tmp_path / f"stories-{outtype}.gguf"
    pyllm("convert", shared_file("derived/stories260K-hf"), "-o", model, "--outtype", outtype)
    theirs = run(Path(BIN) / "llama-simple", "-m", model, "-n", "48", "Once upon a time")
    ours = pyllm("generate", "-m", model, "-p", "Once upon a time", "-n", "48", "--temp", "0")
    # llama-simple echoes the prompt (after BOS); we print only the continuation
    assert theirs.split("Once upon a time", 1)[1].strip() == ours.strip()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_quantize_bytes_equal_llama_quantize(tmp_path, stories_f32, qtype):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    pyllm("quantize", stories_f32, ours, qtype)
    run(Path(BIN) / "llama-quantize", stories_f32, theirs, qtype)
    assert_same_tensors(ours, theirs)


def assert_same_tensors(ours: Path, theirs: Path):
    a, b = GGUFFile(ours), GGUFFile(theirs)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].qtype == b.tensors[name].qtype, name
        assert np.array_equal(a.raw(name), b.raw(name)), name


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q3_K_S", "Q6_K"])
def test_requantize_smollm2_equals_llama_quantize(tmp_path, smollm2, qtype):
    """Real 576-wide rows: the K-quant mixes and their fall-backs, tensor by tensor, byte by byte."""
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    pyllm("quantize", "--allow-requantize", smollm2, ours, qtype)
    run(Path(BIN) / "llama-quantize", "--allow-requantize", smollm2, theirs, qtype)
    assert_same_tensors(ours, theirs)
