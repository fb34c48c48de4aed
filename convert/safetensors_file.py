"""A torch-free safetensors reader: reads one tensor (or a block of its rows) at a time.

Format (huggingface/safetensors README): u64 little-endian header length N, then N bytes of
JSON {name: {"dtype": "F32"|"F16"|"BF16"|..., "shape": [...], "data_offsets": [begin, end]},
"__metadata__": {...}}, then the data section; offsets are relative to its start.

A sharded checkpoint has `model.safetensors.index.json` ({"weight_map": {name: file}}) next to
`model-0000x-of-0000y.safetensors`. SafetensorsModel opens either layout and reads any tensor
as float32 (BF16 widened exactly by shifting its bits into the high half of a float32).

Reads use os.pread rather than a memory map on purpose: mapped pages stay in the process's
resident set once touched, so converting a 15 GB checkpoint through a map would show 15 GB
of RSS; pread keeps it at one tensor (the kernel's page cache is not ours).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyllm.base import PyllmError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass
class STensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int
    file: "SafetensorsFile"

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def np_dtype(self):
        return np.dtype(_DTYPES[self.dtype])

    def raw(self, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Stored values of rows [row_start, row_stop) of the first axis (BF16 as uint16 bits)."""
        return self.file.read_rows(self, row_start, row_stop)

    def to_f32(self, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Rows [row_start, row_stop) (all by default) as a float32 array."""
        return as_f32(self.raw(row_start, row_stop), self.dtype)


def as_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


class SafetensorsFile:
    def __init__(self, path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
            size = os.fstat(self._fd).st_size
        except FileNotFoundError:
            raise PyllmError(f"file not found: {self.path}") from None
        except IsADirectoryError:
            raise PyllmError(f"{self.path} is a directory, not a safetensors file") from None
        except OSError as e:
            raise PyllmError(f"cannot read {self.path}: {e.strerror}") from None
        if size < 8:
            raise PyllmError(f"{self.path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > size - 8:
            raise PyllmError(f"{self.path}: not a safetensors file (header length {n} past the end)")
        try:
            header = json.loads(os.pread(self._fd, n, 8).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PyllmError(f"{self.path}: not a safetensors file (bad JSON header)") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        base = 8 + n
        self.tensors: dict[str, STensor] = {}
        for name, info in header.items():
            dtype = info.get("dtype")
            shape = tuple(int(d) for d in info.get("shape", ()))
            begin, end = (int(x) for x in info.get("data_offsets", (0, 0)))
            if dtype not in _DTYPES:
                raise PyllmError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if end - begin != want or base + end > size or begin < 0:
                raise PyllmError(f"{self.path}: tensor {name!r} has bad offsets {begin}..{end} (file truncated?)")
            self.tensors[name] = STensor(name, dtype, shape, base + begin, base + end, self)

    def read_rows(self, t: STensor, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Stored values of rows [row_start, row_stop) of tensor t of this file (STensor.raw)."""
        rows = t.shape[0] if t.shape else 1
        row_stop = rows if row_stop is None else min(row_stop, rows)
        inner = t.shape[1:] if t.shape else ()
        row_bytes = int(np.prod(inner, dtype=np.int64)) * t.np_dtype.itemsize
        out = np.empty((max(row_stop - row_start, 0),) + inner, dtype=t.np_dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        pos, want = t.begin + row_start * row_bytes, out.nbytes
        done = 0
        while done < want:
            n = os.preadv(self._fd, [buf[done:]], pos + done)
            if n <= 0:
                raise PyllmError(f"{self.path}: truncated while reading {t.name}")
            done += n
        return out if t.shape else out.reshape(())

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class SafetensorsModel:
    """All tensors of a (possibly sharded) checkpoint directory or a single .safetensors file,
    in file order (shards in index order, tensors by offset within a shard)."""

    def __init__(self, path):
        path = Path(path)
        if path.is_file():
            files = [path]
        else:
            index = path / "model.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (OSError, ValueError, KeyError, TypeError):
                    raise PyllmError(f"{index}: cannot read its weight_map") from None
                names = list(dict.fromkeys(weight_map.values()))
                files = []
                for n in sorted(names):
                    if not (path / n).is_file():
                        raise PyllmError(f"{path}: shard {n} named in model.safetensors.index.json is missing")
                    files.append(path / n)
            else:
                files = sorted(p for p in path.glob("*.safetensors") if p.name.startswith("model"))
                if not files:
                    files = sorted(path.glob("*.safetensors"))
            if not files:
                raise PyllmError(f"{path}: no .safetensors weights found (only safetensors checkpoints are supported)")
        self.files = [SafetensorsFile(p) for p in files]
        self.tensors: dict[str, STensor] = {}
        for f in self.files:
            for t in sorted(f.tensors.values(), key=lambda t: t.begin):
                if t.name in self.tensors:
                    first = self.tensors[t.name].file.path.name
                    raise PyllmError(f"tensor {t.name!r} appears in both {first} and {f.path.name}")
                self.tensors[t.name] = t

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name) -> STensor:
        return self.tensors[name]
