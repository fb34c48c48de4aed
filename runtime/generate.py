"""Text generation: generate_step (token ids), stream_generate (text pieces), generate."""

import time
from dataclasses import dataclass, fields
from typing import Iterator

from pyllm.base import PyllmError
from pyllm.runtime.sampling import Sampler
from pyllm.runtime.tokenizer import IncrementalDecoder

SAMPLING_KEYWORDS = frozenset(f.name for f in fields(Sampler) if f.init)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_tokens: int = 0  # tokens sampled and evaluated after the prompt
    decode_s: float = 0.0
    completion_tokens: int = 0  # tokens sampled and yielded (the last one may not be evaluated)
    stop_reason: str = ""  # "eog", "length" or "context"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def generate_step(model, ids, sampler: Sampler, max_tokens: int, stats: GenerationStats | None = None,
                  ignore_eos: bool = False, stop_ids=None) -> Iterator[int]:
    """Evaluate ids on top of the cache, then yield up to max_tokens sampled tokens.

    A token is yielded as soon as it is sampled and evaluated when the next one is asked
    for, so a consumer that stops early (break, close()) leaves its last token out of the
    cache, and the last of max_tokens is never evaluated (llama.cpp counts the same way:
    n tokens, n - 1 evaluations). Stops before a token of stop_ids (default: the
    tokenizer's end-of-generation tokens; not yielded, not evaluated) unless ignore_eos,
    and when the context has no room for another token.
    """
    stats = stats if stats is not None else GenerationStats()
    t0 = time.perf_counter()
    logits = model.eval(ids)
    stats.prompt_tokens += len(ids)
    stats.prompt_s += time.perf_counter() - t0
    if ignore_eos:
        stop_ids = frozenset()
    elif stop_ids is None:
        stop_ids = model.tokenizer.eog_ids
    stats.stop_reason = "length"
    for i in range(max_tokens):
        token = sampler.sample(logits, model.tokens)
        if token in stop_ids:
            stats.stop_reason = "eog"
            return
        if len(model.tokens) >= model.n_ctx:
            stats.stop_reason = "context"
            return
        stats.completion_tokens += 1
        yield token
        if i + 1 == max_tokens:
            return
        t0 = time.perf_counter()
        logits = model.eval([token])
        stats.decode_s += time.perf_counter() - t0
        stats.decode_tokens += 1


def prompt_ids(model, prompt) -> list:
    """Token ids for a prompt: a string (BOS added as the model wants) or a list of ids.

    An empty prompt starts from BOS alone.
    """
    if isinstance(prompt, str):
        tok = model.tokenizer
        ids = tok.encode(prompt) if prompt else []
        if not ids:
            if tok.bos_id is None:
                raise PyllmError("empty prompt and the model has no BOS token to start from")
            ids = [tok.bos_id]
    else:
        ids = [int(i) for i in prompt]
    if len(ids) >= model.n_ctx:
        raise PyllmError(f"prompt is {len(ids)} tokens, longer than the context size {model.n_ctx} (raise -c)")
    return ids


def stream_generate(model, prompt, max_tokens: int = 256, stats: GenerationStats | None = None,
                    ignore_eos: bool = False, sampler: Sampler | None = None, **sampling) -> Iterator[str]:
    """Yield the generated text piece by piece (never half a UTF-8 character).

    sampling: the Sampler fields (temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
    frequency_penalty, presence_penalty, seed); or sampler, a Sampler whose random state
    carries on from call to call. The KV cache is reused for any prefix the prompt shares
    with what the model evaluated last.
    """
    sampler = make_sampler(sampler, sampling)
    ids = prompt_ids(model, prompt)
    todo = model.reuse_prefix(ids)
    decoder = IncrementalDecoder(model.tokenizer)
    if ids == [model.tokenizer.bos_id]:
        # Text generated from BOS alone starts a document: like sentencepiece (and
        # llama2.c), drop the space prefix of its first word.
        decoder.add(ids[0])
    for token in generate_step(model, todo, sampler, max_tokens, stats, ignore_eos):
        piece = decoder.add(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def make_sampler(sampler: Sampler | None, sampling: dict) -> Sampler:
    """The Sampler a call draws with: the one given, or one made from the sampling keywords
    (unknown keywords are a one-line error naming the known ones)."""
    if sampler is not None:
        if sampling:
            raise PyllmError(f"give either sampler= or sampling keywords, not both (got {', '.join(sampling)})")
        return sampler
    unknown = sorted(set(sampling) - SAMPLING_KEYWORDS)
    if unknown:
        raise PyllmError(f"unknown sampling keyword {unknown[0]!r}; known: {', '.join(sorted(SAMPLING_KEYWORDS))}")
    return Sampler(**sampling)


def generate(model, prompt, max_tokens: int = 256, **kwargs) -> str:
    """The generated text as one string; arguments as stream_generate."""
    return "".join(stream_generate(model, prompt, max_tokens, **kwargs))
