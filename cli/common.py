"""What the commands share: the model argument, runtime and sampling flags, loading, timings.

Flag names and defaults follow llama.cpp's (`-m`, `-c`, `-t`, `--temp 0.8 --top-k 40 ...`).
"""

import argparse
import sys
import time
from pathlib import Path

from pyllm.base import PyllmError


def add_model_arg(p: argparse.ArgumentParser, default_model: str | None = "the bundled stories260K"):
    """The model as a positional argument (`pyllm chat model.gguf`) or as -m/--model, as
    llama.cpp spells it. default_model None: one of the two is required. Read it back with
    model_arg(p, args)."""
    what = f"(default: {default_model})" if default_model else "(required)"
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help=f"GGUF model file {what}")
    p.add_argument("-m", "--model", dest="model_opt", metavar="MODEL", help="the model file, as an option")
    p.set_defaults(model_required=default_model is None)


def model_arg(p: argparse.ArgumentParser, args) -> str | None:
    """The model path given positionally or with -m (a usage error when both or, if required, neither);
    also stored as args.model."""
    if args.model_pos is not None and args.model_opt is not None:
        p.error(f"the model is given twice, as MODEL ({args.model_pos}) and with -m ({args.model_opt}); give one")
    args.model = args.model_pos if args.model_pos is not None else args.model_opt
    if args.model is None and args.model_required:
        p.error("a model file is required (MODEL or -m MODEL)")
    return args.model


def add_model_args(p: argparse.ArgumentParser, default_model: str = "the bundled stories260K"):
    """The model (positional or -m), -c, -t, the LoRA and the KV cache flags: what every command
    that runs a model takes."""
    add_model_arg(p, default_model)
    p.add_argument("-c", "--ctx-size", type=int, default=0, help="context size in tokens (0: min(4096, model's))")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads for the kernels (default: all cores)")
    from pyllm.runtime.lora import add_lora_args

    add_lora_args(p)  # --lora FILE, --lora-scaled FILE SCALE
    add_cache_type_args(p)


def cache_type_list(text: str) -> list:
    """"q8_0,f16" -> ['q8_0', 'f16'] (a comma list, as llama-bench takes); unknown names are a usage error."""
    from pyllm.kernels.kvcache import NAMES

    values = [v.strip().lower() for v in text.split(",")]
    bad = [v for v in values if v not in NAMES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown KV cache type {bad[0]!r}; valid types: {', '.join(NAMES)}")
    return values


def add_cache_type_args(p: argparse.ArgumentParser, lists: bool = False):
    """--cache-type-k/-ctk and --cache-type-v/-ctv, llama.cpp's flags (default f16); lists: comma
    lists of types, as llama-bench takes them."""
    from pyllm.kernels.kvcache import DEFAULT, NAMES

    kind = cache_type_list if lists else cache_type_name
    default = [DEFAULT] if lists else DEFAULT
    what = "T[,T...]" if lists else "TYPE"
    for short, long, which in (("-ctk", "--cache-type-k", "K"), ("-ctv", "--cache-type-v", "V")):
        p.add_argument(short, long, type=kind, default=default, metavar=what,
                       help=f"{which} cache type: {', '.join(NAMES)} (default: {DEFAULT})")


def cache_type_name(text: str) -> str:
    """One KV cache type name (a usage error if unknown)."""
    values = cache_type_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"one KV cache type expected, got {text!r}")
    return values[0]


def add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("-n", "--n-predict", type=int, default=-1,
                   help="tokens to generate (-1: until end of text or full context)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (<= 0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (<= 0: off)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (1.0: off)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (0.0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalize repeated tokens (1.0: off)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalties look back over (-1: all)")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=-1, help="random seed (-1: random)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text tokens")


def sampler_from_args(args):
    from pyllm.runtime.sampling import Sampler

    return Sampler(
        temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty, seed=args.seed,
    )


def max_tokens_from_args(args) -> int:
    if args.n_predict < -1:
        raise PyllmError(f"-n must be -1 or more, got {args.n_predict}")
    return sys.maxsize if args.n_predict == -1 else args.n_predict


def load_from_args(args, background: bool = False):
    """Load the model named by -m/-c/-t, timing it; returns (model, load seconds, warm-up seconds).
    background: the weights are packed and the step compiled or loaded in a thread
    (Model.warmup), behind the caller; the warm-up seconds are then 0."""
    from pyllm.runtime.loader import load

    if args.ctx_size < 0:
        raise PyllmError(f"-c must be 0 or more, got {args.ctx_size}")
    t0 = time.perf_counter()
    from pyllm.runtime.lora import lora_from_args

    model = load(args.model, n_ctx=args.ctx_size or None, n_threads=args.threads, lora=lora_from_args(args),
                 cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)
    t1 = time.perf_counter()
    if background:
        model.warmup(background=True)
    else:
        model.warmup(progress=lambda message: print(message, file=sys.stderr, flush=True))
    return model, t1 - t0, time.perf_counter() - t1


def read_prompt(args) -> str:
    if args.file is None:
        return args.prompt
    try:
        return Path(args.file).read_text(encoding="utf-8")
    except OSError as e:
        raise PyllmError(f"cannot read prompt file {args.file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PyllmError(f"prompt file {args.file} is not UTF-8 text") from None


def print_timings(load_s, warmup_s, stats):
    def line(label, seconds, n):
        per_tok = seconds * 1e3 / n if n else 0.0
        tps = n / seconds if seconds else 0.0
        return (f"{label:>16} = {seconds * 1e3:10.2f} ms / {n:5d} tokens ({per_tok:8.2f} ms per token, "
                f"{tps:8.2f} tokens per second)")

    print(file=sys.stderr)
    print(f"{'load time':>16} = {load_s * 1e3:10.2f} ms (+ {warmup_s * 1e3:.2f} ms JIT warm-up)", file=sys.stderr)
    print(line("prompt eval time", stats.prompt_s, stats.prompt_tokens), file=sys.stderr)
    print(line("eval time", stats.decode_s, stats.decode_tokens), file=sys.stderr)
