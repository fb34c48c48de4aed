"""Quantizer quality and speed per block type, against llama.cpp's own reference C code.

    OPENBLAS_NUM_THREADS=1 python benchmarks/quantize_rmse.py [--rows 4096] [--cols 4096]
        [--threads N] [--llama-cpp PATH] [--stories PATH]

For each type: bits/weight, RMSE of dequantize(quantize(x)) - x for pyllm's quantizer and
for llama.cpp's quantize_row_*_ref (when it can be built), whether the bytes are identical,
and pyllm's throughput in MB/s of float32 input (after a warm-up run).

The llama.cpp reference: the quantize_row_*_ref functions and their helpers are cut out of
ggml/src/ggml-quants.c (and the portable fp16 conversion out of ggml-impl.h) of a llama.cpp
source tree or git mirror, put behind minimal block structs, and compiled with gcc
-O2 -ffp-contract=off into a small shared library loaded with ctypes. Nothing is copied
into this repository; without the source or a C compiler the reference columns say "-".
Source lookup: --llama-cpp, $LLAMA_CPP_SRC, then /work/.mirror/ggerganov+llama.cpp/repo
(a bare git directory: files are read with `git show HEAD:...`).
"""

import argparse
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

TYPES = "F32 F16 BF16 Q8_0 Q5_1 Q5_0 Q4_1 Q4_0 Q6_K Q5_K Q4_K Q3_K Q2_K Q8_K".split()
REF_TYPES = "Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K".split()
DEFAULT_MIRROR = "/work/.mirror/ggerganov+llama.cpp/repo"

# -- building llama.cpp's reference quantizers -------------------------------------------------

_PRELUDE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>
#include <assert.h>
#include <stdbool.h>
typedef uint16_t ggml_fp16_t;
typedef uint16_t ggml_half;
#define QK_K 256
#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define GGML_RESTRICT restrict
typedef struct { ggml_half d; uint8_t qs[16]; } block_q4_0;
typedef struct { ggml_half d; ggml_half m; uint8_t qs[16]; } block_q4_1;
typedef struct { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;
typedef struct { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1;
typedef struct { ggml_half d; int8_t qs[32]; } block_q8_0;
typedef struct { uint8_t scales[16]; uint8_t qs[64]; ggml_half d; ggml_half dmin; } block_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; ggml_half d; } block_q3_K;
typedef struct { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
typedef struct { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; } block_q6_K;
typedef struct { float d; int8_t qs[256]; int16_t bsums[16]; } block_q8_K;
_Static_assert(sizeof(block_q5_0) == 22, "q5_0");
_Static_assert(sizeof(block_q2_K) == 84, "q2_K");
_Static_assert(sizeof(block_q3_K) == 110, "q3_K");
_Static_assert(sizeof(block_q4_K) == 144, "q4_K");
_Static_assert(sizeof(block_q5_K) == 176, "q5_K");
_Static_assert(sizeof(block_q6_K) == 210, "q6_K");
_Static_assert(sizeof(block_q8_K) == 292, "q8_K");
"""

_EPILOGUE = r"""
#define GGML_FP32_TO_FP16(x) ggml_compute_fp32_to_fp16(x)
#define GGML_FP16_TO_FP32(x) ggml_compute_fp16_to_fp32(x)
"""


def _read_source(root: Path, rel: str) -> str:
    if (root / rel).is_file():
        return (root / rel).read_text()
    # a bare git directory (the mirror): read the file at HEAD
    out = subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:{rel}"], capture_output=True, text=True)
    if out.returncode != 0:
        raise FileNotFoundError(f"{rel} not in {root}: {out.stderr.strip()}")
    return out.stdout


def _drop_apple_branch(src: str) -> str:
    """Keep the #else side of `#ifdef HAVE_BUGGY_APPLE_LINKER` blocks (they open two loops)."""
    out, skip, inside = [], False, False
    for line in src.splitlines(keepends=True):
        s = line.strip()
        if s.startswith("#ifdef HAVE_BUGGY_APPLE_LINKER"):
            skip = inside = True
        elif inside and s.startswith("#else"):
            skip = False
        elif inside and s.startswith("#endif"):
            inside = skip = False
        elif not skip:
            out.append(line)
    return "".join(out)


def _cut(src: str, head: str, must_contain: str | None = None) -> str:
    """The text of the C function whose definition starts with `head` (brace-matched)."""
    start = 0
    body = None
    while True:
        i = src.find(head, start)
        if i < 0:
            raise ValueError(f"{head!r} not found")
        j = src.index("{", i)
        depth = 0
        for k in range(j, len(src)):
            if src[k] == "{":
                depth += 1
            elif src[k] == "}":
                depth -= 1
                if depth == 0:
                    body = src[i:k + 1]
                    break
        if body is None:
            raise ValueError(f"unbalanced braces after {head!r}")
        if must_contain is None or must_contain in body:
            return body
        start = k


def ref_c_source(root: Path) -> str:
    """A self-contained C file with llama.cpp's reference quantizers (cut from its sources)."""
    quants = _drop_apple_branch(_read_source(root, "ggml/src/ggml-quants.c"))
    impl = _read_source(root, "ggml/src/ggml-impl.h")
    parts = [_PRELUDE]
    parts += re.findall(r"^#define GROUP_MAX_EPS\s.*$", quants, flags=re.M)
    parts.append(_cut(impl, "static inline float fp32_from_bits("))
    parts.append(_cut(impl, "static inline uint32_t fp32_to_bits("))
    parts.append(_cut(impl, "static inline float ggml_compute_fp16_to_fp32(", "exp_offset"))
    parts.append(_cut(impl, "static inline ggml_fp16_t ggml_compute_fp32_to_fp16(", "scale_to_inf"))
    parts.append(_EPILOGUE)
    parts.append(_cut(quants, "static inline int nearest_int("))
    for name in ("make_qx_quants", "make_q3_quants", "make_qkx2_quants"):
        parts.append(_cut(quants, f"static float {name}("))
    parts.append(_cut(quants, "static inline void get_scale_min_k4("))
    for t in REF_TYPES:
        parts.append(_cut(quants, f"void quantize_row_{t.lower()[:-1] + t[-1]}_ref("))
    return "\n\n".join(parts) + "\n"


def find_llama_cpp(path: str | None = None) -> Path | None:
    for cand in (path, os.environ.get("LLAMA_CPP_SRC"), DEFAULT_MIRROR):
        if cand and Path(cand).exists():
            return Path(cand)
    return None


class RefLib:
    """ctypes handle on the compiled reference: quantize(x, name) -> uint8 (rows, row_bytes)."""

    def __init__(self, so: Path):
        self.lib = ctypes.CDLL(str(so))
        for t in REF_TYPES:
            f = getattr(self.lib, self.fname(t))
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            f.restype = None

    @staticmethod
    def fname(t: str) -> str:
        return f"quantize_row_{t.lower()[:-1] + t[-1]}_ref"

    def quantize(self, x: np.ndarray, name: str) -> np.ndarray:
        from pyllm.base import GGMLType, row_bytes

        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], row_bytes(GGMLType[name], x.shape[1])), dtype=np.uint8)
        # rows are contiguous, so the whole tensor is one long row of blocks
        getattr(self.lib, self.fname(name))(x.ctypes.data, out.ctypes.data, x.size)
        return out


def build_ref(root: Path | None = None, cache_dir: Path | None = None) -> RefLib | None:
    """Compile llama.cpp's reference quantizers; None when the source or gcc is missing."""
    root = root or find_llama_cpp()
    cc = shutil.which("gcc") or shutil.which("cc")
    if root is None or cc is None:
        return None
    try:
        src = ref_c_source(root)
    except (OSError, ValueError):
        return None
    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "pyllm-ggml-ref")
    cache_dir.mkdir(parents=True, exist_ok=True)
    so = cache_dir / f"ggml_quants_ref_{key}.so"
    if not so.exists():
        c = cache_dir / f"ggml_quants_ref_{key}.c"
        c.write_text(src)
        tmp = cache_dir / f".{key}.{os.getpid()}.so"
        # -ffp-contract=off: no fused multiply-adds, so the float32 steps are the plain ones
        cmd = [cc, "-O2", "-std=gnu11", "-ffp-contract=off", "-fPIC", "-shared", "-o", str(tmp), str(c), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return None
        os.replace(tmp, so)
    return RefLib(so)


# -- the benchmark -----------------------------------------------------------------------------


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def decode(q: np.ndarray, name: str, cols: int) -> np.ndarray | None:
    import gguf

    if name == "Q8_K":  # gguf-py has no Q8_K: d * q
        b = q.reshape(-1, 292)
        d = b[:, :4].copy().view(np.float32)
        return (d * b[:, 4:260].view(np.int8).astype(np.float32)).reshape(q.shape[0], cols)
    return gguf.quants.dequantize(q, gguf.GGMLQuantizationType[name]).reshape(q.shape[0], cols)


def run_table(x: np.ndarray, ref: RefLib | None, repeats: int = 3) -> list[dict]:
    from pyllm.base import BLOCK_SIZE, GGMLType
    from pyllm.kernels.quantize import quantize

    rows = []
    for name in TYPES:
        qt = GGMLType[name]
        block, size = BLOCK_SIZE[qt]
        q = quantize(x[:2], qt)  # warm-up (and compile)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            q = quantize(x, qt)
            best = min(best, time.perf_counter() - t)
        row = {
            "type": name,
            "bpw": 8.0 * size / block,
            "rmse": rmse(decode(q, name, x.shape[1]), x),
            "mbs": x.nbytes / best / 1e6,
            "ref_rmse": None,
            "same": None,
            "ref_mbs": None,
        }
        if ref is not None and name in REF_TYPES:
            t = time.perf_counter()
            qr = ref.quantize(x, name)
            row["ref_mbs"] = x.nbytes / (time.perf_counter() - t) / 1e6
            row["ref_rmse"] = rmse(decode(qr, name, x.shape[1]), x)
            same = np.all(qr == q, axis=1)
            row["same"] = f"{'y' if same.all() else 'n'} ({int(same.sum())}/{len(same)} rows)"
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| type | bits/weight | RMSE ours | RMSE llama.cpp ref | bytes identical | ours MB/s | ref MB/s (1 thread) |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        ref = "-" if r["ref_rmse"] is None else f"{r['ref_rmse']:.6g}"
        rm = "-" if r["ref_mbs"] is None else f"{r['ref_mbs']:.0f}"
        lines.append(
            f"| {r['type']} | {r['bpw']:.4g} | {r['rmse']:.6g} | {ref} | {r['same'] or '-'} | {r['mbs']:.0f} | {rm} |"
        )
    return "\n".join(lines)


def stories_weights(path: Path) -> np.ndarray | None:
    """All 2-D weights of stories260K, flattened and cut into rows of 256 (its rows are 64 wide)."""
    if not path.exists():
        return None
    import gguf

    r = gguf.GGUFReader(str(path))
    parts = [np.asarray(t.data, dtype=np.float32).ravel() for t in r.tensors if len(t.shape) == 2]
    flat = np.concatenate(parts)
    n = flat.size // 256 * 256
    return np.ascontiguousarray(flat[:n].reshape(-1, 256))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--llama-cpp", default=None, help="llama.cpp source tree or bare git mirror")
    stories = Path(__file__).resolve().parents[2] / "shared/models/gguf/stories260K.gguf"
    p.add_argument("--stories", default=str(stories))
    a = p.parse_args()

    from pyllm.kernels import set_threads

    threads = set_threads(a.threads)
    root = find_llama_cpp(a.llama_cpp)
    ref = build_ref(root)
    print(f"llama.cpp reference: {'built from ' + str(root) if ref else 'not available'}; pyllm threads: {threads}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.rows, a.cols), dtype=np.float32)
    print(f"\nrandom normal {a.rows}x{a.cols} float32 ({x.nbytes / 1e6:.0f} MB)\n")
    print(format_table(run_table(x, ref)))

    w = stories_weights(Path(a.stories))
    if w is not None:
        print(f"\nstories260K: all 2-D weights, {w.size} values as {w.shape[0]}x256 rows\n")
        print(format_table(run_table(w, ref)))


if __name__ == "__main__":
    main()
