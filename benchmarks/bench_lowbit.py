"""The low-bit float types (kernels/lowbit.py): one-token product speed and quantization RMSE.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_lowbit.py speed [--rows 4096] [--cols 4096] [--threads 1,2]
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_lowbit.py rmse [--model SmolLM2.gguf] [--layers 0,10,20,29]

speed: GB/s and G weights/s of W x for one token, W (rows, cols) of random normal weights
quantized by pyllm, against the fused products of the existing types (kernels/matmul.py); the
matrix is larger than the caches, so this is the decode case. NF4 and MXFP4 are timed with
their AVX2 table kernel and the portable one.

rmse: bits per weight and RMSE of dequantize(quantize(x)) - x, on random normal 4096 x 4096
(seed 0) and on a model's real weights (every 2-D weight of the chosen layers, and the token
embedding), as relative RMSE (RMSE / RMS of the weights) so tensors of any scale add up. Rows
are cut into 256-wide rows for the K-quants (flat order: the 32/64-blocks are the file's own).

build_mxfp4_ref() compiles llama.cpp's quantize_row_mxfp4_ref out of its source (found by
$LLAMA_CPP_SRC, or $PYLLM_LLAMA_CPP_BIN/../..) for tests/test_lowbit.py; nothing is copied
into this repository.
"""

import argparse
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

NEW = ["NF4", "MXFP4", "FP8_E4M3", "FP8_E5M2", "FP6_E3M2"]
OLD = ["Q8_0", "Q6_K", "Q5_0", "Q4_1", "Q4_0", "Q4_K", "Q3_K"]


# -- llama.cpp's MXFP4 quantizer, compiled from its source ---------------------------------------

def find_llama_cpp_src() -> Path | None:
    for cand in (os.environ.get("LLAMA_CPP_SRC"),
                 os.environ.get("PYLLM_LLAMA_CPP_BIN") and Path(os.environ["PYLLM_LLAMA_CPP_BIN"]).parent.parent):
        if cand and (Path(cand) / "ggml" / "src" / "ggml-quants.c").is_file():
            return Path(cand)
    return None


def _cut(src: str, head: str) -> str:
    """The C definition that starts with `head`, to its matching closing brace."""
    i = src.index(head)
    depth, j = 0, src.index("{", i)
    for k in range(j, len(src)):
        depth += {"{": 1, "}": -1}.get(src[k], 0)
        if depth == 0:
            return src[i:k + 1]
    raise ValueError(f"unbalanced braces after {head!r}")


def mxfp4_c_source(root: Path) -> str:
    quants = (root / "ggml/src/ggml-quants.c").read_text()
    impl = (root / "ggml/src/ggml-impl.h").read_text()
    common = (root / "ggml/src/ggml-common.h").read_text()
    table = common[common.index("GGML_TABLE_BEGIN(int8_t, kvalues_fp4, 16)"):]
    table = table[table.index("\n") + 1:table.index("GGML_TABLE_END()")]
    return "\n".join([
        "#include <stdint.h>\n#include <string.h>\n#include <math.h>\n#include <assert.h>",
        "#define GGML_RESTRICT restrict\n#define QK_MXFP4 32",
        "typedef struct { uint8_t e; uint8_t qs[QK_MXFP4/2]; } block_mxfp4;",
        f"static const int8_t kvalues_mxfp4[16] = {{{table.strip().rstrip(',')}}};",
        _cut(impl, "static inline float ggml_e8m0_to_fp32_half("),
        "#define GGML_E8M0_TO_FP32_HALF(x) ggml_e8m0_to_fp32_half(x)",
        _cut(quants, "static inline int best_index_mxfp4("),
        _cut(quants, "void quantize_row_mxfp4_ref("),
    ]) + "\n"


def build_mxfp4_ref(root: Path | None = None):
    """x float32 (n, 32k) -> ggml's MXFP4 bytes (n, 17k); None without the source or gcc. Built
    with -O3 -march=native as llama.cpp's own build (contraction cannot matter here: every
    kvalue * scale product is exact)."""
    root = root or find_llama_cpp_src()
    cc = shutil.which("gcc") or shutil.which("cc")
    if root is None or cc is None:
        return None
    try:
        src = mxfp4_c_source(root)
    except (OSError, ValueError):
        return None
    cache = Path(tempfile.gettempdir()) / "pyllm-ggml-ref"
    cache.mkdir(parents=True, exist_ok=True)
    so = cache / f"ggml_mxfp4_ref_{hashlib.sha256(src.encode()).hexdigest()[:16]}.so"
    if not so.exists():
        c = cache / (so.stem + ".c")
        c.write_text(src)
        tmp = so.with_suffix(f".{os.getpid()}.so")
        proc = subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", "-o", str(tmp), str(c), "-lm"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return None
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    lib.quantize_row_mxfp4_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.quantize_row_mxfp4_ref.restype = None

    def quantize(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], x.shape[1] // 32 * 17), dtype=np.uint8)
        lib.quantize_row_mxfp4_ref(x.ctypes.data, out.ctypes.data, x.size)
        return out

    return quantize


# -- helpers -----------------------------------------------------------------------------------------

def quantize(x, name):
    from pyllm.base import GGMLType
    from pyllm.kernels import lowbit
    from pyllm.kernels.quantize import quantize as quantize_old

    t = GGMLType[name]
    return lowbit.quantize(x, t) if t in lowbit.TYPES else quantize_old(x, t)


def dequantize(raw, name, cols):
    from pyllm.base import GGMLType
    from pyllm.kernels import lowbit
    from pyllm.kernels.quants import QTensor
    from pyllm.kernels.quants import dequantize as dequantize_old

    t = GGMLType[name]
    if t in lowbit.TYPES:
        return lowbit.dequantize(raw, t, cols)
    return dequantize_old(QTensor(raw, t, raw.shape[0], cols))


def bits_per_weight(name):
    from pyllm.base import BLOCK_SIZE, GGMLType

    block, size = BLOCK_SIZE[GGMLType[name]]
    return 8 * size / block


# -- speed -------------------------------------------------------------------------------------------

def speed(args):
    from pyllm.base import GGMLType
    from pyllm.kernels import lowbit, set_threads
    from pyllm.kernels.matmul import linear
    from pyllm.kernels.quants import QTensor

    w = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal(args.cols).astype(np.float32)
    cases = []
    for name in args.types.split(","):
        t = GGMLType[name]
        raw = quantize(w, name)
        if t in lowbit.TYPES:
            cases.append((name, raw, lambda raw=raw, t=t: lowbit.matvec(raw, t, x)))
            if lowbit.TYPES[t].dot_portable is not lowbit.TYPES[t].dot:
                cases.append((name + " (portable)", raw, lambda raw=raw, t=t: lowbit.matvec(raw, t, x, portable=True)))
        else:
            q = QTensor(raw, t, args.rows, args.cols)
            cases.append((name, raw, lambda q=q: linear(q, x[None, :])))
    print(f"{args.rows} x {args.cols}, best of {args.repeat} rounds (each round runs every case once, so a busy")
    print("machine slows all cases alike):\n")
    print("| type | bits/weight | MiB | threads | ms | GB/s | G weights/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads in [int(n) for n in args.threads.split(",")]:
        set_threads(threads)
        best = [float("inf")] * len(cases)
        for _, _, run in cases:
            run()  # compile / warm
        for _ in range(args.repeat):
            for i, (_, _, run) in enumerate(cases):
                t0 = time.perf_counter()
                run()
                best[i] = min(best[i], time.perf_counter() - t0)
        for (label, raw, _), t in zip(cases, best):
            name = label.split()[0]
            print(f"| {label} | {bits_per_weight(name):.3g} | {raw.nbytes / 2**20:.1f} | {threads} | {t * 1e3:.3f} "
                  f"| {raw.nbytes / t / 1e9:.2f} | {args.rows * args.cols / t / 1e9:.2f} |")


# -- RMSE ----------------------------------------------------------------------------------------------

def model_weights(path, layers):
    """(name, float32 (n, 256)) for the token embedding and every 2-D weight of the layers."""
    from pyllm.convert.quantize import decode
    from pyllm.runtime.gguf_file import GGUFFile

    g = GGUFFile(path)
    keep = [n for n, t in g.tensors.items() if len(t.dims) == 2 and (n == "token_embd.weight" or any(
        n.startswith(f"blk.{i}.") for i in layers))]
    for n in keep:
        t = g.tensors[n]
        rows = t.dims[1]
        x = decode(g.raw(n).reshape(rows, -1), t.qtype, rows, t.dims[0])
        yield n, np.ascontiguousarray(x).reshape(-1, 256)


def rmse(args):
    from pyllm.kernels import set_threads

    set_threads(None)
    types = args.types.split(",")
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((4096, 4096)).astype(np.float32)
    print("random normal 4096 x 4096 (seed 0):\n")
    print("| type | bits/weight | RMSE | quantize MB/s |")
    print("| --- | ---: | ---: | ---: |")
    for name in types:
        quantize(normal[:64], name)  # compile
        t0 = time.perf_counter()
        raw = quantize(normal, name)
        dt = time.perf_counter() - t0
        err = dequantize(raw, name, normal.shape[1]) - normal
        print(f"| {name} | {bits_per_weight(name):.3g} | {np.sqrt(np.mean(err.astype(np.float64) ** 2)):.5f} | "
              f"{normal.nbytes / dt / 1e6:.0f} |")
    if not args.model:
        return
    layers = [int(i) for i in args.layers.split(",")]
    print(f"\n{args.model}: token_embd and the 2-D weights of layers {args.layers}:\n")
    sq = {name: 0.0 for name in types}
    total, n = 0.0, 0
    for tname, x in model_weights(args.model, layers):
        x64 = x.astype(np.float64)
        total += float(np.sum(x64 ** 2))
        n += x.size
        for name in types:
            err = dequantize(quantize(x, name), name, 256).astype(np.float64) - x64
            sq[name] += float(np.sum(err ** 2))
    print(f"({n / 1e6:.1f} M weights, RMS {np.sqrt(total / n):.5f})\n")
    print("| type | bits/weight | RMSE | relative RMSE |")
    print("| --- | ---: | ---: | ---: |")
    for name in types:
        rel = np.sqrt(sq[name] / total)
        print(f"| {name} | {bits_per_weight(name):.3g} | {np.sqrt(sq[name] / n):.6f} | {rel:.4f} |")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--rows", type=int, default=4096)
    s.add_argument("--cols", type=int, default=4096)
    s.add_argument("--threads", default="1,2")
    s.add_argument("--repeat", type=int, default=20)
    s.add_argument("--types", default="Q4_0,NF4,MXFP4,Q4_1,Q8_0,FP8_E4M3,FP8_E5M2,FP6_E3M2,Q6_K")
    r = sub.add_parser("rmse")
    r.add_argument("--model", help="a GGUF model whose weights to quantize")
    r.add_argument("--layers", default="0,10,20,29")
    r.add_argument("--types", default=",".join(OLD[:5] + NEW))
    args = p.parse_args()
    speed(args) if args.what == "speed" else rmse(args)


if __name__ == "__main__":
    main()
