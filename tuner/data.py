"""Training data: jsonl records -> token ids with a loss mask -> padded batches."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """B sequences padded to T positions. Position t predicts targets[:, t]; mask says which
    targets are in the loss (not prompt, not padding). keys: each sequence's index in the
    data set (seeds its dropout masks)."""

    inputs: np.ndarray  # (B, T) int64
    targets: np.ndarray  # (B, T) int64
    mask: np.ndarray  # (B, T) bool
    keys: tuple

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())
