"""One forward pass over a set of KV rows: the prefill chunks of new requests, or a decode step.

In the style of gpt-fast: short standalone functions. Each batch row feeds its own tokens at its
own positions (left-padded to a common width, so every row's last token is in the last column
and `logits_to_keep=1` suffices); the KV cache and the 4D masks keep rows independent, so a
row's logits do not depend on what else shares the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.server.engine.attention_backends import prefill_attention
from loraserve.server.engine.kv_cache import ForwardPlan, SlotKVCache
from loraserve.server.engine.lora import BatchLoRAState
from loraserve.server.engine.model import LoadedModel


@dataclass(frozen=True)
class RowInput:
    """What one batch row feeds in this forward."""

    row: int
    """Its KV row."""
    tokens: list[int]
    """Tokens to feed (a prompt chunk, or the last generated token); empty for an idle row."""
    start: int
    """Position of tokens[0] in the sequence."""


def lora_state(pages: list[tuple[int, ...]], device: torch.device) -> BatchLoRAState:
    """Routing for one forward: each row's adapter pages (empty for the base model)."""
    width = max(1, max((len(p) for p in pages), default=1))
    table = torch.zeros((len(pages), width), dtype=torch.long)  # (batch, width), 0 = zero page
    for row, row_pages in enumerate(pages):
        if row_pages:
            table[row, : len(row_pages)] = torch.tensor(row_pages, dtype=torch.long)
    return BatchLoRAState(
        page_table=table.to(device),
        pages=frozenset(p for row_pages in pages for p in row_pages),
    )


def forward_rows(
    loaded: LoadedModel,
    cache: SlotKVCache,
    inputs: list[RowInput],
    lora: BatchLoRAState,
) -> torch.Tensor:
    """Runs one forward; returns logits (batch, vocab) after each row's last token.

    Rows whose inputs are empty are idle: they compute on a pad token that writes only to the
    scratch column and is masked from everything (their logits are meaningless).
    """
    return forward_rows_last(loaded, cache, inputs, lora, keep=1)[:, -1, :]


@torch.inference_mode()
def forward_rows_last(
    loaded: LoadedModel,
    cache: SlotKVCache,
    inputs: list[RowInput],
    lora: BatchLoRAState,
    keep: int,
) -> torch.Tensor:
    """As forward_rows, but returns the logits of the last `keep` columns (batch, keep, vocab).

    Rows are left-padded, so row b's i-th token sits in kept column keep - len(tokens_b) + i
    whenever len(tokens_b) <= keep (prompt_logprobs asks for every position of its rows).
    """
    device = loaded.device
    batch = len(inputs)
    width = max(1, max(len(r.tokens) for r in inputs))
    input_ids = torch.full((batch, width), loaded.pad_token_id, dtype=torch.long)  # (batch, width)
    positions = torch.zeros((batch, width), dtype=torch.long)  # (batch, width)
    valid = torch.zeros((batch, width), dtype=torch.bool)  # (batch, width)
    kv_len = 1
    for b, row in enumerate(inputs):
        n = len(row.tokens)
        if n == 0:
            continue
        input_ids[b, width - n :] = torch.tensor(row.tokens, dtype=torch.long)
        positions[b, width - n :] = torch.arange(row.start, row.start + n)
        valid[b, width - n :] = True
        kv_len = max(kv_len, row.start + n)
    rows = [r.row for r in inputs]
    input_ids, positions, valid = input_ids.to(device), positions.to(device), valid.to(device)
    cache.plan = ForwardPlan(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        write_positions=torch.where(valid, positions, cache.scratch),  # (batch, width)
        kv_len=kv_len,
        contiguous=rows == list(range(batch)),
    )
    masks = cache.attention_masks(positions, valid, loaded.dtype)
    loaded.context.current = lora
    try:
        with prefill_attention(input_ids.device, width):  # no cuDNN plan builds at new shapes
            out = loaded.model(
                input_ids=input_ids,  # (batch, width)
                attention_mask=masks,  # (batch, 1, width, kv_len), or one per layer type
                position_ids=positions,  # (batch, width)
                use_cache=True,
                logits_to_keep=keep,
                **{loaded.cache_kwarg: cache},
            )
    finally:
        loaded.context.current = None
        cache.plan = None
    return out.logits[:, -keep:, :]  # (batch, keep, vocab)
