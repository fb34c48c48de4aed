"""Tokenizer conversion: the tokenizer.* GGUF keys, as llama.cpp's converters write them.

- SentencePiece `tokenizer.model` -> tokenizer.ggml.model "llama" (tokens, scores, token
  types), as convert_hf_to_gguf.py's _create_vocab_sentencepiece / _set_vocab_sentencepiece.
- Hugging Face `tokenizer.json` (byte-level BPE) -> "gpt2" (tokens, merges, token types,
  tokenizer.ggml.pre), as get_vocab_base / _set_vocab_gpt2.
- llama2.c `tok*.bin` -> "llama", as examples/convert-llama2c-to-ggml's load_vocab.
- Special token ids, add_bos/add_eos and the chat template come from tokenizer_config.json /
  config.json / tokenizer.json through gguf-py's SpecialVocab (llama.cpp's own code, shipped
  in the `gguf` package we depend on).

Each function adds keys to a convert.gguf_writer.GGUFWriter.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path

import numpy as np
from pyllm.base import PyllmError, ValueType
from pyllm.convert.gguf_writer import GGUFWriter

# gguf.TokenType / llama_token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TOKEN_NULL = 0xFFFFFFFF  # LLAMA_TOKEN_NULL (-1) stored as u32, as the llama2.c converter writes it


def _put_tokens(w: GGUFWriter, model: str, pre: str | None, tokens, scores, types):
    w.add_string("tokenizer.ggml.model", model)
    if pre is not None:
        w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", list(tokens), ValueType.STRING)
    if scores is not None:
        w.add_array("tokenizer.ggml.scores", np.asarray(scores, dtype=np.float32), ValueType.FLOAT32)
    w.add_array("tokenizer.ggml.token_type", np.asarray(types, dtype=np.int32), ValueType.INT32)


def add_special_vocab(w: GGUFWriter, directory: Path | None, n_vocab: int | None, load_merges: bool = False):
    """Special ids, add_*_token flags, merges and chat template via gguf-py's SpecialVocab."""
    if directory is None or not Path(directory).is_dir():
        return
    import gguf

    level = logging.getLogger("gguf.vocab").level
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    try:
        sv = gguf.SpecialVocab(Path(directory), load_merges=load_merges, n_vocab=n_vocab)
        collector = gguf.GGUFWriter(path=None, arch="none")
        sv.add_to_gguf(collector, quiet=True)
    except ValueError as e:
        raise PyllmError(f"{directory}: bad tokenizer configuration: {e}") from None
    finally:
        logging.getLogger("gguf.vocab").setLevel(level)
    copy_gguf_kv(w, collector, skip=("general.architecture",))


def copy_gguf_kv(w: GGUFWriter, collector, skip=()):
    """Copy the key/values a gguf.GGUFWriter collected (with gguf-py's types) into w."""
    import gguf

    for key, v in collector.kv_data[0].items():
        if key in skip:
            continue
        vtype = ValueType(int(v.type))
        sub = v.sub_type
        if vtype == ValueType.ARRAY and sub is None:
            sub = gguf.GGUFValueType.get_type(v.value[0]) if len(v.value) else gguf.GGUFValueType.STRING
        w.add(key, v.value, vtype, None if sub is None else ValueType(int(sub)))


# -- SentencePiece ------------------------------------------------------------------------

def _looks_special(text: str) -> bool:
    # Model.does_token_look_special in convert_hf_to_gguf.py
    seems = text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
    seems = seems or (text.startswith("<|") and text.endswith("|>"))
    seems = seems or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
    seems = seems or (text.startswith("<unused") and text.endswith(">"))
    return seems


def spm_tokens(model_path: Path, vocab_size: int | None = None, model_dir: Path | None = None):
    """(tokens, scores, types) of a SentencePiece model, as _create_vocab_sentencepiece."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(model_path))
    except (OSError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else "unreadable"
        raise PyllmError(f"{model_path}: not a SentencePiece model ({reason})") from None
    n_sp = sp.vocab_size()
    vocab_size = n_sp if vocab_size is None else int(vocab_size)
    if n_sp > vocab_size:
        raise PyllmError(f"{model_path}: the tokenizer has {n_sp} tokens but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(n_sp):
        t = NORMAL
        if sp.IsUnknown(i):
            t = UNKNOWN
        elif sp.IsControl(i):
            t = CONTROL
        elif sp.IsUnused(i):
            t = UNUSED
        elif sp.IsByte(i):
            t = BYTE
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = t
    if model_dir is not None:
        added_file = Path(model_dir) / "added_tokens.json"
        if added_file.is_file():
            for text, tid in json.loads(added_file.read_text(encoding="utf-8")).items():
                if tid < vocab_size:
                    tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, USER_DEFINED
        cfg_file = Path(model_dir) / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = _read_json(cfg_file)
            for tid, data in (cfg.get("added_tokens_decoder") or {}).items():
                tid = int(tid)
                if tid >= vocab_size:
                    continue
                text = data["content"]
                if data.get("special") or _looks_special(text):
                    types[tid] = CONTROL
                else:
                    text = text.replace("\u2581", " ")
                    types[tid] = USER_DEFINED
                scores[tid] = -1000.0
                tokens[tid] = text.encode("utf-8")
    return tokens, scores, types


def add_spm_vocab(w: GGUFWriter, model_path, vocab_size=None, model_dir=None, special_dir=None):
    """tokenizer.ggml.* for a SentencePiece tokenizer.model (_set_vocab_sentencepiece)."""
    tokens, scores, types = spm_tokens(Path(model_path), vocab_size, model_dir)
    _put_tokens(w, "llama", "default", tokens, scores, types)
    add_special_vocab(w, special_dir if special_dir is not None else model_dir, len(tokens))
    return len(tokens)


# -- tokenizer.json (byte-level BPE) ------------------------------------------------------

# Known pre-tokenizer regexes (tokenizer.json "Split" patterns) -> llama.cpp's tokenizer.ggml.pre.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _flatten_pretokenizers(pt):
    if not pt:
        return []
    if pt.get("type") == "Sequence":
        out = []
        for p in pt.get("pretokenizers", []):
            out.extend(_flatten_pretokenizers(p))
        return out
    return [pt]


def detect_pre(tok: dict) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json, from its pre-tokenizer.

    llama.cpp identifies the pre-tokenizer by hashing the tokens of a check string with
    transformers (get_vocab_base_pre); we do not want transformers at runtime, so we read the
    pre-tokenizer configuration instead and map the known ones to the same names:
    Llama-3 regex -> "llama-bpe", Qwen2 regex -> "qwen2", individual digits + GPT-2 byte level
    (SmolLM, StarCoder) -> "smollm", plain GPT-2 byte level -> "gpt-2". None when unknown."""
    parts = _flatten_pretokenizers(tok.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    splits = [p for p in parts if p.get("type") == "Split"]
    if splits:
        pattern = splits[0].get("pattern", {})
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex == _LLAMA3_RE:
            return "llama-bpe"
        if regex == _QWEN2_RE:
            return "qwen2"
        return None
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if byte_level and byte_level[0].get("use_regex", True):
        digits = [p for p in parts if p.get("type") == "Digits"]
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and digits[0].get("individual_digits"):
            return "smollm"
    return None


def gpt2_tokens(tok: dict, vocab_size: int | None = None):
    """(tokens, types) of a byte-level BPE tokenizer.json, as get_vocab_base."""
    vocab = tok["model"]["vocab"]
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    reverse = {i: t for t, i in vocab.items()}
    for a in added.values():
        reverse[a["id"]] = a["content"]
    n = max(reverse) + 1 if reverse else 0
    vocab_size = n if vocab_size is None else int(vocab_size)
    if n > vocab_size:
        raise PyllmError(f"tokenizer.json has token id {n - 1} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = reverse[i]
        if text in added:
            if added[text].get("special") or _looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)
    return tokens, types


def add_gpt2_vocab(w: GGUFWriter, tokenizer_json, vocab_size=None, special_dir=None):
    """tokenizer.ggml.* for a byte-level BPE tokenizer.json (_set_vocab_gpt2)."""
    path = Path(tokenizer_json)
    tok = _read_json(path)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise PyllmError(f"{path}: unsupported tokenizer type {model.get('type')!r} "
                         "(supported: BPE, or a SentencePiece tokenizer.model)")
    if model.get("byte_fallback") and not model.get("ignore_merges"):
        raise PyllmError(f"{path}: a SentencePiece-style BPE tokenizer.json is not supported; "
                         "convert with its tokenizer.model (--tokenizer PATH/tokenizer.model)")
    pre = detect_pre(tok)
    if pre is None:
        print(f"warning: {path}: pre-tokenizer not recognized; writing tokenizer.ggml.pre = 'default'", file=sys.stderr)
        pre = "default"
    tokens, types = gpt2_tokens(tok, vocab_size)
    _put_tokens(w, "gpt2", pre, tokens, None, types)
    add_special_vocab(w, special_dir if special_dir is not None else path.parent, len(tokens), load_merges=True)
    if "tokenizer.ggml.merges" not in w.kv:
        # no tokenizer_config.json / config.json beside it: SpecialVocab still read the merges?
        merges = model.get("merges") or []
        if merges and isinstance(merges[0], list):
            merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m)
                      for m in merges]
        if merges:
            w.add_array("tokenizer.ggml.merges", merges, ValueType.STRING)
    return len(tokens)


# -- llama2.c tok*.bin --------------------------------------------------------------------

def parse_llama2c_tokenizer(data: bytes, vocab_size: int):
    """(tokens, scores, types) of a llama2.c tokenizer .bin, as convert-llama2c-to-ggml's load_vocab:
    int32 max_token_length, then per token float32 score, int32 length, bytes. Ids 0/1/2 are
    renamed <unk>/<s>/</s>; empty pieces are CONTROL, <0xNN> BYTE; spaces become U+2581.

    Raises ValueError (the reason) unless the bytes are exactly that structure: a positive
    max_token_length, no piece longer than it, and exactly vocab_size entries up to the end of
    the file. That structure, not the first byte, tells it from a SentencePiece protobuf."""
    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes, shorter than its header")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if max_len <= 0:
        raise ValueError(f"max_token_length is {max_len}")
    pos = 4
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if pos + 8 > len(data):
            raise ValueError(f"truncated: the model has {vocab_size} tokens, the file ends at token {i}")
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if n < 0 or n > max_len:
            raise ValueError(f"token {i} has length {n}, outside 0..max_token_length={max_len}")
        if pos + n > len(data):
            raise ValueError(f"truncated: the file ends inside token {i}")
        text = data[pos : pos + n].decode("utf-8", errors="replace")
        pos += n
        if i == 0:
            text, t = "<unk>", UNKNOWN
        elif i == 1:
            text, t = "<s>", CONTROL
        elif i == 2:
            text, t = "</s>", CONTROL
        elif not text:
            t = CONTROL
        elif _is_byte_token(text):
            t = BYTE
        else:
            t = NORMAL
        tokens.append(text.replace(" ", "\u2581"))
        scores.append(score)
        types.append(t)
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes left after the model's {vocab_size} tokens "
                         "(a tokenizer for a larger vocabulary?)")
    return tokens, scores, types


def _is_byte_token(text: str) -> bool:
    # sscanf(text, "<0x%02hhX>", &b) == 1: "<0x" followed by one or two hex digits
    if not text.startswith("<0x"):
        return False
    h = text[3:5]
    return len(h) >= 1 and all(c in "0123456789abcdefABCDEF" for c in h[:1])


def add_llama2c_vocab(w: GGUFWriter, tokenizer_path, vocab_size: int):
    """tokenizer.ggml.* for a llama2.c checkpoint: from a tok*.bin, a SentencePiece .model,
    or the tokenizer of a GGUF file (what convert-llama2c-to-ggml accepts)."""
    path = Path(tokenizer_path)
    if not path.is_file():
        raise PyllmError(f"tokenizer not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from pyllm.runtime.gguf_file import GGUFFile

        g = GGUFFile(path)
        if "tokenizer.ggml.tokens" not in g.metadata:
            raise PyllmError(f"{path}: has no tokenizer")
        for key, value in g.metadata.items():
            if key.startswith("tokenizer."):
                w.add(key, value, *g.value_types[key])
        return
    if path.suffix == ".model":
        tokens, scores, types = spm_tokens(path, vocab_size)
        tokens = [t.decode("utf-8") for t in tokens]
    else:
        # a llama2.c tok*.bin if it has exactly that structure, else a SentencePiece protobuf
        # (whatever its name); both failing is one error naming both reasons
        try:
            tokens, scores, types = parse_llama2c_tokenizer(path.read_bytes(), vocab_size)
        except OSError as e:
            raise PyllmError(f"cannot read tokenizer {path}: {e.strerror}") from None
        except ValueError as not_llama2c:
            try:
                tokens, scores, types = spm_tokens(path, vocab_size)
            except PyllmError as not_spm:
                spm_reason = str(not_spm).split(": ", 1)[-1]
                raise PyllmError(f"{path}: not a llama2.c tokenizer ({not_llama2c}) and {spm_reason}") from None
            tokens = [t.decode("utf-8") for t in tokens]
    _put_tokens(w, "llama", None, tokens, scores, types)
    # convert-llama2c-to-ggml.cpp save_as_llama_model: fixed ids, no separator / padding
    w.add_u32("tokenizer.ggml.unknown_token_id", 0)
    w.add_u32("tokenizer.ggml.bos_token_id", 1)
    w.add_u32("tokenizer.ggml.eos_token_id", 2)
    w.add_u32("tokenizer.ggml.seperator_token_id", TOKEN_NULL)
    w.add_u32("tokenizer.ggml.padding_token_id", TOKEN_NULL)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PyllmError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PyllmError(f"{path}: not valid JSON ({e})") from None
