"""The fine-tuning loop: `pyllm finetune` and `pyllm.finetune(...)`.

A step: zero the gradients; for each of grad_accum micro-batches of batch_size examples
(this rank's share of them), forward + backward adding d(summed loss)/d(LoRA); sum the
gradients, losses and token counts over ranks; divide by the step's loss tokens (so the
step minimises the mean loss per target token of the whole global batch); clip; AdamW.

Everything that decides the result is a function of (seed, step): the initial A matrices,
each epoch's example order, every dropout mask. A checkpoint therefore holds the adapter,
the AdamW moments, the step (which is the data position: step * grad_accum * batch_size
examples consumed) and the seed, and --resume continues bit for bit where an
uninterrupted run would be. Checkpoints are written atomically (temporary file + rename)
every --save-every steps, at the end, and on Ctrl-C (after the step in progress; a second
Ctrl-C aborts at once).

Files, beside the adapter OUT.gguf: OUT.ckpt.npz (the checkpoint), OUT.log.jsonl (one
record per step: step, loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s; val_loss
when validated), and OUT.log.png from `pyllm finetune --plot OUT.log.jsonl`.
"""

import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pyllm.base import PyllmError

CHECKPOINT_VERSION = 1


@dataclass
class FinetuneConfig:
    model: str
    data: str
    output: str
    val_data: str | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "q,k,v,o"
    iters: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mask_prompt: bool = False
    val_every: int = 0  # 0: validate before training and at the end only
    save_every: int = 0  # 0: checkpoint at the end (and on Ctrl-C) only
    resume: str | None = None
    seed: int = 0
    threads: int | None = None
    dtype: str = "f32"
    grad_checkpoint: bool = False
    chat_template: str | None = None
    log_every: int = 10  # a progress line every N steps when stderr is not a terminal
    quiet: bool = False

    def check(self):
        def positive(name, value, minimum=1):
            if value < minimum:
                raise PyllmError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")

        positive("rank", self.rank)
        positive("iters", self.iters)
        positive("batch_size", self.batch_size)
        positive("grad_accum", self.grad_accum)
        positive("seq_len", self.seq_len, 2)
        positive("warmup", self.warmup, 0)
        positive("val_every", self.val_every, 0)
        positive("save_every", self.save_every, 0)
        positive("log_every", self.log_every, 1)
        if not self.lr > 0:
            raise PyllmError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise PyllmError("--weight-decay and --grad-clip must not be negative")
        if self.dtype not in ("f32", "bf16"):
            raise PyllmError(f"--dtype must be f32 or bf16, got {self.dtype!r}")
        from pyllm.tuner.optim import SCHEDULES

        if self.lr_schedule not in SCHEDULES:
            raise PyllmError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")


@dataclass
class FinetuneResult:
    adapter: Path
    checkpoint: Path
    log: Path
    step: int  # optimizer steps done
    train_loss: list = field(default_factory=list)  # (step, loss) of the steps run now
    val_loss: list = field(default_factory=list)  # (step, loss)
    tokens_per_s: float = 0.0  # over the steps run now, all ranks
    interrupted: bool = False


def run_paths(output) -> tuple:
    """(checkpoint, log) beside the adapter file."""
    out = Path(output)
    stem = out.with_suffix("") if out.suffix == ".gguf" else out
    return Path(f"{stem}.ckpt.npz"), Path(f"{stem}.log.jsonl")


def finetune(model, data, output, **options) -> FinetuneResult:
    """Train a LoRA adapter on GGUF model `model` with jsonl `data`; write it to `output`.

    Options as `pyllm finetune` (underscores for dashes): rank, alpha, dropout, targets,
    iters, batch_size, grad_accum, seq_len, lr, lr_schedule, warmup, weight_decay,
    grad_clip, mask_prompt, val_data, val_every, save_every, resume, seed, threads, dtype,
    grad_checkpoint, chat_template, log_every, quiet."""
    if isinstance(options.get("targets"), (list, tuple)):
        options["targets"] = ",".join(options["targets"])
    try:
        cfg = FinetuneConfig(str(model), str(data), str(output), **options)
    except TypeError as e:
        raise PyllmError(f"finetune: {e}") from None
    return Trainer(cfg).run()


# -- checkpoints ----------------------------------------------------------------------------


def _atomic_write(path: Path, write):
    """write(file object) into a temporary file beside path, then rename it over path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# options that change what the weights mean: a checkpoint only resumes with the same ones
_STRUCTURAL = ("rank", "alpha", "targets", "dtype")
# options that change the result but may deliberately differ on resume (a note is printed)
_TRAJECTORY = ("iters", "batch_size", "grad_accum", "lr", "lr_schedule", "warmup", "weight_decay", "grad_clip",
               "dropout", "mask_prompt", "seq_len")


def save_checkpoint(path: Path, cfg: FinetuneConfig, step: int, params, adam):
    meta = {"version": CHECKPOINT_VERSION, "step": step, "seed": cfg.seed,
            "examples_consumed": step * cfg.grad_accum * cfg.batch_size, "model": cfg.model, "data": cfg.data,
            "config": {k: getattr(cfg, k) for k in _STRUCTURAL + _TRAJECTORY}}
    arrays = {"params": params, **adam.state(), "meta": np.array(json.dumps(meta))}
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        out["meta"] = json.loads(str(out["meta"]))
    except FileNotFoundError:
        raise PyllmError(f"checkpoint not found: {path}") from None
    except (OSError, ValueError, KeyError) as e:
        raise PyllmError(f"{path}: not a pyllm finetune checkpoint ({e})") from None
    if out["meta"].get("version") != CHECKPOINT_VERSION or "params" not in out:
        raise PyllmError(f"{path}: not a pyllm finetune checkpoint (version {out['meta'].get('version')})")
    return out


# -- progress -----------------------------------------------------------------------------


class Reporter:
    """A rich progress bar (step, loss, lr, tokens/s, ETA) on a terminal; plain lines
    every log_every steps otherwise; nothing when quiet."""

    def __init__(self, total: int, start: int, quiet: bool, log_every: int):
        self.quiet, self.log_every, self.total = quiet, log_every, total
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=sys.stderr))
            self.bar.start()
            self.task = self.bar.add_task("finetune", total=total, completed=start, loss="-", lr="-", tps="-")

    def note(self, text: str):
        if self.quiet:
            return
        if self.bar:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def step(self, rec: dict, eta_s: float):
        if self.bar:
            self.bar.update(self.task, completed=rec["step"], loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                            tps=f"{rec['tokens_per_s']:.0f}")
        elif not self.quiet and (rec["step"] % self.log_every == 0 or rec["step"] == self.total):
            self.note(f"step {rec['step']:>5}/{self.total}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                      f"{rec['tokens_per_s']:.0f} tok/s  ETA {_hms(eta_s)}")

    def close(self):
        if self.bar:
            self.bar.stop()


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _StopFlag:
    """Ctrl-C once: finish the step, save, stop. Twice: KeyboardInterrupt at once."""

    def __init__(self, reporter):
        self.set, self.reporter, self.old = False, reporter, None

    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.old = None
        return self

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        self.reporter.note("interrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


# -- the trainer ---------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg

    def _load(self):
        """Everything that can fail on bad input, before any file is written."""
        from pyllm.kernels.blocks import decodable
        from pyllm.runtime.chat_template import ChatTemplate
        from pyllm.runtime.gguf_file import GGUFFile
        from pyllm.runtime.llama import Model
        from pyllm.runtime.tokenizer import Tokenizer
        from pyllm.tuner.data import Encoder, Stream, load_jsonl
        from pyllm.tuner.model import LoraModel, LoraSpec, parse_targets

        cfg = self.cfg
        cfg.check()
        out = Path(cfg.output)
        if not (out.parent if str(out.parent) else Path(".")).is_dir():
            raise PyllmError(f"output directory {out.parent} does not exist")
        if out.is_dir():
            raise PyllmError(f"output {out} is a directory")
        spec = LoraSpec(cfg.rank, cfg.alpha, cfg.dropout, parse_targets(cfg.targets))
        gguf = GGUFFile(cfg.model)
        if gguf.metadata.get("general.type") == "adapter":
            raise PyllmError(f"{gguf.path}: is a LoRA adapter, not a base model")
        if not gguf.tensors:
            raise PyllmError(f"{gguf.path}: has no tensors (a vocab-only file?)")
        try:
            tokenizer = Tokenizer.from_metadata(gguf.metadata)
        except PyllmError as e:
            raise PyllmError(f"{gguf.path}: {e}") from None
        ctx = int(gguf.metadata.get(f"{gguf.architecture}.context_length", cfg.seq_len))
        if cfg.seq_len > ctx:
            raise PyllmError(f"--seq-len {cfg.seq_len} exceeds the model's context length {ctx}")
        base = Model.from_gguf(gguf, tokenizer, cfg.seq_len)
        for name, info in gguf.tensors.items():
            if not decodable(info.qtype) and len(info.dims) >= 2:
                raise PyllmError(f"{gguf.path}: tensor {name} has block type {info.qtype.name}, which the trainer "
                                 "cannot read")
        template = None
        try:
            template = ChatTemplate.from_metadata(gguf.metadata, cfg.chat_template)
        except PyllmError:
            if cfg.chat_template:
                raise
        enc = Encoder(tokenizer, template, cfg.mask_prompt)
        self.train = load_jsonl(cfg.data, enc, cfg.seq_len)
        self.val = load_jsonl(cfg.val_data, enc, cfg.seq_len) if cfg.val_data else None
        self.stream = Stream(self.train, cfg.seed)
        self.gguf = gguf
        self.model = LoraModel(base, spec, np.float32, bf16=cfg.dtype == "bf16",
                               grad_checkpoint=cfg.grad_checkpoint, seed=cfg.seed)
        self.model.weights.init(np.random.default_rng([cfg.seed, 0x5EED]))
        self.ckpt = load_checkpoint(cfg.resume) if cfg.resume else None

    def _restore(self, adam, reporter) -> int:
        ck, cfg = self.ckpt, self.cfg
        meta = ck["meta"]
        old = meta["config"]
        for k in _STRUCTURAL:
            if old.get(k) != getattr(cfg, k):
                raise PyllmError(f"{cfg.resume}: the checkpoint was trained with --{k.replace('_', '-')} {old.get(k)}, "
                                 f"not {getattr(cfg, k)}")
        if ck["params"].shape != self.model.weights.flat.shape:
            raise PyllmError(f"{cfg.resume}: the checkpoint's adapter does not fit this base model")
        for k in _TRAJECTORY:
            if old.get(k) != getattr(cfg, k):
                reporter.note(f"note: resuming with --{k.replace('_', '-')} {getattr(cfg, k)} "
                              f"(the checkpoint used {old.get(k)}): the result will differ from an uninterrupted run")
        if meta["seed"] != cfg.seed:
            reporter.note(f"note: using the checkpoint's seed {meta['seed']} (not {cfg.seed}) "
                          "for data order and dropout")
            cfg.seed = meta["seed"]
            self.stream.seed = cfg.seed
            self.model.seed = cfg.seed
        self.model.weights.flat[...] = ck["params"]
        adam.load(ck)
        return int(meta["step"])

    def _val_loss(self, comm) -> float:
        from pyllm.tuner.data import fixed_batches

        total = np.zeros(2)
        for batch in fixed_batches(self.val, self.cfg.batch_size, comm.rank, comm.size):
            total += (self.model.loss_threads(batch, self.threads), batch.n_tokens)
        comm.allreduce_sum(total)
        return float(total[0] / total[1])

    def _train_step(self, step: int, comm, adam, stop_requested: bool) -> tuple:
        """One optimizer step; returns its log record and whether any rank asked to stop."""
        from pyllm.tuner.optim import clip_grad_norm, lr_at

        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.iters, cfg.lr, cfg.lr_schedule, cfg.warmup)
        model.grads.flat[...] = 0.0
        sums = np.zeros(4)  # summed loss, loss tokens, input tokens, stop requests
        for m in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + m) * cfg.batch_size
            batch = self.stream.micro_batch(first, cfg.batch_size, comm.rank, comm.size)
            if batch is not None:  # this rank's share of the micro-batch, over this process's threads
                sums[0] += model.forward_backward_threads(batch, step, self.threads)
                sums[1] += batch.n_tokens
                sums[2] += batch.n_inputs
        sums[3] = float(stop_requested)
        comm.allreduce_sum(model.grads.flat)
        comm.allreduce_sum(sums)
        model.grads.flat *= np.float32(1.0 / sums[1])  # the mean over the global batch's loss tokens
        norm = clip_grad_norm(model.grads.flat, cfg.grad_clip)
        adam.step(model.weights.flat, model.grads.flat, lr)
        dt = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": sums[0] / sums[1], "lr": lr, "grad_norm": norm, "tokens": int(sums[2]),
               "tokens_per_s": sums[2] / dt}
        return rec, sums[3] > 0

    def run(self) -> FinetuneResult:
        from pyllm.kernels import max_threads, set_threads
        from pyllm.tuner import dist
        from pyllm.tuner.adapter import save_adapter
        from pyllm.tuner.optim import AdamW
        from threadpoolctl import threadpool_limits

        cfg = self.cfg
        comm = dist.world()
        main = comm.rank == 0
        # default threads: the cores shared by the ranks on this machine (no oversubscription)
        threads = set_threads(cfg.threads or (max(1, max_threads() // dist.local_size()) if comm.size > 1 else None))
        self.threads = threads
        with threadpool_limits(limits=threads, user_api="blas"):
            self._load()
            ckpt_path, log_path = run_paths(cfg.output)
            result = FinetuneResult(Path(cfg.output), ckpt_path, log_path, 0)
            weights = self.model.weights
            adam = AdamW(weights.flat.size, weight_decay=cfg.weight_decay)
            reporter = Reporter(cfg.iters, 0, cfg.quiet or not main, cfg.log_every)
            start = self._restore(adam, reporter) if self.ckpt else 0
            if start > cfg.iters:
                raise PyllmError(f"{cfg.resume}: the checkpoint is at step {start}, past --iters {cfg.iters}")
            if main:
                _start_log(log_path, start if self.ckpt else None)
            arch = self.gguf.architecture

            def save(step):
                if main:
                    save_adapter(cfg.output, weights, arch, cfg.alpha, name=f"pyllm LoRA r{cfg.rank} step {step}")
                    save_checkpoint(ckpt_path, cfg, step, weights.flat, adam)
                comm.barrier()

            def log(rec):
                if main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")

            n_params = weights.flat.size
            reporter.note(f"finetune: {len(self.train)} examples, {len(weights.names)} LoRA pairs "
                          f"({n_params:,} parameters, rank {cfg.rank}), {comm.size} process(es) x {threads} thread(s), "
                          f"steps {start}..{cfg.iters}")
            if self.val and start == 0:
                v = self._val_loss(comm)
                result.val_loss.append((0, v))
                log({"step": 0, "val_loss": v})
                reporter.note(f"step     0  val_loss {v:.4f}")
            if reporter.bar:
                reporter.bar.update(reporter.task, completed=start)
            t_run, tokens_run = time.perf_counter(), 0
            step = start
            with _StopFlag(reporter) as stop:
                while step < cfg.iters:
                    rec, stopping = self._train_step(step, comm, adam, stop.set)
                    step += 1
                    tokens_run += rec["tokens"]
                    rec["elapsed_s"] = time.perf_counter() - t_run
                    result.train_loss.append((step, rec["loss"]))
                    if self.val and ((cfg.val_every and step % cfg.val_every == 0) or step == cfg.iters):
                        rec["val_loss"] = self._val_loss(comm)
                        result.val_loss.append((step, rec["val_loss"]))
                        reporter.note(f"step {step:>5}  val_loss {rec['val_loss']:.4f}")
                    log(rec)
                    elapsed = time.perf_counter() - t_run
                    reporter.step(rec, elapsed / (step - start) * (cfg.iters - step))
                    if stopping and step < cfg.iters:
                        save(step)
                        reporter.note(f"interrupted at step {step}: checkpoint {ckpt_path}, adapter {cfg.output} "
                                      f"(continue with --resume {ckpt_path})")
                        result.interrupted = True
                        break
                    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.iters:
                        save(step)
            reporter.close()
            if not result.interrupted:
                save(step)
                reporter.note(f"wrote {cfg.output} and {ckpt_path} (step {step})")
            result.step = step
            seconds = time.perf_counter() - t_run
            result.tokens_per_s = tokens_run / seconds if seconds and step > start else 0.0
            return result


def _start_log(path: Path, resume_step: int | None):
    """A fresh log; or, on resume, the old one cut back to the checkpoint's step."""
    keep = []
    if resume_step is not None and path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= resume_step:
                keep.append(line + "\n")
    _atomic_write(path, lambda f: f.write("".join(keep).encode()))
