"""The command line as a user meets it: stdout carries only text, errors are one line."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def pyllm(*args, stdin=None):
    env = dict(os.environ, PYLLM_DEBUG="")
    return subprocess.run([sys.executable, "-m", "pyllm", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=600)


def test_generate_default_model_streams_only_text():
    r = pyllm("generate", "-p", "", "-n", "60", "--temp", "0", "-t", "1")
    assert r.returncode == 0, r.stderr
    expected = (DATA / "stories260K_greedy.txt").read_text()
    assert expected.startswith(r.stdout.strip()[:200]) and len(r.stdout) > 150
    assert "tokens per second" in r.stderr and "tokens per second" not in r.stdout


def test_generate_prompt_file_and_seed(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time")
    a = pyllm("generate", "-f", str(prompt), "-n", "30", "--seed", "3")
    b = pyllm("generate", "-p", "Once upon a time", "-n", "30", "--seed", "3")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["generate", "-m", "/nonexistent.gguf", "-p", "hi"], 1, "model file not found"),
        (["generate", "-p", "hi", "--top-p", "2"], 1, "--top-p must be in [0, 1]"),
        (["generate", "-p", "hi", "-t", "999"], 1, "threads must be between 1 and"),
        (["generate", "-p", "hi", "-n", "abc"], 2, "invalid int value"),
        (["generate", "-p", "word " * 600, "-c", "64"], 1, "longer than the context size 64"),
        (["generate", "-f", "/nonexistent.txt"], 1, "cannot read prompt file"),
        (["generate"], 2, "one of the arguments -p/--prompt -f/--file is required"),
        (["frobnicate"], 2, "unknown command"),
    ],
)
def test_bad_input_is_one_line_error(args, code, message):
    r = pyllm(*args)
    assert r.returncode == code
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_truncated_model_is_one_line_error(tmp_path, stories260k):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(Path(stories260k).read_bytes()[:500_000])
    r = pyllm("generate", "-m", str(bad), "-p", "hi")
    assert r.returncode == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_tokenize_matches_api_and_works_on_vocab_only_files():
    from conftest import shared_file

    vocab = shared_file("gguf-vocab/ggml-vocab-llama-spm.gguf")
    r = pyllm("tokenize", "-m", str(vocab), "-p", "Hello world", "--ids")
    assert r.returncode == 0, r.stderr
    import pyllm as api

    assert eval(r.stdout) == api.load_tokenizer(vocab).encode("Hello world")
    r = pyllm("tokenize", "-m", str(vocab), "-p", "Hello world", "--ids", "--no-bos")
    assert eval(r.stdout) == api.load_tokenizer(vocab).encode("Hello world", add_bos=False)


def test_info_describes_model(smollm2):
    r = pyllm("info", str(smollm2))
    assert r.returncode == 0, r.stderr
    assert "Q4_1: 210" in r.stdout and "Q8_0: 1" in r.stdout and "F32: 61" in r.stdout
    assert "chat template  yes" in r.stdout and "134.52 M" in r.stdout


def test_runs_without_torch():
    """Loading and generating never imports torch (how fast it starts is measured by
    benchmarks/bench_startup.py, not asserted here)."""
    code = "import sys, pyllm; m = pyllm.load(); pyllm.generate(m, 'Once', max_tokens=5); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


# -- the model as a positional argument or -m ---------------------------------------------------


def run_main(argv, capsys, stdin=None, monkeypatch=None):
    """pyllm's main in-process: (exit code, stdout, stderr)."""
    from pyllm.cli.main import main

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command, rest", [
    ("generate", ["-p", "Once upon a time", "-n", "8", "--temp", "0", "-t", "1"]),
    ("tokenize", ["-p", "Once upon a time", "--ids"]),
    ("info", []),
    ("chat", ["--chat-template", "chatml", "-n", "3", "--temp", "0", "-t", "1"]),
])
def test_model_positional_or_option_not_both(command, rest, stories260k, capsys, monkeypatch):
    stdin = "Hello there\n" if command == "chat" else None
    code, positional, err = run_main([command, str(stories260k), *rest], capsys, stdin, monkeypatch)
    assert code == 0, err
    assert positional.strip()
    code, option, err = run_main([command, "-m", str(stories260k), *rest], capsys, stdin, monkeypatch)
    assert code == 0 and option == positional, err
    code, out, err = run_main([command, "x.gguf", "-m", str(stories260k), *rest], capsys, stdin, monkeypatch)
    assert code == 2 and out == ""
    assert "the model is given twice, as MODEL (x.gguf) and with -m" in err and str(stories260k) in err
    code, out, err = run_main([command, "-h"], capsys)
    assert code == 0 and "MODEL" in out and "-m MODEL, --model MODEL" in out
