"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False).

The oracle is tests/fixtures/chat_templates/renderings.json, written once by
make_renderings.py with transformers (a test-only tool, not installed in CI); when
transformers is importable the renderings are also recomputed live.
"""

import json
from pathlib import Path

import pytest
from conftest import shared_file
from pyllm.base import PyllmError
from pyllm.runtime.chat_template import BUILTIN_TEMPLATES, ChatTemplate, encode_rendered

FIXTURE = Path(__file__).parent / "fixtures" / "chat_templates" / "renderings.json"
DATA = json.loads(FIXTURE.read_text(encoding="utf-8"))


def template(name):
    sp = DATA["special_tokens"][name]
    return ChatTemplate(DATA["templates"][name], sp["bos_token"], sp["eos_token"], name=name)


def case_id(c):
    return f"{c['template']}-conv{c['conversation']}-{'gen' if c['add_generation_prompt'] else 'nogen'}"


@pytest.mark.parametrize("case", DATA["cases"], ids=case_id)
def test_rendering_equals_transformers(case):
    t = template(case["template"])
    messages = DATA["conversations"][case["conversation"]]
    if "error" in case:
        with pytest.raises(PyllmError):
            t.render(messages, case["add_generation_prompt"], merge_system=False)
    else:
        assert t.render(messages, case["add_generation_prompt"]) == case["output"]


def test_fixture_covers_every_builtin_and_smollm2():
    assert set(BUILTIN_TEMPLATES) | {"smollm2"} == set(DATA["templates"])
    for name, source in BUILTIN_TEMPLATES.items():
        assert DATA["templates"][name] == source, f"{name} changed: rerun make_renderings.py"


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_system_prompt_folded_into_first_user_message(name):
    """Templates without a system role get it merged, rendered as transformers renders the merged chat."""
    t = template(name)
    merged = {c["add_generation_prompt"]: c["output"] for c in DATA["cases"]
              if c["template"] == name and c["conversation"] == 5}
    for agp in (True, False):
        assert t.render(DATA["conversations"][1], agp) == merged[agp]


def test_smollm2_gguf_template_is_the_fixture(smollm2):
    from pyllm.runtime.gguf_file import GGUFFile

    meta = GGUFFile(smollm2).metadata
    assert meta["tokenizer.chat_template"] == DATA["templates"]["smollm2"]
    t = ChatTemplate.from_metadata(meta)
    assert (t.bos_token, t.eos_token) == ("<|im_start|>", "<|im_end|>")
    msgs = [{"role": "user", "content": "Hi"}]
    assert t.render(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_live_transformers_when_installed():
    transformers = pytest.importorskip("transformers", reason="transformers is a local-only oracle, not installed "
                                                                "in CI (see make_renderings.py)")
    tokfile = shared_file("hf/SmolLM2-135M-Instruct/tokenizer.json")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokfile))
    for name in DATA["templates"]:
        sp = DATA["special_tokens"][name]
        tok.bos_token, tok.eos_token, tok.chat_template = sp["bos_token"], sp["eos_token"], DATA["templates"][name]
        for conv in DATA["conversations"]:
            for agp in (True, False):
                try:
                    want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp)
                except Exception:
                    continue
                assert template(name).render(conv, agp, merge_system=False) == want


def test_helpers_match_hf():
    src = (
        "{{ messages | tojson }}|{{ {'a': 'é<b>'} | tojson(indent=2) }}|{{ raise_exception is defined }}|"
        "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{{ strftime_now('%Y') | length }}|{{ extra }}|{% set ns = namespace(n=0) %}{% set ns.n = 3 %}{{ ns.n }}"
    )
    msgs = [{"role": "user", "content": "ü"}, {"role": "assistant", "content": "x"}]
    out = ChatTemplate(src).render(msgs, extra="kw")
    assert out == ('[{"role": "user", "content": "ü"}, {"role": "assistant", "content": "x"}]'
                   '|{\n  "a": "é<b>"\n}|True|user|4|kw|3')


def test_raise_exception_is_one_line_error():
    t = ChatTemplate("{{ raise_exception('nope') }}", name="t")
    with pytest.raises(PyllmError, match="nope"):
        t.render([{"role": "user", "content": "x"}])


ESCAPES = {
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "class alone": "{{ ''.__class__ }}",  # HF's sandbox prints an empty Undefined; refused here
    "globals of a global": "{{ raise_exception.__globals__ }}",
    "cycler": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner": "{{ joiner.__init__.__globals__ }}",
    "namespace": "{{ namespace.__init__.__globals__ }}",
    "namespace attribute": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "namespace kwarg": "{% set ns = namespace(__dict__=1) %}",
    "lipsum": "{{ lipsum.__globals__['os'] }}",
    "attr filter": "{{ messages|attr('__class__') }}",
    "format field": "{{ '{0.__class__}'.format(messages) }}",
    "mutating method": "{% set d = {'a': 1} %}{{ d.pop('a') }}",
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
    "nested ranges": "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "string repetition": "{{ 'a' * 10**9 }}",
    "repetition twice": "{{ ('a' * 10**5) * 10**5 }}",
    "list repetition": "{{ ([0] * 10**8)|length }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "format width": "{{ '{:>1000000000}'.format(1) }}",
    "percent width": "{{ '%1000000000d' % 1 }}",
    "center filter": "{{ 'a'|center(10**9) }}",
    "ljust method": "{{ 'a'.ljust(10**9) }}",
    "big power": "{{ 2 ** 100000 ** 2 }}",
}


@pytest.mark.parametrize("name", ESCAPES)
def test_sandbox_refuses_escapes_and_blow_ups(name):
    """jinja2's SecurityError (as a PyllmError, so the CLI prints one line), quickly, with
    nothing built: no attribute walk to Python internals, no unbounded size or loop."""
    import time

    import jinja2

    t = ChatTemplate(ESCAPES[name], name="evil")
    t0 = time.perf_counter()
    with pytest.raises(jinja2.exceptions.SecurityError) as e:
        t.render([{"role": "user", "content": "hi"}])
    assert isinstance(e.value, PyllmError) and str(e.value).startswith("chat template 'evil' refused: ")
    assert "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 5  # generous: refused before any real work (not a speed test)


def test_sandbox_still_renders_ordinary_templates():
    t = ChatTemplate("{% for m in messages %}{{ m.content * 2 }}{% endfor %}{{ 2 ** 10 }}{{ '%5d|{:>4}' % 7 }}"
                     "{% for i in range(3) %}{{ i }}{% endfor %}{{ '{:>4}'.format(1) }}{{ 'x'|center(5) }}")
    assert t.render([{"role": "user", "content": "ab"}]) == "abab1024    7|{:>4}012   1  x  "


def test_invalid_jinja_is_pyllm_error():
    with pytest.raises(PyllmError, match="not valid Jinja"):
        ChatTemplate("{% for %}")


def meta_without_template(tokens):
    return {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def test_from_metadata_defaults_and_overrides(tmp_path):
    t = ChatTemplate.from_metadata(meta_without_template(["<unk>", "<|im_start|>", "<|im_end|>"]))
    assert t.name == "chatml"
    with pytest.raises(PyllmError, match="--chat-template"):
        ChatTemplate.from_metadata(meta_without_template(["<unk>", "<s>", "</s>"]))
    t = ChatTemplate.from_metadata(meta_without_template(["<unk>", "<s>", "</s>"]), override="llama2")
    assert t.render([{"role": "user", "content": "Hi"}]) == "<s>[INST] Hi [/INST]"
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ bos_token }}{{ m.content }}{% endfor %}", encoding="utf-8")
    t = ChatTemplate.from_metadata(meta_without_template(["<unk>", "<s>", "</s>"]), override=str(f))
    assert t.render([{"role": "user", "content": "Hi"}]) == "<s>Hi"
    with pytest.raises(PyllmError, match="neither a built-in"):
        ChatTemplate.from_metadata(meta_without_template([]), override=str(tmp_path / "missing"))


class FakeTok:
    bos_id = 1

    def __init__(self):
        self.calls = []

    def token_text(self, i):
        return "<s>"

    def encode(self, text, add_bos=None, add_eos=None, parse_special=True):
        self.calls.append((text, add_bos, parse_special))
        return [0]


def test_encode_rendered_avoids_double_bos():
    tok = FakeTok()
    encode_rendered(tok, "<s>[INST] Hi [/INST]")
    encode_rendered(tok, "<|im_start|>user")
    encode_rendered(tok, "more", first=False)
    assert [c[1] for c in tok.calls] == [False, None, False]
    assert all(c[2] for c in tok.calls)
