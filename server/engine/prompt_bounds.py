"""How many bytes of text a prompt of at most N tokens can hold, to refuse before tokenizing.

Every token of a tokenizer covers at most `longest_token_bytes` bytes of input text, so a prompt
of more than `max_tokens x longest_token_bytes` bytes encodes to more than `max_tokens` tokens and
cannot fit: it is refused by its length alone, in microseconds, instead of after seconds of
tokenizing a multi-megabyte string.
"""

from __future__ import annotations

from typing import Any

_FALLBACK_TOKEN_BYTES = 64
"""Used when a tokenizer exposes no vocabulary: longer than any token of common tokenizers."""


def longest_token_bytes(tokenizer: Any) -> int:
    """Bytes of input text the longest token of `tokenizer` can stand for, as an upper bound.

    Measured on the vocabulary's token strings in UTF-8, which over-count rather than under-count:
    byte-level BPE spells each byte as one character of 1-2 UTF-8 bytes, SentencePiece spells a
    1-byte space as the 3-byte "▁" and byte fallbacks as "<0xNN>". Added (special) tokens are in
    the vocabulary too.
    """
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return _FALLBACK_TOKEN_BYTES
    longest = max((len(str(token).encode("utf-8")) for token in vocab), default=0)
    return max(longest, 1)
