"""Training data: what each record format puts in the loss (checked by decoding the loss
tokens back to text), and bad input as one-line errors naming the file and line, with
nothing written."""

import json
import subprocess
import sys

import pyllm
import pytest
from pyllm.base import PyllmError
from pyllm.tuner.data import Encoder, load_jsonl


@pytest.fixture(scope="module")
def stories_tok(stories260k):
    return pyllm.load_tokenizer(stories260k)


@pytest.fixture(scope="module")
def smol(smollm2):
    from pyllm.runtime.chat_template import ChatTemplate
    from pyllm.runtime.gguf_file import GGUFFile

    meta = GGUFFile(smollm2).metadata
    return pyllm.load_tokenizer(smollm2), ChatTemplate.from_metadata(meta)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def loss_text(tok, ex):
    """The text of the tokens in the loss (ids[0] is never a target)."""
    return tok.decode([t for t, keep in zip(ex.ids[1:], ex.loss[1:]) if keep], skip_special=False)


def test_text_records_learn_every_token_and_eos(tmp_path, stories_tok):
    ex = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "Tom ran home."}]), Encoder(stories_tok), 64)[0]
    assert ex.ids == stories_tok.encode("Tom ran home.") + [stories_tok.eos_id]
    assert all(ex.loss) and ex.line == 1


@pytest.mark.parametrize("mask", [False, True])
def test_prompt_completion_masks_the_prompt(tmp_path, stories_tok, mask):
    rec = {"prompt": "Question: what did Tom see?\nAnswer:", "completion": " a big red ball."}
    ex = load_jsonl(write_jsonl(tmp_path / "p.jsonl", ["", rec]), Encoder(stories_tok, mask_prompt=mask), 64)[0]
    assert ex.line == 2  # blank lines are skipped but counted
    assert ex.ids == stories_tok.encode(rec["prompt"] + rec["completion"]) + [stories_tok.eos_id]
    learned = loss_text(stories_tok, ex)
    if mask:
        assert learned.strip() == "a big red ball.</s>"
    else:
        assert learned.strip() == "Question: what did Tom see?\nAnswer: a big red ball.</s>"


def test_messages_mask_keeps_only_assistant_turns(tmp_path, smol):
    tok, template = smol
    msgs = [{"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Bonjour !"},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": "De rien."}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    full = load_jsonl(path, Encoder(tok, template, mask_prompt=False), 256)[0]
    text = template.render(msgs, add_generation_prompt=False)
    assert tok.decode(full.ids, skip_special=False) == text  # the whole conversation, as the template renders it
    ex = load_jsonl(path, Encoder(tok, template, mask_prompt=True), 256)[0]
    assert ex.ids == full.ids
    # exactly the assistant turns' content and end-of-turn, in order
    assert loss_text(tok, ex) == "Bonjour !<|im_end|>De rien.<|im_end|>"


def test_messages_without_a_template_is_an_error(tmp_path, stories_tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(PyllmError, match=r"m\.jsonl:1: a messages record needs a chat template"):
        load_jsonl(path, Encoder(stories_tok), 64)


BAD = {
    "not valid JSON": ['{"text": "fine"}', '{"text": "oops'],
    "expected a JSON object": ['{"text": "fine"}', '["a", "list"]'],
    'expected "text", "prompt"/"completion" or "messages", found keys \'content\'': ['{"content": "x"}'],
    '"prompt" and "completion" must both be strings': ['{"prompt": "x"}'],
    "longer than --seq-len 16": ['{"text": "' + "Once upon a time there was a very long story. " * 4 + '"}'],
    '"messages" must be a non-empty list': ['{"messages": [{"role": "user"}]}'],
}


@pytest.mark.parametrize("message", list(BAD))
def test_bad_records_name_the_file_and_line(tmp_path, stories_tok, message):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD[message])
    line = len(BAD[message])
    with pytest.raises(PyllmError) as e:
        load_jsonl(path, Encoder(stories_tok), 16)
    assert str(e.value).startswith(f"{path}:{line}: ") and message in str(e.value)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pyllm", "finetune", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_bad_input_is_one_line_exit_1_and_writes_nothing(tmp_path, stories260k):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "Tom ran."}])
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(128, 256)) + b"\n")
    cases = [
        (["--data", binary], f"{binary}:1: not UTF-8 text"),
        (["--data", write_jsonl(tmp_path / "k.jsonl", ['{"text": "a"}', '{"txt": "b"}'])], "k.jsonl:2: expected"),
        (["--data", good, "--rank", "0"], "--rank must be at least 1, got 0"),
        (["--data", good, "--targets", "q,x"], "unknown target 'x'"),
        (["--data", good, "--seq-len", "100000"], "exceeds the model's context length"),
        (["--data", tmp_path / "missing.jsonl"], "data file not found"),
    ]
    for extra, message in cases:
        p = run_cli(stories260k, "-o", tmp_path / "a.gguf", *extra)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            (extra, p.stderr)
    # a base model the runtime cannot read
    p = run_cli(good, "--data", good, "-o", tmp_path / "a.gguf")
    assert p.returncode == 1 and p.stderr.strip() == f"error: {good}: not a GGUF file (bad magic)"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["data.bin", "good.jsonl", "k.jsonl"]
    # usage errors exit 2
    assert run_cli(stories260k, "--data", good).returncode == 2
