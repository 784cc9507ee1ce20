"""Multi-LoRA linear layer: one shared W0 matmul for the whole batch plus each row's own B_i A_i x.

Semantics (BGMV, as in Punica): for a batch of rows b with adapter slot s_b,

    y[b, t] = W0 x[b, t] (+ bias) + B[s_b] (A[s_b] x[b, t])

where A[s] is (r_max, d_in), B[s] is (d_out, r_max) with the adapter's scale already folded into
B and ranks below r_max zero-padded (so padding adds exact zeros). Slot 0 is all zeros and stands
for "no adapter on this layer" (the base model, or an adapter that does not target this layer).
The gather + two batched matmuls cost the same whatever the number of distinct adapters in the
batch: there is no Python loop over adapters or rows in the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class BatchLoRAState:
    """Which adapter slot each batch row uses, for the forward pass in progress."""

    slot_ids: torch.Tensor
    """(batch,) int64 on the model device: each row's slot (0 = no adapter)."""
    slot_set: frozenset[int]
    """The distinct non-zero slots in slot_ids, to skip layers no row's adapter touches."""
    rank: int
    """The largest rank among the batch's adapters: slots are sliced to it (exact, rest is zero)."""
    gathered: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )
    """Per layer: (its slot generation, each row's A (batch, rank, d_in), B (batch, d_out, rank)),
    gathered on the first forward and reused by every decode step of the same batch, so a step
    costs two batched matmuls per layer and no gathers. Rows' slots are pinned and do not
    change; the generation still guards against any slot write in between."""


class LoRAContext:
    """Per-forward routing shared by every MultiLoRALinear of one model.

    Only the engine thread runs forwards, and it sets `current` right before each one, so this
    carries per-batch data, never per-adapter global state.
    """

    def __init__(self) -> None:
        self.current: BatchLoRAState | None = None


def lora_delta_reference(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot_ids: torch.Tensor
) -> torch.Tensor:
    """Pure-torch ground truth of the low-rank term, row by row (slow, for tests).

    x: (batch, seq, d_in); lora_a: (slots, r, d_in); lora_b: (slots, d_out, r); slot_ids: (batch,).
    Returns (batch, seq, d_out).
    """
    rows = []
    for b in range(x.shape[0]):
        s = int(slot_ids[b])
        rows.append((x[b] @ lora_a[s].T) @ lora_b[s].T)  # (seq, d_out)
    return torch.stack(rows)


def lora_delta_bgmv(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot_ids: torch.Tensor
) -> torch.Tensor:
    """Gathered batched low-rank term; same semantics as lora_delta_reference.

    x: (batch, seq, d_in); lora_a: (slots, r, d_in); lora_b: (slots, d_out, r); slot_ids: (batch,).
    Returns (batch, seq, d_out).
    """
    a_rows, b_rows = gather_rows(lora_a, lora_b, slot_ids)
    xa = torch.bmm(x, a_rows.transpose(1, 2))  # (batch, seq, r)
    return torch.bmm(xa, b_rows.transpose(1, 2))  # (batch, seq, d_out)


def gather_rows(
    lora_a: torch.Tensor, lora_b: torch.Tensor, slot_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's factors. lora_a: (slots, r, d_in), lora_b: (slots, d_out, r), slot_ids: (batch,).

    Returns A rows (batch, r, d_in) and B rows (batch, d_out, r).
    """
    return lora_a.index_select(0, slot_ids), lora_b.index_select(0, slot_ids)


class MultiLoRALinear(nn.Module):
    """Wraps a frozen nn.Linear or GPT-2 Conv1D with per-row adapters held in slots."""

    def __init__(self, base: nn.Module, *, context: LoRAContext, num_slots: int, max_rank: int):
        super().__init__()
        if isinstance(base, Conv1D):
            # Conv1D stores W0 as (d_in, d_out) and computes x @ W0 + b.
            self.in_features, self.out_features = base.weight.shape
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"cannot wrap {type(base).__name__}: not nn.Linear or Conv1D")
        self.base_layer = base
        self.context = context
        self.num_slots = num_slots
        self.max_rank = max_rank
        # Allocated on the first adapter that targets this layer: most adapters touch a subset.
        self.lora_a: torch.Tensor | None = None  # (num_slots + 1, max_rank, d_in)
        self.lora_b: torch.Tensor | None = None  # (num_slots + 1, d_out, max_rank)
        self.occupied: set[int] = set()
        self.generation = 0
        """Bumped on every slot write, so gathered copies of the old contents are never used."""

    def _allocate(self) -> None:
        weight = self.base_layer.weight
        slots = self.num_slots + 1
        self.lora_a = torch.zeros(
            slots, self.max_rank, self.in_features, dtype=weight.dtype, device=weight.device
        )
        self.lora_b = torch.zeros(
            slots, self.out_features, self.max_rank, dtype=weight.dtype, device=weight.device
        )

    def set_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        """Loads one adapter's A (r, d_in) and B (d_out, r) into `slot`, folding in `scale`."""
        if self.lora_a is None:
            self._allocate()
        assert self.lora_a is not None and self.lora_b is not None
        rank = lora_a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :rank].copy_(lora_a)
        self.lora_b[slot, :, :rank].copy_(lora_b * scale)
        self.occupied.add(slot)
        self.generation += 1

    def clear_slot(self, slot: int) -> None:
        """Zeroes `slot` so rows routed to it get exactly the base output."""
        if slot in self.occupied:
            assert self.lora_a is not None and self.lora_b is not None
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            self.occupied.discard(slot)
            self.generation += 1

    def release_memory(self) -> None:
        """Frees the slot stacks when no slot is occupied any more."""
        if not self.occupied:
            self.lora_a = None
            self.lora_b = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, d_in) -> (batch, seq, d_out)."""
        y = self.base_layer(x)  # (batch, seq, d_out)
        state = self.context.current
        if state is None or self.occupied.isdisjoint(state.slot_set):
            return y
        assert self.lora_a is not None and self.lora_b is not None
        cached = state.gathered.get(id(self))
        if cached is None or cached[0] != self.generation:
            rank = state.rank
            a, b = gather_rows(self.lora_a[:, :rank], self.lora_b[:, :, :rank], state.slot_ids)
            cached = (self.generation, a, b)
            state.gathered[id(self)] = cached
        _, a_rows, b_rows = cached  # (batch, rank, d_in), (batch, d_out, rank)
        xa = torch.bmm(x.to(a_rows.dtype), a_rows.transpose(1, 2))  # (batch, seq, rank)
        if y.dtype == xa.dtype:
            # y += xa @ B^T in one kernel.
            return torch.baddbmm(y, xa, b_rows.transpose(1, 2))  # (batch, seq, d_out)
        return y + torch.bmm(xa, b_rows.transpose(1, 2)).to(y.dtype)


def is_lora_target(module: nn.Module) -> bool:
    """True for layers loraserve can wrap: nn.Linear and GPT-2's Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))
