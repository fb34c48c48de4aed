"""`pyllm perplexity`: perplexity of a model on a text, and KL divergence against a base model,
by llama-perplexity's method (runtime/perplexity.py says how).

Results go to stdout as llama-perplexity prints them ("[1]x,[2]y,..." and "Final estimate:
PPL = X +/- Y"; with --kl-divergence its per-chunk table and summary); progress and speed to stderr.
"""

import argparse
import os
import sys
import time

from pyllm.base import PyllmError
from pyllm.cli.common import add_cache_type_args, add_model_arg, model_arg


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyllm perplexity",
        description="Perplexity of a model on a text, as llama.cpp's llama-perplexity computes it: the text is cut "
        "into chunks of -c tokens, each evaluated from an empty cache, and the second half of each is scored. "
        "With --kl-divergence-base FILE the model's log-probabilities are saved as a base; with --kl-divergence "
        "as well, another model is compared with that base (KL divergence, top-1 agreement, PPL ratio).",
    )
    add_model_arg(p, default_model=None)
    p.add_argument("-f", "--file", metavar="TEXT", help="the text to score (UTF-8); optional with --kl-divergence, "
                   "where the base holds the tokens (if given, it must tokenize to them)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N",
                   help="tokens per chunk (default: 512; with --kl-divergence: the base's)")
    p.add_argument("--chunks", type=int, default=-1, metavar="N", help="score at most N chunks (default: -1, all)")
    p.add_argument("-b", "--batch-size", type=int, default=2048, metavar="N",
                   help="most tokens per evaluation; a chunk takes ceil(c / b) of them (default: 2048)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads for the kernels (default: all cores)")
    add_cache_type_args(p)
    p.add_argument("--kl-divergence-base", metavar="FILE",
                   help="without --kl-divergence: save the model's log-probabilities to FILE; "
                   "with it: the base to compare against")
    p.add_argument("--kl-divergence", action="store_true",
                   help="compare the model with the base in --kl-divergence-base (KLD, same top p, PPL ratio)")
    p.add_argument("--kl-divergence-top-k", type=int, default=None, metavar="K",
                   help="keep only the K most likely log-probabilities per token in a saved base, the rest as one "
                   "bucket: a much smaller file, but a KLD that misses the divergence within the bucket (default: "
                   "keep all, 2 bytes per vocabulary entry per scored token)")
    return p


def main(argv=None) -> int:
    from pyllm.runtime import perplexity as ppl
    from pyllm.runtime.loader import load

    p = parser()
    args = p.parse_args(argv)
    model_arg(p, args)
    if args.kl_divergence and not args.kl_divergence_base:
        p.error("--kl-divergence needs --kl-divergence-base FILE (a base saved by an earlier run)")
    if not args.kl_divergence and args.file is None:
        p.error("the text to score is required (-f TEXT)")
    if args.kl_divergence_top_k is not None and (args.kl_divergence or not args.kl_divergence_base):
        p.error("--kl-divergence-top-k applies to saving a base (--kl-divergence-base FILE without --kl-divergence)")
    if args.kl_divergence_top_k is not None and args.kl_divergence_top_k < 1:
        raise PyllmError(f"--kl-divergence-top-k must be 1 or more, got {args.kl_divergence_top_k}")
    if args.ctx_size is not None and args.ctx_size < 3:
        raise PyllmError(f"-c must be at least 3 tokens, got {args.ctx_size}")
    if args.batch_size < 1:
        raise PyllmError(f"-b must be 1 or more, got {args.batch_size}")
    if args.chunks == 0 or args.chunks < -1:
        raise PyllmError(f"--chunks must be -1 (all) or 1 or more, got {args.chunks}")

    base = ppl.KLBase.load(args.kl_divergence_base) if args.kl_divergence else None
    if args.kl_divergence_base and not args.kl_divergence:
        folder = os.path.dirname(os.path.abspath(args.kl_divergence_base))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise PyllmError(f"cannot write the base to {args.kl_divergence_base}: {folder} is not a writable folder")
    n_ctx = args.ctx_size or (base.n_ctx if base is not None else 512)
    text = ppl.read_text(args.file) if args.file is not None else None

    t0 = time.perf_counter()
    model = load(args.model, n_ctx=n_ctx, n_threads=args.threads, cache_type_k=args.cache_type_k,
                 cache_type_v=args.cache_type_v)
    t1 = time.perf_counter()
    model.warmup()
    info(f"load: {t1 - t0:.2f} s; warm-up (JIT compile/load): {time.perf_counter() - t1:.2f} s")
    train_ctx = model.args.max_position_embeddings
    if n_ctx > train_ctx:
        info(f"warning: the model was trained on only {train_ctx} context tokens ({n_ctx} specified)")
    tokens = None
    if text is not None:
        t0 = time.perf_counter()
        tokens = ppl.tokenize(model.tokenizer, text)
        info(f"tokenized the input: {len(tokens)} tokens in {time.perf_counter() - t0:.2f} s")

    if base is not None:
        base.check_compatible(model, args.ctx_size, tokens)
        run_kl_divergence(model, base, args)
    else:
        run_perplexity(model, tokens, n_ctx, args)
    return 0


def info(line: str):
    print(line, file=sys.stderr, flush=True)


def print_speed(n_tokens: int, seconds: float, batch: int):
    import numba

    tps = n_tokens / seconds if seconds else 0.0
    info(f"evaluated {n_tokens} tokens in {seconds:.2f} s: {tps:.2f} tokens per second "
         f"(batch {batch}, {numba.get_num_threads()} threads)")


def eta_line(seconds: float, n_chunk: int) -> str:
    total = seconds * n_chunk
    hours = f"{int(total // 3600)} hours " if total >= 3600 else ""
    return f"{seconds:.2f} seconds per pass - ETA {hours}{(total % 3600) / 60:.2f} minutes"


def run_perplexity(model, tokens, n_ctx: int, args):
    from pyllm.runtime import perplexity as ppl

    ppl.check_chunking(len(tokens), n_ctx)
    n_chunk = ppl.n_chunks_of(len(tokens), n_ctx, args.chunks)
    batch = min(args.batch_size, n_ctx)
    info(f"calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={batch}")

    def on_chunk(i, running, seconds):
        if i == 1:
            info(eta_line(seconds, n_chunk))
        print(f"[{i}]{running:.4f},", end="", flush=True)

    save = args.kl_divergence_base is not None
    result, kl_base = ppl.perplexity(model, tokens, n_ctx, batch, args.chunks, on_chunk, save_base=save,
                                     top_k=args.kl_divergence_top_k)
    print()
    value, err = result.ppl, result.ppl_error
    if err == err:  # not nan
        print(f"Final estimate: PPL = {value:.4f} +/- {err:.5f}")
    else:
        print(f"Final estimate: PPL = {value:.4f} (too few tokens for an error estimate)")
    if save:
        kl_base.save(args.kl_divergence_base)
        what = "all" if kl_base.top_k == kl_base.n_vocab else f"the top {kl_base.top_k}"
        info(f"saved the base ({what} log-probabilities of {len(kl_base.tok_logp)} tokens) "
             f"to {args.kl_divergence_base}")
    print_speed(result.tokens_evaluated, result.eval_seconds, batch)


def run_kl_divergence(model, base, args):
    from pyllm.runtime import perplexity as ppl

    n_chunk = base.n_chunks if args.chunks < 0 else min(args.chunks, base.n_chunks)
    batch = min(args.batch_size, base.n_ctx)
    kept = "all" if base.top_k == base.n_vocab else f"the top {base.top_k}"
    info(f"computing over {n_chunk} chunks, n_ctx={base.n_ctx}, batch_size={batch}, against {kept} log-probabilities "
         f"of {base.model or 'the base model'}")

    def on_chunk(i, res):
        if i == 1:
            info(eta_line(res.eval_seconds, n_chunk))
            print("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                  "              Δp RMS            Same top p")
        s = res.stats()

        def pm(key, fmt, scale=1.0):
            return f"{scale * s[key][0]:{fmt}} ± {scale * s[key][1]:{fmt}}"

        print(f"{i:4d}    {pm('ppl', '9.4f')}    {pm('ln_ratio', '10.5f')}    {pm('kld', '10.5f')}"
              f"    {pm('p_diff_rms', '6.3f', 100)} %    {pm('same_top', '6.3f', 100)} %", flush=True)

    result = ppl.kl_divergence(model, base, batch, args.chunks, on_chunk)
    print()
    for line in summary_lines(result.stats()):
        print(line)
    print_speed(result.tokens_evaluated, result.eval_seconds, batch)


def summary_lines(s: dict) -> list:
    """kl_divergence()'s closing statistics, in its words."""
    def pm(key, scale=1.0, fmt="10.6f", fmt_u=None):
        v, u = s[key]
        return f"{scale * v:{fmt}} ± {scale * u:{fmt_u or fmt}}"

    out = ["====== Perplexity statistics ======",
           f"Mean PPL(Q)                   : {pm('ppl')}",
           f"Mean PPL(base)                : {pm('ppl_base')}",
           f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['cor']:6.2f}%",
           f"Mean ln(PPL(Q)/PPL(base))     : {pm('ln_ratio')}",
           f"Mean PPL(Q)/PPL(base)         : {pm('ratio')}",
           f"Mean PPL(Q)-PPL(base)         : {pm('diff')}",
           "",
           "====== KL divergence statistics ======",
           f"Mean    KLD: {pm('kld')}"]
    names = {100: "Maximum", 50: "Median ", 0: "Minimum"}
    for q, v in s["kld_percentiles"].items():
        out.append(f"{names.get(q, f'{q:4.1f}%  ')} KLD: {v:10.6f}")
    out += ["", "====== Token probability statistics ======", f"Mean    Δp: {pm('p_diff', 100, '6.3f', '5.3f')} %"]
    for q, v in s["p_diff_percentiles"].items():
        out.append(f"{names.get(q, f'{q:4.1f}%  ')} Δp: {100 * v:6.3f}%")
    out += [f"RMS Δp    : {pm('p_diff_rms', 100, '6.3f', '5.3f')} %",
            f"Same top p: {pm('same_top', 100, '6.3f', '5.3f')} %"]
    return out
