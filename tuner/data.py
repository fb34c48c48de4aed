"""Training data: jsonl records -> token ids with a loss mask -> padded batches.

One JSON object per line, in one of three forms (blank lines are skipped):

    {"text": "..."}                              every token is a target; EOS appended
    {"prompt": "...", "completion": "..."}       EOS appended; --mask-prompt: only the completion
    {"messages": [{"role": ..., "content": ...}, ...]}
        rendered with the model's chat template; --mask-prompt: only the assistant turns'
        content and end-of-turn are targets (system and user turns, the template's
        role headers and the whitespace between turns are not).

A record is tokenized whole; a prompt/completion or turn boundary becomes a token index
as the longest common prefix of the whole text's tokens and the tokens of the text before
the boundary (so a token that straddles the boundary is counted on the target side).
Every problem is reported as `FILE:LINE: what is wrong`, before anything is trained.

Batches: the examples are read in a fixed random order per epoch (from the seed and the
epoch number), global batch after global batch; micro-batch m of step s holds examples
(s * grad_accum + m) * batch_size ... of that stream. With several ranks, each takes every
size-th example of each micro-batch, so the global batch is the same however many
processes share it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyllm.base import PyllmError


@dataclass
class Example:
    ids: list  # token ids
    loss: list  # loss[j]: whether ids[j] is a target (ids[0] never is: nothing predicts it)
    line: int  # 1-based line in the data file


@dataclass
class Batch:
    """B sequences padded to T positions. Position t predicts targets[:, t]; mask says which
    targets are in the loss (not prompt, not padding). keys: each sequence's index in the
    data stream (seeds its dropout masks)."""

    inputs: np.ndarray  # (B, T) int64
    targets: np.ndarray  # (B, T) int64
    mask: np.ndarray  # (B, T) bool
    keys: tuple
    lengths: tuple = ()  # real (not padding) positions of each sequence

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def n_inputs(self) -> int:
        return int(sum(self.lengths)) if self.lengths else self.inputs.size

    def split(self, n: int) -> list:
        """At most n batches of whole sequences with about equal tokens (longest first to
        the lightest), each cut to its own longest sequence."""
        lengths = self.lengths or (self.inputs.shape[1],) * len(self.keys)
        n = max(1, min(n, len(self.keys)))
        if n == 1:
            return [self]
        groups, load = [[] for _ in range(n)], [0] * n
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            g = load.index(min(load))
            groups[g].append(i)
            load[g] += lengths[i]
        out = []
        for rows in groups:
            rows = sorted(rows)
            T = max(lengths[i] for i in rows)
            out.append(Batch(self.inputs[rows, :T], self.targets[rows, :T], self.mask[rows, :T],
                             tuple(self.keys[i] for i in rows), tuple(lengths[i] for i in rows)))
        return out


# -- records -> examples -------------------------------------------------------------------


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Encoder:
    """Turns records into Examples with one tokenizer and (for messages) chat template."""

    def __init__(self, tokenizer, template=None, mask_prompt: bool = False):
        self.tok, self.template, self.mask_prompt = tokenizer, template, mask_prompt

    def _encode(self, text: str) -> list:
        return list(self.tok.encode(text, parse_special=True))

    def _with_eos(self, ids: list) -> list:
        eos = self.tok.eos_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def text(self, text: str) -> tuple:
        ids = self._with_eos(self._encode(text))
        return ids, [True] * len(ids)

    def prompt_completion(self, prompt: str, completion: str) -> tuple:
        ids = self._with_eos(self._encode(prompt + completion))
        start = _common_prefix(self._encode(prompt), ids) if self.mask_prompt else 0
        return ids, [j >= start for j in range(len(ids))]

    def messages(self, messages: list) -> tuple:
        from pyllm.runtime.chat_template import encode_rendered

        if self.template is None:
            raise PyllmError("a messages record needs a chat template (the model has none; use --chat-template)")
        text = self.template.render(messages, add_generation_prompt=False)
        ids = encode_rendered(self.tok, text)
        if not self.mask_prompt:
            return ids, [True] * len(ids)
        loss = [False] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.template.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.template.render(messages[: i + 1], add_generation_prompt=False)
            if not (text.startswith(upto) and upto.startswith(before)):
                raise PyllmError("the chat template does not render the conversation turn by turn; "
                                 "--mask-prompt cannot find the assistant turns")
            end = len(upto.rstrip())  # the turn's content and end-of-turn, not the blank after it
            first = _common_prefix(encode_rendered(self.tok, before), ids) if before else 0
            last = _common_prefix(encode_rendered(self.tok, text[:end]), ids)
            for j in range(first, last):
                loss[j] = True
        return ids, loss

    def record(self, rec) -> tuple:
        """(ids, loss) of one parsed JSON record; PyllmError when its shape is wrong."""
        if not isinstance(rec, dict):
            raise PyllmError(f"expected a JSON object, got {type(rec).__name__}")
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise PyllmError('"messages" must be a non-empty list of {"role": str, "content": str}')
            if not any(m["role"] == "assistant" for m in msgs):
                raise PyllmError('"messages" has no assistant turn to learn from')
            return self.messages(msgs)
        if "prompt" in rec or "completion" in rec:
            p, c = rec.get("prompt"), rec.get("completion")
            if not isinstance(p, str) or not isinstance(c, str):
                raise PyllmError('"prompt" and "completion" must both be strings')
            return self.prompt_completion(p, c)
        if "text" in rec:
            if not isinstance(rec["text"], str):
                raise PyllmError('"text" must be a string')
            return self.text(rec["text"])
        keys = ", ".join(repr(k) for k in list(rec)[:5]) or "none"
        raise PyllmError(f'expected "text", "prompt"/"completion" or "messages", found keys {keys}')


def load_jsonl(path, encoder: Encoder, seq_len: int) -> list:
    """All examples of a jsonl file, validated: one-line errors naming the file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PyllmError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise PyllmError(f"data file {path} is a directory") from None
    except OSError as e:
        raise PyllmError(f"cannot read data file {path}: {e.strerror}") from None
    examples = []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise PyllmError(f"{where}: not UTF-8 text (is {path.name} a jsonl file?)") from None
        except json.JSONDecodeError as e:
            raise PyllmError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                             "expected one JSON object per line (jsonl)") from None
        try:
            ids, loss = encoder.record(rec)
        except PyllmError as e:
            raise PyllmError(f"{where}: {e}") from None
        if len(ids) > seq_len:
            raise PyllmError(f"{where}: the record is {len(ids)} tokens, longer than --seq-len {seq_len}")
        if not any(loss[1:]):
            raise PyllmError(f"{where}: the record has no token to learn (all masked or too short)")
        examples.append(Example(ids, loss, lineno))
    if not examples:
        raise PyllmError(f"{path}: no records (expected one JSON object per line)")
    return examples


# -- examples -> batches ------------------------------------------------------------------


def make_batch(examples: list, keys) -> Batch:
    """Pad to the longest example; targets are the inputs shifted by one."""
    T = max(len(e.ids) for e in examples) - 1
    inputs = np.zeros((len(examples), T), dtype=np.int64)
    targets = np.zeros((len(examples), T), dtype=np.int64)
    mask = np.zeros((len(examples), T), dtype=bool)
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[i, :n] = e.ids[:-1]
        targets[i, :n] = e.ids[1:]
        mask[i, :n] = e.loss[1:]
    return Batch(inputs, targets, mask, tuple(keys), tuple(len(e.ids) - 1 for e in examples))


class Stream:
    """The training examples in epoch-shuffled order, cut into (micro-)batches."""

    def __init__(self, examples: list, seed: int):
        self.examples, self.seed = examples, seed
        self._perm = {}

    def index(self, k: int) -> int:
        """Which example is k-th in the stream."""
        n = len(self.examples)
        epoch = k // n
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        return int(self._perm[epoch][k % n])

    def micro_batch(self, first: int, size: int, rank: int = 0, world: int = 1) -> Batch | None:
        """This rank's share of stream positions first..first+size-1 (None if it has none)."""
        keys = [k for k in range(first, first + size) if k % world == rank]
        if not keys:
            return None
        return make_batch([self.examples[self.index(k)] for k in keys], keys)


def fixed_batches(examples: list, size: int, rank: int = 0, world: int = 1):
    """Validation: the examples in file order, size at a time, this rank's share of each."""
    for first in range(0, len(examples), size):
        keys = [k for k in range(first, min(len(examples), first + size)) if k % world == rank]
        if keys:
            yield make_batch([examples[k] for k in keys], keys)
