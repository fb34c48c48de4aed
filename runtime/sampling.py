"""Token sampling with llama.cpp's defaults and order.

The chain runs as llama.cpp's common sampler does: penalties -> top-k -> top-p -> min-p ->
temperature -> draw. A temperature <= 0 means greedy (argmax after the penalties).
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from pyllm.base import PyllmError


@dataclass
class Sampler:
    temp: float = 0.8
    top_k: int = 40  # <= 0: the whole vocabulary
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # penalties look at this many previous tokens (-1: all, 0: none)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = -1  # -1: a random seed
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.top_p <= 1.0:
            raise PyllmError(f"--top-p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise PyllmError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise PyllmError(f"--repeat-penalty must be positive, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise PyllmError(f"--repeat-last-n must be -1 or more, got {self.repeat_last_n}")
        self.rng = np.random.default_rng(None if self.seed < 0 else self.seed)

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Apply repeat/frequency/presence penalties over the last repeat_last_n tokens."""
        last_n = len(history) if self.repeat_last_n == -1 else self.repeat_last_n
        off = self.repeat_penalty == 1.0 and self.frequency_penalty == 0.0 and self.presence_penalty == 0.0
        if off or last_n == 0 or not history:
            return logits
        logits = logits.copy()
        counts = Counter(history[-last_n:])
        ids = np.fromiter(counts.keys(), dtype=np.int64)
        n = np.fromiter(counts.values(), dtype=np.float32)
        x = logits[ids]
        # As llama.cpp: divide positive logits, multiply negative ones, so both become less likely.
        x = np.where(x > 0, x / self.repeat_penalty, x * self.repeat_penalty)
        logits[ids] = x - n * self.frequency_penalty - self.presence_penalty
        return logits

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Pick the next token from logits (vocab,) given the tokens so far."""
        logits = self.penalize(np.asarray(logits, dtype=np.float32), history)
        if self.temp <= 0:
            return int(np.argmax(logits))

        # top-k: candidates sorted by logit, best first.
        k = logits.size if self.top_k <= 0 else min(self.top_k, logits.size)
        ids = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        cand = logits[ids].astype(np.float64)

        # top-p: the smallest prefix whose probability mass reaches top_p.
        if self.top_p < 1.0:
            p = np.exp(cand - cand[0])
            p /= p.sum()
            keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1
            ids, cand = ids[:keep], cand[:keep]

        # min-p: drop tokens less likely than min_p times the best one.
        if self.min_p > 0.0:
            keep = cand >= cand[0] + np.log(self.min_p)
            ids, cand = ids[keep], cand[keep]

        p = np.exp((cand - cand[0]) / self.temp)
        p /= p.sum()
        return int(ids[self.rng.choice(len(ids), p=p)])
