"""Data parallel: `mpiexec -n 2 pyllm finetune ...` against one process with the same global
batch. Real MPI (the mpich and mpi4py wheels of the test extra), no mock communicator."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyllm
import pytest
from test_tuner_train import SENTENCES, adapter_arrays, assert_close_adapters, assert_same_curves


def mpiexec():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
    for candidate in (Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.skip("no mpiexec found (pip install mpich)")


def test_two_ranks_give_the_one_process_adapter(tmp_path, stories260k):
    launcher = mpiexec()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    opts = ["--iters", "4", "--rank", "4", "--lr", "3e-3", "--batch-size", "3", "--grad-accum", "2", "--dropout", "0.1",
            "--seq-len", "64", "-t", "1", "--targets", "q,v,down", "--val-data", str(data), "--val-every", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    proc = subprocess.run([launcher, "-n", "2", sys.executable, "-m", "pyllm", "finetune", str(stories260k),
                           "--data", str(data), "-o", str(tmp_path / "mpi.gguf"), *opts],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2 process(es)" in proc.stderr
    from pyllm.cli.main import main

    assert main(["finetune", str(stories260k), "--data", str(data), "-o", str(tmp_path / "one.gguf"), "-q", *opts]) == 0
    assert_close_adapters(adapter_arrays(tmp_path / "mpi.gguf"), adapter_arrays(tmp_path / "one.gguf"))
    assert_same_curves(tmp_path / "mpi.log.jsonl", tmp_path / "one.log.jsonl")
    logs = [[json.loads(s) for s in (tmp_path / f"{k}.log.jsonl").read_text().splitlines()] for k in ("mpi", "one")]
    # one log (rank 0 writes), counting the tokens of both ranks; validation sharded and summed
    assert [r.get("tokens") for r in logs[0]] == [r.get("tokens") for r in logs[1]]
    for a, b in zip(logs[0], logs[1]):
        if "val_loss" in b:
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-3 * b["val_loss"]
    assert pyllm.load(stories260k, n_ctx=64, lora=[(tmp_path / "mpi.gguf", 1.0)])
