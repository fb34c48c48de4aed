"""`pyllm chat`: talk to a chat model in a REPL.

    pyllm chat                      # SmolLM2-135M-Instruct, pulled into the cache on first use
    pyllm chat model.gguf -sys "You are terse." --temp 0
    printf 'Hi\\nWhat is 2+2?\\n' | pyllm chat --temp 0     # one reply line per input line

A terminal UI over the runtime's chat completions (runtime/chat.py): each turn sends the
whole conversation to create_chat_completion, which renders it with the chat template,
evaluates only the tokens the KV cache does not hold yet and drops the oldest turns when the
context fills. ChatSession keeps the messages (and /save, /load); the REPL and the
line-by-line mode are thin layers over it.
"""

import argparse
import json
import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pyllm.base import PyllmError

HELP = """commands:
  /help            this text
  /reset           forget the conversation (the system prompt stays)
  /system [TEXT]   set the system prompt (without TEXT: show it)
  /regen           discard the last reply and generate it again
  /save FILE       write the conversation to FILE (JSON)
  /load FILE       continue a conversation saved with /save
  /stats           tokens in context, speed of the last reply
  /exit            leave (Ctrl-D too)
end a line with \\ to continue the message on the next line; Ctrl-C stops a reply"""


class ChatSession:
    """A conversation with a model: the messages so far, the system prompt, the last turn's stats.

    template None: completion mode (each message is a prompt that the model continues).
    notify(text): where one-line notices go (context shift, ...).
    """

    def __init__(self, model, template, sampler, max_tokens: int = -1, system: str | None = None,
                 ignore_eos: bool = False, notify=None):
        from pyllm.runtime.chat import ChatStats

        self.model = model
        self.template = template
        self.sampler = sampler
        self.max_tokens = None if max_tokens is None or max_tokens < 0 or max_tokens >= sys.maxsize else max_tokens
        self.system = system or None
        self.ignore_eos = ignore_eos
        self.notify = notify or (lambda text: print(text, file=sys.stderr, flush=True))
        self.messages = []  # user and assistant messages (the system prompt is self.system)
        self.last = ChatStats()
        self.shift_noticed = False

    # -- conversation ------------------------------------------------------------------

    @property
    def completion_mode(self) -> bool:
        return self.template is None

    def conversation(self) -> list:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + [dict(m) for m in self.messages]

    def reset(self):
        self.messages = []

    def set_system(self, text: str | None):
        self.system = text or None

    def to_json(self) -> dict:
        return {"format": "pyllm-chat", "messages": self.conversation()}

    def save(self, path):
        """Write the conversation as JSON (through a temporary file, so never half a file)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise PyllmError(f"cannot write {path}: {e.strerror}") from None

    def load(self, path):
        """Replace the conversation (system prompt included) with one saved by save()."""
        from pyllm.runtime.chat import validate_messages

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise PyllmError(f"cannot read {path}: {e.strerror}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise PyllmError(f"{path} is not a JSON conversation: {e}") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        try:
            messages = validate_messages(messages)
        except PyllmError as e:
            raise PyllmError(f"{path}: expected a list of {{\"role\": system|user|assistant, \"content\": text}} "
                             f"messages ({e})") from None
        system = None
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if any(m["role"] == "system" for m in messages):
            raise PyllmError(f"{path}: a system message may only come first")
        self.system = system
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return len(self.messages)

    # -- turns -------------------------------------------------------------------------

    def reply(self, text: str, on_piece=None, should_stop=None) -> str:
        """Add a user message, generate the assistant's reply (streamed through on_piece; it
        stops when should_stop() turns true) and add it to the conversation; returns the reply."""
        self.messages.append({"role": "user", "content": text})
        try:
            return self._generate(on_piece, should_stop)
        except BaseException:
            if self.messages and self.messages[-1]["role"] == "user" and self.messages[-1]["content"] == text:
                self.messages.pop()  # nothing was generated: the message is not part of the conversation
            raise

    def regen(self, on_piece=None, should_stop=None) -> str:
        """Generate the last reply again."""
        if not self.messages:
            raise PyllmError("nothing to regenerate yet")
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        return self._generate(on_piece, should_stop)

    def _generate(self, on_piece=None, should_stop=None) -> str:
        from pyllm.runtime.chat import ChatStats, create_chat_completion
        from pyllm.runtime.generate import stream_generate

        stats = self.last = ChatStats()
        t_submit = time.perf_counter()
        if self.completion_mode:
            limit = sys.maxsize if self.max_tokens is None else self.max_tokens
            stream = stream_generate(self.model, self.messages[-1]["content"], limit, stats=stats,
                                     ignore_eos=self.ignore_eos, sampler=self.sampler)
            pieces = stream
        else:
            stream = create_chat_completion(self.model, self.conversation(), stream=True, max_tokens=self.max_tokens,
                                            template=self.template, ignore_eos=self.ignore_eos, stats=stats,
                                            sampler=self.sampler)
            pieces = (chunk["choices"][0]["delta"].get("content", "") for chunk in stream)
            if stats.dropped:
                del self.messages[: stats.dropped]
                if not self.shift_noticed:
                    self.shift_noticed = True
                    self.notify(f"[context full ({self.model.n_ctx} tokens): dropping the oldest turns to make "
                                "room; the system prompt is kept]")
        received = []
        t_first = None
        done = False
        try:
            for piece in pieces:
                if not piece:
                    continue
                if t_first is None:
                    t_first = time.perf_counter()
                received.append(piece)
                if on_piece:
                    on_piece(piece)
                if should_stop is not None and should_stop():  # checked after each piece shown
                    stats.stop_reason = "interrupted"
                    break
            done = True
        finally:
            stream.close()
            text = "".join(received)
            if done or received:  # a reply, or part of one; an error before any text leaves none
                self.messages.append({"role": "assistant", "content": text})
        if self.completion_mode and t_first is not None:  # chat completions time themselves
            stats.ttft_s = t_first - t_submit
            stats.reply_s = time.perf_counter() - t_first
        if stats.stop_reason == "context":
            self.notify(f"[reply cut: the context ({self.model.n_ctx} tokens) is full; the next message drops "
                        "old turns]")
        return text

    # -- stats -------------------------------------------------------------------------

    def stats_text(self) -> str:
        s = self.last
        lines = [f"context: {len(self.model.tokens)} / {self.model.n_ctx} tokens, {len(self.messages)} messages"
                 + (" + system prompt" if self.system else "")]
        k, v = self.model.cache_types
        per = self.model.kv_bytes_per_token
        lines.append(f"KV cache: {k} K, {v} V, {per} bytes per token ({len(self.model.tokens) * per / 2**20:.1f} MiB "
                     f"used of {self.model.n_ctx * per / 2**20:.1f} MiB)")
        if s.stop_reason:
            lines.append(f"last reply: {s.completion_tokens} tokens, {s.reply_tps:.1f} tokens/s, "
                         f"time to first token {s.ttft_s * 1e3:.0f} ms ({s.prompt_tokens} new prompt tokens"
                         f"{f', {s.prompt_tps:.0f} tokens/s' if s.prompt_s else ''}), stopped: {s.stop_reason}")
        return "\n".join(lines)


# -- terminal user interface -----------------------------------------------------------

class UI:
    """Output for the REPL: rich colours on a terminal, plain text otherwise."""

    def __init__(self, color: bool):
        self.color = color
        self.err = None
        if color:
            from rich.console import Console

            self.err = Console(stderr=True, highlight=False)

    def note(self, text: str, style: str = "dim"):
        if self.err is not None:
            from rich.markup import escape

            self.err.print(f"[{style}]{escape(text)}[/]", soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def prompt(self, cont: bool = False) -> str:
        p = "... " if cont else "> "
        if self.color:
            # \001 \002 tell readline the escape codes take no room on the line
            return f"\001\033[1;32m\002{p}\001\033[0m\002"
        return p

    def piece(self, text: str):
        sys.stdout.write(text)
        sys.stdout.flush()


def setup_readline():
    """Line editing and a history file; nothing when readline is unavailable."""
    try:
        import readline
    except ImportError:
        return
    from pyllm.runtime.hub import pyllm_home

    path = pyllm_home() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    import atexit

    atexit.register(save)


def clean_text(line: str) -> str:
    """A line as valid Unicode: bytes that were not UTF-8 (kept as surrogate escapes) are
    decoded as errors="replace" decodes them, to U+FFFD; any other lone surrogate too."""
    try:
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:
        pass
    try:
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in line)


def read_message(read_line, prompt_first: str = "", prompt_cont: str = ""):
    """One message: lines joined while they end with a backslash. EOFError at end of input."""
    lines = []
    line = clean_text(read_line(prompt_first))
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = clean_text(read_line(prompt_cont))
        except EOFError:
            line = ""
            break
    lines.append(line)
    return "\n".join(lines)


class CtrlC:
    """Ctrl-C in the REPL: while a reply streams it sets a flag the reply checks after each
    token (so the model is never cut mid-step); anywhere else it raises KeyboardInterrupt.

    The race this class closes: CPython's readline waits for keys in select() and runs Python
    signal handlers only when select() is interrupted by a signal. A SIGINT that lands after
    input() is entered but before select() blocks -- while readline draws the prompt, which it
    writes byte by byte -- is only noted by the C-level handler; Python sees it after the next
    line is typed, and the KeyboardInterrupt then throws that line away. That C-level handler
    also writes the signal number to signal.set_wakeup_fd's pipe. A watcher thread reads the
    pipe and, while the main thread sits in input() with the SIGINT not yet handled, pokes it
    with SIGUSR1 (whose handler does nothing), so select() returns EINTR and the pending SIGINT
    handler runs. A SIGINT handled normally is drained from the pipe by the handler itself.
    """

    POLL_S = 0.02

    def __init__(self):
        self.streaming = False  # a reply is being generated: Ctrl-C sets .hit
        self.hit = False
        self.in_input = False  # the main thread is inside input()
        self.handled_at = 0.0  # time.monotonic() of the last run of the SIGINT handler
        self._closed = False

    def __enter__(self):
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._main = threading.get_ident()
        self._old_int = signal.signal(signal.SIGINT, self._on_sigint)
        self._watcher = None
        if hasattr(signal, "pthread_kill"):  # POSIX (where readline is)
            self._old_usr1 = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
            self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
            self._watcher = threading.Thread(target=self._watch, name="pyllm-ctrl-c", daemon=True)
            self._watcher.start()
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old_int)
        self._closed = True
        if self._watcher is not None:
            signal.set_wakeup_fd(self._old_fd)
            signal.signal(signal.SIGUSR1, self._old_usr1)
            try:
                os.write(self._w, b"\0")  # wakes the watcher, which sees _closed
            except OSError:
                pass
            self._watcher.join(timeout=1.0)
        os.close(self._r)
        os.close(self._w)
        return False

    def _on_sigint(self, signum, frame):
        self.handled_at = time.monotonic()
        try:
            while os.read(self._r, 512):
                pass
        except OSError:  # BlockingIOError: drained
            pass
        if self.streaming:
            self.hit = True
            return
        raise KeyboardInterrupt

    def _watch(self):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGUSR1})  # signals go to the main thread
        while not self._closed:
            select.select([self._r], [], [])
            seen = time.monotonic()
            try:
                data = os.read(self._r, 512)
            except OSError:  # the handler drained it first: handled
                continue
            if signal.SIGINT not in data:
                continue
            time.sleep(self.POLL_S)
            while not self._closed and self.handled_at < seen:
                if self.in_input:
                    signal.pthread_kill(self._main, signal.SIGUSR1)
                time.sleep(self.POLL_S)

    def input(self, prompt: str = "") -> str:
        self.in_input = True
        try:
            return input(prompt)
        finally:
            self.in_input = False

    @contextmanager
    def reply(self):
        """Ctrl-C sets .hit instead of raising, for the duration of a reply."""
        self.hit = False
        self.streaming = True
        try:
            yield self
        finally:
            self.streaming = False

    def __call__(self) -> bool:
        return self.hit


def run_command(session: ChatSession, line: str, ui: UI, keys: CtrlC | None = None) -> bool:
    """Handle a /command; returns False when the session should end. keys: the REPL's Ctrl-C
    (None when stdin is not a terminal)."""
    cmd, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    cmd = cmd.lower()
    if cmd in ("/exit", "/quit", "/bye"):
        return False
    if cmd in ("/help", "/?"):
        ui.note(HELP, "default")
    elif cmd == "/reset":
        session.reset()
        ui.note("[conversation cleared]")
    elif cmd == "/system":
        if arg:
            session.set_system(arg)
            ui.note("[system prompt set]")
        else:
            ui.note(f"system prompt: {session.system!r}" if session.system
                    else "no system prompt (the template's default applies)")
    elif cmd == "/regen":
        if not session.messages:
            ui.note("nothing to regenerate yet")
        else:
            reply_streaming(session, None, ui, keys)
    elif cmd == "/save":
        if not arg:
            ui.note("usage: /save FILE")
        else:
            session.save(arg)
            ui.note(f"[saved {len(session.conversation())} messages to {arg}]")
    elif cmd == "/load":
        if not arg:
            ui.note("usage: /load FILE")
        else:
            n = session.load(arg)
            ui.note(f"[loaded {n} messages from {arg}" + (", with a system prompt]" if session.system else "]"))
    elif cmd == "/stats":
        ui.note(session.stats_text(), "default")
    else:
        ui.note(f"unknown command {cmd}; /help lists them")
    return True


def reply_streaming(session: ChatSession, text: str | None, ui: UI, keys: CtrlC | None = None):
    """Generate one reply (text None: again for the last message), streamed to stdout; with
    keys (a terminal), Ctrl-C stops it."""
    if session.model.compiling:
        ui.note("[waiting for the kernels to compile ...]")
    session.model.finish_warmup()
    if keys is None:
        out = session.reply(text, ui.piece) if text is not None else session.regen(ui.piece)
        ui.piece("\n")
        return out
    with keys.reply():
        out = session.reply(text, ui.piece, keys) if text is not None else session.regen(ui.piece, keys)
    ui.piece("\n")
    if session.last.stop_reason == "interrupted":
        ui.note("[reply stopped]")
    elif keys.hit:  # Ctrl-C after the last token: what it means at the prompt
        raise KeyboardInterrupt
    return out


def repl(session: ChatSession, ui: UI):
    setup_readline()
    warned = False  # a Ctrl-C at the prompt asks first; a second one leaves
    with CtrlC() as keys:
        while True:
            try:
                line = read_message(keys.input, ui.prompt(), ui.prompt(cont=True))
                warned = False
                if not line.strip():
                    continue
                if line.lstrip().startswith("/"):
                    if not run_command(session, line, ui, keys):
                        return 0
                else:
                    reply_streaming(session, line, ui, keys)
            except EOFError:
                print(file=sys.stdout, flush=True)
                return 0
            except KeyboardInterrupt:
                print(file=sys.stdout, flush=True)
                if warned:
                    return 0
                warned = True
                ui.note("(press Ctrl-C again or /exit to leave)")
            except PyllmError as e:
                ui.note(f"error: {e}", "red")


def batch(session: ChatSession, ui: UI):
    """stdin is not a terminal: one message per line (a trailing backslash continues it),
    one reply per message on stdout, each ending with a newline. A message that cannot be
    answered (too long for the context, ...) gets an empty line on stdout and `error: ...` on
    stderr, and the next line is served."""
    def read_line(_prompt):
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    while True:
        try:
            line = read_message(read_line)
        except EOFError:
            return 0
        if not line.strip():
            continue
        command = line.lstrip().startswith("/")
        try:
            if command:
                if not run_command(session, line, ui):
                    return 0
            else:
                reply_streaming(session, line, ui)
        except PyllmError as e:
            if not command:
                ui.piece("\n")  # this message's reply line, empty
            ui.note(f"error: {e}")


def main(argv=None) -> int:
    from pyllm.cli.common import (
        add_model_args,
        add_sampling_args,
        load_from_args,
        max_tokens_from_args,
        model_arg,
        sampler_from_args,
    )
    from pyllm.runtime import hub
    from pyllm.runtime.chat_template import BUILTIN_TEMPLATES, ChatTemplate

    p = argparse.ArgumentParser(prog="pyllm chat", description="Chat with a model (default: SmolLM2-135M-Instruct, "
                                "downloaded on first use). Type /help in the chat for its commands.")
    add_model_args(p, "SmolLM2-135M-Instruct, pulled on first use")
    add_sampling_args(p)
    p.add_argument("-sys", "--system", default=None, help="system prompt")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help=f"chat template: {', '.join(BUILTIN_TEMPLATES)} or a Jinja file (default: the model's)")
    p.add_argument("--no-color", action="store_true", help="plain output, no colours")
    args = p.parse_args(argv)
    model_arg(p, args)

    interactive = sys.stdin.isatty()
    color = interactive and sys.stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ
    ui = UI(color)
    for stream in (sys.stdin, sys.stdout):
        try:  # bytes that are not UTF-8 (typed or piped) become U+FFFD instead of ending the session
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass
    max_tokens = max_tokens_from_args(args)
    sampler = sampler_from_args(args)

    completion = False
    if args.model is None:
        path = hub.resolve_default_chat_model()
        if path is None:
            ui.note("pyllm: falling back to the bundled stories260K in completion mode "
                    "(it continues the text you type)")
            completion = True
        else:
            args.model = str(path)
    model, load_s, warmup_s = load_from_args(args, background=True)
    name = Path(args.model).name if args.model else "stories260K (bundled)"
    template = None if completion else ChatTemplate.from_metadata(model.metadata, args.chat_template)
    session = ChatSession(model, template, sampler, max_tokens, system=args.system, ignore_eos=args.ignore_eos,
                          notify=ui.note)
    mode = "completion mode" if completion else f"chat template: {template.name}"
    ui.note(f"pyllm chat · {name} · ctx {model.n_ctx} · {mode} · loaded in {load_s + warmup_s:.1f} s · "
            "/help for commands, Ctrl-D to leave", "bold" if color else "default")
    if model.compiling:
        ui.note(f"[compiling kernels for {model.decoder.kernels} while you type: first run only]")
    rc = repl(session, ui) if interactive else batch(session, ui)
    if model.compiling:  # left before the first reply: let the compile finish into the cache
        ui.note("[finishing the kernel compile, so that the next start is quick ...]")
    model.finish_warmup()
    return rc
