"""`pyllm bench`: prompt (ppN) and decode (tgN) speed, as llama.cpp's llama-bench reports them.

The table (or CSV/JSON records) goes to stdout; load and JIT warm-up times go to stderr.
"""

import argparse
import sys
import time

from pyllm.cli.common import add_cache_type_args, add_model_arg, model_arg


def int_list(text: str) -> list:
    """"1,2,4" -> [1, 2, 4] (a comma list, as llama-bench takes)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyllm bench",
        description="Measure prompt processing (ppN: N tokens as one batch from an empty cache) and text "
        "generation (tgN: N single-token steps from an empty cache) as llama-bench does; every combination "
        "of the comma lists is run.",
    )
    add_model_arg(p, default_model=None)
    p.add_argument("-p", "--n-prompt", type=int_list, default=[512], metavar="N[,N...]",
                   help="prompt sizes to test (0: none; default: 512)")
    p.add_argument("-n", "--n-gen", type=int_list, default=[128], metavar="N[,N...]",
                   help="generation lengths to test (0: none; default: 128)")
    p.add_argument("-t", "--threads", type=int_list, default=None, metavar="T[,T...]",
                   help="thread counts to test (default: all cores)")
    p.add_argument("-b", "--batch-size", type=int, default=2048, metavar="N",
                   help="most prompt tokens per evaluation (default: 2048)")
    p.add_argument("-r", "--repetitions", type=int, default=5, metavar="N",
                   help="repetitions of each test (default: 5)")
    p.add_argument("-o", "--output", choices=("md", "csv", "json"), default="md",
                   help="output format: markdown table, CSV or a JSON array of records (default: md)")
    add_cache_type_args(p, lists=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default: 0)")
    return p


def main(argv=None) -> int:
    from pyllm.runtime import bench
    from pyllm.runtime.loader import load

    p = parser()
    args = p.parse_args(argv)
    model_arg(p, args)
    threads = args.threads or [None]
    bench.check_params(args.n_prompt, args.n_gen, threads, args.repetitions, args.batch_size)

    kv = args.cache_type_k != ["f16"] or args.cache_type_v != ["f16"]  # llama-bench's rule for the columns
    out = sys.stdout
    if args.output == "md":
        print(bench.markdown_header(kv), file=out, flush=True)
    elif args.output == "csv":
        print(bench.csv_header(), file=out, flush=True)

    def on_result(r):
        if args.output == "md":
            print(bench.markdown_row(r, kv), file=out, flush=True)
        elif args.output == "csv":
            print(bench.csv_row(r), file=out, flush=True)

    results = []
    for type_k in args.cache_type_k:  # every combination, one model (cache) each
        for type_v in args.cache_type_v:
            t0 = time.perf_counter()
            model = load(args.model, n_ctx=bench.n_ctx_needed(args.n_prompt, args.n_gen), n_threads=threads[0],
                         cache_type_k=type_k, cache_type_v=type_v)
            t1 = time.perf_counter()
            model.warmup()
            t2 = time.perf_counter()
            print(f"load: {t1 - t0:.2f} s; warm-up (JIT compile/load): {t2 - t1:.2f} s", file=sys.stderr)
            results += bench.bench(model, args.n_prompt, args.n_gen, threads, args.repetitions, args.batch_size,
                                   seed=args.seed, on_result=on_result)
    if args.output == "json":
        print(bench.to_json(results), file=out)
    return 0
