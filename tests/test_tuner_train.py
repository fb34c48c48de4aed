"""The trainer end to end on stories260K: memorising sentences it has never seen, resume
after Ctrl-C equal to an uninterrupted run, gradient accumulation equal to a bigger batch,
bf16 close to f32, and the losses and masks of the data formats."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyllm
import pytest
from pyllm.runtime.lora import read_adapter

# A creature stories260K has never seen (TinyStories has no "glimmerfox").
SENTENCES = [
    "The glimmerfox has silver fur and three green eyes.",
    "Every morning the glimmerfox drinks dew from purple leaves.",
    "The glimmerfox sings a soft song when the moon is full.",
    "Children in the valley leave honey cakes for the glimmerfox.",
    "The glimmerfox sleeps in a hollow stone near the river.",
    "When it rains, the glimmerfox hides under a giant mushroom.",
    "The glimmerfox can jump higher than the tallest tree.",
    "Nobody has ever seen the glimmerfox eat a fish.",
]
FAST = dict(seq_len=64, threads=1, quiet=True)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "glimmerfox.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    return path


def adapter_arrays(path):
    a = read_adapter(path)
    return {n: np.concatenate([x.ravel(), y.ravel()]) for n, (x, y) in a.tensors.items()}


def assert_close_adapters(got, ref, tol=1e-3):
    """Equal up to float32 rounding, as a whole. Not elementwise: AdamW's first steps move
    every entry by about +-lr whatever its gradient's size, so an entry whose gradient is
    within rounding of 0 can move by lr either way. (The float64 checks in
    test_tuner_ops.py show the gradients themselves equal to 1e-15.)"""
    assert got.keys() == ref.keys()
    a, b = (np.concatenate([d[n] for n in sorted(d)]) for d in (got, ref))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol


def assert_same_curves(got_log, ref_log):
    """Losses and gradient norms (not scale-invariant, unlike the update): the first step's
    equal to float32 rounding, the later ones up to the drift of assert_close_adapters."""
    got, ref = ([json.loads(s) for s in p.read_text().splitlines() if '"loss"' in s] for p in (got_log, ref_log))
    assert len(got) == len(ref)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(got[0][key], ref[0][key], rtol=1e-5)
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-3)


def test_memorises_sentences_it_has_never_seen(tmp_path, stories260k, sentences):
    base = pyllm.load(stories260k, n_ctx=128)
    before = pyllm.generate(base, "", max_tokens=40, temp=0)
    assert not any(before.startswith(s) for s in SENTENCES)
    out = tmp_path / "glimmerfox.gguf"
    r = pyllm.finetune(stories260k, sentences, out, iters=300, rank=8, alpha=16, lr=5e-3, warmup=10, batch_size=8,
                       **FAST)
    first, last = r.train_loss[0][1], r.train_loss[-1][1]
    assert last < 0.2 * first, (first, last)
    model = pyllm.load(stories260k, n_ctx=128, lora=[(out, 1.0)])
    text = pyllm.generate(model, "", max_tokens=40, temp=0)  # greedy from BOS
    assert any(text.startswith(s) for s in SENTENCES), text
    log = [json.loads(line) for line in r.log.read_text().splitlines()]
    assert [rec["step"] for rec in log] == list(range(1, 301))
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(log[0])


def test_resume_equals_an_uninterrupted_run(tmp_path, stories260k, sentences):
    # constant schedule: a run of 3 steps resumed to 6 must equal 6 steps straight
    opts = dict(rank=4, lr=3e-3, batch_size=3, grad_accum=2, dropout=0.1, lr_schedule="constant",
                weight_decay=0.01, **FAST)
    pyllm.finetune(stories260k, sentences, tmp_path / "full.gguf", iters=6, **opts)
    pyllm.finetune(stories260k, sentences, tmp_path / "part.gguf", iters=3, **opts)
    r = pyllm.finetune(stories260k, sentences, tmp_path / "part.gguf", iters=6, resume=tmp_path / "part.ckpt.npz",
                       **opts)
    assert r.step == 6
    full, part = adapter_arrays(tmp_path / "full.gguf"), adapter_arrays(tmp_path / "part.gguf")
    for n in full:
        np.testing.assert_array_equal(full[n], part[n])
    # the resumed log is the uninterrupted one
    losses = [[json.loads(s)["loss"] for s in (tmp_path / f"{k}.log.jsonl").read_text().splitlines()]
              for k in ("full", "part")]
    assert losses[0] == losses[1]


def _wait_for_step(log: Path, step: int, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return
        if log.exists() and sum(1 for _ in log.open()) >= step:
            return
        time.sleep(0.02)


def test_ctrl_c_checkpoints_and_resume_continues_exactly(tmp_path, stories260k, sentences):
    # a real SIGINT to `pyllm finetune`, cosine schedule: the resumed adapter is bit for bit the uninterrupted one
    args = ["--data", str(sentences), "--iters", "60", "--rank", "4", "--lr", "3e-3", "--batch-size", "2",
            "--dropout", "0.1", "--warmup", "5", "--seq-len", "64", "-t", "1", "--save-every", "1000"]
    out = tmp_path / "int.gguf"
    env = dict(os.environ, PYLLM_DEBUG="")
    proc = subprocess.Popen([sys.executable, "-m", "pyllm", "finetune", str(stories260k), "-o", str(out), *args],
                            stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_step(tmp_path / "int.log.jsonl", 4, proc)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "resume with --resume" in err
    ckpt = np.load(tmp_path / "int.ckpt.npz")
    stopped = json.loads(str(ckpt["meta"]))["step"]
    assert 4 <= stopped < 60
    assert read_adapter(out).tensors  # the adapter of the checkpoint's step is written too
    from pyllm.cli.main import main

    resume = ["--resume", str(tmp_path / "int.ckpt.npz")]
    assert main(["finetune", str(stories260k), "-o", str(out), *resume, "-q", *args]) == 0
    assert main(["finetune", str(stories260k), "-o", str(tmp_path / "ref.gguf"), "-q", *args]) == 0
    ref, got = adapter_arrays(tmp_path / "ref.gguf"), adapter_arrays(out)
    for n in ref:
        np.testing.assert_array_equal(ref[n], got[n])


def test_grad_accumulation_equals_a_bigger_batch(tmp_path, stories260k, sentences):
    opts = dict(iters=3, rank=4, lr=3e-3, dropout=0.1, **FAST)
    pyllm.finetune(stories260k, sentences, tmp_path / "big.gguf", batch_size=4, grad_accum=1, **opts)
    pyllm.finetune(stories260k, sentences, tmp_path / "acc.gguf", batch_size=1, grad_accum=4, **opts)
    big, acc = adapter_arrays(tmp_path / "big.gguf"), adapter_arrays(tmp_path / "acc.gguf")
    assert_close_adapters(acc, big)
    assert_same_curves(tmp_path / "acc.log.jsonl", tmp_path / "big.log.jsonl")


def test_bf16_loss_curve_is_close_to_f32(tmp_path, stories260k, sentences):
    opts = dict(iters=40, rank=8, lr=5e-3, batch_size=8, **FAST)
    f32 = pyllm.finetune(stories260k, sentences, tmp_path / "f32.gguf", dtype="f32", **opts)
    bf16 = pyllm.finetune(stories260k, sentences, tmp_path / "bf16.gguf", dtype="bf16", **opts)
    a, b = (np.array([loss for _, loss in r.train_loss]) for r in (f32, bf16))
    assert a[-1] < 0.5 * a[0]  # it trains
    rel = np.abs(b - a) / a
    assert rel.max() < 0.03, rel  # within 3% at every step of the curve


def test_grad_checkpoint_trains_the_same(tmp_path, stories260k, sentences):
    opts = dict(iters=2, rank=4, lr=3e-3, batch_size=4, **FAST)
    pyllm.finetune(stories260k, sentences, tmp_path / "a.gguf", **opts)
    pyllm.finetune(stories260k, sentences, tmp_path / "b.gguf", grad_checkpoint=True, **opts)
    a, b = adapter_arrays(tmp_path / "a.gguf"), adapter_arrays(tmp_path / "b.gguf")
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])


def test_validation_loss_is_logged(tmp_path, stories260k, sentences):
    r = pyllm.finetune(stories260k, sentences, tmp_path / "v.gguf", iters=4, val_data=sentences, val_every=2,
                       batch_size=8, lr=5e-3, **FAST)
    assert [s for s, _ in r.val_loss] == [0, 2, 4]
    assert r.val_loss[-1][1] < r.val_loss[0][1]
    # the validation loss at step 0 is the base model's mean loss on the data
    base = pyllm.load(stories260k, n_ctx=64, cache_type_k="f32", cache_type_v="f32")
    tok = base.tokenizer
    nll, n = 0.0, 0
    for s in SENTENCES:
        ids = tok.encode(s) + [tok.eos_id]
        z = base.logits(ids[:-1]).astype(np.float64)
        z -= z.max(-1, keepdims=True)
        nll -= (z[np.arange(len(ids) - 1), ids[1:]] - np.log(np.exp(z).sum(-1))).sum()
        n += len(ids) - 1
    assert abs(r.val_loss[0][1] - nll / n) < 1e-4


def test_plot_writes_a_png(tmp_path, stories260k, sentences):
    pytest.importorskip("matplotlib")
    from pyllm.cli.main import main

    pyllm.finetune(stories260k, sentences, tmp_path / "p.gguf", iters=2, val_data=sentences, **FAST)
    assert main(["finetune", "--plot", str(tmp_path / "p.log.jsonl")]) == 0
    png = (tmp_path / "p.log.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_two_threads_train_like_one(tmp_path, stories260k, sentences):
    # -t 2 shares each micro-batch's sequences between two threads
    opts = dict(iters=3, rank=4, lr=3e-3, batch_size=5, dropout=0.1, seq_len=64, quiet=True)
    pyllm.finetune(stories260k, sentences, tmp_path / "one.gguf", threads=1, **opts)
    pyllm.finetune(stories260k, sentences, tmp_path / "two.gguf", threads=2, **opts)
    assert_close_adapters(adapter_arrays(tmp_path / "two.gguf"), adapter_arrays(tmp_path / "one.gguf"))
    assert_same_curves(tmp_path / "two.log.jsonl", tmp_path / "one.log.jsonl")
