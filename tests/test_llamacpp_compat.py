"""llama.cpp itself as the oracle: files pyllm writes load there (and f32/f16/q8_0 conversions
decode the same greedy text), quantized bytes are identical, and its log-probabilities agree
with pyllm's: equal on F32 models, the same next-token choices on quantized ones.

Needs llama.cpp's tools in $PYLLM_LLAMA_CPP_BIN (.ci/run builds them from the llama-cpp-python
sdist it pins; tests/conftest.py makes a missing tool a failure under CI=true).

Logits come from `llama-perplexity --kl-divergence-base FILE`, which stores, for the second
half of each context, every token's log-probability quantized to 16 bits over the top 16 nats
(tools/perplexity/perplexity.cpp, log_softmax): readable to within its scale (<= 2.5e-4).
"""

import subprocess
from pathlib import Path

import numpy as np
import pyllm
import pytest
from conftest import llama_cpp_tool, shared_file
from pyllm.base import is_pyllm_only
from pyllm.convert.hf import convert_hf
from pyllm.convert.quantize import FILE_TYPES, quantize_gguf
from pyllm.runtime.gguf_file import GGUFFile

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run(*cmd) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def pyllm_cli(*args) -> str:
    return run("pyllm", *args)


def llama_simple(model: Path, prompt: str, n: int) -> str:
    """llama-simple's greedy continuation (it echoes the prompt after BOS: cut it off)."""
    out = run(llama_cpp_tool("llama-simple"), "-m", model, "-n", n, prompt)
    return out.split(prompt, 1)[1]


@pytest.fixture(scope="module")
def stories_f32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compat") / "stories-f32.gguf"
    pyllm_cli("convert", shared_file("derived/stories260K-hf"), "-o", out, "--outtype", "f32")
    return out


# -- greedy text -----------------------------------------------------------------------------

@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_decodes_our_conversion_like_pyllm(tmp_path, outtype):
    model = tmp_path / f"stories-{outtype}.gguf"
    pyllm_cli("convert", shared_file("derived/stories260K-hf"), "-o", model, "--outtype", outtype)
    ours = pyllm_cli("generate", "-m", model, "-p", "Once upon a time", "-n", "48", "--temp", "0")
    assert llama_simple(model, "Once upon a time", 48).strip() == ours.strip()


# pyllm's own types are left out: llama.cpp refuses their files (tests/test_lowbit.py checks how)
@pytest.mark.parametrize("qtype", [t for t, ft in FILE_TYPES.items() if t != "F32" and not is_pyllm_only(ft.default)])
def test_every_quantize_type_runs_alike_in_llama_cpp(tmp_path, stories260k, qtype):
    """Every file `pyllm quantize` writes (with llama-quantize's per-tensor mixes and fall-backs
    on stories260K's 64-wide rows) loads in llama.cpp, and over a story llama.cpp's next-token
    choices are pyllm's (as for SmolLM2 below). Not the greedy text itself: llama.cpp rounds
    activations to 8 bits for these products, which flips near ties (seen on Q4_1 and Q3_K_M:
    a 0.004-logit tie, and two tokenizations of the same text), after which the texts part."""
    model = tmp_path / f"stories-{qtype}.gguf"
    quantize_gguf(stories260k, model, qtype)
    assert_same_choices(tmp_path, model, shared_file("text/tinystories_valid_head.txt"), 256)


# -- bytes -----------------------------------------------------------------------------------

def assert_same_tensors(ours: Path, theirs: Path):
    a, b = GGUFFile(ours), GGUFFile(theirs)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].qtype == b.tensors[name].qtype, name
        assert np.array_equal(a.raw(name), b.raw(name)), name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_quantize_bytes_equal_llama_quantize(tmp_path, stories_f32, qtype):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    pyllm_cli("quantize", stories_f32, ours, qtype)
    run(llama_cpp_tool("llama-quantize"), stories_f32, theirs, qtype)
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q3_K_S", "Q6_K"])
def test_requantize_smollm2_equals_llama_quantize(tmp_path, smollm2, qtype):
    """Real 576-wide rows: the K-quant mixes and their fall-backs, tensor by tensor, byte by byte."""
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    pyllm_cli("quantize", "--allow-requantize", smollm2, ours, qtype)
    run(llama_cpp_tool("llama-quantize"), "--allow-requantize", smollm2, theirs, qtype)
    assert_same_tensors(ours, theirs)


# -- logits ----------------------------------------------------------------------------------

def llama_cpp_log_probs(tmp_path, model: Path, text: str, n_ctx: int):
    """(tokens (n_ctx,), log-probs (n_ctx-1-n_ctx//2, vocab), scale per row) for the first context
    of text, as llama-perplexity evaluates it: positions n_ctx//2 .. n_ctx-2, each predicting
    the next token. Entries below the stored 16-nat window are -inf."""
    f, out = tmp_path / "text.txt", tmp_path / "kld-base.bin"
    f.write_text(text, encoding="utf-8")
    run(llama_cpp_tool("llama-perplexity"), "-m", model, "-f", f, "-c", n_ctx, "-b", n_ctx, "--chunks", 1,
        "-t", 2, "--kl-divergence-base", out)
    data = out.read_bytes()
    assert data[:8] == b"_logits_"
    ctx, n_vocab, n_chunk = np.frombuffer(data, np.int32, 3, 8)
    assert (ctx, n_chunk) == (n_ctx, 1)
    tokens = np.frombuffer(data, np.int32, n_ctx, 20)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.frombuffer(data, np.uint16, (n_ctx - 1 - n_ctx // 2) * nv, 20 + 4 * n_ctx).reshape(-1, nv)
    head = rows[:, :4].copy().view(np.float32)  # (rows, 2): scale, min_log_prob
    q = rows[:, 4:4 + n_vocab].astype(np.float64)
    lp = head[:, 1:2] + head[:, 0:1] * q
    lp[q == 0] = -np.inf
    # (for a vocab that adds BOS, the text's tokens already start with it, so the stored tokens
    # are exactly the evaluated ones)
    return tokens, lp, head[:, 0].astype(np.float64)


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("fixture", ["qwen2-yarn", "llama-bias", "qwen2", "llama"])
def test_logits_equal_llama_cpp_on_tiny_models(tmp_path, fixture):
    """YaRN (positions 256..510, past the 256-token original context), attn_output.bias, q/k/v
    biases and Llama-3 rope factors: llama.cpp's log-probabilities equal pyllm's (F32 weights)."""
    model = tmp_path / f"{fixture}.gguf"
    convert_hf(FIXTURES / f"tiny-{fixture}", model, "f32")
    text = shared_file("text/tinystories_valid_head.txt").read_text(encoding="utf-8")[:8000]
    n_ctx = 512
    tokens, theirs, scale = llama_cpp_log_probs(tmp_path, model, text, n_ctx)
    ours = log_softmax(pyllm.load(model, n_ctx=n_ctx).logits([int(t) for t in tokens])[n_ctx // 2 : n_ctx - 1])
    seen = np.isfinite(theirs)
    assert seen.mean() > 0.99  # a random tiny model's distribution is flat: nearly all stored
    err = np.abs(ours - theirs)[seen]
    assert err.max() <= scale.max() + 1e-3, err.max()


def assert_same_choices(tmp_path, model: Path, text_file: Path, n_ctx: int, text_chars: int = 6000):
    """pyllm's next-token choice over the second half of a context is llama.cpp's wherever
    llama.cpp's own top two are more than 1 nat apart, and at 90% of all positions; pyllm's
    choice is never more than 1 nat below llama.cpp's best. llama.cpp rounds activations to
    8 bits (Q8_K / Q8_0 / Q8_1) for quantized products, so its log-probabilities stray from
    exact arithmetic by ~0.1 nat on average (up to ~1.7 on single tokens, SmolLM2 Q4_K_M);
    pyllm is within 1e-5 of a float64 reference (test_model.py)."""
    text = text_file.read_text(encoding="utf-8")[:text_chars]
    tokens, theirs, _ = llama_cpp_log_probs(tmp_path, model, text, n_ctx)
    ours = pyllm.load(model, n_ctx=n_ctx).logits([int(t) for t in tokens])[n_ctx // 2 : n_ctx - 1]
    top1, their_top1 = ours.argmax(-1), theirs.argmax(-1)
    best = np.sort(theirs, -1)[:, ::-1]
    clear = best[:, 0] - best[:, 1] > 1.0
    assert clear.sum() >= 0.3 * len(clear)
    assert (top1[clear] == their_top1[clear]).all()
    assert (top1 == their_top1).mean() >= 0.9
    assert (theirs[np.arange(len(top1)), top1] >= best[:, 0] - 1.0).all()


def test_smollm2_q4_k_m_top1_equals_llama_cpp(tmp_path, smollm2):
    """A llama-quantize'd Q4_K_M SmolLM2 over a Wikipedia paragraph: the same next-token choices."""
    model = tmp_path / "smollm2-q4_k_m.gguf"
    run(llama_cpp_tool("llama-quantize"), "--allow-requantize", smollm2, model, "Q4_K_M")
    assert_same_choices(tmp_path, model, shared_file("text/wikitext-2-raw-wiki.test.raw"), 256)
