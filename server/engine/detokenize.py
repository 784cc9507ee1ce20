"""Incremental detokenization with stop sequences: what text is final and safe to stream.

A completion's text is what decoding its whole token list gives. Re-decoding the whole list
every step costs O(length) per token, O(length^2) per request: at batch 32, 512 tokens in, it
was 1.6 ms of host time per decode step. So, as vLLM and TGI do, each step decodes only a short
window: the tokens since the last point where the text was complete (`_prefix`..) with and
without the newest ones, and appends the difference. Decoding the window's first tokens twice,
in both decodes, keeps what a decoder does at the start of a sequence (SentencePiece strips the
first token's leading space) out of the difference; an incomplete multi-byte character (a
trailing U+FFFD) keeps the window open until a later token completes it. The deltas add up to
the whole decode exactly for the tokenizers' own decoders (tested on byte-level BPE and a
SentencePiece-style Metaspace decoder, with special tokens and broken UTF-8); a tokenizer that
post-processes the joined text (transformers' clean_up_tokenization_spaces) or has no fast
backend is decoded whole, as before.

Two things are held back from what is streamed: a trailing replacement character (an
incomplete multi-byte character) and any tail that could still become a stop sequence.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Decode = Callable[[list[int]], str]

SINGLE_TOKENS_KEPT = 1 << 18
"""At most this many single-token decodes are remembered per tokenizer (every id of a 256k
vocabulary; tens of MB at most)."""


class WindowDecoder:
    """A fast tokenizer's backend decode of a token list (special tokens skipped), with the
    decode of each single token remembered.

    At almost every step a window's older part is the one token the previous step completed,
    and a one-token list decodes the same wherever it stands (a function of its id alone): one
    backend call per row and step instead of two. One per tokenizer, shared by its requests
    (the engine thread's; a dict read or write is atomic for other threads anyway)."""

    def __init__(self, backend: Tokenizer) -> None:
        self._decode: Decode = functools.partial(backend.decode, skip_special_tokens=True)
        self._single: dict[int, str] = {}

    def __call__(self, token_ids: list[int]) -> str:
        return self._decode(token_ids)

    def one(self, token_id: int) -> str:
        """decode([token_id])."""
        text = self._single.get(token_id)
        if text is None:
            text = self._decode([token_id])
            if len(self._single) < SINGLE_TOKENS_KEPT:
                self._single[token_id] = text
        return text


_decoders: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, WindowDecoder] = (
    weakref.WeakKeyDictionary()
)


def windowed_decoder(tokenizer: PreTrainedTokenizerBase) -> WindowDecoder | None:
    """The tokenizer's decoder of token lists (special tokens skipped) where decoding a window
    is sound, else None; the same one for every call with the same tokenizer.

    transformers' fast decode is the backend's decode followed, only when the tokenizer sets
    clean_up_tokenization_spaces, by a text clean-up (in every version pyproject admits); the
    backend is called directly, which also skips transformers' per-call argument conversion.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    decoder = _decoders.get(tokenizer)
    if decoder is None:
        decoder = _decoders[tokenizer] = WindowDecoder(backend)
    return decoder


@dataclass
class TextState:
    """The text side of one sequence. `update` takes the completion's token ids so far, each
    call's list extending the previous one's (the engine appends); a list that does not is
    decoded afresh."""

    tokenizer: PreTrainedTokenizerBase
    stop: tuple[str, ...]
    text: str = ""
    """The whole completion text so far (cut before a matched stop sequence)."""
    sent: int = 0
    """How many characters of `text` were already streamed."""
    stopped: bool = False
    _windowed: WindowDecoder | None = field(default=None, init=False, repr=False)
    _seen: list[int] = field(default_factory=list, init=False, repr=False)
    """The token id list of the previous update (the caller's own list: the engine passes the
    same list every step, appended to, so checking it costs nothing)."""
    _seen_len: int = field(default=0, init=False, repr=False)
    _prefix: int = field(default=0, init=False, repr=False)
    """First token of the decode window."""
    _read: int = field(default=0, init=False, repr=False)
    """Tokens whose text is complete in `_final` (the window's older part ends here)."""
    _final: str = field(default="", init=False, repr=False)
    """Text of the first `_read` tokens: never changes again."""

    def __post_init__(self) -> None:
        self._windowed = windowed_decoder(self.tokenizer)
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    def update(self, token_ids: list[int]) -> str:
        """Decodes the completion `token_ids`; returns the new text that is safe to stream."""
        if self._windowed is None:
            text, unchanged = self.tokenizer.decode(token_ids, skip_special_tokens=True), 0
        else:
            text, unchanged = self._decode_window(token_ids, self._windowed)
        safe = len(text)
        if self.stop:
            # A stop sequence not found before must end in the text that may have changed.
            cut = self._first_stop(text, max(0, unchanged - self._longest_stop + 1))
            if cut is not None:
                self.text = text[:cut]
                self.stopped = True
                return self.flush()
            safe -= self._stop_prefix_len(text)
        self.text = text
        if text.endswith("\ufffd"):
            safe = min(safe, len(text.rstrip("\ufffd")))
        if safe <= self.sent:
            return ""
        delta = text[self.sent : safe]
        self.sent = safe
        return delta

    def flush(self) -> str:
        """Everything not yet streamed (at the end of the sequence)."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def _decode_window(self, token_ids: list[int], decode: WindowDecoder) -> tuple[str, int]:
        """(The whole completion's text, how many of its leading characters were final before
        this call), decoding only the window."""
        if not self._extends_previous(token_ids):
            self._prefix = self._read = 0
            self._final = ""
        self._seen, self._seen_len = token_ids, len(token_ids)
        unchanged = len(self._final)
        if self._read - self._prefix == 1:
            older = decode.one(token_ids[self._prefix])
        else:
            older = decode(token_ids[self._prefix : self._read])
        newer = decode(token_ids[self._prefix :])
        if not newer.startswith(older):
            # The window's text is not its older part's plus more (no decoder we know does
            # this): decode whole, and let the window start over from the first token.
            self._prefix = self._read = 0
            self._final = ""
            return decode(token_ids), 0
        added = newer[len(older) :]
        if added and not added.endswith("\ufffd"):
            self._final += added
            self._prefix, self._read = self._read, len(token_ids)
            return self._final, unchanged
        return self._final + added, unchanged

    def _extends_previous(self, token_ids: list[int]) -> bool:
        seen = self._seen_len
        if len(token_ids) < seen:
            return False
        # The same list, appended to (the engine's case: nothing to compare), or an equal start.
        return token_ids is self._seen or token_ids[:seen] == self._seen[:seen]

    def _first_stop(self, text: str, start: int) -> int | None:
        positions = [i for i in (text.find(s, start) for s in self.stop if s) if i >= 0]
        return min(positions) if positions else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop sequence."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
