"""A small streaming GGUF v3 writer.

    w = GGUFWriter("out.gguf")
    w.add("general.architecture", "llama")                 # type inferred (str)
    w.add("llama.block_count", 5, ValueType.UINT32)         # or explicit
    w.add_tensor("token_embd.weight", (512, 64), GGMLType.F32, load)   # numpy shape
    w.write(progress=True)

`load` is a callable returning the tensor's raw bytes: a numpy array whose nbytes is the size
the type and shape imply, or an iterable of arrays (blocks of rows, in order) adding up to it. Tensors are produced and written one at a time, so peak
memory is about one tensor, not the model. The file is written to a temporary file beside
the destination and renamed over it only when complete: an error or Ctrl-C never leaves a
partial output file.

Layout (ggml docs/gguf.md, as gguf-py's GGUFWriter writes it): magic "GGUF", version u32 = 3,
n_tensors u64, n_kv u64, the key/values, the tensor infos (name, n_dims u32, dims u64[] with
dims[0] the innermost (column) size, ggml type u32, offset u64 relative to the data section),
padding to general.alignment (32), then each tensor's data padded to the alignment.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from pyllm.base import (
    BLOCK_SIZE,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    PYLLM_BLOCK_TYPES_KEY,
    SCALAR_FORMATS,
    GGMLType,
    PyllmError,
    ValueType,
    pyllm_block_types_entries,
)

_FMT = {vt: fmt for vt, (fmt, _) in SCALAR_FORMATS.items()}
_NP = {vt: dtype for vt, (_, dtype) in SCALAR_FORMATS.items()}
_FROM_NP = {np.dtype(v): k for k, v in _NP.items()}


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLType) -> int:
    """Bytes of a tensor of numpy `shape` (last axis = row) stored as qtype."""
    block, size = BLOCK_SIZE[GGMLType(qtype)]
    cols = shape[-1] if shape else 1
    if cols % block:
        raise ValueError(f"{GGMLType(qtype).name} rows must be a multiple of {block} elements, got {cols}")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return n // block * size


def _infer_type(value) -> tuple[ValueType, ValueType | None]:
    if isinstance(value, bool):
        return ValueType.BOOL, None
    if isinstance(value, (int, np.integer)):
        return ValueType.UINT32 if value >= 0 else ValueType.INT32, None
    if isinstance(value, (float, np.floating)):
        return ValueType.FLOAT32, None
    if isinstance(value, (str, bytes)):
        return ValueType.STRING, None
    if isinstance(value, np.ndarray):
        if value.dtype not in _FROM_NP:
            raise ValueError(f"cannot store a numpy array of {value.dtype} in GGUF")
        return ValueType.ARRAY, _FROM_NP[value.dtype]
    if isinstance(value, (list, tuple)):
        if not value:
            return ValueType.ARRAY, ValueType.STRING
        return ValueType.ARRAY, _infer_type(value[0])[0]
    raise ValueError(f"cannot store a {type(value).__name__} in GGUF")


@dataclass
class PendingTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows..., cols)
    qtype: GGMLType
    load: Callable[[], Any]
    nbytes: int


class GGUFWriter:
    def __init__(self, path, alignment: int = DEFAULT_ALIGNMENT):
        self.path = Path(path)
        self.alignment = alignment
        self.kv: dict[str, tuple[ValueType, ValueType | None, Any]] = {}
        self.tensors: list[PendingTensor] = []

    # -- metadata ------------------------------------------------------------------------
    def add(self, key: str, value, vtype: ValueType | int | None = None, item_type: ValueType | int | None = None):
        """Set a key (replacing an earlier value but keeping its position)."""
        if vtype is None:
            vtype, inferred_item = _infer_type(value)
            item_type = item_type if item_type is not None else inferred_item
        vtype = ValueType(int(vtype))
        if vtype == ValueType.ARRAY and item_type is None:
            item_type = _infer_type(value)[1]
        self.kv[key] = (vtype, None if item_type is None else ValueType(int(item_type)), value)

    def add_string(self, key, value):
        self.add(key, value, ValueType.STRING)

    def add_u32(self, key, value):
        self.add(key, int(value), ValueType.UINT32)

    def add_i32(self, key, value):
        self.add(key, int(value), ValueType.INT32)

    def add_f32(self, key, value):
        self.add(key, float(value), ValueType.FLOAT32)

    def add_bool(self, key, value):
        self.add(key, bool(value), ValueType.BOOL)

    def add_array(self, key, values, item_type: ValueType | int):
        self.add(key, values, ValueType.ARRAY, item_type)

    def remove(self, key: str):
        self.kv.pop(key, None)

    # -- tensors -------------------------------------------------------------------------
    def add_tensor(self, name: str, shape: Iterable[int], qtype: GGMLType | int, load: Callable[[], Any]):
        """Declare a tensor of numpy `shape` (rows..., cols) to be written as qtype; `load()`
        is called once, while writing, and must return exactly the tensor's bytes."""
        shape = tuple(int(d) for d in shape)
        qtype = GGMLType(int(qtype))
        if any(t.name == name for t in self.tensors):
            raise ValueError(f"duplicate tensor name {name!r}")
        self.tensors.append(PendingTensor(name, shape, qtype, load, tensor_nbytes(shape, qtype)))

    # -- output --------------------------------------------------------------------------
    def _name_pyllm_types(self):
        """`pyllm.block_types` lists exactly the pyllm-only block types the tensors use (a value
        copied from a source file is replaced), so the reader can check their ids."""
        self.remove(PYLLM_BLOCK_TYPES_KEY)
        entries = pyllm_block_types_entries(t.qtype for t in self.tensors)
        if entries:
            self.add_array(PYLLM_BLOCK_TYPES_KEY, entries, ValueType.STRING)

    def _header(self) -> bytes:
        self._name_pyllm_types()
        out = bytearray()
        out += GGUF_MAGIC
        out += struct.pack("<IQQ", GGUF_VERSION, len(self.tensors), len(self.kv))
        for key, (vtype, item_type, value) in self.kv.items():
            out += _pack_string(key)
            out += struct.pack("<I", vtype)
            out += _pack_value(value, vtype, item_type, key)
        offset = 0
        for t in self.tensors:
            out += _pack_string(t.name)
            dims = tuple(reversed(t.shape)) or (1,)
            out += struct.pack("<I", len(dims))
            out += struct.pack(f"<{len(dims)}Q", *dims)
            out += struct.pack("<IQ", int(t.qtype), offset)
            offset += _pad(t.nbytes, self.alignment)
        out += b"\0" * (_pad(len(out), self.alignment) - len(out))
        return bytes(out)

    def write(self, progress: bool = False, on_tensor: Callable[[PendingTensor], None] | None = None,
              description: str = "writing"):
        """Write the file: header, then each tensor's bytes from its load(), then rename.

        on_tensor(t) is called after each tensor is written (for per-tensor reports)."""
        directory = self.path.parent if str(self.path.parent) else Path(".")
        if not directory.is_dir():
            raise PyllmError(f"output directory {directory} does not exist")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=directory)
        except OSError as e:
            raise PyllmError(f"cannot write to {directory}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._header())
                bar = _Progress(sum(t.nbytes for t in self.tensors), description) if progress else None
                try:
                    for t in self.tensors:
                        if bar:
                            bar.name(t.name)
                        produced = t.load()
                        if isinstance(produced, (np.ndarray, bytes, bytearray, memoryview)):
                            produced = (produced,)
                        written = 0
                        for chunk in produced:  # one array, or blocks of rows in order
                            chunk = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
                            written += chunk.nbytes
                            if written > t.nbytes:
                                break
                            f.write(memoryview(chunk))
                            if bar:
                                bar.advance(chunk.nbytes)
                            del chunk
                        if written != t.nbytes:
                            raise ValueError(
                                f"tensor {t.name}: produced {written} bytes, expected {t.nbytes} "
                                f"({t.qtype.name} {t.shape})"
                            )
                        f.write(b"\0" * (_pad(t.nbytes, self.alignment) - t.nbytes))
                        if on_tensor:
                            on_tensor(t)
                finally:
                    if bar:
                        bar.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a finished model is not
            os.replace(tmp, self.path)
        except OSError as e:
            _remove(tmp)
            if e.strerror:
                raise PyllmError(f"cannot write {self.path}: {e.strerror}") from None
            raise
        except BaseException:
            _remove(tmp)
            raise


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _pack_string(s) -> bytes:
    raw = s if isinstance(s, bytes) else str(s).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(value, vtype: ValueType, item_type: ValueType | None, key: str) -> bytes:
    if vtype == ValueType.STRING:
        return _pack_string(value)
    if vtype == ValueType.ARRAY:
        if item_type is None:
            raise ValueError(f"{key}: array item type missing")
        out = bytearray(struct.pack("<IQ", item_type, len(value)))
        if item_type in _NP:
            arr = np.asarray(value, dtype=np.dtype(_NP[item_type]).newbyteorder("<"))
            out += arr.tobytes()
        elif item_type == ValueType.STRING:
            for s in value:
                out += _pack_string(s)
        else:  # nested arrays: rare; each item carries its own type
            for v in value:
                sub_v, sub_i = _infer_type(v)
                if sub_v != item_type:
                    raise ValueError(f"{key}: mixed item types in a GGUF array")
                out += _pack_value(v, sub_v, sub_i, key)
        return bytes(out)
    if vtype in _FMT:
        if vtype == ValueType.FLOAT32 or vtype == ValueType.FLOAT64:
            value = float(value)
        elif vtype == ValueType.BOOL:
            value = bool(value)
        else:
            value = int(value)
        try:
            return struct.pack(_FMT[vtype], value)
        except struct.error:
            raise ValueError(f"{key}: value {value!r} does not fit GGUF type {vtype.name}") from None
    raise ValueError(f"{key}: unknown GGUF value type {vtype}")


class _Progress:
    """A rich progress bar on stderr, measured in bytes written."""

    def __init__(self, total: int, description: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._p = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[tensor]}"),
            console=Console(file=sys.stderr), transient=False,
        )
        self._p.start()
        self._task = self._p.add_task(description, total=total, tensor="")

    def name(self, name: str):
        self._p.update(self._task, tensor=name)

    def advance(self, n: int):
        self._p.update(self._task, advance=n)

    def close(self):
        self._p.update(self._task, tensor="")
        self._p.stop()
