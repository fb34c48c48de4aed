"""`pyllm export`: a LoRA adapter merged into its base model, or written for PEFT.

    pyllm export --fuse -m BASE.gguf --lora ADAPTER.gguf -o OUT.gguf [--outtype TYPE]
    pyllm export --peft -m BASE.gguf --lora ADAPTER.gguf -o DIR
"""

import argparse
import sys

from pyllm.cli.common import add_model_arg, model_arg


def main(argv=None) -> int:
    from pyllm.runtime.lora import add_lora_args, lora_from_args

    p = argparse.ArgumentParser(prog="pyllm export", description="Merge a LoRA adapter into a GGUF model, or "
                                "export it as a Hugging Face PEFT adapter.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fuse", action="store_true", help="write BASE + adapter(s) as one GGUF model")
    mode.add_argument("--peft", action="store_true", help="write adapter_model.safetensors + adapter_config.json")
    add_model_arg(p, default_model=None)
    add_lora_args(p)
    p.add_argument("-o", "--output", required=True, help="OUT.gguf (--fuse) or a directory (--peft)")
    p.add_argument("--outtype", help="--fuse: re-encode as this llama.cpp type (F16, Q8_0, Q4_K_M, ...); "
                                     "default: each tensor's own type")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-tensor lines")
    args = p.parse_args(argv)
    model_arg(p, args)
    specs = lora_from_args(args)
    if not specs:
        p.error("give the adapter with --lora FILE (or --lora-scaled FILE SCALE)")
    if args.peft:
        from pyllm.tuner.adapter import export_peft

        if len(specs) != 1 or specs[0][1] != 1.0 or args.outtype:
            p.error("--peft exports exactly one adapter (--lora FILE), without --outtype")
        print(f"wrote {export_peft(specs[0][0], args.model, args.output)}")
        return 0
    from pyllm.convert.quantize import format_totals
    from pyllm.tuner.adapter import fuse

    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    report = fuse(args.model, specs, args.output, outtype=args.outtype, log=log)
    print(f"wrote {args.output}: {format_totals(report)}")
    return 0
