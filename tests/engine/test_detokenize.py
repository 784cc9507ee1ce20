"""Unit tests for server.engine.detokenize.TextState with the embedded byte-level BPE tokenizer.

Tokens are fed one at a time, as the engine does. What is streamed must never be taken back:
incomplete multi-byte characters and tails that could still become a stop sequence are held back,
and the deltas plus the final flush always add up to the final text.
"""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from loraserve.server.engine.detokenize import TextState
from loraserve.testing.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    return list(ids)


def _stream(state: TextState, ids: list[int]) -> list[str]:
    """Feeds the completion one token at a time (stopping when it stops); returns the deltas."""
    deltas = []
    for n in range(1, len(ids) + 1):
        deltas.append(state.update(ids[:n]))
        if state.stopped:
            break
    return deltas


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "café au lait, naïve façade",
        "I like 😀 a lot 日本語 — ok",
        "",
    ],
)
def test_streaming_deltas_concatenate_to_the_final_text(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    state = TextState(tokenizer, stop=())
    ids = _ids(tokenizer, text)
    deltas = _stream(state, ids)
    tail = state.flush()
    assert "".join(deltas) + tail == text
    assert state.text == text
    assert not state.stopped
    assert all("\ufffd" not in d for d in deltas), deltas
    assert state.flush() == "", "a second flush must not repeat text"


@pytest.mark.parametrize(("prefix", "char"), [("caf", "é"), ("I like ", "😀"), ("x", "日")])
def test_multibyte_character_is_held_back_until_complete(
    tokenizer: PreTrainedTokenizerBase, prefix: str, char: str
) -> None:
    prefix_ids = _ids(tokenizer, prefix)
    char_ids = _ids(tokenizer, char)
    assert len(char_ids) >= 2, f"{char!r} should be split into several byte tokens"
    state = TextState(tokenizer, stop=())
    assert "".join(_stream(state, prefix_ids)) == prefix
    ids = list(prefix_ids)
    for token in char_ids[:-1]:
        ids.append(token)
        assert state.update(ids) == "", "a partial character must not be streamed"
        assert state.text.endswith("\ufffd")
    ids.append(char_ids[-1])
    assert state.update(ids) == char
    assert state.flush() == ""


def test_special_tokens_are_not_part_of_the_text(tokenizer: PreTrainedTokenizerBase) -> None:
    state = TextState(tokenizer, stop=())
    ids = [*_ids(tokenizer, "Hello"), tokenizer.eos_token_id]
    assert "".join(_stream(state, ids)) + state.flush() == "Hello"


def test_stop_sequence_cuts_the_text_before_it(tokenizer: PreTrainedTokenizerBase) -> None:
    state = TextState(tokenizer, stop=("world",))
    ids = _ids(tokenizer, "Hello world. Bye")
    deltas = _stream(state, ids)
    assert state.stopped
    assert state.text == "Hello "
    assert "".join(deltas) + state.flush() == "Hello "
    assert all("w" not in d for d in deltas), "no part of the stop sequence may be streamed"


def test_earliest_of_several_stop_sequences_wins(tokenizer: PreTrainedTokenizerBase) -> None:
    state = TextState(tokenizer, stop=("Bye", "."))
    # Both are present in one update: the text before the first one is returned at once.
    assert state.update(_ids(tokenizer, "Hello world. Bye now")) == "Hello world"
    assert state.stopped
    assert state.text == "Hello world"
    assert state.flush() == ""


def test_possible_stop_prefix_is_held_back_then_released(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    state = TextState(tokenizer, stop=("world",))
    assert state.update(_ids(tokenizer, "I am")) == "I am"
    assert state.update(_ids(tokenizer, "I am w")) == " ", "'w' could start 'world'"
    assert state.update(_ids(tokenizer, "I am wor")) == ""
    assert state.update(_ids(tokenizer, "I am won")) == "won", "'won' is not 'world'"
    assert not state.stopped
    assert state.flush() == ""


def test_stop_prefix_is_held_against_the_longest_matching_stop(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    state = TextState(tokenizer, stop=("END!", "ab", "D!x"))
    assert state.update(_ids(tokenizer, "The end EN")) == "The end "
    assert state.update(_ids(tokenizer, "The end END")) == ""  # "END" and "D" both pending
    assert state.update(_ids(tokenizer, "The end END.")) == "END."
    assert not state.stopped


def test_flush_returns_the_held_back_tail(tokenizer: PreTrainedTokenizerBase) -> None:
    state = TextState(tokenizer, stop=("world",))
    deltas = _stream(state, _ids(tokenizer, "Hello wor"))
    assert "".join(deltas) == "Hello "
    assert state.flush() == "wor"
    assert state.flush() == ""
    assert state.text == "Hello wor"


def test_flush_releases_an_incomplete_character_at_the_end(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    state = TextState(tokenizer, stop=())
    ids = [*_ids(tokenizer, "caf"), _ids(tokenizer, "é")[0]]
    assert "".join(_stream(state, ids)) == "caf"
    assert state.flush() == "\ufffd"


def test_stop_sequence_with_a_multibyte_character(tokenizer: PreTrainedTokenizerBase) -> None:
    state = TextState(tokenizer, stop=("é",))
    deltas = _stream(state, _ids(tokenizer, "café au lait"))
    assert state.stopped
    assert state.text == "caf"
    assert "".join(deltas) + state.flush() == "caf"


def test_stop_sequence_spanning_many_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    state = TextState(tokenizer, stop=("over the lazy",))
    deltas = _stream(state, _ids(tokenizer, text))
    assert state.stopped
    assert state.text == "The quick brown fox jumps "
    streamed = "".join(deltas)
    assert streamed + state.flush() == state.text
    assert "over" not in streamed
