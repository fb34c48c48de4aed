"""`pyllm convert`: a Hugging Face model directory or a llama2.c checkpoint -> GGUF.

    pyllm convert SRC -o OUT.gguf [--outtype f16] [--tokenizer PATH] [--vocab-only]

SRC: a directory with config.json + *.safetensors (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM), or a llama2.c .bin checkpoint (then --tokenizer names its tok*.bin or
SentencePiece .model). --outtype: f32, f16 (default, as llama.cpp's converter), bf16, or any
`pyllm quantize` type (q8_0, q4_k_m, ...). The per-tensor report goes to stderr; the file
appears only once it is complete.
"""

import argparse
import sys
import time
from pathlib import Path

from pyllm.base import PyllmError


def _log(quiet: bool):
    if quiet:
        return None
    return lambda line: print(line, file=sys.stderr)


def main(argv=None) -> int:
    from pyllm.convert.quantize import FILE_TYPES, format_totals, parse_file_type, same_file

    p = argparse.ArgumentParser(prog="pyllm convert", description="Convert a Hugging Face or llama2.c checkpoint to GGUF.")
    p.add_argument("src", help="Hugging Face model directory, or a llama2.c .bin checkpoint")
    p.add_argument("-o", "--outfile", required=True, help="output .gguf file")
    p.add_argument("--outtype", default="f16",
                   help=f"tensor type: f32, f16 (default), bf16 or a quantize type ({', '.join(t.lower() for t in FILE_TYPES)})")
    p.add_argument("--tokenizer", help="tokenizer to use: tokenizer.model / tokenizer.json / llama2.c tok*.bin / a directory")
    p.add_argument("--vocab-only", action="store_true", help="write only the tokenizer and hyper-parameters, no tensors")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-tensor report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from pyllm.convert.llama2c import convert_llama2c, is_llama2c

    ft = parse_file_type(args.outtype)
    src, out = Path(args.src), Path(args.outfile)
    if not src.exists():
        raise PyllmError(f"no such file or directory: {src}")
    if out.is_dir():
        raise PyllmError(f"{out} is a directory; give the output file name")
    inputs = [src] + ([Path(args.tokenizer)] if args.tokenizer else [])
    if src.is_dir():
        inputs += [f for f in src.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".json", ".model", ".bin"))]
    if out.exists() and any(same_file(out, f) for f in inputs):
        raise PyllmError(f"refusing to overwrite the input file {out}")

    progress = sys.stderr.isatty() and not args.no_progress
    log = _log(args.quiet)
    t0 = time.perf_counter()
    if src.is_dir():
        from pyllm.convert.hf import convert_hf

        report = convert_hf(src, out, ft.name, tokenizer=args.tokenizer, vocab_only=args.vocab_only, progress=progress, log=log)
    elif is_llama2c(src):
        report = convert_llama2c(src, out, args.tokenizer, ft.name, vocab_only=args.vocab_only, progress=progress, log=log)
    else:
        raise PyllmError(f"{src}: not a Hugging Face model directory nor a llama2.c checkpoint")
    dt = time.perf_counter() - t0
    if not args.quiet:
        print(format_totals(report), file=sys.stderr)
    size = out.stat().st_size
    print(f"wrote {out} ({ft.name}, {size / 2**20:.2f} MiB) in {dt:.1f} s", file=sys.stderr)
    return 0
