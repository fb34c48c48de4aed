"""`pyllm <command> ...`: dispatch to cli/<command>.py, each with a main(argv) -> int.

Errors a user can cause (PyllmError) print one line and exit 1; usage errors exit 2
(argparse); anything else is reported in one line too, with the traceback behind
PYLLM_DEBUG=1.
"""

import importlib
import os
import sys

COMMANDS = {
    "chat": "talk to a model in an interactive REPL (default: SmolLM2-135M-Instruct)",
    "generate": "complete a prompt and stream the text",
    "tokenize": "show the token ids of a text",
    "info": "describe a GGUF model file",
    "convert": "Hugging Face / llama2.c checkpoint -> GGUF",
    "quantize": "re-encode a GGUF file with another block type (Q4_K_M, Q8_0, ...)",
    "pull": "download a known model into the cache",
    "bench": "measure prompt and decode speed, as llama-bench does",
    "perplexity": "perplexity (and KL divergence against a base model) on a text, as llama-perplexity does",
    "finetune": "train a LoRA adapter (QLoRA on quantized models) on jsonl data",
    "export": "merge a LoRA adapter into a model (--fuse) or write it for PEFT (--peft)",
}

USAGE = "usage: pyllm <command> [options]   (pyllm <command> -h for its options)\n\ncommands:\n" + "\n".join(
    f"  {name:<11} {text}" for name, text in COMMANDS.items()
)


def main(argv=None) -> int:
    from pyllm import __version__
    from pyllm.base import PyllmError

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"pyllm {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"pyllm: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    debug = os.environ.get("PYLLM_DEBUG") == "1"
    try:
        module = importlib.import_module(f"pyllm.cli.{command}")
        return module.main(argv[1:]) or 0
    except PyllmError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`pyllm generate ... | head`): not an error of ours.
        sys.stderr.close()
        return 0
    except Exception as e:  # a bug: still one line, the traceback on request
        if debug:
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (set PYLLM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
