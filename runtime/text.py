"""Text in, text out: chat template, stop tokens and strings, Hermes tool calls.

Text is released only when it is final: never a stop string or the text after
it, never half of a multi-byte character, never the text of a stop or special
token.
"""

import functools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    SPMStreamingDetokenizer,
    StreamingDetokenizer,
    TokenizerWrapper,
    _is_bpe_decoder,
    _is_spm_decoder,
    _is_spm_decoder_no_space,
)

from ..train.tokenizer import CHATML_TEMPLATE
from .decode import decode
from .sampling import TokenLogprob
from .stats import Stats, Step

Prompt = str | Sequence[dict]
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
CHAT_END = "<|im_end|>"


@dataclass
class TextChunk:
    """New final text, the tokens decoded since the previous chunk, and the stats so far.

    ``finish_reason`` is set on the last chunk only: "stop" (a stop token or
    string) or "length".
    """

    text: str
    tokens: list[int]
    stats: Stats
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # of the tokens but stop tokens, when asked for


def encode_prompt(tokenizer, prompt: Prompt, *, chat: bool, tools=None) -> list[int]:
    """Token ids of a plain prompt, or of chat messages rendered by the chat template.

    A string with ``chat`` is one user message. The tokenizer's own template is
    used; a tokenizer without one gets ChatML.
    """
    if not chat:
        if not isinstance(prompt, str) or tools:
            raise ValueError("chat messages and tools need chat=True; a plain prompt is a string.")
        return tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not messages:
        raise ValueError("messages is empty; give at least one chat message.")
    template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False, chat_template=template
    )
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(tokenizer) -> set[int]:
    """The tokenizer's end-of-sequence ids and ``<|im_end|>``."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    chat_end = tokenizer.get_vocab().get(CHAT_END)
    if chat_end is not None:
        ids.add(chat_end)
    return ids


def special_token_ids(tokenizer) -> set[int]:
    """Ids that are never text: the special tokens and any added token marked special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become the start of a stop string."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held


@functools.lru_cache(maxsize=4)
def _wrapped(tokenizer) -> TokenizerWrapper:
    """A plain HF tokenizer with the streaming detokenizer mlx-lm's ``load`` would give it.

    Cached because building a detokenizer maps the whole vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend else None
    if _is_spm_decoder(decoder):
        detokenizer = SPMStreamingDetokenizer
    elif _is_spm_decoder_no_space(decoder):
        detokenizer = functools.partial(SPMStreamingDetokenizer, trim_space=False)
    elif _is_bpe_decoder(decoder):
        detokenizer = BPEStreamingDetokenizer
    else:
        detokenizer = NaiveStreamingDetokenizer
    return TokenizerWrapper(tokenizer, detokenizer)


def _as_wrapper(tokenizer) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else _wrapped(tokenizer)


def _keep_space(text: str) -> str:
    return text


def streaming_detokenizer(tokenizer) -> StreamingDetokenizer:
    """A fresh detokenizer: text in time linear in the tokens, where ``decode`` is quadratic.

    mlx-lm's byte-level one drops the first space of the text; ``decode`` keeps
    it, and so does this one.
    """
    detokenizer = _as_wrapper(tokenizer).detokenizer
    if isinstance(detokenizer, BPEStreamingDetokenizer):
        detokenizer._maybe_trim_space = _keep_space
    return detokenizer


class TextStream:
    """The text of one request, made from its decoding steps one at a time.

    The caller decodes with ``stop_ids`` and feeds each step; this class owns no
    decoder, so a batched engine can drive one per row. ``finished`` is set by
    the chunk that ends the text; ``stopped_by_string`` says a stop string ended
    it, which the decoder does not know: the caller stops that row. The work per
    step does not grow with the text: tokens go through a streaming detokenizer
    (which also holds back half characters) and stop strings are looked for in
    the unsent text only.
    """

    def __init__(self, tokenizer, *, stop: Sequence[str] = (), stop_ids: Iterable[int] = ()):
        tokenizer = _as_wrapper(tokenizer)
        self.stop_ids = frozenset(stop_token_ids(tokenizer) | {int(t) for t in stop_ids})
        self._stops = [s for s in stop if s]
        self._skip = self.stop_ids | special_token_ids(tokenizer)  # never text
        self._vocab_size = len(tokenizer)  # a model's vocabulary may be padded past it
        self._detokenizer = streaming_detokenizer(tokenizer)
        self._unsent = ""  # final text held back because it may start a stop string
        self._tokens: list[int] = []  # tokens since the last chunk
        self._logprobs: list[TokenLogprob] | None = None  # theirs, stop tokens left out
        self.finished = False
        self.stopped_by_string = False

    def feed(self, step: Step) -> TextChunk | None:
        """The new final text after ``step``, or None while there is none and the run goes on.

        The chunk that ends the text has ``finish_reason`` set; a stop string
        ends it with "stop", also in ``step.stats``.
        """
        if self.finished:
            raise RuntimeError("this request's text has ended; feed no more steps.")
        self._tokens += step.tokens
        if step.logprobs is not None:
            kept = [entry for entry in step.logprobs if entry.token not in self.stop_ids]
            self._logprobs = (self._logprobs or []) + kept
        for token in step.tokens:
            if token not in self._skip and token < self._vocab_size:
                self._detokenizer.add_token(token)
        if step.stats.finish_reason:
            self._detokenizer.finalize()
        text = self._unsent + self._detokenizer.last_segment
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped_by_string = True
            step.stats.finish_reason = "stop"
            end = min(hits)
        elif step.stats.finish_reason:
            end = len(text)
        else:
            end = len(text) - held_back(text, self._stops)
        self.finished = step.stats.finish_reason is not None
        if not end and not self.finished:
            self._unsent = text
            return None
        self._unsent = text[end:]
        chunk = TextChunk(
            text[:end], self._tokens, step.stats, step.stats.finish_reason, self._logprobs
        )
        self._tokens, self._logprobs = [], None
        return chunk


def stream_text(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    tools: list[dict] | None = None,
    stop: Sequence[str] = (),
    chat: bool,
    **decode_kwargs,
) -> Iterator[TextChunk]:
    """Generate text after ``prompt``; keyword arguments as ``decode``.

    Decoding stops at the tokenizer's stop tokens (and any ``stop_ids`` given),
    and at the first of the ``stop`` strings, which is not part of the text.
    """
    stream = TextStream(tokenizer, stop=stop, stop_ids=decode_kwargs.pop("stop_ids", ()))
    ids = encode_prompt(tokenizer, prompt, chat=chat, tools=tools)
    steps = decode(model, ids, stop_ids=stream.stop_ids, **decode_kwargs)
    with closing(steps):
        for step in steps:
            chunk = stream.feed(step)
            if stream.finished:  # hand the state to the prefix cache before the caller sees the end
                steps.close()
                yield chunk
                return
            if chunk:
                yield chunk


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Split Hermes ``<tool_call>{json}</tool_call>`` blocks from the content.

    Returns the content without the calls (stripped) and the calls as
    ``{"name": str, "arguments": dict | str}``. A block that is not JSON with a
    name stays in the content.
    """
    calls = []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return match.group(0)
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
        return ""

    content = TOOL_CALL.sub(take, text)
    return content.strip(), calls
