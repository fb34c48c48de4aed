"""What every part of pyllm shares: the user-facing error, and the GGUF/GGML format facts.

This module imports nothing else of pyllm, so the reader (runtime/), the writer (convert/)
and the kernels (kernels/) all stand on it without importing each other.

Format facts follow ggml's docs/gguf.md and ggml.h (ggml_type): the file magic, the
metadata value types, and for each block type its id, elements per block and bytes per
block. The kernels that decode, multiply and quantize each type live in kernels/.

pyllm also has block types of its own that ggml does not know (NF4, FP8, FP6: see
kernels/lowbit.py). They take ids from PYLLM_TYPE_BASE = 1000 on, far outside ggml's range
(GGML_TYPE_COUNT is 43 in the pinned llama.cpp), and a file that uses them names them in
the metadata key `pyllm.block_types` ("NAME=ID" strings), so the ids are never a silent
contract: the reader checks every such tensor's id against that key, and llama.cpp refuses
the file at its tensor-type check ("invalid ggml type") instead of misreading it.
"""

from enum import IntEnum

import numpy as np


class PyllmError(Exception):
    """A user-facing error: bad model file, bad flag value, prompt too long, ...

    The CLI prints `error: <message>` for it and exits 1, with no traceback (PYLLM_DEBUG=1
    shows it). Anything else is a bug and keeps its traceback.
    """


# -- GGUF container ---------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # what we write; the reader takes 2 and 3
DEFAULT_ALIGNMENT = 32


class ValueType(IntEnum):
    # gguf_type in ggml's gguf.h / gguf-py's GGUFValueType
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# fixed-size value types -> (struct format, numpy dtype), little-endian
SCALAR_FORMATS = {
    ValueType.UINT8: ("<B", np.uint8),
    ValueType.INT8: ("<b", np.int8),
    ValueType.UINT16: ("<H", np.uint16),
    ValueType.INT16: ("<h", np.int16),
    ValueType.UINT32: ("<I", np.uint32),
    ValueType.INT32: ("<i", np.int32),
    ValueType.FLOAT32: ("<f", np.float32),
    ValueType.BOOL: ("<?", np.bool_),
    ValueType.UINT64: ("<Q", np.uint64),
    ValueType.INT64: ("<q", np.int64),
    ValueType.FLOAT64: ("<d", np.float64),
}


# -- GGML block types -------------------------------------------------------------------


class GGMLType(IntEnum):
    # Numbering as in GGUF / ggml.h (ggml_type); from 1000 on: pyllm's own types.
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
    MXFP4 = 39  # OCP MX FP4: E8M0 scale + 32 E2M1 values (ggml's block_mxfp4)
    # pyllm only (kernels/lowbit.py has the layouts):
    NF4 = 1000  # QLoRA NormalFloat-4 code book, f16 absmax per 64
    FP8_E4M3 = 1001  # OCP FP8 E4M3 values with an E8M0 scale per 32
    FP8_E5M2 = 1002  # OCP FP8 E5M2 values with an E8M0 scale per 32
    FP6_E3M2 = 1003  # OCP FP6 E3M2 values with an E8M0 scale per 32, 4 values in 3 bytes


QK_K = 256  # super-block size of the K-quants

PYLLM_TYPE_BASE = 1000  # ids from here on are pyllm's, unknown to ggml
PYLLM_BLOCK_TYPES_KEY = "pyllm.block_types"  # the metadata key naming them: ["NF4=1000", ...]


def is_pyllm_only(qtype: int) -> bool:
    """True for block types that only pyllm reads (llama.cpp refuses such files)."""
    return int(qtype) >= PYLLM_TYPE_BASE


def pyllm_block_types_entries(qtypes) -> list[str]:
    """The `pyllm.block_types` value for a file whose tensors have these types: one
    "NAME=ID" string per pyllm-only type, sorted by id; empty when there is none."""
    ids = sorted({int(t) for t in qtypes if is_pyllm_only(t)})
    return [f"{GGMLType(i).name}={i}" for i in ids]


def parse_pyllm_block_types(value) -> dict[int, str]:
    """id -> name from a `pyllm.block_types` value; raises ValueError when malformed."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError("must be an array of \"NAME=ID\" strings")
    out = {}
    for entry in value:
        name, sep, num = str(entry).partition("=")
        if not sep or not name or not num.isdigit():
            raise ValueError(f"bad entry {entry!r} (expected \"NAME=ID\")")
        out[int(num)] = name
    return out

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
    GGMLType.MXFP4: (32, 1 + 16),
    GGMLType.NF4: (64, 2 + 32),
    GGMLType.FP8_E4M3: (32, 1 + 32),
    GGMLType.FP8_E5M2: (32, 1 + 32),
    GGMLType.FP6_E3M2: (32, 1 + 24),
}


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes one row of `cols` elements takes; cols must be a multiple of the block size."""
    block, size = BLOCK_SIZE[GGMLType(qtype)]
    if cols % block:
        raise ValueError(f"{GGMLType(qtype).name} rows must be a multiple of {block} elements, got {cols}")
    return cols // block * size
