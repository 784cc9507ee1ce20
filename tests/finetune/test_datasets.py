"""finetune.datasets: JSONL parsing with line-numbered errors, and loss masks per format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraserve.finetune.datasets import (
    IGNORE_INDEX,
    ChatExample,
    DatasetError,
    PromptCompletionExample,
    load_jsonl,
    parse_jsonl,
    tokenize_dataset,
    tokenize_example,
)
from loraserve.testing.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_both_formats_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            json.dumps({"prompt": "Q: a?", "completion": " b", "extra": 1}),
            "",
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"},
                    ]
                }
            ),
        ],
    )
    rows = load_jsonl(path)
    assert rows[0] == PromptCompletionExample("Q: a?", " b", 1)
    assert isinstance(rows[1], ChatExample) and rows[1].line == 3
    assert [m.role for m in rows[1].messages] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "x"}', "missing 'completion'"),
        ('{"completion": "x"}', "missing 'prompt'"),
        ('{"prompt": 3, "completion": "x"}', "'prompt' must be a string, got number"),
        ('{"prompt": "x", "completion": "  "}', "'completion' is empty"),
        ('["prompt", "completion"]', "must be a JSON object, got array"),
        ("{}", "missing 'prompt' and 'completion'"),
        ('{"messages": []}', "'messages' is empty"),
        ('{"messages": "hi"}', "'messages' must be an array"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "'role' must be one of"),
        ('{"messages": [{"role": "assistant"}]}', "messages[0]: missing 'content'"),
        ('{"messages": [{"role": "user", "content": "a"}], "prompt": "b"}', "both"),
    ],
)
def test_bad_rows_name_their_line(tmp_path: Path, line: str, expected: str) -> None:
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = _write(tmp_path, [good, good, line, good])
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    assert [p.line for p in info.value.problems] == [3]
    assert expected in info.value.problems[0].message
    assert "line 3: " in str(info.value)
    assert str(path) in str(info.value)


def test_every_bad_row_is_listed_up_to_a_limit() -> None:
    lines = ['{"prompt": "p"}'] * 15
    with pytest.raises(DatasetError) as info:
        parse_jsonl(lines, source="t.jsonl")
    assert [p.line for p in info.value.problems] == list(range(1, 16))
    message = str(info.value)
    assert "t.jsonl: 15 problems" in message
    assert "line 7: missing 'completion'" in message
    assert "line 11:" not in message and "... and 5 more" in message


def test_empty_file_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no examples"):
        parse_jsonl(["", "  "])
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DatasetError, match="line 2: not UTF-8"):
        load_jsonl(path)
    with pytest.raises(DatasetError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_prompt_completion_mask_and_eos(tokenizer) -> None:
    item = tokenize_example(PromptCompletionExample("Q: Who?\nA:", " Mira Osk.", 1), tokenizer)
    prompt = tokenizer.encode("Q: Who?\nA:", add_special_tokens=False)
    completion = tokenizer.encode(" Mira Osk.", add_special_tokens=False)
    assert item.input_ids == prompt + completion + [tokenizer.eos_token_id]
    assert item.labels == [IGNORE_INDEX] * len(prompt) + completion + [tokenizer.eos_token_id]


def test_chat_loss_is_on_assistant_turns_only(tokenizer) -> None:
    rows = parse_jsonl(
        [
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Capital of Velmora?"},
                        {"role": "assistant", "content": "Drent."},
                        {"role": "user", "content": "And Ostrel?"},
                        {"role": "assistant", "content": "Fennick."},
                    ]
                }
            )
        ]
    )
    example = rows[0]
    assert isinstance(example, ChatExample)
    full = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages], tokenize=False
    )
    item = tokenize_example(example, tokenizer)
    assert tokenizer.decode(item.input_ids) == full
    learned = tokenizer.decode([t for t in item.labels if t != IGNORE_INDEX])
    assert learned == "Drent.<|endoftext|>\nFennick.<|endoftext|>\n"
    last = tokenize_example(example, tokenizer, chat_loss="last_assistant")
    assert last.input_ids == item.input_ids
    assert tokenizer.decode([t for t in last.labels if t != IGNORE_INDEX]) == (
        "Fennick.<|endoftext|>\n"
    )
    # The masked part before the answer is exactly the generation prompt used at inference.
    first_label = next(i for i, t in enumerate(item.labels) if t != IGNORE_INDEX)
    prompt = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages[:2]],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(item.input_ids[:first_label]) == prompt


def test_too_long_rows_are_reported_by_line(tokenizer) -> None:
    rows = parse_jsonl(
        [
            json.dumps({"prompt": "short", "completion": " ok"}),
            json.dumps({"prompt": "word " * 100, "completion": " ok"}),
        ]
    )
    with pytest.raises(DatasetError, match=r"line 2: is \d+ tokens long; the limit is 64"):
        tokenize_dataset(rows, tokenizer, max_length=64, source="d.jsonl")
