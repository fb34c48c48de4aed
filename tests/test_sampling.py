"""Sampling: greedy, each filter's effect, penalties, and seed reproducibility."""

import numpy as np
import pytest
from pyllm.base import PyllmError
from pyllm.runtime.sampling import Sampler


def _draws(sampler, logits, n=2000):
    return np.bincount([sampler.sample(logits) for _ in range(n)], minlength=logits.size)


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert Sampler(temp=0).sample(logits) == int(np.argmax(logits))


def test_top_k_keeps_only_k_best():
    logits = np.arange(10, dtype=np.float32)
    counts = _draws(Sampler(temp=5.0, top_k=3, top_p=1.0, min_p=0.0, seed=1), logits)
    assert set(np.nonzero(counts)[0]) == {7, 8, 9}


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p).astype(np.float32)
    counts = _draws(Sampler(temp=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=2), logits)
    # 0.5 + 0.3 reaches 0.8: tokens 0 and 1 only, in ratio 5:3
    assert set(np.nonzero(counts)[0]) == {0, 1}
    assert counts[0] / counts[1] == pytest.approx(5 / 3, rel=0.15)


def test_min_p_drops_unlikely_tokens():
    p = np.array([0.6, 0.3, 0.06, 0.04])
    logits = np.log(p).astype(np.float32)
    counts = _draws(Sampler(temp=1.0, top_k=0, top_p=1.0, min_p=0.09, seed=3), logits)
    # threshold 0.09 * 0.6 = 0.054: token 3 (0.04) goes, token 2 (0.06) stays
    assert counts[3] == 0 and counts[2] > 0


def test_temperature_sharpens_distribution():
    logits = np.log(np.array([0.6, 0.4])).astype(np.float32)
    counts = _draws(Sampler(temp=0.5, top_k=0, top_p=1.0, min_p=0.0, seed=4), logits, 4000)
    # p ∝ p_i^(1/T): 0.36 : 0.16
    assert counts[0] / counts.sum() == pytest.approx(0.36 / 0.52, abs=0.03)


def test_penalties_follow_llama_cpp_rules():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    s = Sampler(repeat_penalty=2.0, frequency_penalty=0.1, presence_penalty=0.2, repeat_last_n=3)
    out = s.penalize(logits, [3, 0, 1, 1])  # token 3 is outside the last 3
    assert out[0] == pytest.approx(2.0 / 2 - 0.1 - 0.2)
    assert out[1] == pytest.approx(-2.0 * 2 - 0.2 - 0.2)
    assert out[2] == 1.0 and out[3] == 0.5
    # the penalty flips the greedy choice away from a repeated token
    assert Sampler(temp=0, repeat_penalty=3.0).sample(np.array([3.0, 2.0]), [0]) == 1


def test_same_seed_same_tokens():
    logits = np.random.default_rng(5).normal(size=500).astype(np.float32)
    s1, s2, s3 = Sampler(seed=42), Sampler(seed=42), Sampler(seed=43)
    first = [s1.sample(logits) for _ in range(50)]
    assert first == [s2.sample(logits) for _ in range(50)]
    assert first != [s3.sample(logits) for _ in range(50)]


def test_bad_values_raise():
    for kwargs in ({"top_p": 1.5}, {"min_p": -0.1}, {"repeat_penalty": 0.0}, {"repeat_last_n": -2}):
        with pytest.raises(PyllmError):
            Sampler(**kwargs)
