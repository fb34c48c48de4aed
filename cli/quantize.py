"""`pyllm quantize`: re-encode a GGUF file with llama.cpp's quantization types and mixes.

    pyllm quantize IN.gguf OUT.gguf TYPE [--allow-requantize] [--leave-output-tensor] [--pure]

TYPE: F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 (= SYM_INT4), Q6_K, Q5_K_M, Q5_K_S, Q4_K_M,
Q4_K_S, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K, MXFP4, and pyllm's own NF4, FP8_E4M3, FP8_E5M2, FP6_E3M2
(= FP6), whose files only pyllm reads (case-insensitive). Per-tensor types, sizes and totals go
to stderr.
"""

import argparse
import sys
import time
from pathlib import Path

from pyllm.base import PyllmError


def main(argv=None) -> int:
    from pyllm.convert.quantize import ALIASES, FILE_TYPES, format_totals, parse_file_type, quantize_gguf, same_file

    p = argparse.ArgumentParser(prog="pyllm quantize", description="Quantize a GGUF model (llama.cpp's types and mixes).")
    p.add_argument("input", help="input .gguf")
    p.add_argument("output", help="output .gguf")
    p.add_argument("type", help=f"one of {', '.join(FILE_TYPES)} (aliases: {', '.join(ALIASES)})")
    p.add_argument("--allow-requantize", action="store_true", help="allow re-quantizing tensors that are already quantized")
    p.add_argument("--leave-output-tensor", action="store_true", help="do not quantize output.weight")
    p.add_argument("--pure", action="store_true", help="use the type for every tensor (no per-tensor mixes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-tensor report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    ft = parse_file_type(args.type)
    inp, out = Path(args.input), Path(args.output)
    if not inp.is_file():
        raise PyllmError(f"input file not found: {inp}")
    if out.is_dir():
        raise PyllmError(f"{out} is a directory; give the output file name")
    if same_file(inp, out):
        raise PyllmError(f"refusing to overwrite the input file {inp}")

    progress = sys.stderr.isatty() and not args.no_progress
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    t0 = time.perf_counter()
    report = quantize_gguf(inp, out, ft.name, allow_requantize=args.allow_requantize,
                           leave_output=args.leave_output_tensor, pure=args.pure, progress=progress, log=log)
    dt = time.perf_counter() - t0
    print(format_totals(report), file=sys.stderr)
    print(f"wrote {out} ({ft.name}) in {dt:.1f} s", file=sys.stderr)
    return 0
