"""Prefill and decode over one padded batch of sequences, each row with its own adapter slot.

In the style of gpt-fast: short standalone functions. Prompts are left-padded so every row's
next token sits in the last column; position ids count real tokens only, so a row's logits do
not depend on the padding (and so not on what else shares its batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from server.engine.lora import BatchLoRAState
from server.engine.model import LoadedModel


@dataclass
class BatchTensors:
    """The device-side state of a running batch."""

    cache: DynamicCache
    attention_mask: torch.Tensor
    """(batch, past_len) int64: 1 for real tokens, 0 for left padding."""
    next_positions: torch.Tensor
    """(batch,) int64: position id of each row's next input token."""
    slot_ids: torch.Tensor
    """(batch,) int64: each row's adapter slot (0 = base model)."""
    lora: BatchLoRAState


def lora_state(slot_ids: list[int], ranks: list[int], device: torch.device) -> BatchLoRAState:
    """Routing for one forward: each row's slot, and the batch's largest adapter rank."""
    slots = torch.tensor(slot_ids, dtype=torch.long, device=device)  # (batch,)
    return BatchLoRAState(
        slot_ids=slots,
        slot_set=frozenset(s for s in slot_ids if s != 0),
        rank=max(ranks, default=0),
    )


@torch.inference_mode()
def prefill(
    loaded: LoadedModel, prompts: list[list[int]], slot_ids: list[int], ranks: list[int]
) -> tuple[BatchTensors, torch.Tensor]:
    """Runs the prompts through the model; returns the batch state and the last logits.

    Returns logits (batch, vocab) for each row's first generated token.
    """
    device = loaded.device
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), loaded.pad_token_id, dtype=torch.long)  # (batch, width)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # (batch, width)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (batch, width)
    state = lora_state(slot_ids, ranks, device)
    cache = DynamicCache(config=loaded.model.config)
    logits = _forward(loaded, state, input_ids, attention_mask, position_ids, cache)
    tensors = BatchTensors(
        cache=cache,
        attention_mask=attention_mask,
        next_positions=attention_mask.sum(-1),  # (batch,)
        slot_ids=state.slot_ids,
        lora=state,
    )
    return tensors, logits


@torch.inference_mode()
def decode_one_token(
    loaded: LoadedModel, tensors: BatchTensors, last_tokens: list[int]
) -> torch.Tensor:
    """Feeds each row's latest token; returns logits (batch, vocab) for the next one."""
    device = loaded.device
    input_ids = torch.tensor(last_tokens, dtype=torch.long, device=device)[:, None]  # (batch, 1)
    ones = torch.ones((len(last_tokens), 1), dtype=torch.long, device=device)  # (batch, 1)
    tensors.attention_mask = torch.cat([tensors.attention_mask, ones], dim=1)  # (batch, past+1)
    position_ids = tensors.next_positions[:, None]  # (batch, 1)
    logits = _forward(
        loaded, tensors.lora, input_ids, tensors.attention_mask, position_ids, tensors.cache
    )
    tensors.next_positions = tensors.next_positions + 1
    return logits


def keep_rows(tensors: BatchTensors, keep: list[int], ranks: list[int]) -> None:
    """Drops finished rows from the batch state (their KV memory is freed with them)."""
    index = torch.tensor(keep, dtype=torch.long, device=tensors.attention_mask.device)  # (kept,)
    tensors.cache.batch_select_indices(index)
    tensors.attention_mask = tensors.attention_mask.index_select(0, index)  # (kept, past)
    tensors.next_positions = tensors.next_positions.index_select(0, index)  # (kept,)
    tensors.slot_ids = tensors.slot_ids.index_select(0, index)  # (kept,)
    tensors.lora = lora_state(tensors.slot_ids.tolist(), ranks, tensors.slot_ids.device)


def _forward(
    loaded: LoadedModel,
    state: BatchLoRAState,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """One model forward with the batch's adapter routing installed; returns (batch, vocab)."""
    loaded.context.current = state
    try:
        out = loaded.model(
            input_ids=input_ids,  # (batch, new)
            attention_mask=attention_mask,  # (batch, past + new)
            position_ids=position_ids,  # (batch, new)
            use_cache=True,
            logits_to_keep=1,
            **{loaded.cache_kwarg: cache},
        )
    finally:
        loaded.context.current = None
    return out.logits[:, -1, :]  # (batch, vocab)
