"""GGUF -> GGUF re-encoding with llama.cpp's file types and per-tensor mixes.

The type chosen for each tensor follows llama.cpp's src/llama-quant.cpp
(llama_model_quantize_impl and llama_tensor_get_type, commit c392e509, Feb 2025):

- only tensors whose name ends in "weight", with 2+ dims, not "*_norm.weight", are quantized
  (and output.weight only without --leave-output-tensor); everything else is copied as is;
- the file type's default block type, adjusted per tensor unless --pure: output.weight (or
  token_embd.weight when the model has no output.weight) gets Q6_K (Q8_0 stays Q8_0); attn_v,
  attn_output and ffn_down get more bits in the _M/_L mixes, following use_more_bits();
- a K-quant whose row length is not a multiple of 256 falls back: Q4_K->Q5_0, Q5_K->Q5_1,
  Q6_K->Q8_0, Q2_K->Q4_0, Q3_K->Q4_0 (as llama.cpp's llama-quantize does: checked byte for
  byte by tests/test_llamacpp_compat.py), and then F16 when the row is not even a multiple
  of 32 (what convert_hf_to_gguf.py does on a QuantError).

Tensors are processed in llama.cpp's order (non-layer tensors by name, then layer by layer,
by name within a layer): the attn_v / ffn_down counters that drive the mixes depend on it.

Low-bit float types (kernels/lowbit.py) follow the same rules: the same tensors are quantized,
output.weight (or tied token_embd.weight) gets Q6_K, except MXFP4, whose output gets Q8_0 as
llama.cpp's MXFP4_MOE gives it; no other mixes. NF4 rows not a multiple of 64 fall back to
Q4_0. SYM_INT4 is IPEX-LLM's name for ggml's Q4_0 (its ggml_tensor_qtype "sym_int4" = 2,
quantized by ggml's quantize_row_q4_0): an alias, it writes Q4_0. NF4, FP8_E4M3, FP8_E5M2 and
FP6_E3M2 are pyllm's own block types: files with them are readable by pyllm only, and carry
pyllm file type ids (general.file_type 1000..1003) that llama.cpp does not know either.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from pyllm.base import BLOCK_SIZE, GGMLType, PyllmError

T = GGMLType


@dataclass(frozen=True)
class FileType:
    name: str  # llama.cpp's name (llama-quantize's TYPE argument)
    ftype: int  # llama_ftype, stored as general.file_type
    default: GGMLType  # the block type most tensors get


# llama_ftype values from llama.h (LLAMA_FTYPE_*), default types from llama_model_quantize_impl.
FILE_TYPES = {
    ft.name: ft
    for ft in (
        FileType("F32", 0, T.F32),
        FileType("F16", 1, T.F16),
        FileType("BF16", 32, T.BF16),
        FileType("Q4_0", 2, T.Q4_0),
        FileType("Q4_1", 3, T.Q4_1),
        FileType("Q8_0", 7, T.Q8_0),
        FileType("Q5_0", 8, T.Q5_0),
        FileType("Q5_1", 9, T.Q5_1),
        FileType("Q2_K", 10, T.Q2_K),
        FileType("Q3_K_S", 11, T.Q3_K),
        FileType("Q3_K_M", 12, T.Q3_K),
        FileType("Q3_K_L", 13, T.Q3_K),
        FileType("Q4_K_S", 14, T.Q4_K),
        FileType("Q4_K_M", 15, T.Q4_K),
        FileType("Q5_K_S", 16, T.Q5_K),
        FileType("Q5_K_M", 17, T.Q5_K),
        FileType("Q6_K", 18, T.Q6_K),
        # dense MXFP4: every quantized tensor MXFP4; llama_ftype MXFP4_MOE, the only one ggml has
        FileType("MXFP4", 38, T.MXFP4),
        # pyllm's own (ids outside llama_ftype, like the block types)
        FileType("NF4", 1000, T.NF4),
        FileType("FP8_E4M3", 1001, T.FP8_E4M3),
        FileType("FP8_E5M2", 1002, T.FP8_E5M2),
        FileType("FP6_E3M2", 1003, T.FP6_E3M2),
    )
}
# llama-quantize accepts these short names too (tools/quantize: Q3_K = Q3_K_M, Q4_K = Q4_K_M, Q5_K = Q5_K_M);
# SYM_INT4 is IPEX-LLM's name for Q4_0, FP6 the E3M2 variant of OCP's FP6.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "SYM_INT4": "Q4_0", "FP6": "FP6_E3M2"}

QUANTIZED = frozenset(t for t in GGMLType if t not in (T.F32, T.F16, T.BF16))


def parse_file_type(name: str) -> FileType:
    key = str(name).strip().upper()
    key = ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise PyllmError(f"unknown type {name!r}; supported: {', '.join(FILE_TYPES)} (and {', '.join(ALIASES)})")
    return FILE_TYPES[key]


def file_type_name(ftype: int) -> str | None:
    return next((ft.name for ft in FILE_TYPES.values() if ft.ftype == ftype), None)


# -- choosing the type of each tensor ------------------------------------------------------

@dataclass
class ModelInfo:
    """The hyper-parameters llama_tensor_get_type looks at."""

    arch: str = "llama"
    n_layer: int = 0
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 1

    @property
    def is_70b(self) -> bool:
        # llama-model.cpp load_hparams: llama with 80 layers is 70B when it has GQA (65B otherwise);
        # qwen2 with 80 layers is 70B.
        if self.n_layer != 80:
            return False
        return self.arch == "qwen2" or (self.arch in ("llama", "mistral") and self.n_head != self.n_head_kv)

    @classmethod
    def from_metadata(cls, meta: dict) -> "ModelInfo":
        arch = meta.get("general.architecture", "llama")

        def get(key, default):
            v = meta.get(f"{arch}.{key}", default)
            if isinstance(v, np.ndarray):  # per-layer arrays: take the first layer's
                v = v.flat[0] if v.size else default
            return int(v)

        n_head = get("attention.head_count", 1)
        return cls(arch, get("block_count", 0), n_head, get("attention.head_count_kv", n_head) or n_head,
                   get("expert_count", 0))


def _layer_key(name: str):
    # llama_model_loader::weight_name_comparer: by "blk.%d." layer (-1 for none), then by name
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def llama_order(names):
    return sorted(names, key=_layer_key)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def should_quantize(name: str, shape: tuple[int, ...], leave_output: bool = False) -> bool:
    """llama_model_quantize_impl's `quantize` flag (the parts that apply to these models)."""
    q = name.endswith("weight")
    q &= len(shape) >= 2
    q &= "_norm.weight" not in name
    q &= not (leave_output and name == "output.weight")
    for never in ("ffn_gate_inp.weight", "ssm_conv1d.weight", "time_mix_first.weight", "attn_rel_b.weight"):
        q &= never not in name
    q &= name not in ("position_embd.weight", "token_types.weight")
    return bool(q)


# Rows not a multiple of 256: llama.cpp's tensor_type_fallback (src/llama-quant.cpp, as
# vendored by llama-cpp-python 0.3.36, whose llama-quantize we compare against byte for byte).
_K_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
               T.NF4: T.Q4_0}  # (NF4's 64-blocks: pyllm's choice, the nearest 32-block 4-bit type)


def _fallback(new_type: GGMLType, cols: int) -> GGMLType:
    """The type to use when rows of `cols` elements cannot be cut in new_type's blocks."""
    block = BLOCK_SIZE[new_type][0]
    if cols % block == 0:
        return new_type
    new_type = _K_FALLBACK.get(new_type, T.F16)
    if cols % BLOCK_SIZE[new_type][0]:
        new_type = T.F16
    return new_type


class _State:
    def __init__(self, info: ModelInfo, names):
        self.info = info
        self.has_output = "output.weight" in names
        self.n_attention_wv = sum(1 for n in names if "attn_v.weight" in n or "attn_qkv.weight" in n or "attn_kv_b.weight" in n)
        self.n_ffn = info.n_layer
        self.i_attention_wv = 0
        self.i_ffn_down = 0
        self.i_ffn_gate = 0
        self.i_ffn_up = 0


def _get_type(qs: _State, new_type: GGMLType, name: str, cols: int, ft: str) -> GGMLType:
    """llama_tensor_get_type for the file types pyllm supports (no IQ types, no imatrix)."""
    info = qs.info
    if name == "output.weight" or (not qs.has_output and name == "token_embd.weight"):
        if cols % BLOCK_SIZE[new_type][0] != 0 or ft == "MXFP4":
            new_type = T.Q8_0
        elif new_type != T.Q8_0:
            new_type = T.Q6_K
    elif name == "token_embd.weight":
        pass
    elif "attn_v.weight" in name:
        if ft == "Q2_K":
            new_type = T.Q4_K if info.n_gqa >= 4 else T.Q3_K
        elif ft == "Q3_K_M":
            new_type = T.Q5_K if qs.i_attention_wv < 2 else T.Q4_K
        elif ft == "Q3_K_L":
            new_type = T.Q5_K
        elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = T.Q6_K
        elif ft == "Q4_K_S" and qs.i_attention_wv < 4:
            new_type = T.Q5_K
        if info.is_70b and new_type in (T.Q3_K, T.Q4_K):
            new_type = T.Q5_K
        if info.n_expert == 8:
            new_type = T.Q8_0
        qs.i_attention_wv += 1
    elif "attn_k.weight" in name:
        if info.n_expert == 8:
            new_type = T.Q8_0
    elif "attn_q.weight" in name:
        pass
    elif "ffn_down" in name:
        i_layer, n_layer = qs.i_ffn_down, qs.n_ffn
        if info.n_expert > 1:
            m = re.match(r"blk\.(\d+)\.", name)
            i_layer = int(m.group(1)) if m else i_layer
        if ft == "Q2_K":
            new_type = T.Q3_K
        elif ft == "Q3_K_M":
            new_type = T.Q5_K if i_layer < n_layer // 16 else T.Q4_K  # (Q3_K only for falcon)
        elif ft == "Q3_K_L":
            new_type = T.Q5_K
        elif ft == "Q4_K_M":
            if _use_more_bits(i_layer, n_layer):
                new_type = T.Q6_K
        elif ft == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new_type = T.Q6_K
        elif ft == "Q4_K_S" and i_layer < n_layer // 8:
            new_type = T.Q5_K
        qs.i_ffn_down += 1
    elif "attn_output.weight" in name:
        if info.n_expert == 8:
            if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                new_type = T.Q5_K
        else:
            if ft == "Q2_K":
                new_type = T.Q3_K
            elif ft == "Q3_K_M":
                new_type = T.Q4_K
            elif ft == "Q3_K_L":
                new_type = T.Q5_K
    elif "attn_qkv.weight" in name:
        if ft in ("Q3_K_M", "Q3_K_L"):
            new_type = T.Q4_K
        elif ft == "Q4_K_M":
            new_type = T.Q5_K
        elif ft == "Q5_K_M":
            new_type = T.Q6_K
    elif "ffn_gate" in name:
        qs.i_ffn_gate += 1
    elif "ffn_up" in name:
        qs.i_ffn_up += 1
    return new_type


def choose_types(tensors: dict[str, tuple[tuple[int, ...], GGMLType]], ft: FileType, info: ModelInfo,
                 pure: bool = False, leave_output: bool = False) -> dict[str, GGMLType]:
    """Target block type of every tensor.

    tensors: name -> (numpy shape (..., cols), current type), in any order. A tensor that is not
    quantized keeps its current type."""
    names = llama_order(tensors)
    qs = _State(info, set(names))
    out = {}
    for name in names:
        shape, cur = tensors[name]
        cols = shape[-1] if shape else 1
        if not should_quantize(name, shape, leave_output):
            out[name] = GGMLType(cur)
            continue
        new_type = ft.default
        if not pure and new_type in QUANTIZED:
            new_type = _get_type(qs, new_type, name, cols, ft.name)
        out[name] = _fallback(new_type, cols)
    return out


# -- encoding ------------------------------------------------------------------------------

def encode(x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """float32 rows (..., cols) -> raw bytes of qtype (uint8 (..., row_bytes); F32/F16 as such)."""
    qtype = GGMLType(int(qtype))
    if qtype == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16)
    from pyllm.kernels.quantize import quantize

    return quantize(x, qtype)


def decode(data: np.ndarray, qtype: GGMLType, rows: int, cols: int) -> np.ndarray:
    """Raw bytes of qtype -> float32 (rows, cols)."""
    qtype = GGMLType(int(qtype))
    if qtype == T.F32:
        return np.asarray(data).view(np.float32).reshape(rows, cols)
    if qtype == T.F16:
        return np.asarray(data).view(np.float16).reshape(rows, cols).astype(np.float32)
    if qtype == T.BF16:
        return (np.asarray(data).view(np.uint16).reshape(rows, cols).astype(np.uint32) << 16).view(np.float32)
    from pyllm.kernels.quants import QTensor, dequantize

    return dequantize(QTensor(np.asarray(data).reshape(rows, -1), qtype, rows, cols)).reshape(rows, cols)


CHUNK_ELEMENTS = 1 << 22  # rows are converted in blocks of about 16 MB of float32


def chunked(rows: int, cols: int, read_f32: Callable[[int, int], np.ndarray], qtype: GGMLType,
            row_multiple: int = 1, chunk_elements: int = CHUNK_ELEMENTS):
    """A load() for GGUFWriter that converts a (rows, cols) tensor block by block:
    read_f32(r0, r1) gives float32 rows r0..r1; the blocks are encoded as qtype and yielded
    in order, so peak memory is one block, not the tensor."""
    step = max(row_multiple, (chunk_elements // max(cols, 1)) // row_multiple * row_multiple)

    def load():
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            yield encode(read_f32(r0, r1), qtype)

    return load


# -- GGUF -> GGUF --------------------------------------------------------------------------

@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]  # numpy order
    type_in: GGMLType
    type_out: GGMLType
    bytes_in: int
    bytes_out: int


@dataclass
class QuantizeReport:
    tensors: list[TensorReport] = field(default_factory=list)

    @property
    def bytes_in(self):
        return sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self):
        return sum(t.bytes_out for t in self.tensors)


def format_tensor_line(i: int, n: int, r: TensorReport) -> str:
    shape = "[" + ", ".join(str(d) for d in reversed(r.shape)) + "]"
    arrow = f"{r.type_in.name:>5} -> {r.type_out.name:<5}" if r.type_in != r.type_out else f"{r.type_in.name:>5}    {'':<5}"
    return (f"[{i:4d}/{n:4d}] {r.name:<32} {shape:<14} {arrow} "
            f"{r.bytes_in / 2**20:9.3f} MiB -> {r.bytes_out / 2**20:9.3f} MiB")


def format_totals(rep: QuantizeReport) -> str:
    return (f"model size: {rep.bytes_in / 2**20:.2f} MiB -> {rep.bytes_out / 2**20:.2f} MiB "
            f"({len(rep.tensors)} tensors)")


def same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def quantize_gguf(inp, out, type_name: str, *, allow_requantize: bool = False, leave_output: bool = False,
                  pure: bool = False, progress: bool = False, log: Callable[[str], None] | None = None) -> QuantizeReport:
    """Re-encode GGUF `inp` as `out` with llama.cpp file type `type_name` (e.g. "Q4_K_M")."""
    from pyllm.convert.gguf_writer import GGUFWriter
    from pyllm.runtime.gguf_file import GGUFFile

    ft = parse_file_type(type_name)
    if same_file(inp, out):
        raise PyllmError(f"refusing to overwrite the input file {inp}")
    src = GGUFFile(inp)
    infos = src.tensors
    shapes = {n: tuple(reversed(t.dims)) for n, t in infos.items()}
    types = choose_types({n: (shapes[n], t.qtype) for n, t in infos.items()}, ft, ModelInfo.from_metadata(src.metadata),
                         pure=pure, leave_output=leave_output)
    for name in llama_order(infos):
        cur, new = infos[name].qtype, types[name]
        if cur != new and cur in QUANTIZED and not allow_requantize:
            raise PyllmError(f"{inp}: tensor {name} is already quantized ({cur.name}); "
                             f"requantizing loses quality, pass --allow-requantize to do it anyway")

    w = GGUFWriter(out, alignment=src.alignment)
    for key, value in src.metadata.items():
        vtype, item_type = src.value_types[key]
        if key.startswith("split."):
            continue
        w.add(key, value, vtype, item_type)
    w.add_u32("general.quantization_version", 2)  # GGML_QNT_VERSION
    w.add_u32("general.file_type", ft.ftype)

    report = QuantizeReport()
    order = llama_order(infos)

    def loader(name):
        info = infos[name]
        new = types[name]
        if new == info.qtype:
            def load():
                data = np.array(src.raw(name))  # a copy, so the map's pages can be dropped
                src.drop_pages(name)
                return data
            return load
        rows = int(np.prod(shapes[name][:-1], dtype=np.int64)) if len(shapes[name]) > 1 else 1
        cols = shapes[name][-1]
        raw = src.raw(name).reshape(rows, -1)

        def read(r0, r1):
            x = decode(raw[r0:r1], info.qtype, r1 - r0, cols)
            return x

        inner = chunked(rows, cols, read, new)

        def load():
            try:
                yield from inner()
            except ValueError as e:  # values the type cannot hold (NaN in NF4, ...)
                raise PyllmError(f"{inp}: tensor {name}: {e}") from None
            src.drop_pages(name)

        return load

    for name in order:
        w.add_tensor(name, shapes[name], types[name], loader(name))

    def on_tensor(t):
        info = infos[t.name]
        r = TensorReport(t.name, t.shape, info.qtype, t.qtype, info.nbytes, t.nbytes)
        report.tensors.append(r)
        if log:
            log(format_tensor_line(len(report.tensors), len(order), r))

    w.write(progress=progress, on_tensor=on_tensor, description=f"quantize {ft.name}")
    return report
