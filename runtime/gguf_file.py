"""GGUF reader: memory-mapped, zero-copy, validating.

Layout (GGUF v2/v3, little-endian; see ggml's docs/gguf.md):
    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, value_type u32, value)
    n_tensors x (name: string, n_dims u32, dims u64[n_dims], ggml_type u32, offset u64)
    padding to `general.alignment` (default 32), then the tensor data.
Strings are a u64 byte length followed by UTF-8 bytes. dims[0] is the innermost (column) size,
so a weight of PyTorch shape (out, in) has dims [in, out] and is stored as `out` rows.

Block type ids from 1000 on are pyllm's own (base.PYLLM_TYPE_BASE); a tensor may use one only
when the file's `pyllm.block_types` key names that id with the same name.
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyllm.base import (
    BLOCK_SIZE,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    PYLLM_BLOCK_TYPES_KEY,
    SCALAR_FORMATS,
    GGMLType,
    PyllmError,
    ValueType,
    is_pyllm_only,
    parse_pyllm_block_types,
)
from pyllm.kernels.quants import QTensor


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the number of columns
    qtype: GGMLType
    offset: int  # from the start of the data section
    nbytes: int


class _Cursor:
    """Reads little-endian values from a buffer, turning any overrun into a 'truncated' error."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise PyllmError(f"{self.path}: truncated GGUF file (header needs byte {end}, file has {len(self.buf)})")
        view = self.buf[self.pos : end]
        self.pos = end
        return view

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.scalar("<Q")))
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list:
        """count strings: as string() each, in one loop over the buffer (a 49k-token vocabulary and
        its merges are ~100k strings: 0.9 s through string(), ~0.1 s here)."""
        buf, pos, size, out = self.buf, self.pos, len(self.buf), []
        for _ in range(count):
            if pos + 8 > size:
                break
            end = pos + 8 + int.from_bytes(buf[pos:pos + 8], "little")
            if end > size:
                break
            out.append(str(buf[pos + 8:end], "utf-8", "replace"))
            pos = end
        self.pos = pos
        if len(out) < count:
            self.take(8 if pos + 8 > size else 8 + int.from_bytes(buf[pos:pos + 8], "little"))  # raises
        return out

    def value(self, vtype: int):
        if vtype in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[vtype][0])
        if vtype == ValueType.STRING:
            return self.string()
        if vtype == ValueType.ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in SCALAR_FORMATS:
                dtype = np.dtype(SCALAR_FORMATS[itype][1]).newbyteorder("<")
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)
            if itype == ValueType.STRING:
                return self.strings(count)
            return [self.value(itype) for _ in range(count)]
        raise PyllmError(f"{self.path}: corrupt GGUF file (unknown metadata value type {vtype})")


class GGUFFile:
    """A GGUF file opened by memory map. `metadata` is a dict; tensors are views, never copies."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else b""
        except FileNotFoundError:
            raise PyllmError(f"model file not found: {self.path}") from None
        except IsADirectoryError:
            raise PyllmError(f"{self.path} is a directory, not a GGUF file") from None
        except OSError as e:
            raise PyllmError(f"cannot read {self.path}: {e.strerror}") from None
        self._buf = memoryview(self._mmap)
        self._parse()

    def _parse(self):
        cur = _Cursor(self._buf, self.path)
        if len(self._buf) < 4 or bytes(self._buf[:4]) != GGUF_MAGIC:
            raise PyllmError(f"{self.path}: not a GGUF file (bad magic)")
        cur.take(4)
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            hint = " (big-endian files are not supported)" if self.version & 0xFFFF == 0 else ""
            raise PyllmError(f"{self.path}: unsupported GGUF version {self.version}{hint}; supported: 2, 3")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > len(self._buf) or n_kv > len(self._buf):
            raise PyllmError(f"{self.path}: corrupt GGUF header (counts {n_tensors} tensors, {n_kv} keys)")

        self.metadata: dict = {}
        # key -> (GGUF value type, array item type or None): kept so a rewrite (quantize)
        # can store every key with the exact type llama.cpp expects.
        self.value_types: dict[str, tuple[int, int | None]] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.scalar("<I")
            item_type = None
            if vtype == ValueType.ARRAY:
                if cur.pos + 4 <= len(self._buf):
                    item_type = struct.unpack("<I", self._buf[cur.pos : cur.pos + 4])[0]
            self.metadata[key] = cur.value(vtype)
            self.value_types[key] = (vtype, item_type)

        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > 4:
                raise PyllmError(f"{self.path}: corrupt tensor info for {name!r} ({n_dims} dims)")
            dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
            type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
            if is_pyllm_only(type_id):
                self._check_pyllm_type(name, type_id)
            try:
                qtype = GGMLType(type_id)
                block, size = BLOCK_SIZE[qtype]
            except (ValueError, KeyError):
                raise PyllmError(f"{self.path}: tensor {name!r} has unsupported block type {type_id}") from None
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if dims and dims[0] % block:
                raise PyllmError(f"{self.path}: tensor {name!r} row size {dims[0]} is not a multiple of {block}")
            infos.append(TensorInfo(name, dims, qtype, offset, n // block * size))

        self.alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise PyllmError(f"{self.path}: general.alignment must be a power of two, got {self.alignment}")
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for info in infos:
            end = self.data_offset + info.offset + info.nbytes
            if end > len(self._buf):
                raise PyllmError(
                    f"{self.path}: truncated GGUF file (tensor {info.name!r} ends at byte {end}, "
                    f"file has {len(self._buf)})"
                )
            self.tensors[info.name] = info

    def _check_pyllm_type(self, name: str, type_id: int):
        """A pyllm-only block type id must be named, with the name pyllm gives it, by the file."""
        key = PYLLM_BLOCK_TYPES_KEY
        if key not in self.metadata:
            raise PyllmError(f"{self.path}: tensor {name!r} has block type {type_id}, a pyllm-only id, but the "
                             f"file has no {key} key naming it (corrupt, or not written by pyllm)")
        try:
            declared = parse_pyllm_block_types(self.metadata[key])
        except ValueError as e:
            raise PyllmError(f"{self.path}: bad {key}: {e}") from None
        if type_id not in declared:
            raise PyllmError(f"{self.path}: tensor {name!r} has block type {type_id}, which {key} does not name")
        try:
            known = GGMLType(type_id).name
        except ValueError:
            raise PyllmError(f"{self.path}: tensor {name!r} has block type {declared[type_id]} ({type_id}), "
                             f"which this version of pyllm does not know") from None
        if declared[type_id] != known:
            raise PyllmError(f"{self.path}: {key} calls block type {type_id} {declared[type_id]!r}, "
                             f"but to pyllm {type_id} is {known}")

    @property
    def pyllm_only_types(self) -> list[GGMLType]:
        """The tensors' block types that only pyllm reads (llama.cpp refuses such files)."""
        return sorted({t.qtype for t in self.tensors.values() if is_pyllm_only(t.qtype)})

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view into the memory map."""
        info = self.tensors[name]
        start = self.data_offset + info.offset
        return np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=start)

    def qtensor(self, name: str) -> QTensor:
        """A weight of GGUF dims [cols, rows, ...] as a (rows, row_bytes) block view."""
        info = self.tensors[name]
        cols = info.dims[0]
        rows = int(np.prod(info.dims[1:], dtype=np.int64)) if len(info.dims) > 1 else 1
        return QTensor(self.raw(name).reshape(rows, -1), info.qtype, rows, cols)

    def array(self, name: str) -> np.ndarray:
        """A small tensor (norm weights, biases) as float32 in numpy shape order (copied)."""
        from pyllm.kernels.quants import dequantize

        info = self.tensors[name]
        shape = tuple(reversed(info.dims))
        if info.qtype in (GGMLType.F32, GGMLType.F16):  # numpy's half -> float is exact: no kernel to load
            return self.raw(name).view("<f4" if info.qtype == GGMLType.F32 else "<f2").astype(np.float32).reshape(shape)
        return dequantize(self.qtensor(name)).reshape(shape)

    def drop_pages(self, name: str):
        """Tell the kernel the tensor's mapped pages are not needed for now (best effort; views
        stay valid and read the file again), so one pass over all tensors (quantize) keeps the
        resident set near one tensor."""
        mm = self._mmap
        if not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise"):
            return
        info = self.tensors[name]
        start = self.data_offset + info.offset
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, first, start + info.nbytes - first)
        except (OSError, ValueError, AttributeError):
            pass

    def close(self):
        # Views handed out keep the map alive through the buffer protocol; drop ours only.
        self._buf = None
