"""`pyllm chat`: talk to a chat model in a REPL.

    pyllm chat                      # SmolLM2-135M-Instruct, pulled into the cache on first use
    pyllm chat -m model.gguf -sys "You are terse." --temp 0
    printf 'Hi\\nWhat is 2+2?\\n' | pyllm chat --temp 0     # one reply line per input line

Each turn renders the whole conversation with the model's chat template; the text the
model has already seen (the earlier prompts and its own replies, token for token) is
kept, so only the new tokens are evaluated. When the context fills, the oldest turns are
dropped (the system prompt stays). ChatSession holds all of that; the REPL and the
line-by-line mode are thin layers over it.
"""

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
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

# End-of-turn markers of well-known templates: generation stops on them when the
# template uses them and they are single special tokens of the vocabulary.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>",
               "<|endoftext|>", "</s>")


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # tokens evaluated for the prompt this turn (the new ones only)
    prompt_s: float = 0.0
    reply_tokens: int = 0
    ttft_s: float = 0.0  # from the message being submitted to the first token of the reply
    reply_s: float = 0.0  # from the first token of the reply to the last
    stop_reason: str = ""  # "eog", "length", "context", "interrupted"

    @property
    def reply_tps(self) -> float:
        # tokens after the first over the time they took, as a user watches them stream
        return (self.reply_tokens - 1) / self.reply_s if self.reply_tokens > 1 and self.reply_s > 0 else 0.0


class ChatSession:
    """A conversation with a model, kept in sync with the model's KV cache.

    template None: completion mode (each message is a prompt that the model continues).
    notify(text): where one-line notices go (context shift, ...).
    """

    def __init__(self, model, template, sampler, max_tokens: int = -1, system: str | None = None,
                 ignore_eos: bool = False, notify=None):
        self.model = model
        self.template = template
        self.sampler = sampler
        self.max_tokens = sys.maxsize if max_tokens is None or max_tokens < 0 else max_tokens
        self.system = system or None
        self.ignore_eos = ignore_eos
        self.notify = notify or (lambda text: print(text, file=sys.stderr, flush=True))
        self.messages = []  # user and assistant messages (the system prompt is self.system)
        self.segments = []  # [(text, ids)]: the conversation as the model was fed it, in order
        self.last = TurnStats()
        self.shift_noticed = False
        self.stop_ids = self._stop_ids()

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
        try:
            Path(path).write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise PyllmError(f"cannot write {path}: {e.strerror}") from None

    def load(self, path):
        """Replace the conversation (system prompt included) with one saved by save()."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise PyllmError(f"cannot read {path}: {e.strerror}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise PyllmError(f"{path} is not a JSON conversation: {e}") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise PyllmError(f"{path}: expected a list of {{\"role\": system|user|assistant, \"content\": text}} messages")
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if any(m["role"] == "system" for m in messages):
            raise PyllmError(f"{path}: a system message may only come first")
        self.system = system
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return len(self.messages)

    # -- turns -------------------------------------------------------------------------

    def reply(self, text: str, on_piece=None, should_stop=None) -> str:
        """Add a user message, generate the assistant's reply (streamed through on_piece)
        and add it to the conversation; returns the reply text."""
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

    def prompt_ids(self) -> list:
        """The token ids of the conversation so far plus the assistant's turn opening,
        dropping the oldest turns when the prompt and room for a reply do not fit."""
        n_ctx = self.model.n_ctx
        reserve = max(1, min(self.max_tokens, n_ctx // 4))
        dropped = 0
        while True:
            ids, segments = self._build_ids()
            if len(ids) + reserve <= n_ctx:
                break
            if not self.completion_mode and self._drop_oldest_turn():
                dropped += 1
                continue
            if len(ids) < n_ctx:
                break  # the last message alone: the reply gets what room is left
            raise PyllmError(f"the message is {len(ids)} tokens with the conversation's prompt; the context holds "
                             f"{n_ctx} (raise -c)")
        if dropped and not self.shift_noticed:
            self.shift_noticed = True
            self.notify(f"[context full ({n_ctx} tokens): dropping the oldest turns to make room; "
                        "the system prompt is kept]")
        self._pending_segments = segments
        return ids

    def _drop_oldest_turn(self) -> bool:
        """Remove the oldest user message and the replies to it; keep the last user message."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if len(users) < 2:
            return False
        del self.messages[: users[1]]
        return True

    def _render(self) -> str:
        if self.completion_mode:
            return self.messages[-1]["content"] if self.messages else ""
        return self.template.render(self.conversation(), add_generation_prompt=True)

    def _build_ids(self):
        """Tokens for the rendered prompt, reusing the known (text, ids) segments that start it,
        so the model's own reply tokens are kept as generated (llama.cpp does the same)."""
        from pyllm.runtime.chat_template import encode_rendered

        text = self._render()
        if self.completion_mode:
            tok = self.model.tokenizer
            ids = list(tok.encode(text)) if text else []
            if not ids and tok.bos_id is not None:
                ids = [tok.bos_id]
            return ids, [(text, ids)]
        pos, ids, segments = 0, [], []
        for seg_text, seg_ids in self.segments:
            if not seg_text or not text.startswith(seg_text, pos):
                break
            pos += len(seg_text)
            ids.extend(seg_ids)
            segments.append((seg_text, seg_ids))
        rest = text[pos:]
        if rest or not ids:
            rest_ids = encode_rendered(self.model.tokenizer, rest, first=not ids)
            ids.extend(rest_ids)
            segments.append((rest, rest_ids))
        return ids, segments

    def _stop_ids(self) -> frozenset:
        tok = self.model.tokenizer
        if self.ignore_eos:
            return frozenset()
        stop = set(tok.eog_ids)
        if self.template is not None:
            for marker in END_OF_TURN:
                if marker in self.template.source or marker == self.template.eos_token:
                    try:
                        ids = tok.encode(marker, add_bos=False, add_eos=False, parse_special=True)
                    except Exception:
                        continue
                    if len(ids) == 1 and tok.is_control(ids[0]):
                        stop.add(int(ids[0]))
        return frozenset(stop)

    def _generate(self, on_piece=None, should_stop=None) -> str:
        from pyllm.runtime.tokenizer import IncrementalDecoder

        model = self.model
        t_submit = time.perf_counter()
        if self.completion_mode:
            self.segments = []
        ids = self.prompt_ids()
        todo = model.reuse_prefix(ids)
        stats = self.last = TurnStats(prompt_tokens=len(todo))
        decoder = IncrementalDecoder(model.tokenizer)
        pieces, out_ids = [], []
        t_first = None
        stats.stop_reason = "length"
        try:
            logits = model.eval(todo)
            stats.prompt_s = time.perf_counter() - t_submit
            for _ in range(self.max_tokens):
                token = self.sampler.sample(logits, model.tokens)
                if token in self.stop_ids:
                    stats.stop_reason = "eog"
                    break
                if len(model.tokens) >= model.n_ctx:
                    stats.stop_reason = "context"
                    break
                out_ids.append(token)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t_submit
                piece = decoder.add(token)
                if piece:
                    pieces.append(piece)
                    if on_piece:
                        on_piece(piece)
                if should_stop is not None and should_stop():
                    stats.stop_reason = "interrupted"
                    break
                logits = model.eval([token])
        finally:
            tail = decoder.flush()
            if tail:
                pieces.append(tail)
                if on_piece:
                    on_piece(tail)
            if t_first is not None:
                stats.reply_s = time.perf_counter() - t_first
            stats.reply_tokens = len(out_ids)
            text = "".join(pieces)
            self.messages.append({"role": "assistant", "content": text})
            self.segments = list(self._pending_segments) + [(text, out_ids)]
        if stats.stop_reason == "context":
            self.notify(f"[reply cut: the context ({model.n_ctx} tokens) is full; the next message drops old turns]")
        return text

    # -- stats -------------------------------------------------------------------------

    def stats_text(self) -> str:
        s = self.last
        lines = [f"context: {len(self.model.tokens)} / {self.model.n_ctx} tokens, {len(self.messages)} messages"
                 + (" + system prompt" if self.system else "")]
        if s.stop_reason:
            lines.append(f"last reply: {s.reply_tokens} tokens, {s.reply_tps:.1f} tokens/s, "
                         f"time to first token {s.ttft_s * 1e3:.0f} ms ({s.prompt_tokens} new prompt tokens"
                         f"{f', {s.prompt_tokens / s.prompt_s:.0f} tokens/s' if s.prompt_s else ''}), "
                         f"stopped: {s.stop_reason}")
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


def read_message(read_line, prompt_first: str = "", prompt_cont: str = ""):
    """One message: lines joined while they end with a backslash. EOFError at end of input."""
    lines = []
    line = read_line(prompt_first)
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = read_line(prompt_cont)
        except EOFError:
            line = ""
            break
    lines.append(line)
    return "\n".join(lines)


class Interrupt:
    """SIGINT sets a flag while a reply streams (so the model's state is never cut mid-step)."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.hit = False
        self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)
        return False

    def __call__(self) -> bool:
        return self.hit


def run_command(session: ChatSession, line: str, ui: UI, interactive: bool) -> bool:
    """Handle a /command; returns False when the session should end."""
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
            ui.note(f"system prompt: {session.system!r}" if session.system else "no system prompt (the template's default applies)")
    elif cmd == "/regen":
        if not session.messages:
            ui.note("nothing to regenerate yet")
        else:
            reply_streaming(session, None, ui, interactive)
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


def reply_streaming(session: ChatSession, text: str | None, ui: UI, interactive: bool):
    """Generate one reply, streamed to stdout; Ctrl-C stops it when interactive."""
    if interactive:
        with Interrupt() as stop:
            out = session.reply(text, ui.piece, stop) if text is not None else session.regen(ui.piece, stop)
        if stop.hit:
            ui.piece("\n")
            ui.note("[reply stopped]")
            return out
    else:
        out = session.reply(text, ui.piece) if text is not None else session.regen(ui.piece)
    ui.piece("\n")
    return out


def repl(session: ChatSession, ui: UI):
    setup_readline()
    warned = False
    while True:
        try:
            line = read_message(input, ui.prompt(), ui.prompt(cont=True))
        except EOFError:
            print(file=sys.stdout, flush=True)
            return 0
        except KeyboardInterrupt:
            if warned:
                print(file=sys.stdout, flush=True)
                return 0
            warned = True
            print(file=sys.stdout, flush=True)
            ui.note("(press Ctrl-C again or /exit to leave)")
            continue
        warned = False
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("/"):
                if not run_command(session, line, ui, True):
                    return 0
                continue
            reply_streaming(session, line, ui, True)
        except PyllmError as e:
            ui.note(f"error: {e}", "red")
        except KeyboardInterrupt:  # Ctrl-C just before a reply started, or during a command
            print(file=sys.stdout, flush=True)
            ui.note("[stopped]")


def batch(session: ChatSession, ui: UI):
    """stdin is not a terminal: one message per line (a trailing backslash continues it),
    one reply per message on stdout, each ending with a newline."""
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
        if line.lstrip().startswith("/"):
            if not run_command(session, line, ui, False):
                return 0
            continue
        reply_streaming(session, line, ui, False)


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
    try:
        sys.stdout.reconfigure(errors="replace")
    except (AttributeError, ValueError):
        pass
    max_tokens = max_tokens_from_args(args)
    sampler = sampler_from_args(args)

    completion = False
    if args.model is None:
        path = hub.resolve_default_chat_model()
        if path is None:
            ui.note("pyllm: falling back to the bundled stories260K in completion mode (it continues the text you type)")
            completion = True
        else:
            args.model = str(path)
    model, load_s, warmup_s = load_from_args(args)
    name = Path(args.model).name if args.model else "stories260K (bundled)"
    template = None if completion else ChatTemplate.from_metadata(model.metadata, args.chat_template)
    session = ChatSession(model, template, sampler, max_tokens, system=args.system, ignore_eos=args.ignore_eos,
                          notify=ui.note)
    mode = "completion mode" if completion else f"chat template: {template.name}"
    ui.note(f"pyllm chat · {name} · ctx {model.n_ctx} · {mode} · loaded in {load_s + warmup_s:.1f} s · "
            "/help for commands, Ctrl-D to leave", "bold" if color else "default")
    if interactive:
        return repl(session, ui)
    return batch(session, ui)
