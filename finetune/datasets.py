"""JSONL training data for `loraserve train`: loading, checking and tokenizing with loss masks.

Two row formats, one JSON object per line (blank lines are skipped):

* ``{"prompt": "...", "completion": "..."}``: the loss is on the completion tokens only,
  followed by the tokenizer's EOS token so the model learns to stop;
* ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``:
  rendered with the tokenizer's chat template when it has one (a plain
  ``<role>: content`` layout otherwise); the loss is on the assistant turns only (every
  assistant turn, or just the last one), including the template's end-of-turn marker.

Problems are collected for the whole file and raised together as one :class:`DatasetError`
whose message lists them by line number (``line 7: missing 'completion'``), so a tenant can
fix a file in one pass. Nothing here imports torch; tokenizers are duck-typed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "CHAT_ROLES",
    "IGNORE_INDEX",
    "MAX_REPORTED_PROBLEMS",
    "ChatExample",
    "ChatLoss",
    "DatasetError",
    "Example",
    "Message",
    "PromptCompletionExample",
    "TokenizedExample",
    "load_jsonl",
    "parse_jsonl",
    "tokenize_dataset",
    "tokenize_example",
]

IGNORE_INDEX = -100
"""Label value that the cross-entropy loss skips (prompt, user and system tokens)."""

MAX_REPORTED_PROBLEMS = 10
"""How many problems a DatasetError message lists; the rest are counted."""

CHAT_ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})
"""Roles a chat row may use."""

ChatLoss = Literal["all_assistant", "last_assistant"]


class _Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that tokenization here needs."""

    eos_token_id: int | None
    chat_template: Any

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Problem:
    """One bad row: its 1-based line number and what is wrong."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class DatasetError(ValueError):
    """A dataset file has bad rows; ``problems`` lists every one found, by line number."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems: list[Problem] = list(problems)
        shown = [f"  {problem}" for problem in self.problems[:MAX_REPORTED_PROBLEMS]]
        hidden = len(self.problems) - len(shown)
        if hidden > 0:
            shown.append(f"  ... and {hidden} more")
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{source}: {len(self.problems)} {noun}\n" + "\n".join(shown))


@dataclass(frozen=True)
class PromptCompletionExample:
    """A ``{"prompt", "completion"}`` row."""

    prompt: str
    completion: str
    line: int


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True)
class ChatExample:
    """A ``{"messages": [...]}`` row."""

    messages: tuple[Message, ...]
    line: int


Example = PromptCompletionExample | ChatExample


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels (IGNORE_INDEX where no loss is taken) of one row."""

    input_ids: list[int]
    labels: list[int]
    line: int = field(default=0)

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__
    )


def _check_text(row: dict[str, Any], key: str, problems: list[str]) -> str | None:
    if key not in row:
        problems.append(f"missing {key!r}")
        return None
    value = row[key]
    if not isinstance(value, str):
        problems.append(f"{key!r} must be a string, got {_type_name(value)}")
        return None
    if not value.strip():
        problems.append(f"{key!r} is empty")
        return None
    return value


def _parse_messages(value: object, problems: list[str]) -> tuple[Message, ...] | None:
    if not isinstance(value, list):
        problems.append(f"'messages' must be an array, got {_type_name(value)}")
        return None
    if not value:
        problems.append("'messages' is empty")
        return None
    messages: list[Message] = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where} must be an object, got {_type_name(item)}")
            continue
        role, content = item.get("role"), item.get("content")
        if "role" not in item:
            problems.append(f"{where}: missing 'role'")
        elif not isinstance(role, str) or role not in CHAT_ROLES:
            problems.append(
                f"{where}: 'role' must be one of {', '.join(sorted(CHAT_ROLES))}, got {role!r}"
            )
        if "content" not in item:
            problems.append(f"{where}: missing 'content'")
        elif not isinstance(content, str):
            problems.append(f"{where}: 'content' must be a string, got {_type_name(content)}")
        elif role == "assistant" and not content.strip():
            problems.append(f"{where}: assistant 'content' is empty")
        if isinstance(role, str) and isinstance(content, str):
            messages.append(Message(role, content))
    if problems:
        return None
    if not any(message.role == "assistant" for message in messages):
        problems.append("'messages' has no assistant turn to learn from")
        return None
    return tuple(messages)


def _parse_row(row: object, line: int, problems: list[str]) -> Example | None:
    if not isinstance(row, dict):
        problems.append(f"must be a JSON object, got {_type_name(row)}")
        return None
    if "messages" in row:
        if "prompt" in row or "completion" in row:
            problems.append("has both 'messages' and 'prompt'/'completion'; use one format")
            return None
        messages = _parse_messages(row["messages"], problems)
        return None if messages is None else ChatExample(messages, line)
    if "prompt" not in row and "completion" not in row:
        problems.append("missing 'prompt' and 'completion' (or 'messages' for chat rows)")
        return None
    prompt = _check_text(row, "prompt", problems)
    completion = _check_text(row, "completion", problems)
    if prompt is None or completion is None:
        return None
    return PromptCompletionExample(prompt, completion, line)


def parse_jsonl(lines: Iterable[str], source: str = "<data>") -> list[Example]:
    """Parse JSONL text lines into examples; raise DatasetError listing every bad row."""
    examples: list[Example] = []
    problems: list[Problem] = []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem(line_no, f"not valid JSON: {exc.msg} (column {exc.colno})"))
            continue
        except (ValueError, RecursionError) as exc:
            problems.append(Problem(line_no, f"not valid JSON: {str(exc)[:80]}"))
            continue
        row_problems: list[str] = []
        example = _parse_row(row, line_no, row_problems)
        problems.extend(Problem(line_no, message) for message in row_problems)
        if example is not None:
            examples.append(example)
    if problems:
        raise DatasetError(source, problems)
    if not examples:
        raise DatasetError(source, [Problem(0, "no examples (the file is empty)")])
    return examples


def load_jsonl(path: Path | str) -> list[Example]:
    """Read and check a JSONL dataset file; raise DatasetError on bad rows."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(str(path), [Problem(0, f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(str(path), [Problem(line, "not UTF-8 text")]) from None
    return parse_jsonl(text.splitlines(), source=str(path))


def _encode(tokenizer: _Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _render(tokenizer: _Tokenizer, messages: Sequence[Message], generation_prompt: bool) -> str:
    """The conversation as text, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        return str(rendered)
    eos = getattr(tokenizer, "eos_token", None) or ""
    text = "".join(f"{m.role}: {m.content}{eos}\n" for m in messages)
    return text + ("assistant: " if generation_prompt else "")


def _tokenize_chat(
    example: ChatExample, tokenizer: _Tokenizer, chat_loss: ChatLoss
) -> TokenizedExample:
    """Renders turn by turn, so each segment is tokenized exactly as inference would see it.

    For assistant turn i the masked part is render(messages[:i], generation prompt) and the
    learned part is what render(messages[:i+1]) adds after it (content + end-of-turn marker).
    """
    messages = example.messages
    last_assistant = max(i for i, m in enumerate(messages) if m.role == "assistant")
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""
    for index, message in enumerate(messages):
        learn = message.role == "assistant" and (
            chat_loss == "all_assistant" or index == last_assistant
        )
        full = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if message.role == "assistant":
            header = _render(tokenizer, messages[:index], generation_prompt=True)
        else:
            header = full
        if not (header.startswith(done) and full.startswith(header)):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; "
                "cannot locate the assistant turns"
            )
        masked = _encode(tokenizer, header[len(done) :])
        body = _encode(tokenizer, full[len(header) :])
        input_ids += masked + body
        labels += [IGNORE_INDEX] * len(masked) + (body if learn else [IGNORE_INDEX] * len(body))
        done = full
        if index == last_assistant:
            break
    return TokenizedExample(input_ids, labels, example.line)


def tokenize_example(
    example: Example, tokenizer: _Tokenizer, chat_loss: ChatLoss = "all_assistant"
) -> TokenizedExample:
    """Token ids with labels: IGNORE_INDEX on prompt/user/system tokens, ids on learned ones.

    Prompt and completion are tokenized separately (the prompt exactly as it would be for
    generation) and an EOS token is appended to the completion.
    """
    if isinstance(example, ChatExample):
        return _tokenize_chat(example, tokenizer, chat_loss)
    prompt = _encode(tokenizer, example.prompt)
    completion = _encode(tokenizer, example.completion)
    if tokenizer.eos_token_id is not None:
        completion.append(int(tokenizer.eos_token_id))
    return TokenizedExample(
        prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, example.line
    )


def tokenize_dataset(
    examples: Sequence[Example],
    tokenizer: _Tokenizer,
    *,
    max_length: int,
    source: str = "<data>",
    chat_loss: ChatLoss = "all_assistant",
) -> list[TokenizedExample]:
    """Tokenize every example; rows longer than ``max_length`` tokens are a DatasetError."""
    tokenized: list[TokenizedExample] = []
    problems: list[Problem] = []
    for example in examples:
        try:
            item = tokenize_example(example, tokenizer, chat_loss)
        except ValueError as exc:
            problems.append(Problem(example.line, str(exc)))
            continue
        if len(item.input_ids) > max_length:
            problems.append(
                Problem(
                    example.line,
                    f"is {len(item.input_ids)} tokens long; the limit is {max_length}",
                )
            )
        elif item.n_label_tokens == 0:
            problems.append(Problem(example.line, "has no tokens to learn from"))
        else:
            tokenized.append(item)
    if problems:
        raise DatasetError(source, problems)
    return tokenized
