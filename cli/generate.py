"""`pyllm generate`: complete a prompt, streaming only the new text to stdout.

Timings go to stderr in llama.cpp's style, so stdout can be piped.
"""

import argparse
import sys

from pyllm.cli.common import (
    add_model_args,
    add_sampling_args,
    load_from_args,
    max_tokens_from_args,
    model_arg,
    print_timings,
    read_prompt,
    sampler_from_args,
)


def main(argv=None) -> int:
    from pyllm.runtime.generate import GenerationStats, generate_step, prompt_ids
    from pyllm.runtime.tokenizer import IncrementalDecoder

    p = argparse.ArgumentParser(prog="pyllm generate", description="Complete a prompt with a GGUF model.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help='the prompt ("" starts from BOS alone)')
    src.add_argument("-f", "--file", help="read the prompt from a file")
    add_model_args(p)
    add_sampling_args(p)
    args = p.parse_args(argv)
    model_arg(p, args)

    prompt = read_prompt(args)
    max_tokens = max_tokens_from_args(args)
    sampler = sampler_from_args(args)
    model, load_s, warmup_s = load_from_args(args)
    ids = prompt_ids(model, prompt)

    stats = GenerationStats()
    decoder = IncrementalDecoder(model.tokenizer)
    out = sys.stdout
    for token in generate_step(model, ids, sampler, max_tokens, stats, ignore_eos=args.ignore_eos):
        piece = decoder.add(token)
        if piece:
            out.write(piece)
            out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    if stats.stop_reason == "context":
        print(f"[context full at {model.n_ctx} tokens; raise -c for more]", file=sys.stderr)
    print_timings(load_s, warmup_s, stats)
    return 0
