"""The decoder against two oracles: llama2.c's published greedy sample, and an independent
float64 numpy forward pass over gguf-py's own dequantization (tests/reference_llama.py)."""

from pathlib import Path

import numpy as np
import pyllm
import pytest
from pyllm.base import PyllmError

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def stories(stories260k):
    return pyllm.load(stories260k, n_ctx=512, n_threads=2)


def test_stories260k_greedy_reproduces_llama2c_sample(stories):
    expected = (DATA / "stories260K_greedy.txt").read_text()
    text = pyllm.generate(stories, "", max_tokens=256, temp=0)
    assert text.startswith(expected.rstrip("\n"))


def _cosines(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_stories260k_logits_match_reference(stories, stories260k):
    from reference_llama import forward, load_weights

    ids = stories.tokenizer.encode("Once upon a time, there was a little dog named Max. He liked to run.")
    ours = stories.logits(ids)
    ref = forward(*load_weights(stories260k), ids)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_smollm2_logits_match_reference(smollm2):
    from reference_llama import forward, load_weights

    model = pyllm.load(smollm2, n_ctx=256, n_threads=2)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris."
    ids = model.tokenizer.encode(text)
    ours = model.logits(ids)  # (n, vocab)
    ref = forward(*load_weights(smollm2), ids)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert _cosines(ours, ref).min() >= 0.999


def test_incremental_decode_equals_batch(stories):
    ids = stories.tokenizer.encode("Lily saw a big red ball in the park.")
    batch = stories.logits(ids)
    stories.reset()
    step = np.stack([stories.eval([i]) for i in ids])
    np.testing.assert_allclose(step, batch, atol=1e-4)
    # KV reuse: a prompt sharing a prefix evaluates only the new tokens
    stories.reset()
    stories.eval(ids)
    more = ids + stories.tokenizer.encode(" She ran.", add_bos=False)
    todo = stories.reuse_prefix(more)
    assert todo == more[len(ids):]
    np.testing.assert_allclose(stories.eval(todo), stories.logits(more)[-1], atol=1e-4)


def test_same_seed_same_text(stories):
    a = pyllm.generate(stories, "Once upon a time", max_tokens=40, seed=7)
    b = pyllm.generate(stories, "Once upon a time", max_tokens=40, seed=7)
    assert a == b and len(a) > 20


def test_stream_generate_pieces_join_to_generate(stories):
    pieces = list(pyllm.stream_generate(stories, "One day", max_tokens=30, temp=0))
    assert len(pieces) > 5
    assert "".join(pieces) == pyllm.generate(stories, "One day", max_tokens=30, temp=0)


def test_prompt_longer_than_context(stories260k):
    model = pyllm.load(stories260k, n_ctx=16)
    with pytest.raises(PyllmError, match="longer than the context"):
        pyllm.generate(model, "Once upon a time " * 20, max_tokens=4)


def test_generation_stops_at_full_context(stories260k):
    from pyllm.runtime.generate import GenerationStats

    model = pyllm.load(stories260k, n_ctx=24)
    stats = GenerationStats()
    pyllm.generate(model, "Once", max_tokens=100, temp=0, ignore_eos=True, stats=stats)
    assert stats.stop_reason == "context" and len(model.tokens) == 24


def test_unknown_architecture_is_a_clear_error(tmp_path, stories260k):
    data = bytearray(Path(stories260k).read_bytes())
    at = data.index(b"general.architecture") + len("general.architecture") + 4 + 8
    data[at : at + 5] = b"gpt99"
    bad = tmp_path / "gpt99.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(PyllmError, match="unsupported architecture 'gpt99'; supported: llama, mistral, qwen2"):
        pyllm.load(bad)
