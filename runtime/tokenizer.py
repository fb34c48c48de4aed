"""Tokenizers built from GGUF metadata alone, matching llama.cpp's llama-vocab.cpp.

Two algorithms, chosen by `tokenizer.ggml.model`:

- "llama": SentencePiece BPE (llama.cpp's llm_tokenizer_spm). Spaces become U+2581 (▁), a ▁
  is prepended when `tokenizer.ggml.add_space_prefix` (default True), then adjacent symbols
  are merged greedily, the merge whose result has the highest score first (ties: leftmost),
  and symbols that are not in the vocabulary fall back to `<0xXX>` byte tokens.
- "gpt2": byte-level BPE. The text is split by the pre-tokenizer regexes named by
  `tokenizer.ggml.pre`, each word's UTF-8 bytes are mapped to GPT-2's printable alphabet and
  merged by rank from `tokenizer.ggml.merges` (lower index first, ties: leftmost).

Special tokens (control, user-defined, unknown) found in the text are split out first, longest
first, as llama.cpp's tokenizer_st_partition does (control and unknown ones only when
parse_special).

Decoding: control and unknown tokens give no text (unless skip_special=False); bytes are joined
and decoded as UTF-8 with U+FFFD for invalid sequences. With an SPM vocabulary that adds a
space prefix, the leading space of the token right after a leading BOS is dropped, both in
decode() and in IncrementalDecoder, so streaming a sequence gives exactly decode()'s text.
llama.cpp's `clean_spaces` post-processing (" ." -> ".") is not applied: it is lossy.
"""

import codecs
import heapq
import sys

import numpy as np
import regex
from pyllm.base import PyllmError

# llama.cpp / GGUF token types
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # ▁, SentencePiece's escaped space

# Token texts that end generation when the vocabulary has them as control tokens (llama.cpp's
# list in llama_vocab::impl::load, plus a few end-of-text markers of other families).
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
    "<|end_of_text|>", "<|eom_id|>", "<EOT>", "<|fim_pad|>", "<|fim_repo|>", "<|repo_name|>", "<|file_sep|>",
)

# --- pre-tokenizer regexes (llama.cpp's llm_tokenizer_bpe), applied one after the other -----
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZERS = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "smollm": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
               r"[0-9][0-9][0-9]"),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "poro": (_PORO,),
    "viking": (_PORO, r"\p{N}"),
    "tekken": (_TEKKEN,),
    "chameleon": (r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                  r"[\p{P}!-/:-@\[-`{-~]", _GPT2),
}
# tokenizer.ggml.pre value -> PRE_TOKENIZERS key (llama.cpp's names)
PRE_ALIASES = {
    "": "default", "default": "default",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3", "dbrx": "llama3",
    "smaug-bpe": "llama3", "chatglm-bpe": "llama3",
    "gpt-2": "gpt2", "phi-2": "gpt2", "jina-es": "gpt2", "jina-de": "gpt2", "gigachat": "gpt2",
    "jina-v1-en": "gpt2", "jina-v2-es": "gpt2", "jina-v2-de": "gpt2", "jina-v2-code": "gpt2", "roberta-bpe": "gpt2",
    "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "smollm": "smollm", "codeshell": "smollm",
    "exaone": "smollm", "minerva-7b": "smollm",
    "qwen2": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2",
    "falcon": "falcon", "deepseek-coder": "deepseek-coder", "deepseek-v3": "deepseek-v3",
    "poro-chat": "poro", "bloom": "poro", "gpt3-finnish": "poro", "viking": "viking",
    "tekken": "tekken", "chameleon": "chameleon",
}
# pre-tokenizers after which llama.cpp adds BOS by default, and ones that take a word that is
# a whole token as is (ignore_merges)
_PRE_ADD_BOS = {"llama3", "tekken", "chameleon"}
_PRE_IGNORE_MERGES = {"llama3", "tekken"}


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_LATIN1_TO_GPT2 = {b: ord(c) for b, c in BYTE_TO_CHAR.items()}  # str.translate table on latin-1 text
# GPT-2 characters -> the latin-1 character of their byte; latin-1 characters outside GPT-2's
# alphabet -> U+FFFF, so that a translated text below U+0100 is known to be all GPT-2 characters
_GPT2_TO_LATIN1 = {i: 0xFFFF for i in range(256)}
_GPT2_TO_LATIN1.update({ord(c): b for b, c in BYTE_TO_CHAR.items()})


def _split_regexes(text: str, patterns) -> list:
    """llama.cpp's unicode_regex_split: each regex splits every piece into its matches and the
    unmatched text between them (kept as pieces too)."""
    pieces = [text]
    for pat in patterns:
        out = []
        for piece in pieces:
            pos = 0
            for m in pat.finditer(piece):
                s, e = m.span()
                if s == e:
                    continue
                if s > pos:
                    out.append(piece[pos:s])
                out.append(piece[s:e])
                pos = e
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


def _merge(syms: list, priority) -> list:
    """Merge adjacent symbols pair by pair, lowest priority(a, b) first (None: never),
    leftmost first among equals; returns the symbols with merged-away slots as "".

    A heap of candidate pairs over a linked list of symbols, as llama.cpp's tokenizers do:
    a popped pair is stale when either side has since been merged into something else.
    """
    n = len(syms)
    if n < 2:
        return syms
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        key = priority(syms[i], syms[i + 1])
        if key is not None:
            heap.append((key, i, i + 1, syms[i] + syms[i + 1]))
    heapq.heapify(heap)
    while heap:
        _, left, right, merged = heapq.heappop(heap)
        a, b = syms[left], syms[right]
        if not a or not b or nxt[left] != right or a + b != merged:
            continue
        syms[left], syms[right] = merged, ""
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prv[after] = left
        before = prv[left]
        if before >= 0:
            key = priority(syms[before], merged)
            if key is not None:
                heapq.heappush(heap, (key, before, left, syms[before] + merged))
        if after >= 0:
            key = priority(merged, syms[after])
            if key is not None:
                heapq.heappush(heap, (key, left, after, merged + syms[after]))
    return syms


class Tokenizer:
    """A GGUF vocabulary with encode/decode. Build it with Tokenizer.from_metadata(meta)."""

    def __init__(self, meta: dict):
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise PyllmError("the model file has no tokenizer (tokenizer.ggml.model is missing)")
        if model not in ("llama", "gpt2"):
            raise PyllmError(f"unsupported tokenizer type {model!r} (tokenizer.ggml.model); only 'llama' "
                             "(SentencePiece) and 'gpt2' (byte-level BPE) are supported")
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None or len(tokens) == 0:
            raise PyllmError("the model file has no vocabulary (tokenizer.ggml.tokens is missing)")
        self.model = model
        n = len(tokens)
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        types = meta.get("tokenizer.ggml.token_type")
        if types is not None and len(types) != n:
            raise PyllmError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        self.types = [int(t) for t in np.asarray(types).tolist()] if types is not None else [TOKEN_NORMAL] * n
        scores = meta.get("tokenizer.ggml.scores")
        self.scores = [float(s) for s in np.asarray(scores).tolist()] if scores is not None else [0.0] * n
        if len(self.scores) != n:
            raise PyllmError(f"tokenizer.ggml.scores has {len(self.scores)} entries for {n} tokens")
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}  # last one wins, as in llama.cpp

        def special(key, default=None):
            v = meta.get(key)
            if v is None:
                return default
            v = int(v)
            return v if 0 <= v < n else default

        spm = model == "llama"
        self.bos_id = special("tokenizer.ggml.bos_token_id", 1 if spm and n > 1 else None)
        self.eos_id = special("tokenizer.ggml.eos_token_id", 2 if spm and n > 2 else None)
        self.unk_id = special("tokenizer.ggml.unknown_token_id", 0 if spm else None)
        eot_id = special("tokenizer.ggml.eot_token_id")
        eom_id = special("tokenizer.ggml.eom_token_id")

        self.pre = None
        if spm:
            self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            add_bos_default = True
        else:
            self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
            pre = str(meta.get("tokenizer.ggml.pre", "") or "")
            key = PRE_ALIASES.get(pre)
            if key is None:
                print(f"warning: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); using the GPT-2 regex",
                      file=sys.stderr)
                key = "gpt2"
            self.pre = key
            add_bos_default = key in _PRE_ADD_BOS
            self._ignore_merges = key in _PRE_IGNORE_MERGES
            self._pre_patterns = [regex.compile(p) for p in PRE_TOKENIZERS[key]]
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise PyllmError("byte-level BPE tokenizer without merges (tokenizer.ggml.merges is missing)")
            self.ranks = {}
            for i, m in enumerate(merges):
                p = m.find(" ", 1)
                if p < 0:
                    continue
                self.ranks.setdefault((m[:p], m[p + 1:]), i)
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

        # end-of-generation tokens
        eog = set()
        for i in (self.eos_id, eot_id, eom_id, special("tokenizer.ggml.fim_pad_token_id"),
                  special("tokenizer.ggml.fim_rep_token_id"), special("tokenizer.ggml.fim_sep_token_id")):
            if i is not None:
                eog.add(i)
        for text in EOG_TEXTS:
            i = self.token_to_id.get(text)
            if i is not None and self.types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                eog.add(i)
                self.types[i] = TOKEN_CONTROL  # llama.cpp overrides the type of these
        self.eog_ids = frozenset(eog)

        # special tokens split out of the text before tokenizing, longest first
        order = sorted((i for i, t in enumerate(self.types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)),
                       key=lambda i: -len(self.tokens[i].encode("utf-8")))
        self._specials = [(self.tokens[i], i, self.types[i] == TOKEN_USER_DEFINED) for i in order]

        # piece bytes of each token (for decoding), made on first use: all 49k of a BPE
        # vocabulary up front is ~0.1 s of every start
        self._bytes = {}
        # control and unknown tokens: decoded as nothing unless skip_special=False
        self.skipped_ids = frozenset(i for i, t in enumerate(self.types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN))
        self._cache = {}

        if spm:
            # tokens a merge may produce (sentencepiece's pieces: normal, user-defined, unused)
            self._merge_score = {}
            before_space = set()
            for i, (t, ty) in enumerate(zip(self.tokens, self.types)):
                if ty in (TOKEN_NORMAL, TOKEN_USER_DEFINED, TOKEN_UNUSED):
                    self._merge_score[t] = self.scores[i]
                    for j in range(1, len(t)):
                        if t[j] == SPACE:
                            before_space.add(t[j - 1])
            self._byte_ids = []
            for b in range(256):
                i = self.token_to_id.get(f"<0x{b:02X}>")
                if i is None:
                    i = self.token_to_id.get(chr(b)) if b < 128 else None
                self._byte_ids.append(i if i is not None else self.unk_id)
            # No merge can cross a boundary c|▁ when no token contains c▁, so the text is cut
            # there into words that are tokenized (and cached) on their own: exactly the same result.
            cls = "".join(regex.escape(c) for c in sorted(before_space | {SPACE}))
            self._spm_split = regex.compile(f"(?<=[^{cls}])(?={SPACE})")

    @classmethod
    def from_metadata(cls, meta: dict) -> "Tokenizer":
        return cls(meta)

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id]

    def is_control(self, token_id: int) -> bool:
        return 0 <= token_id < len(self.types) and self.types[token_id] == TOKEN_CONTROL

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes the token stands for (b"" for control and unknown tokens)."""
        b = self._bytes.get(token_id)
        if b is None:
            b = self._bytes[token_id] = self._piece_bytes(token_id)
        return b

    def _piece_bytes(self, i: int) -> bytes:
        t, ty = self.tokens[i], self.types[i]
        if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            return b""
        if ty == TOKEN_USER_DEFINED:
            return t.encode("utf-8")
        if self.model == "llama":
            if ty == TOKEN_BYTE or (len(t) == 6 and t.startswith("<0x") and t.endswith(">") and ty == TOKEN_NORMAL
                                    and self._is_hex(t[3:5])):
                return bytes([int(t[3:5], 16)])
            return t.replace(SPACE, " ").encode("utf-8")
        u = t.translate(_GPT2_TO_LATIN1)
        if not u or max(u) < "\u0100":
            return u.encode("latin-1")
        out = bytearray()
        for c in t:
            b = CHAR_TO_BYTE.get(c)
            if b is None:
                out += c.encode("utf-8")
            else:
                out.append(b)
        return bytes(out)

    @staticmethod
    def _is_hex(s: str) -> bool:
        return all(c in "0123456789ABCDEFabcdef" for c in s)

    # --- encoding -----------------------------------------------------------------------------
    def encode(self, text: str, add_bos=None, add_eos=None, parse_special: bool = True) -> list:
        """Token ids of text; add_bos/add_eos None means the model's default."""
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        out = []
        if add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        prev_special = True
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            elif self.model == "llama":
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._encode_spm(frag.replace(" ", SPACE), out)
                prev_special = False
            else:
                self._encode_bpe(frag, out)
        if add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list:
        """text -> list of str fragments and int special-token ids (tokenizer_st_partition)."""
        frags = [text] if text else []
        for tok, tid, user_defined in self._specials:
            if not parse_special and not user_defined:
                continue
            if not any(isinstance(f, str) and tok in f for f in frags):
                continue
            new = []
            for f in frags:
                if isinstance(f, str) and tok in f:
                    parts = f.split(tok)
                    for k, p in enumerate(parts):
                        if k:
                            new.append(tid)
                        if p:
                            new.append(p)
                else:
                    new.append(f)
            frags = new
        return frags

    # SentencePiece BPE
    def _encode_words(self, words, encode_word, out: list) -> None:
        """Append the ids of each word, remembering words already seen (text repeats them)."""
        cache = self._cache
        for word in words:
            ids = cache.get(word)
            if ids is None:
                ids = encode_word(word)
                if len(cache) < 500_000:
                    cache[word] = ids
            out.extend(ids)

    def _encode_spm(self, text: str, out: list) -> None:
        self._encode_words(self._spm_split.split(text), self._spm_word, out)

    def _spm_word(self, text: str) -> tuple:
        scores = self._merge_score

        def priority(a, b):  # the higher the merged token's score, the earlier
            sc = scores.get(a + b)
            return None if sc is None else -sc

        syms = _merge(list(text), priority)
        ids = []
        t2i = self.token_to_id
        for s in syms:
            if not s:
                continue
            i = t2i.get(s) if s in scores else None
            if i is not None:
                ids.append(i)
            else:
                for b in s.encode("utf-8"):
                    bi = self._byte_ids[b]
                    if bi is not None:
                        ids.append(bi)
        return tuple(ids)

    # byte-level BPE
    def _encode_bpe(self, text: str, out: list) -> None:
        self._encode_words(_split_regexes(text, self._pre_patterns), self._bpe_word, out)

    def _bpe_word(self, word: str) -> tuple:
        mapped = word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_GPT2)
        t2i = self.token_to_id
        if self._ignore_merges:
            i = t2i.get(mapped)
            if i is not None:
                return (i,)
        ranks = self.ranks
        syms = _merge(list(mapped), lambda a, b: ranks.get((a, b)))
        ids = []
        for s in syms:
            if not s:
                continue
            i = t2i.get(s)
            if i is not None:
                ids.append(i)
            else:  # not in the vocabulary: one token per character (byte), as llama.cpp
                for c in s:
                    ci = t2i.get(c)
                    if ci is not None:
                        ids.append(ci)
                    elif self.unk_id is not None:
                        ids.append(self.unk_id)
        return tuple(ids)

    # --- decoding -----------------------------------------------------------------------------
    def _strips_after_bos(self) -> bool:
        return self.model == "llama" and self.add_space_prefix and self.bos_id is not None

    def decode_bytes(self, ids, skip_special: bool = True) -> bytes:
        ids = [int(i) for i in ids]
        parts = []
        for k, i in enumerate(ids):
            if not skip_special and i in self.skipped_ids:
                b = self.tokens[i].encode("utf-8")
            else:
                b = self.token_bytes(i)
            if k == 1 and skip_special and ids[0] == self.bos_id and self._strips_after_bos() and b.startswith(b" "):
                b = b[1:]
            parts.append(b)
        return b"".join(parts)

    def decode(self, ids, skip_special: bool = True) -> str:
        """The text of ids (invalid UTF-8 becomes U+FFFD)."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")


class IncrementalDecoder:
    """Streams text token by token, never emitting half a UTF-8 character.

    The concatenation of all add() results and flush() equals tokenizer.decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._n = 0
        self._first_is_bos = False

    def add(self, token_id: int) -> str:
        tok = self.tokenizer
        token_id = int(token_id)
        if not self.skip_special and token_id in tok.skipped_ids:
            b = tok.tokens[token_id].encode("utf-8")
        else:
            b = tok.token_bytes(token_id)
        if self._n == 0:
            self._first_is_bos = token_id == tok.bos_id
        elif (self._n == 1 and self._first_is_bos and self.skip_special and tok._strips_after_bos()
              and b.startswith(b" ")):
            b = b[1:]
        self._n += 1
        return self._utf8.decode(b) if b else ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
