"""Incremental detokenization with stop sequences: what text is final and safe to stream.

Text is re-decoded from the whole completion each step (completions are bounded, and byte-level
BPE can only be decoded correctly as a whole), then two things are held back: a trailing
replacement character (an incomplete multi-byte character) and any tail that could still become
a stop sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass
class TextState:
    """The text side of one sequence."""

    tokenizer: PreTrainedTokenizerBase
    stop: tuple[str, ...]
    text: str = ""
    """The whole completion text so far (cut before a matched stop sequence)."""
    sent: int = 0
    """How many characters of `text` were already streamed."""
    stopped: bool = False

    def update(self, token_ids: list[int]) -> str:
        """Re-decodes the completion `token_ids`; returns the new text that is safe to stream."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.text = text[:cut]
            self.stopped = True
            return self.flush()
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        safe = min(safe, len(text) - self._stop_prefix_len(text))
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

    def _first_stop(self, text: str) -> int | None:
        positions = [i for i in (text.find(s) for s in self.stop if s) if i >= 0]
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
