"""`pyllm finetune BASE.gguf --data TRAIN.jsonl -o ADAPTER.gguf [options]`: train a LoRA
adapter (QLoRA when the base is quantized) with pyllm.tuner; `pyllm finetune --plot
LOG.jsonl` draws a finished or running log's loss curves into LOG.png.

Under `mpirun -n N` every rank runs this same command; rank 0 prints and writes."""

import argparse
import sys

from pyllm.cli.common import add_model_arg, model_arg


def build_parser() -> argparse.ArgumentParser:
    from pyllm.tuner.trainer import FinetuneConfig as C

    p = argparse.ArgumentParser(
        prog="pyllm finetune", description="Fine-tune a LoRA adapter on a GGUF model (no PyTorch).",
        epilog="Files beside OUT.gguf: OUT.ckpt.npz (checkpoint for --resume), OUT.log.jsonl (per-step log). "
               "Data parallel: mpirun -n 2 pyllm finetune ...")
    add_model_arg(p, default_model=None)
    p.add_argument("--data", help="training data, jsonl: {\"text\"}, {\"prompt\",\"completion\"} or {\"messages\"}")
    p.add_argument("-o", "--output", help="the adapter to write (GGUF, llama.cpp's LoRA format)")
    p.add_argument("--val-data", help="validation jsonl (loss reported before, during and after training)")
    p.add_argument("--val-every", type=int, default=C.val_every, help="validate every N steps (0: start and end)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=C.rank, help=f"LoRA rank r (default {C.rank})")
    g.add_argument("--alpha", type=float, default=C.alpha, help=f"LoRA alpha; scale = alpha / r (default {C.alpha:g})")
    g.add_argument("--dropout", type=float, default=C.dropout, help="dropout on the LoRA inputs (default 0)")
    g.add_argument("--targets", default=C.targets, help="weights to adapt, from q,k,v,o,gate,up,down "
                                                        f"(default {C.targets})")
    g = p.add_argument_group("training")
    g.add_argument("--iters", type=int, default=C.iters, help=f"optimizer steps (default {C.iters})")
    g.add_argument("--batch-size", type=int, default=C.batch_size,
                   help=f"examples per micro-batch (default {C.batch_size})")
    g.add_argument("--grad-accum", type=int, default=C.grad_accum, help="micro-batches per step (default 1)")
    g.add_argument("--seq-len", type=int, default=C.seq_len, help=f"longest example in tokens (default {C.seq_len})")
    g.add_argument("--lr", type=float, default=C.lr, help=f"peak learning rate (default {C.lr:g})")
    g.add_argument("--lr-schedule", default=C.lr_schedule, choices=("cosine", "linear", "constant"))
    g.add_argument("--warmup", type=int, default=C.warmup, help="linear warmup steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=C.weight_decay, help="AdamW weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, default=C.grad_clip,
                   help=f"clip the gradient norm (0: off; default {C.grad_clip:g})")
    g.add_argument("--mask-prompt", action="store_true", help="train on completions / assistant turns only")
    g.add_argument("--chat-template", help="template for {\"messages\"} records: a built-in name or a Jinja file")
    g.add_argument("--dtype", default=C.dtype, choices=("f32", "bf16"),
                   help="bf16: bfloat16 products, float32 master weights")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute each layer in the backward (less memory)")
    g.add_argument("--seed", type=int, default=C.seed, help="seed of the initialisation, data order and dropout")
    g.add_argument("-t", "--threads", type=int, default=None,
                   help="threads per process (default: the cores, shared by the MPI ranks of a machine)")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--save-every", type=int, default=C.save_every, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--resume", metavar="CKPT", help="continue from OUT.ckpt.npz")
    g.add_argument("--log-every", type=int, default=C.log_every, help="progress line every N steps when not a terminal")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    g.add_argument("--plot", metavar="LOG", help="only draw LOG.jsonl's loss curves into a PNG beside it")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.plot:
        from pyllm.tuner.plot import plot_log

        print(plot_log(args.plot))
        return 0
    model_arg(p, args)
    if not args.data or not args.output:
        p.error("--data and -o/--output are required")
    from pyllm.tuner.trainer import finetune

    options = {k: getattr(args, k) for k in (
        "val_data", "val_every", "rank", "alpha", "dropout", "targets", "iters", "batch_size", "grad_accum", "seq_len",
        "lr", "lr_schedule", "warmup", "weight_decay", "grad_clip", "mask_prompt", "chat_template", "dtype",
        "grad_checkpoint", "seed", "threads", "save_every", "resume", "log_every", "quiet")}
    result = finetune(args.model, args.data, args.output, **options)
    if result.interrupted:
        print(f"interrupted at step {result.step}; resume with --resume {result.checkpoint}", file=sys.stderr)
        return 130
    return 0
