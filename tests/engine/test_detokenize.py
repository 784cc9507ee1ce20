"""Unit tests for server.engine.detokenize.TextState with the embedded byte-level BPE tokenizer.

Tokens are fed one at a time, as the engine does. What is streamed must never be taken back:
incomplete multi-byte characters and tails that could still become a stop sequence are held back,
and the deltas plus the final flush always add up to the final text.
"""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from loraserve.server.engine import detokenize
from loraserve.server.engine.detokenize import TextState, windowed_decoder
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


# ---- the decode window against decoding the whole completion ---------------------------------


def _sentencepiece_style_tokenizer() -> PreTrainedTokenizerBase:
    """A Llama-2-style tokenizer built offline: SentencePiece BPE (Metaspace), byte-fallback
    tokens and the decoder chain Replace, ByteFallback, Fuse, Strip (the first token's space)."""
    from tokenizers import SentencePieceBPETokenizer, decoders
    from transformers import PreTrainedTokenizerFast

    from loraserve.testing.tiny_model import CORPUS

    trained = SentencePieceBPETokenizer()
    corpus = [CORPUS] if isinstance(CORPUS, str) else list(CORPUS)
    trained.train_from_iterator(
        corpus, vocab_size=300, min_frequency=1, special_tokens=["</s>", "<unk>"]
    )
    backend = trained._tokenizer
    backend.add_tokens([f"<0x{b:02X}>" for b in range(256)])
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", clean_up_tokenization_spaces=False
    )


def _random_completion(tokenizer: PreTrainedTokenizerBase, seed: int, length: int) -> list[int]:
    """Ordinary tokens, single bytes of multi-byte characters (often left incomplete) and the
    end-of-sequence token, mixed at random."""
    import random

    rng = random.Random(seed)
    pieces = ["é", "😀", "日本", " ok", "\n", "world", "."]
    ids: list[int] = []
    while len(ids) < length:
        roll = rng.random()
        if roll < 0.1:
            ids.append(tokenizer.eos_token_id)
        elif roll < 0.4:
            ids.extend(tokenizer(rng.choice(pieces), add_special_tokens=False)["input_ids"])
        elif roll < 0.5:
            ids.append(rng.randrange(len(tokenizer)))  # anything, bytes of broken UTF-8 too
        else:
            ids.append(rng.randrange(3, 300))
    return ids[:length]


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def any_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    if request.param == "byte-level":
        return build_tokenizer()
    return _sentencepiece_style_tokenizer()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("same_list", [True, False])
def test_the_window_gives_the_whole_decode_at_every_step(
    any_tokenizer: PreTrainedTokenizerBase, seed: int, same_list: bool
) -> None:
    """After every token the text is exactly the whole completion decoded, and what is
    streamed is exactly what the whole-decode algorithm streams, stop sequences included."""
    ids = _random_completion(any_tokenizer, seed, 120)
    stop = ("world.", "\n\n", "日本ok") if seed % 2 else ()
    windowed = TextState(any_tokenizer, stop=stop)
    whole = TextState(any_tokenizer, stop=stop)
    whole._windowed = None  # the reference: decode everything every step
    assert windowed._windowed is not None, "a fast tokenizer without clean-up is windowed"
    growing: list[int] = []
    for n in range(1, len(ids) + 1):
        growing.append(ids[n - 1])
        given = growing if same_list else ids[:n]
        assert windowed.update(given) == whole.update(ids[:n]), n
        assert windowed.text == whole.text, n
        if not stop:
            decoded = any_tokenizer.decode(ids[:n], skip_special_tokens=True)
            assert windowed.text == decoded, n
        assert windowed.stopped == whole.stopped
        if whole.stopped:
            break
    assert windowed.flush() == whole.flush()


def test_a_list_that_does_not_extend_the_previous_is_decoded_afresh(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    state = TextState(tokenizer, stop=())
    assert state.update(_ids(tokenizer, "Hello there")) == "Hello there"
    assert state.update(_ids(tokenizer, "Help")) == ""  # nothing new past what was sent
    assert state.text == "Help"


def test_a_tokenizer_that_cleans_up_spaces_is_decoded_whole(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    import copy

    cleaning = copy.deepcopy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    state = TextState(cleaning, stop=())
    assert state._windowed is None
    ids = _ids(tokenizer, "Hello world.")
    assert "".join(_stream(state, ids)) + state.flush() == cleaning.decode(
        ids, skip_special_tokens=True
    )


def test_window_decoder_is_shared_per_tokenizer_and_its_single_tokens_decode_alike(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = windowed_decoder(tokenizer)
    assert decoder is not None and windowed_decoder(tokenizer) is decoder
    ids = _ids(tokenizer, "I like 😀 a lot 日本語 — ok, café")
    for token in ids:  # a one-token list, remembered or not, as the backend decodes it
        assert decoder.one(token) == tokenizer.decode([token], skip_special_tokens=True)
        assert decoder.one(token) == decoder([token])
    # Bounded: past the limit, single tokens are decoded but not kept.
    monkeypatch.setattr(detokenize, "SINGLE_TOKENS_KEPT", 0)
    fresh = detokenize.WindowDecoder(tokenizer.backend_tokenizer)
    assert fresh.one(ids[0]) == decoder.one(ids[0]) and not fresh._single
