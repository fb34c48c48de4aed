"""`pyllm tokenize`: the token ids of a text, from a GGUF file's vocabulary (vocab-only files work)."""

import argparse

from pyllm.cli.common import add_model_arg, model_arg, read_prompt


def main(argv=None) -> int:
    from pyllm.runtime.loader import bundled_model, load_tokenizer

    p = argparse.ArgumentParser(prog="pyllm tokenize", description="Show how a model's tokenizer splits a text.")
    add_model_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="the text")
    src.add_argument("-f", "--file", help="read the text from a file")
    p.add_argument("--ids", action="store_true", help="print only the list of ids")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS even if the model asks for it")
    args = p.parse_args(argv)
    model_arg(p, args)

    tok = load_tokenizer(args.model or bundled_model())
    ids = tok.encode(read_prompt(args), add_bos=False if args.no_bos else None)
    if args.ids:
        print(ids)
    else:
        for i in ids:
            print(f"{i:6d} -> {tok.token_text(i)!r}")
    return 0
