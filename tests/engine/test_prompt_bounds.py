"""longest_token_bytes is an upper bound: no text encodes to fewer tokens than bytes / bound."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from serving_support import build_test_model
from transformers import AutoTokenizer

from loraserve.server.engine.prompt_bounds import longest_token_bytes


def _texts(tokenizer: object) -> list[str]:
    rng = random.Random(0)
    alphabet = "ab zé日本\u2028\n\t😀" + "".join(map(chr, range(32, 127)))
    specials = "".join(getattr(tokenizer, "all_special_tokens", []))
    return [
        "z" * 5000,
        " " * 3000,
        "the " * 1000,
        "😀" * 500,
        specials * 50,
        *("".join(rng.choice(alphabet) for _ in range(2000)) for _ in range(5)),
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_no_text_packs_more_bytes_per_token_than_the_bound(arch: str, model_cache: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(build_test_model(arch, model_cache))
    bound = longest_token_bytes(tokenizer)
    assert bound >= 1
    for text in _texts(tokenizer):
        tokens = len(tokenizer(text)["input_ids"])
        assert tokens * bound >= len(text.encode()), (arch, text[:20], tokens, bound)


def test_a_tokenizer_without_a_vocabulary_gets_a_generous_bound() -> None:
    assert longest_token_bytes(object()) >= 16
