"""`loraserve eval`: exact match, token accuracy and perplexity, base model vs adapter.

Local mode loads the base checkpoint and a PEFT adapter directory and measures both on an
eval JSONL (the same formats `loraserve train` reads). Server mode asks a running loraserve for
greedy completions with and without the named adapter (exact match) and scores the expected
completions teacher-forced through prompt_logprobs (token accuracy, perplexity), on the token
ids `loraserve train` uses (finetune.datasets.tokenize_example):

* request A sends the prompt (or the chat turns before the last assistant one, with the
  generation prompt): its greedy completion is the exact-match answer, and
  usage.prompt_tokens = P is where the expected completion starts;
* request B sends the prompt followed by the expected completion and the EOS token's text
  (chat: the turns through the last assistant one, which the server renders as they stand
  when prompt_logprobs is set, end-of-turn marker included) with prompt_logprobs and
  top_logprobs=1: its entries from position P on are the completion's tokens, their
  log-probabilities and whether each was the most likely one.

A row is scored only when B's first P tokens are A's (the tokenizer did not merge across the
prompt/completion boundary) and, when the tokenizer is at hand, its scored tokens are exactly
tokenize_example's labelled ones; other rows count in `misaligned_rows`. The EOS text comes
from the base model's tokenizer (`--model`, only its tokenizer files are read); without it,
plain prompt rows are scored on their completion tokens without the EOS (said in the output),
chat rows are unaffected.

    loraserve eval [--model PATH] --adapter DIR --data eval.jsonl [--json]
    loraserve eval --server HOST:PORT [--api-key KEY] [--model PATH] --adapter NAME \
        --data eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loraserve.finetune.datasets import (
    IGNORE_INDEX,
    ChatExample,
    DatasetError,
    Example,
    load_jsonl,
    tokenize_example,
)


@dataclass(frozen=True)
class EvalMetrics:
    """How well one model (base or base + adapter) completes the eval rows."""

    rows: int
    exact_match: float
    """Fraction of rows whose greedy completion equals the expected one (whitespace-trimmed)."""
    token_accuracy: float | None
    """Fraction of expected completion tokens the model ranks first (teacher forcing)."""
    perplexity: float | None
    """exp(mean negative log-likelihood) of the expected completion tokens."""
    misaligned_rows: int = 0
    """Server mode: rows left out of token accuracy and perplexity because the server's
    tokens of prompt + completion did not split where training's do."""
    eos_scored: bool = True
    """Server mode: False when plain prompt rows were scored without their EOS token (no
    tokenizer to spell it)."""


def expected_text(example: Example) -> tuple[str, list[dict[str, str]] | None]:
    """The completion to reproduce, and the chat context for chat rows (None for prompts)."""
    if isinstance(example, ChatExample):
        turns = [{"role": m.role, "content": m.content} for m in example.messages]
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        return turns[last]["content"], turns[:last]
    return example.completion, None


def _prompt_ids(tokenized_ids: list[int], labels: list[int]) -> list[int]:
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return tokenized_ids[:first]


def evaluate_model(model: Any, tokenizer: Any, examples: Sequence[Example]) -> EvalMetrics:
    """Metrics of `model` (a causal LM, possibly a PeftModel with its adapter active)."""
    import torch

    exact, correct, counted, nll = 0, 0, 0, 0.0
    for example in examples:
        tokenized = tokenize_example(example, tokenizer, chat_loss="last_assistant")
        ids = torch.tensor([tokenized.input_ids])  # (1, seq)
        labels = torch.tensor(tokenized.labels)  # (seq,)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()  # (seq - 1, vocab)
        targets = labels[1:]  # (seq - 1,)
        mask = targets != IGNORE_INDEX
        log_probs = torch.log_softmax(logits[mask], dim=-1)  # (n, vocab)
        wanted = targets[mask]  # (n,)
        nll += float(-log_probs.gather(1, wanted[:, None]).sum())
        correct += int((logits[mask].argmax(-1) == wanted).sum())
        counted += int(mask.sum())
        prompt = torch.tensor([_prompt_ids(tokenized.input_ids, tokenized.labels)])  # (1, p)
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=tokenized.n_label_tokens + 2,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        exact += int(text.strip() == expected_text(example)[0].strip())
    return EvalMetrics(
        rows=len(examples),
        exact_match=exact / max(len(examples), 1),
        token_accuracy=correct / max(counted, 1),
        perplexity=math.exp(nll / max(counted, 1)),
    )


def evaluate_local(
    model_dir: Path, adapter_dir: Path, examples: Sequence[Example]
) -> dict[str, EvalMetrics]:
    """{"base": ..., "adapter": ...} on the same rows, the same loaded weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with model.disable_adapter():
        base_metrics = evaluate_model(model, tokenizer, examples)
    return {"base": base_metrics, "adapter": evaluate_model(model, tokenizer, examples)}


@dataclass(frozen=True)
class _Scored:
    """One row's teacher-forced result through the server (None: misaligned)."""

    correct: int
    counted: int
    nll: float


def _score_row(
    client: Any, adapter: str, example: Example, tokenizer: Any | None
) -> tuple[bool, _Scored | None]:
    """(exact match, token scores or None) of one row, from requests A and B (module doc)."""
    expected, chat = expected_text(example)
    if chat is not None and not chat:
        return False, None  # an assistant turn with nothing before it: nothing to send
    if chat is not None:
        turns = [(t["role"], t["content"]) for t in chat]
        prompt: Any = turns
        scored: Any = [*turns, ("assistant", expected)]
    else:
        eos = (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else ""
        prompt = example.prompt  # type: ignore[union-attr]
        scored = prompt + expected + eos
    first = client.generate(prompt, adapter=adapter, max_new_tokens=64, prompt_logprobs=True)
    exact = first.text.strip() == expected.strip()
    whole = client.generate(
        scored, adapter=adapter, max_new_tokens=1, prompt_logprobs=True, top_logprobs=1
    )
    p = first.usage.prompt_tokens
    head = [e.token_id for e in whole.prompt_logprobs[: p - 1]]
    entries = list(whole.prompt_logprobs[p - 1 :])  # position p on: the completion
    if head != [e.token_id for e in first.prompt_logprobs] or not entries:
        return exact, None
    if tokenizer is not None:
        try:
            tokenized = tokenize_example(example, tokenizer, chat_loss="last_assistant")
        except ValueError:  # a chat template that does not render prefix by prefix
            return exact, None
        labels = [t for t in tokenized.labels if t != IGNORE_INDEX]
        if [e.token_id for e in entries] != labels:
            return exact, None
    correct = sum(1 for e in entries if e.top and e.top[0].token_id == e.token_id)
    return exact, _Scored(correct, len(entries), -sum(e.logprob for e in entries))


def evaluate_server(
    target: str,
    api_key: str | None,
    adapter: str,
    examples: Sequence[Example],
    tokenizer: Any | None = None,
) -> dict[str, EvalMetrics]:
    """Exact match, token accuracy and perplexity through a running server, base model vs
    the named adapter. `tokenizer` (the base model's) spells the EOS of plain prompt rows and
    checks the scored tokens against tokenize_example; see the module docstring."""
    from loraserve.client.config import ClientConfig
    from loraserve.client.sync import LoraServeClient

    results: dict[str, EvalMetrics] = {}
    plain_rows = any(not isinstance(e, ChatExample) for e in examples)
    with LoraServeClient(ClientConfig(target=target, api_key=api_key)) as client:
        for label, name in (("base", ""), ("adapter", adapter)):
            exact, correct, counted, nll, misaligned = 0, 0, 0, 0.0, 0
            for example in examples:
                matched, scored = _score_row(client, name, example, tokenizer)
                exact += int(matched)
                if scored is None:
                    misaligned += 1
                    continue
                correct, counted, nll = (
                    correct + scored.correct,
                    counted + scored.counted,
                    nll + scored.nll,
                )
            results[label] = EvalMetrics(
                rows=len(examples),
                exact_match=exact / max(len(examples), 1),
                token_accuracy=correct / counted if counted else None,
                perplexity=math.exp(nll / counted) if counted else None,
                misaligned_rows=misaligned,
                eos_scored=tokenizer is not None or not plain_rows,
            )
    return results


def format_table(results: dict[str, EvalMetrics]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [f"{'':<10}{'exact match':>13}{'token acc.':>12}{'perplexity':>12}"]
    for label, m in results.items():
        lines.append(
            f"{label:<10}{cell(m.exact_match, '.1%'):>13}{cell(m.token_accuracy, '.1%'):>12}"
            f"{cell(m.perplexity, '.2f'):>12}"
        )
    for label, m in results.items():
        if m.misaligned_rows:
            lines.append(
                f"{label}: {m.misaligned_rows} of {m.rows} rows left out of token accuracy and "
                "perplexity (the server split prompt + completion into other tokens than "
                "training does)"
            )
    if any(not m.eos_scored for m in results.values()):
        lines.append(
            "plain prompt rows were scored without their EOS token; pass --model (the base "
            "checkpoint, for its tokenizer) to score exactly the tokens training does"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve eval",
        description="Exact match, token accuracy and perplexity: base model vs adapter.",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="base checkpoint (local mode); with --server, only its tokenizer is read, to "
        "score the EOS token of plain prompt rows",
    )
    parser.add_argument("--adapter", required=True, help="adapter DIR (local) or NAME (server)")
    parser.add_argument("--server", default=None, metavar="HOST:PORT", help="evaluate via a server")
    parser.add_argument("--api-key", default=os.environ.get("LORASERVE_API_KEY"))
    parser.add_argument("--data", type=Path, required=True, help="eval JSONL")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        examples = load_jsonl(args.data)
    except (DatasetError, OSError) as exc:
        print(f"loraserve eval: {exc}", file=sys.stderr)
        return 2
    if args.server:
        tokenizer = None
        if args.model is not None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
            except (OSError, ValueError) as exc:
                print(f"loraserve eval: cannot load the tokenizer: {exc}", file=sys.stderr)
                return 2
        results = evaluate_server(args.server, args.api_key, args.adapter, examples, tokenizer)
    else:
        from loraserve.testing.tiny_model import default_model_path

        model = args.model or default_model_path()
        results = evaluate_local(Path(model), Path(args.adapter), examples)
    if args.json:
        print(json.dumps({k: asdict(v) for k, v in results.items()}, indent=2))
    else:
        print(format_table(results))
    return 0
