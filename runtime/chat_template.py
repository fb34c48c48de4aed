"""Chat templates: turn a list of messages into the prompt text a chat model was trained on.

A template is Jinja2, rendered the way Hugging Face's `apply_chat_template` renders it:
an ImmutableSandboxedEnvironment with trim_blocks/lstrip_blocks, the loop-controls
extension, the `raise_exception` and `strftime_now` globals, HF's `tojson` filter
(no HTML escaping, ensure_ascii=False, indent/separators/sort_keys), `dict`/`namespace`
helpers, and the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`
(plus `unk_token`/`pad_token` and any keyword the caller adds). The same template and
messages give the same text as transformers (tests/test_chat_template.py checks it).

GGUF files carry their template in `tokenizer.chat_template`; for files without one,
`BUILTIN_TEMPLATES` holds the well-known Hugging Face templates, picked with
`--chat-template NAME` (or a FILE holding Jinja text).
"""

import functools
import json
import re
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import SecurityError
from pyllm.base import PyllmError


class TemplateSecurityError(PyllmError, SecurityError):
    """A template refused for reaching Python internals or exhausting the machine: jinja2's
    SecurityError, and a PyllmError so the command line prints it as one line."""

# The templates as published in the models' tokenizer_config.json on the Hugging Face hub.
BUILTIN_TEMPLATES = {
    # transformers' former default ChatML template (teknium/OpenHermes-2.5-Mistral-7B, Qwen-style chats)
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # meta-llama/Llama-2-7b-chat-hf
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.2 (no system role: see ChatTemplate.render)
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # google/gemma-7b-it, google/gemma-2-9b-it (no system role: see ChatTemplate.render)
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
}

# The special tokens each built-in template's turns are made of (for --chat-template checks).
BUILTIN_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "llama2": (),
    "mistral": (),
}


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask markers): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # HF's override: jinja's own tojson escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # no dunder/underscore attributes: keeps templates away from CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    class ChatSandbox(ImmutableSandboxedEnvironment):
        """HF's sandbox, stricter where a template could reach Python's internals or exhaust the
        machine: an unsafe attribute is an error at once (not an empty Undefined), and sizes
        are bounded (_check_size) for *, **, +, % and every call's or filter's int arguments,
        format widths, and range() iterations summed over a render."""

        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            _check_args(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            if attribute in ("format", "format_map") and isinstance(obj, str):
                _check_format(obj)
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            if argument in ("format", "format_map") and isinstance(obj, str):
                _check_format(obj)
            return super().getitem(obj, argument)

    budget = {"range": 0}

    def bounded_range(*args):
        r = range(*args)
        budget["range"] += len(r)
        if budget["range"] > MAX_ITEMS:
            raise SecurityError(f"range() over {MAX_ITEMS} items in one rendering is not allowed in chat templates")
        return r

    def bounded(f):
        @functools.wraps(f)
        def filter_(*args, **kwargs):
            _check_args(args, kwargs)
            return f(*args, **kwargs)
        return filter_

    env = ChatSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters = {name: bounded(f) for name, f in env.filters.items()}
    env.globals["range"] = bounded_range
    env.range_budget = budget  # reset by ChatTemplate._render
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


MAX_ITEMS = 100_000  # range() items per rendering (jinja's own MAX_RANGE)
MAX_SIZE = 1_000_000  # characters / items of a string or list an operator or call may build


def _check_size(n, what):
    if n > MAX_SIZE:
        raise SecurityError(f"{what} of {n} items is over the chat template limit of {MAX_SIZE}")


def _check_binop(operator, left, right):
    seq = (str, bytes, list, tuple)
    if operator == "*":
        for a, b in ((left, right), (right, left)):
            if isinstance(a, seq) and isinstance(b, int) and not isinstance(b, bool):
                _check_size(len(a) * b, "a repetition")
    elif operator == "+" and isinstance(left, seq) and isinstance(right, seq):
        _check_size(len(left) + len(right), "a concatenation")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if right > 0 and abs(left) > 1 and right * abs(left).bit_length() > 4096:
            raise SecurityError(f"{left} ** {right} is too large for a chat template")
    elif operator == "%" and isinstance(left, str):
        _check_args(right if isinstance(right, tuple) else (right,), {})
        _check_format(left)


def _check_format(fmt: str):
    if re.search(r"\d{7,}", fmt):  # a width or precision of a million or more
        raise SecurityError("format widths over a million are not allowed in chat templates")


def _check_args(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_SIZE:
            _check_size(abs(a), "an argument")


class ChatTemplate:
    """A compiled chat template with the special-token strings it is rendered with."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "custom",
                 extra_tokens: dict | None = None):
        import jinja2

        self.source = source
        self.name = name
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.extra_tokens = dict(extra_tokens or {})  # unk_token, pad_token: passed like HF does
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise PyllmError(f"chat template {name!r} is not valid Jinja: {e.message} (line {e.lineno})") from None
        self._supports_system = None

    def render(self, messages, add_generation_prompt: bool = True, merge_system: bool = True, **kwargs) -> str:
        """The prompt text for messages (a list of {"role", "content"} dicts).

        Templates that reject a system role (Mistral v0.2, Gemma) get the system prompt
        folded into the first user message (as llama.cpp does) when merge_system.
        """
        import jinja2

        messages = [dict(m) for m in messages]
        try:
            return self._render(messages, add_generation_prompt, **kwargs)
        except SecurityError as e:  # never retried: an escape attempt is not a formatting problem
            raise TemplateSecurityError(f"chat template {self.name!r} refused: {e}") from None
        except jinja2.TemplateError as e:
            if merge_system and len(messages) >= 1 and messages[0].get("role") == "system":
                merged = _merge_system(messages)
                try:
                    return self._render(merged, add_generation_prompt, **kwargs)
                except SecurityError as e2:
                    raise TemplateSecurityError(f"chat template {self.name!r} refused: {e2}") from None
                except jinja2.TemplateError:
                    pass
            raise PyllmError(f"chat template {self.name!r}: {e}") from None
        except (OverflowError, MemoryError, RecursionError, ValueError, TypeError) as e:
            raise PyllmError(f"chat template {self.name!r} failed: {type(e).__name__}: {e}") from None

    def _render(self, messages, add_generation_prompt, **kwargs) -> str:
        self._template.environment.range_budget["range"] = 0
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **self.extra_tokens}
        variables.update(kwargs)
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def builtin(cls, name: str, bos_token: str = "", eos_token: str = "", **kw) -> "ChatTemplate":
        if name not in BUILTIN_TEMPLATES:
            raise PyllmError(f"unknown chat template {name!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}")
        return cls(BUILTIN_TEMPLATES[name], bos_token, eos_token, name=name, **kw)

    @classmethod
    def from_metadata(cls, meta: dict, override: str | None = None) -> "ChatTemplate":
        """The template for a GGUF file's metadata.

        override: a built-in name or a file of Jinja text (--chat-template). Otherwise the
        file's `tokenizer.chat_template`; a file without one gets ChatML when its vocabulary
        has `<|im_start|>`, else an error suggesting --chat-template.
        """
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def token(key):
            i = meta.get(key)
            if i is None:
                return ""
            i = int(i)
            return str(tokens[i]) if 0 <= i < len(tokens) else ""

        kw = dict(bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id"))
        extra = {}
        for name, key in (("unk_token", "tokenizer.ggml.unknown_token_id"),
                          ("pad_token", "tokenizer.ggml.padding_token_id")):
            if token(key):
                extra[name] = token(key)
        kw["extra_tokens"] = extra
        if override:
            if override in BUILTIN_TEMPLATES:
                return cls.builtin(override, **kw)
            path = Path(override)
            if not path.is_file():
                raise PyllmError(
                    f"--chat-template {override!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file"
                )
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise PyllmError(f"cannot read chat template file {override}: {e}") from None
            return cls(source, name=path.name, **kw)
        source = meta.get("tokenizer.chat_template")
        if isinstance(source, str) and source.strip():
            return cls(source, name="the model's", **kw)
        if "<|im_start|>" in set(tokens):
            return cls.builtin("chatml", **kw)
        raise PyllmError(
            "the model has no chat template (tokenizer.chat_template); choose one with --chat-template "
            f"{'|'.join(BUILTIN_TEMPLATES)} or a Jinja file"
        )


def _merge_system(messages):
    """System prompt folded into the first user message."""
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    for m in rest:
        if m.get("role") == "user":
            m["content"] = f"{system.get('content', '')}\n\n{m.get('content', '')}"
            return rest
    return rest


def encode_rendered(tokenizer, text: str, first: bool = True) -> list:
    """Token ids of rendered template text: special tokens parsed; BOS added only at the
    start (first) when the model wants one and the text does not already begin with it."""
    add_bos = False
    if first and tokenizer.bos_id is not None:
        bos_text = tokenizer.token_text(tokenizer.bos_id)
        add_bos = None if not (bos_text and text.startswith(bos_text)) else False
    return list(tokenizer.encode(text, add_bos=add_bos, add_eos=False, parse_special=True))
