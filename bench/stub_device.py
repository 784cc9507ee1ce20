"""A stand-in for the device: an engine's model forwards replaced by fixed logits (bench only).

On a GPU the forward of a decode step runs on the device while the host waits with the GIL
released; what the host does around it (plans, staging, sampling, detokenizing, metrics,
events, and through gRPC the event loop) is the same Python on any machine. Replacing the
forwards with fixed logits, optionally after sleeping a device's step time, lets a CPU-only
machine time that host work alone (bench.host_step) or see how it competes with the gRPC event
loop at a GPU's step time (bench.grpc_overhead).
"""

from __future__ import annotations

import time

import torch

from loraserve.server.engine.engine import Engine

PREFILL_TOKENS_PER_STEP = 128
"""A stubbed prefill sleeps one device step per this many tokens it feeds (at least one)."""


class StubbedForwards:
    """Replaces `engine`'s decode and prefill forwards (paged executor) with fixed logits
    (rows, vocab), after sleeping `device_s` per decode step (0: no sleep). Counts the decode
    forwards, so a run can check every step went through the stub."""

    def __init__(self, engine: Engine, vocab: int, max_rows: int, device_s: float = 0.0) -> None:
        executor = engine.scheduler.executor
        if not hasattr(executor, "_decode_forward"):
            raise ValueError("the stub replaces the paged executor's forwards (a Llama model)")
        self.decodes = 0
        self._device_s = device_s
        self._logits = _text_logits(engine, vocab, max_rows)  # (max_rows, vocab)
        executor._decode_forward = self._decode_forward  # type: ignore[method-assign]
        executor._prefill = self._prefill  # type: ignore[method-assign]
        executor._graphs.clear()  # a captured graph would bypass the stub

    def _decode_forward(self, batch: int, span: int, width: int, kinds=None) -> torch.Tensor:
        self.decodes += 1
        if self._device_s:
            time.sleep(self._device_s)  # the GIL is released, as while a GPU computes
        return self._logits[:batch]  # (batch, vocab)

    def _prefill(self, plan, scoring=None, scored=None) -> torch.Tensor:
        if self._device_s:
            fed = sum(len(row.tokens) for row in plan.rows)
            time.sleep(self._device_s * max(1, -(-fed // PREFILL_TOKENS_PER_STEP)))
        return self._logits[: len(plan.rows)]  # (rows, vocab)


def _text_logits(engine: Engine, vocab: int, rows: int) -> torch.Tensor:
    """(rows, vocab) logits whose argmax in row r is a token that decodes to whole characters
    on its own, a different one per row (in turn): the rows stream ordinary text. A token that
    is one byte of a multi-byte character (a byte-level vocabulary has 128 of them) would keep
    its row's text incomplete for good, and the detokenizer's window open, which real text
    never does."""
    tokenizer = engine.loaded.tokenizer
    special = set(tokenizer.all_special_ids)
    whole = [
        token
        for token in range(vocab)
        if token not in special
        and (text := tokenizer.decode([token])) != ""
        and not text.endswith("\ufffd")
    ]
    if not whole:
        raise ValueError("no token of the vocabulary decodes to whole characters")
    logits = torch.zeros(rows, vocab)  # (rows, vocab)
    for row in range(rows):
        logits[row, whole[(row * 7919) % len(whole)]] = 1.0
    return logits


MODES = ("base", "distinct")
"""The stubbed benches' row kinds: base-model rows, or each row with its own adapter."""


def parse_modes(text: str) -> list[str]:
    """--modes "base,distinct" -> the modes in order; exits naming the unknown ones."""
    modes = [m for m in text.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {list(MODES)}")
    return modes
