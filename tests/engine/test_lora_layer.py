"""Unit tests for server.engine.lora: the BGMV kernel against its reference, and MultiLoRALinear.

The kernel is compared to the row-by-row reference per dtype (Punica style). The layer is checked
against LoRA computed by hand: base(x) + scale * (x @ A.T) @ B.T per row, with slot 0 rows
bit-identical to the base layer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from server.engine import lora as lora_module
from server.engine.lora import (
    BatchLoRAState,
    LoRAContext,
    MultiLoRALinear,
    lora_delta_bgmv,
    lora_delta_reference,
)

D_IN = 12
D_OUT = 10
MAX_RANK = 8
NUM_SLOTS = 3

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 5e-2, "rtol": 2e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}


def _padded_stacks(
    ranks: list[int], dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Slot stacks with slot 0 zero and slot s holding an adapter of rank ranks[s - 1], padded.

    Returns lora_a (slots, MAX_RANK, D_IN), lora_b (slots, D_OUT, MAX_RANK) and the unpadded
    (A (r, D_IN), B (D_OUT, r)) of every slot (slot 0 as rank-0 empties).
    """
    slots = len(ranks) + 1
    lora_a = torch.zeros(slots, MAX_RANK, D_IN, dtype=dtype)
    lora_b = torch.zeros(slots, D_OUT, MAX_RANK, dtype=dtype)
    factors = [(torch.zeros(0, D_IN, dtype=dtype), torch.zeros(D_OUT, 0, dtype=dtype))]
    for s, rank in enumerate(ranks, start=1):
        a = torch.randn(rank, D_IN, generator=generator).to(dtype)  # (r, d_in)
        b = torch.randn(D_OUT, rank, generator=generator).to(dtype)  # (d_out, r)
        lora_a[s, :rank] = a
        lora_b[s, :, :rank] = b
        factors.append((a, b))
    return lora_a, lora_b, factors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bgmv_matches_reference(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    lora_a, lora_b, factors = _padded_stacks([2, 8, 5], dtype, generator)
    slot_ids = torch.tensor([0, 2, 1, 0, 3, 2, 1])  # (batch,) mixed, slot 0 twice
    x = torch.randn(len(slot_ids), 4, D_IN, generator=generator).to(dtype)  # (batch, seq, d_in)

    fast = lora_delta_bgmv(x, lora_a, lora_b, slot_ids)
    reference = lora_delta_reference(x, lora_a, lora_b, slot_ids)

    assert fast.shape == (len(slot_ids), 4, D_OUT)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, reference, **TOLERANCES[dtype])
    # Against float32 math on the same (rounded) inputs, and on the unpadded factors.
    exact = lora_delta_reference(x.float(), lora_a.float(), lora_b.float(), slot_ids)
    torch.testing.assert_close(fast.float(), exact, **TOLERANCES[dtype])
    for row, slot in enumerate(slot_ids.tolist()):
        a, b = factors[slot]
        unpadded = (x[row].float() @ a.float().T) @ b.float().T  # (seq, d_out)
        torch.testing.assert_close(fast[row].float(), unpadded, **TOLERANCES[dtype])
    # Slot 0 rows are exact zeros, not merely small.
    for row in (0, 3):
        assert torch.equal(fast[row], torch.zeros_like(fast[row]))
    # The adapter term is not trivially zero elsewhere (otherwise the test proves nothing).
    assert fast[1].abs().max() > 0.1


def test_bgmv_padding_rank_slice_is_exact_in_float32() -> None:
    generator = torch.Generator().manual_seed(1)
    lora_a, lora_b, _ = _padded_stacks([2, 3], torch.float32, generator)
    slot_ids = torch.tensor([1, 2, 0])
    x = torch.randn(3, 2, D_IN, generator=generator)  # (batch, seq, d_in)
    full = lora_delta_bgmv(x, lora_a, lora_b, slot_ids)
    sliced = lora_delta_bgmv(x, lora_a[:, :3], lora_b[:, :, :3], slot_ids)
    torch.testing.assert_close(full, sliced, atol=1e-6, rtol=1e-6)


# ---- MultiLoRALinear --------------------------------------------------------------------------


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT)


def _conv1d(seed: int = 0) -> Conv1D:
    torch.manual_seed(seed)
    layer = Conv1D(D_OUT, D_IN)  # weight (d_in, d_out)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def _adapter(rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, D_IN, generator=generator)  # (r, d_in)
    b = torch.randn(D_OUT, rank, generator=generator)  # (d_out, r)
    return a, b


def _state(slot_ids: list[int], rank: int) -> BatchLoRAState:
    return BatchLoRAState(
        slot_ids=torch.tensor(slot_ids, dtype=torch.long),
        slot_set=frozenset(s for s in slot_ids if s),
        rank=rank,
    )


def _wrap(base: nn.Module) -> tuple[MultiLoRALinear, LoRAContext]:
    context = LoRAContext()
    layer = MultiLoRALinear(base, context=context, num_slots=NUM_SLOTS, max_rank=MAX_RANK)
    return layer, context


@pytest.mark.parametrize("make_base", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_without_state_output_is_base_exactly(make_base) -> None:
    base = make_base()
    layer, context = _wrap(base)
    assert (layer.in_features, layer.out_features) == (D_IN, D_OUT)
    a, b = _adapter(4, seed=3)
    layer.set_slot(1, a, b, scale=2.0)
    x = torch.randn(3, 5, D_IN)  # (batch, seq, d_in)
    assert context.current is None
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("make_base", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_each_row_gets_its_own_adapter(make_base) -> None:
    base = make_base()
    layer, context = _wrap(base)
    adapters = {1: (_adapter(4, seed=10), 0.5), 2: (_adapter(8, seed=11), 2.0)}
    adapters[3] = (_adapter(2, seed=12), 3.0)
    for slot, ((a, b), scale) in adapters.items():
        layer.set_slot(slot, a, b, scale)
    slot_ids = [2, 0, 1, 3, 0, 1]
    x = torch.randn(len(slot_ids), 3, D_IN)  # (batch, seq, d_in)
    context.current = _state(slot_ids, rank=8)

    y = layer(x)  # (batch, seq, d_out)
    base_y = base(x)
    for row, slot in enumerate(slot_ids):
        if slot == 0:
            assert torch.equal(y[row], base_y[row]), row
            continue
        (a, b), scale = adapters[slot]
        expected = base_y[row] + scale * (x[row] @ a.T) @ b.T  # (seq, d_out)
        torch.testing.assert_close(y[row], expected, atol=1e-5, rtol=1e-5)
        assert (y[row] - base_y[row]).abs().max() > 0.1, row


def test_state_rank_slice_matches_full_rank() -> None:
    layer, context = _wrap(_linear())
    a, b = _adapter(3, seed=20)
    layer.set_slot(2, a, b, scale=1.5)
    x = torch.randn(2, 4, D_IN)  # (batch, seq, d_in)
    context.current = _state([2, 0], rank=3)
    sliced = layer(x)
    context.current = _state([2, 0], rank=MAX_RANK)
    full = layer(x)
    torch.testing.assert_close(sliced, full, atol=1e-6, rtol=1e-6)
    expected = layer.base_layer(x[0]) + 1.5 * (x[0] @ a.T) @ b.T
    torch.testing.assert_close(sliced[0], expected, atol=1e-5, rtol=1e-5)


def test_set_slot_overwrites_a_larger_previous_rank() -> None:
    layer, context = _wrap(_linear())
    big_a, big_b = _adapter(8, seed=30)
    layer.set_slot(1, big_a, big_b, scale=1.0)
    a, b = _adapter(2, seed=31)
    layer.set_slot(1, a, b, scale=1.0)
    assert layer.lora_a is not None and layer.lora_b is not None
    assert torch.equal(layer.lora_a[1, 2:], torch.zeros(MAX_RANK - 2, D_IN))
    assert torch.equal(layer.lora_b[1, :, 2:], torch.zeros(D_OUT, MAX_RANK - 2))
    x = torch.randn(1, 2, D_IN)
    context.current = _state([1], rank=MAX_RANK)
    expected = layer.base_layer(x[0]) + (x[0] @ a.T) @ b.T
    torch.testing.assert_close(layer(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_clear_slot_restores_base_output() -> None:
    base = _linear()
    layer, context = _wrap(base)
    layer.set_slot(1, *_adapter(4, seed=40), scale=1.0)
    layer.set_slot(2, *_adapter(4, seed=41), scale=1.0)
    x = torch.randn(2, 3, D_IN)
    context.current = _state([1, 2], rank=4)
    assert not torch.allclose(layer(x)[0], base(x)[0])

    layer.clear_slot(1)
    assert layer.occupied == {2}
    assert layer.lora_a is not None and layer.lora_b is not None
    assert torch.equal(layer.lora_a[1], torch.zeros(MAX_RANK, D_IN))
    assert torch.equal(layer.lora_b[1], torch.zeros(D_OUT, MAX_RANK))
    y = layer(x)
    assert torch.equal(y[0], base(x)[0])
    assert not torch.allclose(y[1], base(x)[1])
    layer.clear_slot(1)  # clearing an empty slot is a no-op
    assert layer.occupied == {2}


def test_release_memory_only_when_no_slot_is_occupied() -> None:
    layer, context = _wrap(_linear())
    assert layer.lora_a is None and layer.lora_b is None
    layer.set_slot(1, *_adapter(4, seed=50), scale=1.0)
    layer.set_slot(3, *_adapter(4, seed=51), scale=1.0)
    assert layer.lora_a is not None
    assert layer.lora_a.shape == (NUM_SLOTS + 1, MAX_RANK, D_IN)
    assert layer.lora_b is not None
    assert layer.lora_b.shape == (NUM_SLOTS + 1, D_OUT, MAX_RANK)

    layer.clear_slot(1)
    layer.release_memory()
    assert layer.lora_a is not None and layer.lora_b is not None

    layer.clear_slot(3)
    layer.release_memory()
    assert layer.lora_a is None and layer.lora_b is None
    assert layer.occupied == set()
    # Routing to a now-empty slot falls back to the base path without touching the stacks.
    x = torch.randn(1, 2, D_IN)
    context.current = _state([3], rank=4)
    assert torch.equal(layer(x), layer.base_layer(x))
    # And the layer can be used again afterwards.
    a, b = _adapter(4, seed=52)
    layer.set_slot(2, a, b, scale=1.0)
    context.current = _state([2], rank=4)
    expected = layer.base_layer(x[0]) + (x[0] @ a.T) @ b.T
    torch.testing.assert_close(layer(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_layer_untouched_by_the_batch_skips_the_lora_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = lora_module.gather_rows

    def spy(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(lora_module, "gather_rows", spy)
    base = _linear()
    layer, context = _wrap(base)
    layer.set_slot(2, *_adapter(4, seed=60), scale=1.0)
    x = torch.randn(2, 3, D_IN)

    context.current = _state([1, 0], rank=4)  # slot 1 is some adapter not targeting this layer
    assert torch.equal(layer(x), base(x))
    assert calls == []

    context.current = _state([1, 2], rank=4)  # now a row uses this layer's slot
    y = layer(x)
    assert calls == [1]
    assert torch.equal(y[0], base(x)[0])
    assert not torch.allclose(y[1], base(x)[1])


def test_half_precision_layer_matches_hand_computed_lora() -> None:
    base = _linear().to(torch.bfloat16)
    layer, context = _wrap(base)
    a, b = _adapter(4, seed=70)
    layer.set_slot(1, a, b, scale=0.5)
    assert layer.lora_a is not None and layer.lora_a.dtype == torch.bfloat16
    x = torch.randn(2, 3, D_IN).to(torch.bfloat16)
    context.current = _state([1, 0], rank=4)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[1], base(x)[1])
    expected = base(x)[0].float() + 0.5 * (x[0].float() @ a.T) @ b.T
    torch.testing.assert_close(y[0].float(), expected, atol=0.15, rtol=3e-2)


@pytest.mark.parametrize(
    "module", [nn.Conv2d(2, 2, 1), nn.Embedding(4, 4), nn.LayerNorm(4), nn.Identity()]
)
def test_wrapping_anything_else_raises(module: nn.Module) -> None:
    with pytest.raises(TypeError, match=type(module).__name__):
        MultiLoRALinear(module, context=LoRAContext(), num_slots=2, max_rank=4)


def test_gathered_rows_are_reused_across_steps_and_refreshed_after_slot_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = lora_module.gather_rows

    def spy(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(lora_module, "gather_rows", spy)
    base = _linear()
    layer, context = _wrap(base)
    layer.set_slot(1, *_adapter(4, seed=80), scale=1.0)
    x = torch.randn(2, 1, D_IN)
    context.current = _state([1, 0], rank=4)
    first = layer(x)
    assert torch.equal(layer(x), first)  # a second decode step of the same batch
    assert calls == [1], "the batch's rows must be gathered once, not per step"
    layer.set_slot(1, *_adapter(4, seed=81), scale=1.0)  # a write invalidates the copy
    assert not torch.allclose(layer(x)[0], first[0])
    assert calls == [1, 1]
