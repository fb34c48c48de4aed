"""Training tokens/s: pyllm's LoRA trainer against torch + peft, same model, batches, threads.

    python benchmarks/finetune_vs_torch.py --torch-python /path/to/venv-with-torch/bin/python \
        [-m SmolLM2-135M-Instruct.Q4_1.gguf] [-t 2] [--batch 4] [--seq 256] [--steps 6] [--targets q,k,v,o]

The torch side runs in its own virtual environment (torch, transformers, peft, gguf, numpy:
`pip install torch==2.13.0 transformers peft gguf numpy`, never in pyllm's). Both sides
train LoRA (rank 8, alpha 16, no dropout, AdamW lr 1e-4) on the same windows of
tinyshakespeare tokenized by the model's tokenizer:

- pyllm: the base stays in its GGUF blocks (QLoRA on a Q4_1 file); the batch's sequences
  shared among the threads (LoraModel.forward_backward_threads) + clipping + AdamW, exactly
  what a `pyllm finetune -t N` step runs (--blas-threads: one batch on N BLAS threads).
- torch: LlamaForCausalLM in float32 with the same weights, dequantized from the GGUF by
  gguf-py (Q/K rows un-permuted to Hugging Face's order), peft.get_peft_model, the usual
  loss.backward() + AdamW; torch.set_num_threads(t).

Before timing, the first step doubles as a correctness check: both start from the same A
(B = 0), so the first loss and d loss / dB must agree (printed). A step's time is the
median over --steps steps after one warm-up step; tokens/s = batch * seq / step time. CPU
time per step (all threads) is printed too: on a shared machine, with -t 1, it is the
steadier measure of the work done.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HF_MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
SHORT = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
         "down": "ffn_down"}


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- pyllm ----------------------------------------------------------------------------------


def run_pyllm(args, windows, work: Path) -> dict:
    from pyllm.kernels import set_threads
    from pyllm.runtime.gguf_file import GGUFFile
    from pyllm.runtime.llama import Model
    from pyllm.tuner.data import Batch
    from pyllm.tuner.model import LoraModel, LoraSpec, parse_targets
    from pyllm.tuner.optim import AdamW, clip_grad_norm
    from threadpoolctl import threadpool_limits

    threads = set_threads(args.threads)
    base = Model.from_gguf(GGUFFile(args.model), None, args.seq + 1)
    m = LoraModel(base, LoraSpec(8, 16.0, 0.0, parse_targets(args.targets)), grad_checkpoint=args.grad_checkpoint)
    m.weights.init(np.random.default_rng(0))
    np.savez(work / "lora_a.npz", **{n: m.weights.a[n] for n in m.weights.names})
    adam = AdamW(m.weights.flat.size)
    times, cpu, losses = [], [], []
    with threadpool_limits(threads, "blas"):
        for step in range(args.steps + 1):
            ids = windows[step % len(windows)]
            batch = Batch(ids[:, :-1].copy(), ids[:, 1:].copy(), np.ones(ids[:, 1:].shape, bool),
                          tuple(range(len(ids))), (args.seq,) * len(ids))
            t0, c0 = time.perf_counter(), time.process_time()
            m.grads.flat[...] = 0
            loss = m.forward_backward(batch, step_key=step) if args.blas_threads else \
                m.forward_backward_threads(batch, step, threads)
            m.grads.flat *= np.float32(1.0 / batch.n_tokens)
            if step == 0:
                np.savez(work / "pyllm_grad_b.npz", **{n: m.grads.b[n] for n in m.weights.names})
            clip_grad_norm(m.grads.flat, 1.0)
            adam.step(m.weights.flat, m.grads.flat, args.lr)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            losses.append(loss / batch.n_tokens)
    return {"times": times, "cpu": cpu, "losses": losses}


# -- torch + peft (runs in the other environment) --------------------------------------------


def run_torch(args, windows, work: Path) -> dict:
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    reader = GGUFReader(args.model)

    def field(key):
        f = reader.fields[key]
        return f.parts[f.data[0]][0]

    n_head, n_kv = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    cfg = LlamaConfig.from_pretrained(args.hf_config)
    cfg.torch_dtype = torch.float32
    model = LlamaForCausalLM(cfg).float()
    sd = {}
    gguf_to_hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape]))).astype(np.float32)
        name = t.name
        if name in gguf_to_hf:
            sd[gguf_to_hf[name]] = w
            continue
        _, i, kind, _ = name.split(".")
        if kind in ("attn_q", "attn_k"):
            w = unpermute(w, n_head if kind == "attn_q" else n_kv)
        hf = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}.get(kind, HF_MODULES.get(kind))
        sd[f"model.layers.{i}.{hf}.weight"] = w
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    assert not missing.missing_keys, missing.missing_keys
    targets = [HF_MODULES[SHORT[t]].split(".")[1] for t in args.targets.split(",")]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    a_init = np.load(work / "lora_a.npz")
    modules = dict(model.named_modules())
    for name in a_init.files:
        _, i, kind, _ = name.split(".")
        mod = modules[f"base_model.model.model.layers.{i}.{HF_MODULES[kind]}"]
        mod.lora_A["default"].weight.data.copy_(torch.from_numpy(a_init[name]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    times, cpu, losses = [], [], []
    model.train()
    for step in range(args.steps + 1):
        ids = torch.from_numpy(windows[step % len(windows)])
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        if step == 0:
            grads = {}
            for name in a_init.files:
                _, i, kind, _ = name.split(".")
                g = modules[f"base_model.model.model.layers.{i}.{HF_MODULES[kind]}"].lora_B["default"].weight.grad
                g = g.numpy().copy()
                if kind in ("attn_q", "attn_k"):  # back to GGUF row order to compare with pyllm
                    heads = n_head if kind == "attn_q" else n_kv
                    g = g.reshape(heads, 2, -1, g.shape[1]).swapaxes(1, 2).reshape(g.shape)
                grads[name] = g
            np.savez(work / "torch_grad_b.npz", **grads)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(loss.detach()))
    return {"times": times, "cpu": cpu, "losses": losses, "torch": torch.__version__}


# -- orchestration -------------------------------------------------------------------------------


def make_windows(args) -> np.ndarray:
    import pyllm

    tok = pyllm.load_tokenizer(args.model)
    text = Path(args.text).read_text()[:400_000]
    ids = np.array(tok.encode(text, add_bos=False), dtype=np.int64)
    n = args.batch * (args.seq + 1)
    count = min(len(ids) // n, args.steps + 1)
    return ids[: count * n].reshape(count, args.batch, args.seq + 1)


def summary(name, r, tokens):
    t, c = float(np.median(r["times"][1:])), float(np.median(r["cpu"][1:]))
    return {"backend": name, "step_s": t, "tokens_per_s": tokens / t, "cpu_s": c, "first_loss": r["losses"][0],
            "last_loss": r["losses"][-1]}


def main():
    here = Path(__file__).resolve().parent.parent
    shared = here.parent / "shared" / "models"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default=str(Path.home() / ".cache/pyllm/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--hf-config", default=str(shared / "hf" / "SmolLM2-135M-Instruct"))
    p.add_argument("--text", default=str(shared / "text" / "tinyshakespeare.txt"))
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--targets", default="q,k,v,o")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--blas-threads", action="store_true",
                   help="pyllm: one batch on multi-threaded BLAS instead of the trainer's sequences-over-threads")
    p.add_argument("--torch-python", help="python of a venv with torch, transformers, peft, gguf")
    p.add_argument("--backend", choices=("both", "pyllm", "torch"), default="both")
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ft-bench-"))
    if args.backend == "torch":  # child process in the torch environment
        windows = np.load(work / "windows.npy")
        (work / "torch.json").write_text(json.dumps(run_torch(args, windows, work)))
        return
    windows = make_windows(args)
    np.save(work / "windows.npy", windows)
    tokens = args.batch * args.seq
    rows = [summary("pyllm", run_pyllm(args, windows, work), tokens)]
    if args.backend == "both":
        if not args.torch_python:
            sys.exit("--torch-python is required for the torch side")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cmd = [args.torch_python, str(Path(__file__).resolve()), "--backend", "torch", "--work", str(work),
               "-m", args.model, "--hf-config", args.hf_config, "-t", str(args.threads), "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--lr", str(args.lr), "--targets", args.targets]
        subprocess.run(cmd, check=True, env=env, cwd=tempfile.gettempdir())
        r = json.loads((work / "torch.json").read_text())
        rows.append(summary(f"torch {r['torch']} + peft", r, tokens))
        ours, theirs = np.load(work / "pyllm_grad_b.npz"), np.load(work / "torch_grad_b.npz")
        err = max(float(np.linalg.norm(ours[n] - theirs[n]) / np.linalg.norm(theirs[n])) for n in ours.files)
        print(f"check: first loss pyllm {rows[0]['first_loss']:.6f} torch {rows[1]['first_loss']:.6f}; "
              f"d loss / dB max relative difference {err:.2e}")
    print(f"{args.model}: batch {args.batch} x seq {args.seq}, targets {args.targets}, {args.threads} threads")
    for r in rows:
        print(f"  {r['backend']:<22} {r['step_s']:7.2f} s/step  {r['tokens_per_s']:8.1f} tokens/s  "
              f"{r['cpu_s']:7.2f} CPU s/step  loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    if len(rows) == 2:
        print(f"  pyllm / torch: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x tokens/s, "
              f"{rows[1]['cpu_s'] / rows[0]['cpu_s']:.2f}x in CPU time")


if __name__ == "__main__":
    main()
