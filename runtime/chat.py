"""Chat completions: a conversation in, the assistant's reply out, in the shapes OpenAI's chat
API (and llama-cpp-python's create_chat_completion) use.

    model = pyllm.load("SmolLM2-135M-Instruct.Q4_1.gguf")
    out = model.create_chat_completion([{"role": "user", "content": "Hi!"}], max_tokens=64, temp=0)
    out["choices"][0]["message"]["content"]                  # the reply
    for chunk in model.create_chat_completion(messages, stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="", flush=True)

What one call does:
1. checks messages: a list of {"role": system|user|assistant, "content": text} (content may
   also be OpenAI's list of {"type": "text", "text": ...} parts); anything else is a one-line
   PyllmError naming the message.
2. renders them with the chat template (the model's `tokenizer.chat_template`, or template=:
   a built-in name, a Jinja file or a ChatTemplate), the assistant's turn opened.
3. tokenizes that text, reusing the token ids of text the model's KV cache already holds from
   the previous call: its own replies stay token for token as it generated them (llama.cpp
   keeps them the same way), so they match the cache.
4. context shift: when the prompt plus room for the reply (max_tokens, at most a quarter of the
   context) does not fit the context, the oldest turns -- a user message and the replies after
   it -- are left out, one by one, until it does. System messages and the last user message
   always stay; a conversation that still does not fit is an error. stats.dropped says how
   many messages were left out (always the first non-system ones).
5. evaluates only the tokens after the prefix the cache shares with the prompt, then samples
   with generate_step. The reply ends at an end-of-turn token (the tokenizer's end-of-generation
   tokens and the template's end-of-turn marker, e.g. <|im_end|>), at a stop string (stop=, and
   the end-of-turn marker when it is not one special token), after max_tokens, or when the
   context is full (finish_reason "stop", "stop", "length", "length").

The model's KV cache is the state: one generation at a time per model.
"""

import time
import uuid
import weakref
from dataclasses import dataclass, fields
from typing import Iterator

from pyllm.base import PyllmError
from pyllm.runtime.chat_template import ChatTemplate, encode_rendered
from pyllm.runtime.generate import GenerationStats, generate_step, make_sampler
from pyllm.runtime.tokenizer import IncrementalDecoder

ROLES = ("system", "user", "assistant")

# End-of-turn markers of well-known templates: a reply ends on them when the template uses them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>",
               "<|endoftext|>", "</s>")


@dataclass
class ChatStats(GenerationStats):
    """What a chat completion did; pass stats= to have it filled in.

    prompt_tokens / prompt_s: the prompt tokens evaluated (those after the prefix the cache
    already held); completion_tokens: the tokens of the reply. stop_reason: "eog" (end-of-turn
    token), "stop" (a stop string), "length", "context" (the context is full) or "interrupted"
    (the stream was closed before its end).
    """

    prompt_total: int = 0  # tokens of the whole rendered prompt (usage.prompt_tokens)
    dropped: int = 0  # oldest messages left out to fit the context
    ttft_s: float = 0.0  # from the call to the first token of the reply
    reply_s: float = 0.0  # from the first token of the reply to the last

    @property
    def reply_tps(self) -> float:
        # tokens after the first over the time they took, as a user watches them stream
        n = self.completion_tokens
        return (n - 1) / self.reply_s if n > 1 and self.reply_s > 0 else 0.0


def create_chat_completion(model, messages, *, stream: bool = False, max_tokens: int | None = None, stop=None,
                           template=None, ignore_eos: bool = False, stats: ChatStats | None = None,
                           sampler=None, **sampling):
    """The assistant's reply to messages, as a `chat.completion` dict, or with stream=True an
    iterator of `chat.completion.chunk` dicts (the first carries the role, the last the
    finish_reason and an empty delta).

    max_tokens: None or -1 for no limit but the context. stop: a string or a list of strings
    that end the reply (not included). template: a built-in name, a Jinja file or a ChatTemplate
    (default: the model's). sampling: temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
    frequency_penalty, presence_penalty, seed; or sampler, a Sampler whose random state carries
    on across calls. Everything is checked before the call returns; with stream=True the model
    runs as the chunks are read.
    """
    t_call = time.perf_counter()
    messages = validate_messages(messages)
    sampler = make_sampler(sampler, sampling)
    limit = _max_tokens(max_tokens)
    stop_strings = _stop_strings(stop)
    state = _state(model)
    tmpl = state.template(model, template)
    tok = model.tokenizer
    if ignore_eos:
        stop_ids = frozenset()
    else:
        stop_ids, marker_strings = end_of_turn(tok, tmpl)
        stop_strings += [s for s in marker_strings if s not in stop_strings]
    if stats is None:
        stats = ChatStats()
    else:
        for f in fields(stats):
            setattr(stats, f.name, f.default)
    reserve = max(1, min(limit, model.n_ctx // 4))
    ids, used, stats.dropped = _fit(model, tmpl, messages, state.segments, reserve)
    stats.prompt_total = len(ids)

    pieces = _reply_pieces(model, ids, used, sampler, limit, stop_ids, stop_strings, stats, state, t_call)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": str(model.gguf.path)}
    if stream:
        return _chunks(head, pieces, stats)
    text = "".join(pieces)
    return {
        "id": head["id"],
        "object": "chat.completion",
        "created": head["created"],
        "model": head["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason(stats)}],
        "usage": {"prompt_tokens": stats.prompt_total, "completion_tokens": stats.completion_tokens,
                  "total_tokens": stats.prompt_total + stats.completion_tokens},
    }


def finish_reason(stats: ChatStats) -> str:
    """OpenAI's finish_reason for a stop_reason: "stop" at an end of turn or stop string, else "length"."""
    return "stop" if stats.stop_reason in ("eog", "stop") else "length"


# -- checking the request ----------------------------------------------------------------------

def validate_messages(messages) -> list:
    """messages as the template gets them: [{"role", "content"[, "name"]}] with text content;
    OpenAI's content parts ([{"type": "text", "text": ...}]) are joined. Anything else (another
    role, tool calls, images, text that is not valid Unicode) is a one-line PyllmError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PyllmError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} dicts")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise PyllmError(f"{where} must be a dict with \"role\" and \"content\", got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise PyllmError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
        for key, value in m.items():
            if key not in ("role", "content", "name") and value is not None:
                raise PyllmError(f"{where}: {key!r} is not supported (only role, content and name)")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            content = "".join(_text_part(part, f"{where}.content[{j}]") for j, part in enumerate(content))
        elif not isinstance(content, str):
            raise PyllmError(f"{where}: content must be a string or a list of text parts, got "
                             f"{type(content).__name__}")
        msg = {"role": role, "content": _valid_text(content, f"{where}.content")}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise PyllmError(f"{where}: name must be a string, got {type(m['name']).__name__}")
            msg["name"] = _valid_text(m["name"], f"{where}.name")
        out.append(msg)
    return out


def _text_part(part, where) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise PyllmError(f"{where}: only {{\"type\": \"text\", \"text\": ...}} parts are supported, got {kind!r}")
    return part["text"]


def _valid_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: bytes decoded with errors="surrogateescape"
        raise PyllmError(f"{where} is not valid Unicode (unpaired surrogate at character {e.start}); "
                         "decode the input with errors=\"replace\"") from None
    return text


def _max_tokens(max_tokens) -> int:
    if max_tokens is None or max_tokens == -1:
        return 1 << 62
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise PyllmError(f"max_tokens must be a non-negative integer, -1 or None, got {max_tokens!r}")
    return max_tokens


def _stop_strings(stop) -> list:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise PyllmError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in stops if s]


def end_of_turn(tok, template: ChatTemplate) -> tuple:
    """(stop token ids, stop strings) for a template: the tokenizer's end-of-generation ids, plus
    each end-of-turn marker the template uses -- as an id when it is one control token of the
    vocabulary, else as a string."""
    ids, strings = set(tok.eog_ids), []
    for marker in END_OF_TURN:
        if marker not in template.source and marker != template.eos_token:
            continue
        enc = tok.encode(marker, add_bos=False, add_eos=False, parse_special=True)
        if len(enc) == 1 and tok.is_control(enc[0]):
            ids.add(int(enc[0]))
        else:
            strings.append(marker)
    return frozenset(ids), strings


# -- what the model holds -----------------------------------------------------------------------

class _ChatState:
    """Per model: the chat text its KV cache was last fed, as [(text, ids)] pieces in order
    (prompt pieces and the reply as generated), and the templates it was asked for."""

    def __init__(self):
        self.segments = []
        self.templates = {}

    def template(self, model, template) -> ChatTemplate:
        if isinstance(template, ChatTemplate):
            return template
        if template is not None and not isinstance(template, str):
            raise PyllmError(f"template must be a name, a file or a ChatTemplate, got {type(template).__name__}")
        if template not in self.templates:
            self.templates[template] = ChatTemplate.from_metadata(model.metadata, template)
        return self.templates[template]


_STATES = {}  # id(model) -> (weak reference to the model, its _ChatState)


def _state(model) -> _ChatState:
    key = id(model)
    entry = _STATES.get(key)
    if entry is None or entry[0]() is not model:
        ref = weakref.ref(model, lambda _ref, key=key: _STATES.pop(key, None))
        entry = _STATES[key] = (ref, _ChatState())
    return entry[1]


def _tokens_for(tok, text: str, segments) -> tuple:
    """Token ids of rendered text, reusing the known (text, ids) segments that start it; returns
    (ids, the segments used plus the newly encoded rest)."""
    pos, ids, used = 0, [], []
    for seg_text, seg_ids in segments:
        if not seg_text or not text.startswith(seg_text, pos):
            break
        pos += len(seg_text)
        ids.extend(seg_ids)
        used.append((seg_text, seg_ids))
    rest = text[pos:]
    if rest or not ids:
        rest_ids = encode_rendered(tok, rest, first=not ids)
        ids.extend(rest_ids)
        used.append((rest, rest_ids))
    return ids, used


def _without_oldest_turn(messages) -> list | None:
    """messages less the oldest user message and the replies before the next one (system
    messages stay); None when the last user message would go."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if len(users) < 2:
        return None
    return [m for i, m in enumerate(messages) if m["role"] == "system" or i >= users[1]]


def _fit(model, template, messages, segments, reserve) -> tuple:
    """(prompt ids, their segments, messages dropped): the oldest turns left out until the
    prompt and `reserve` tokens for the reply fit the context."""
    n_ctx, dropped = model.n_ctx, 0
    while True:
        ids, used = _tokens_for(model.tokenizer, template.render(messages, add_generation_prompt=True), segments)
        if not ids:
            raise PyllmError(f"chat template {template.name!r} rendered nothing for these messages")
        if len(ids) + reserve <= n_ctx:
            return ids, used, dropped
        shorter = _without_oldest_turn(messages)
        if shorter is None:
            if len(ids) < n_ctx:
                return ids, used, dropped  # the last message alone: the reply gets what room is left
            what = "the last message" if dropped or len(messages) > 1 else "the message"
            raise PyllmError(f"{what} makes a prompt of {len(ids)} tokens; the context holds {n_ctx} (raise -c)")
        dropped += len(messages) - len(shorter)
        messages = shorter


# -- the reply ---------------------------------------------------------------------------------

def _reply_pieces(model, ids, used, sampler, max_tokens, stop_ids, stop_strings, stats, state, t_call):
    """Generate the reply, yielding its text piece by piece; text that may be the start of a
    stop string is held back until it is clear."""
    tok = model.tokenizer
    longest = max((len(s) for s in stop_strings), default=0)
    decoder = IncrementalDecoder(tok)
    out_ids, text, sent, searched = [], "", 0, 0
    t_first = t_last = None
    finished = False
    steps = generate_step(model, model.reuse_prefix(ids), sampler, max_tokens, stats, stop_ids=stop_ids)
    try:
        for token in steps:
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
                stats.ttft_s = t_first - t_call
            out_ids.append(token)
            text += decoder.add(token)
            cut = _find_stop(text, stop_strings, searched)
            if cut is not None:
                text = text[:cut]
                stats.stop_reason = "stop"
                break
            searched = max(0, len(text) - longest + 1)
            safe = len(text) - _held_back(text, stop_strings, longest)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        else:
            text += decoder.flush()
        finished = True
        if len(text) > sent:
            yield text[sent:]
    finally:
        steps.close()
        if not finished:
            stats.stop_reason = "interrupted"
        if t_first is not None:
            stats.reply_s = t_last - t_first
        # Remember the reply as generated, so the next call reuses its ids, when they decode
        # to exactly its text (no control token among them, no stop string cut off).
        reply = tok.decode(out_ids)
        keep = out_ids and stats.stop_reason != "stop" and tok.decode(out_ids, skip_special=False) == reply
        state.segments = used + [(reply, out_ids)] if keep else used


def _find_stop(text: str, stop_strings, start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop_strings, longest: int) -> int:
    """Length of the longest end of text that begins some stop string."""
    for k in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop_strings):
            return k
    return 0


def _chunks(head: dict, pieces, stats: ChatStats) -> Iterator[dict]:
    def chunk(delta, finish=None):
        return {"id": head["id"], "object": "chat.completion.chunk", "created": head["created"],
                "model": head["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    try:
        yield chunk({"role": "assistant"})
        for piece in pieces:
            yield chunk({"content": piece})
        yield chunk({}, finish_reason(stats))
    finally:
        pieces.close()
