"""GGML block types: their sizes, and the QTensor that carries raw blocks to the kernels.

A GGUF weight of shape (rows, cols) is stored row after row; each row is cols/block_size
blocks of type_size bytes. We keep it as a 2-D uint8 view (rows, row_bytes) straight into
the memory map, so nothing is dequantized at load time.
"""

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class GGMLType(IntEnum):
    # Numbering as in GGUF / ggml.h (ggml_type).
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    BF16 = 30


QK_K = 256  # super-block size of the K-quants

# qtype -> (elements per block, bytes per block)
BLOCK_SIZE = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    GGMLType.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    GGMLType.Q8_K: (QK_K, 4 + QK_K + QK_K // 16 * 2),
}


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes one row of `cols` elements takes; cols must be a multiple of the block size."""
    block, size = BLOCK_SIZE[GGMLType(qtype)]
    if cols % block:
        raise ValueError(f"{GGMLType(qtype).name} rows must be a multiple of {block} elements, got {cols}")
    return cols // block * size


@dataclass
class QTensor:
    """A 2-D weight as raw GGML blocks: data is uint8 (rows, row_bytes)."""

    data: np.ndarray  # (rows, row_bytes) uint8
    qtype: GGMLType
    rows: int
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes
