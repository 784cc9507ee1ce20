"""Unit tests for server.engine.lora: the paged BGMV kernel against its reference, and the layer.

The kernel is compared to the row-by-row reference per dtype (Punica style) with adapters whose
ranks span several pages, the last one partial, placed on scattered pages. MultiLoRALinear is
checked against LoRA computed by hand: base(x) + scale * (x @ A.T) @ B.T per row, with base rows
and rows of adapters that do not target the layer bit-identical to the base layer. The page
stacks' growth, clearing, release and the per-batch gather cache are checked directly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraserve.server.engine import lora as lora_module
from loraserve.server.engine.lora import (
    BatchLoRAState,
    LoRAContext,
    MultiLoRALinear,
    gather_rows,
    lora_delta_bgmv,
    lora_delta_reference,
)

D_IN = 12
D_OUT = 10
PAGE_RANK = 4
NUM_PAGES = 8

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 5e-2, "rtol": 2e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}
EXACT_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 0.15, "rtol": 3e-2},
    torch.float16: {"atol": 5e-2, "rtol": 1e-2},
}
"""Against float32 math: the kernel also rounds x @ A.T to the dtype (outputs reach ~40)."""

RANKS = (3, 8, 13)
"""Adapter ranks: one partial page, two full pages, three full pages plus a partial one."""
PAGES: tuple[tuple[int, ...], ...] = ((6,), (7, 2), (3, 8, 1, 5))
"""Where each adapter of RANKS sits: scattered and out of order, as a pool hands them out."""

Factors = tuple[torch.Tensor, torch.Tensor]


def _pages_needed(rank: int) -> int:
    return -(-rank // PAGE_RANK)


def _paged_stacks(
    dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[Factors]]:
    """Page stacks (NUM_PAGES + 1 pages, page 0 zero) holding one adapter per RANKS entry.

    Returns lora_a (pages, PAGE_RANK, D_IN), lora_b (pages, D_OUT, PAGE_RANK) and each
    adapter's unpadded (A (r, D_IN), B (D_OUT, r)).
    """
    lora_a = torch.zeros(NUM_PAGES + 1, PAGE_RANK, D_IN, dtype=dtype)
    lora_b = torch.zeros(NUM_PAGES + 1, D_OUT, PAGE_RANK, dtype=dtype)
    factors: list[Factors] = []
    for rank, pages in zip(RANKS, PAGES, strict=True):
        assert len(pages) == _pages_needed(rank)
        a = torch.randn(rank, D_IN, generator=generator).to(dtype)  # (r, d_in)
        b = torch.randn(D_OUT, rank, generator=generator).to(dtype)  # (d_out, r)
        for i, page in enumerate(pages):
            lo, hi = i * PAGE_RANK, min((i + 1) * PAGE_RANK, rank)
            lora_a[page, : hi - lo] = a[lo:hi]
            lora_b[page, :, : hi - lo] = b[:, lo:hi]
        factors.append((a, b))
    return lora_a, lora_b, factors


def _table(rows: list[tuple[int, ...]], width: int | None = None) -> torch.Tensor:
    """(batch, width) page table, each row's pages then page 0 padding (as runner.lora_state)."""
    width = width or max(1, max(len(r) for r in rows))
    table = torch.zeros(len(rows), width, dtype=torch.long)
    for i, pages in enumerate(rows):
        table[i, : len(pages)] = torch.tensor(pages, dtype=torch.long)
    return table


def _state(rows: list[tuple[int, ...]]) -> BatchLoRAState:
    return BatchLoRAState(page_table=_table(rows), pages=frozenset(p for r in rows for p in r))


# Row -> adapter index into RANKS (None: the base model); base rows twice, adapters repeated.
ROW_ADAPTERS: list[int | None] = [None, 1, 0, None, 2, 1, 0, 2]


def test_gather_rows_concatenates_pages_in_order() -> None:
    generator = torch.Generator().manual_seed(0)
    lora_a, lora_b, factors = _paged_stacks(torch.float32, generator)
    table = _table([(), PAGES[2], PAGES[1]])
    a_rows, b_rows = gather_rows(lora_a, lora_b, table)
    width = table.shape[1] * PAGE_RANK
    assert a_rows.shape == (3, width, D_IN)
    assert b_rows.shape == (3, D_OUT, width)
    assert not a_rows[0].any() and not b_rows[0].any()
    for row, index in ((1, 2), (2, 1)):
        a, b = factors[index]
        rank = a.shape[0]
        assert torch.equal(a_rows[row, :rank], a)
        assert torch.equal(b_rows[row, :, :rank], b)
        assert not a_rows[row, rank:].any()
        assert not b_rows[row, :, rank:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bgmv_matches_reference(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    lora_a, lora_b, factors = _paged_stacks(dtype, generator)
    rows = [() if i is None else PAGES[i] for i in ROW_ADAPTERS]
    table = _table(rows)
    row_factors: list[Factors | None] = [None if i is None else factors[i] for i in ROW_ADAPTERS]
    x = torch.randn(len(rows), 4, D_IN, generator=generator).to(dtype)  # (batch, seq, d_in)

    fast = lora_delta_bgmv(x, lora_a, lora_b, table)
    reference = lora_delta_reference(x, row_factors, D_OUT)

    assert fast.shape == (len(rows), 4, D_OUT)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, reference, **TOLERANCES[dtype])
    # Against float32 math on the same (rounded) inputs.
    exact = lora_delta_reference(
        x.float(), [None if f is None else (f[0].float(), f[1].float()) for f in row_factors], D_OUT
    )
    torch.testing.assert_close(fast.float(), exact, **EXACT_TOLERANCES[dtype])
    for row, index in enumerate(ROW_ADAPTERS):
        if index is None:
            # Base rows (page 0 only) are exact zeros, not merely small.
            assert torch.equal(fast[row], torch.zeros_like(fast[row])), row
        else:
            # The adapter term is not trivially zero (otherwise the test proves nothing).
            assert fast[row].float().abs().max() > 0.1, row


def test_bgmv_extra_zero_page_columns_change_nothing_in_float32() -> None:
    generator = torch.Generator().manual_seed(1)
    lora_a, lora_b, _ = _paged_stacks(torch.float32, generator)
    rows = [PAGES[0], PAGES[1], ()]
    x = torch.randn(3, 2, D_IN, generator=generator)  # (batch, seq, d_in)
    tight = lora_delta_bgmv(x, lora_a, lora_b, _table(rows))
    padded = lora_delta_bgmv(x, lora_a, lora_b, _table(rows, width=5))
    torch.testing.assert_close(tight, padded, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded[2], torch.zeros_like(padded[2]))


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


BASES: list[Callable[[], nn.Module]] = [_linear, _conv1d]


def _adapter(rank: int, seed: int) -> Factors:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, D_IN, generator=generator)  # (r, d_in)
    b = torch.randn(D_OUT, rank, generator=generator)  # (d_out, r)
    return a, b


def _wrap(base: nn.Module) -> tuple[MultiLoRALinear, LoRAContext]:
    context = LoRAContext()
    return MultiLoRALinear(base, context=context), context


def _write(
    layer: MultiLoRALinear,
    pages: tuple[int, ...],
    factors: Factors,
    scale: float = 1.0,
    num_pages: int = NUM_PAGES,
) -> None:
    layer.write(list(pages), PAGE_RANK, num_pages, factors[0], factors[1], scale)


def _spy_gathers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the layer's calls to gather_rows."""
    calls: list[int] = []
    real = lora_module.gather_rows

    def spy(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(lora_module, "gather_rows", spy)
    return calls


@pytest.mark.parametrize("make_base", BASES, ids=["linear", "conv1d"])
def test_without_state_output_is_base_exactly(make_base: Callable[[], nn.Module]) -> None:
    base = make_base()
    layer, context = _wrap(base)
    assert (layer.in_features, layer.out_features) == (D_IN, D_OUT)
    assert layer.lora_a is None and layer.allocated_bytes() == 0
    _write(layer, (1,), _adapter(4, seed=3), scale=2.0)
    x = torch.randn(3, 5, D_IN)  # (batch, seq, d_in)
    assert context.current is None
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("make_base", BASES, ids=["linear", "conv1d"])
def test_each_row_gets_its_own_adapter(make_base: Callable[[], nn.Module]) -> None:
    base = make_base()
    layer, context = _wrap(base)
    scales = (0.5, 2.0, 3.0)
    adapters = [_adapter(rank, seed=10 + i) for i, rank in enumerate(RANKS)]
    for pages, factors, scale in zip(PAGES, adapters, scales, strict=True):
        _write(layer, pages, factors, scale)
    assert layer.occupied == {p for pages in PAGES for p in pages}
    rows = [() if i is None else PAGES[i] for i in ROW_ADAPTERS]
    x = torch.randn(len(rows), 3, D_IN)  # (batch, seq, d_in)
    context.current = _state(rows)

    y = layer(x)  # (batch, seq, d_out)
    base_y = base(x)
    assert y.shape == base_y.shape
    for row, index in enumerate(ROW_ADAPTERS):
        if index is None:
            assert torch.equal(y[row], base_y[row]), row
            continue
        a, b = adapters[index]
        expected = base_y[row] + scales[index] * (x[row] @ a.T) @ b.T  # (seq, d_out)
        torch.testing.assert_close(y[row], expected, atol=1e-5, rtol=1e-5)
        assert (y[row] - base_y[row]).abs().max() > 0.1, row


def test_write_lays_out_a_partial_last_page_with_zero_tail() -> None:
    layer, _ = _wrap(_linear())
    a, b = _adapter(13, seed=15)
    _write(layer, PAGES[2], (a, b), scale=0.25)
    assert layer.lora_a is not None and layer.lora_b is not None
    assert layer.lora_a.dtype == torch.float32
    for i, page in enumerate(PAGES[2]):
        lo, hi = i * PAGE_RANK, min((i + 1) * PAGE_RANK, 13)
        torch.testing.assert_close(layer.lora_a[page, : hi - lo], a[lo:hi])
        torch.testing.assert_close(layer.lora_b[page, :, : hi - lo], 0.25 * b[:, lo:hi])
        assert not layer.lora_a[page, hi - lo :].any()
        assert not layer.lora_b[page, :, hi - lo :].any()
    for page in set(range(layer.lora_a.shape[0])) - set(PAGES[2]):
        assert not layer.lora_a[page].any() and not layer.lora_b[page].any(), page


def test_rewriting_a_page_with_a_smaller_rank_zeroes_the_old_tail() -> None:
    layer, context = _wrap(_linear())
    _write(layer, (1,), _adapter(4, seed=30))
    a, b = _adapter(2, seed=31)
    _write(layer, (1,), (a, b))
    assert layer.lora_a is not None and layer.lora_b is not None
    assert not layer.lora_a[1, 2:].any()
    assert not layer.lora_b[1, :, 2:].any()
    x = torch.randn(1, 2, D_IN)
    context.current = _state([(1,)])
    expected = layer.base_layer(x[0]) + (x[0] @ a.T) @ b.T
    torch.testing.assert_close(layer(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_rows_of_adapters_not_targeting_the_layer_get_base_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _spy_gathers(monkeypatch)
    base = _linear()
    layer, context = _wrap(base)
    big_pool = 40  # the stack is allocated for 8 pages: pages 8.. are beyond it
    _write(layer, (2,), _adapter(4, seed=60), num_pages=big_pool)
    assert layer.lora_a is not None and layer.lora_a.shape[0] == 8
    x = torch.randn(4, 3, D_IN)  # (batch, seq, d_in)
    base_y = base(x)

    # Page 5 is inside the stack but not occupied, page 20 is past its end: no row touches page 2.
    context.current = _state([(5,), (), (20, 21), (5, 30)])
    assert torch.equal(layer(x), base_y)
    assert calls == [], "a layer no row's adapter touches must skip the LoRA path"

    # Now one row uses this layer's page: the others stay exactly base.
    context.current = _state([(20, 21), (2,), (5,), (30, 5, 6)])
    y = layer(x)
    assert calls == [1]
    for row in (0, 2, 3):
        assert torch.equal(y[row], base_y[row]), row
    assert not torch.allclose(y[1], base_y[1])


def test_clear_restores_base_output() -> None:
    base = _linear()
    layer, context = _wrap(base)
    _write(layer, PAGES[1], _adapter(8, seed=40))
    _write(layer, PAGES[0], _adapter(3, seed=41))
    x = torch.randn(2, 3, D_IN)
    context.current = _state([PAGES[1], PAGES[0]])
    assert not torch.allclose(layer(x)[0], base(x)[0])

    generation = layer.generation
    layer.clear(list(PAGES[1]))
    assert layer.generation > generation
    assert layer.occupied == set(PAGES[0])
    assert layer.lora_a is not None and layer.lora_b is not None
    for page in PAGES[1]:
        assert not layer.lora_a[page].any() and not layer.lora_b[page].any(), page
    y = layer(x)
    assert torch.equal(y[0], base(x)[0])
    assert not torch.allclose(y[1], base(x)[1])

    generation = layer.generation
    layer.clear(list(PAGES[1]))  # clearing unoccupied pages is a no-op
    layer.clear([4, 30])  # pages this layer never held, even past its stack
    assert layer.occupied == set(PAGES[0])
    assert layer.generation == generation


def test_page_stacks_grow_by_doubling_up_to_the_pool_and_keep_contents() -> None:
    layer, context = _wrap(_linear())
    num_pages = 40
    written: dict[int, Factors] = {}

    def write(page: int, seed: int) -> None:
        written[page] = _adapter(PAGE_RANK, seed=seed)
        _write(layer, (page,), written[page], num_pages=num_pages)

    def check(size: int) -> None:
        assert layer.lora_a is not None and layer.lora_b is not None
        assert layer.lora_a.shape == (size, PAGE_RANK, D_IN)
        assert layer.lora_b.shape == (size, D_OUT, PAGE_RANK)
        assert layer.allocated_bytes() == size * layer.page_bytes(PAGE_RANK, 4)
        assert layer.occupied == set(written)
        for page in range(size):
            if page in written:
                a, b = written[page]
                assert torch.equal(layer.lora_a[page], a), page
                assert torch.equal(layer.lora_b[page], b), page
            else:
                assert not layer.lora_a[page].any() and not layer.lora_b[page].any(), page

    assert layer.page_bytes(PAGE_RANK, 4) == PAGE_RANK * (D_IN + D_OUT) * 4
    write(1, seed=1)
    check(8)  # at least 8 pages on first use
    generation = layer.generation
    write(7, seed=7)
    check(8)  # fits: no growth
    write(8, seed=8)
    check(16)  # doubled
    assert layer.generation >= generation + 3, "growth and writes must bump the generation"
    write(20, seed=20)
    check(32)
    write(40, seed=40)
    check(41)  # doubling capped at num_pages + 1
    # A jump past twice the size goes straight to the page needed.
    layer2, _ = _wrap(_linear())
    _write(layer2, (25,), _adapter(2, seed=2), num_pages=num_pages)
    assert layer2.lora_a is not None and layer2.lora_a.shape[0] == 26
    # A small pool caps the first allocation too.
    layer3, _ = _wrap(_linear())
    _write(layer3, (1,), _adapter(2, seed=3), num_pages=2)
    assert layer3.lora_a is not None and layer3.lora_a.shape[0] == 3

    # Contents survive growth in the forward pass as well.
    x = torch.randn(2, 2, D_IN)
    context.current = _state([(1,), (40,)])
    y = layer(x)
    for row, page in enumerate((1, 40)):
        a, b = written[page]
        expected = layer.base_layer(x[row]) + (x[row] @ a.T) @ b.T
        torch.testing.assert_close(y[row], expected, atol=1e-5, rtol=1e-5)


def test_release_memory_only_when_no_page_is_occupied() -> None:
    layer, context = _wrap(_linear())
    assert layer.lora_a is None and layer.lora_b is None
    layer.release_memory()  # nothing allocated: a no-op
    _write(layer, (1,), _adapter(4, seed=50))
    _write(layer, (3, 4), _adapter(6, seed=51))
    assert layer.lora_a is not None and layer.allocated_bytes() > 0

    layer.clear([1])
    layer.release_memory()
    assert layer.lora_a is not None and layer.lora_b is not None
    assert layer.allocated_bytes() == 8 * layer.page_bytes(PAGE_RANK, 4)

    layer.clear([3, 4])
    layer.release_memory()
    assert layer.lora_a is None and layer.lora_b is None
    assert layer.occupied == set()
    assert layer.allocated_bytes() == 0
    # Routing to a now-empty page falls back to the base path without touching the stacks.
    x = torch.randn(1, 2, D_IN)
    context.current = _state([(3, 4)])
    assert torch.equal(layer(x), layer.base_layer(x))
    # And the layer can be used again afterwards.
    a, b = _adapter(4, seed=52)
    _write(layer, (2,), (a, b))
    context.current = _state([(2,)])
    expected = layer.base_layer(x[0]) + (x[0] @ a.T) @ b.T
    torch.testing.assert_close(layer(x)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer_matches_hand_computed_lora(dtype: torch.dtype) -> None:
    base = _linear().to(dtype)
    layer, context = _wrap(base)
    a, b = _adapter(6, seed=70)
    _write(layer, (3, 1), (a, b), scale=0.5)
    assert layer.lora_a is not None and layer.lora_a.dtype == dtype
    assert layer.page_bytes(PAGE_RANK, base.weight.element_size()) == PAGE_RANK * (D_IN + D_OUT) * 2
    x = torch.randn(2, 3, D_IN).to(dtype)
    context.current = _state([(3, 1), ()])
    y = layer(x)
    assert y.dtype == dtype
    assert torch.equal(y[1], base(x)[1])
    expected = base(x)[0].float() + 0.5 * (x[0].float() @ a.T) @ b.T
    torch.testing.assert_close(y[0].float(), expected, atol=0.15, rtol=3e-2)


@pytest.mark.parametrize(
    "module", [nn.Conv2d(2, 2, 1), nn.Embedding(4, 4), nn.LayerNorm(4), nn.Identity()]
)
def test_wrapping_anything_else_raises(module: nn.Module) -> None:
    with pytest.raises(TypeError, match=type(module).__name__):
        MultiLoRALinear(module, context=LoRAContext())


def test_gathered_rows_are_reused_across_steps_and_refreshed_after_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _spy_gathers(monkeypatch)
    layer, context = _wrap(_linear())
    _write(layer, (1, 2), _adapter(7, seed=80))
    x = torch.randn(2, 1, D_IN)
    state = _state([(1, 2), ()])
    context.current = state
    first = layer(x)
    assert torch.equal(layer(x), first)  # a second decode step of the same batch
    assert calls == [1], "the batch's rows must be gathered once, not per step"
    assert state.gathered[id(layer)][0] == layer.generation

    a, b = _adapter(7, seed=81)
    _write(layer, (1, 2), (a, b))  # a write invalidates the copy
    second = layer(x)
    assert calls == [1, 1]
    assert not torch.allclose(second[0], first[0])
    expected = layer.base_layer(x[0]) + (x[0] @ a.T) @ b.T
    torch.testing.assert_close(second[0], expected, atol=1e-5, rtol=1e-5)

    _write(layer, (9,), _adapter(2, seed=82), num_pages=16)  # growth invalidates it too
    assert layer.lora_a is not None and layer.lora_a.shape[0] == 16
    torch.testing.assert_close(layer(x), second, atol=0, rtol=0)
    assert calls == [1, 1, 1]

    layer.clear([9])  # so does a clear
    layer(x)
    assert calls == [1, 1, 1, 1]
    layer(x)
    assert calls == [1, 1, 1, 1]

    context.current = _state([(1, 2), ()])  # a new batch gathers afresh
    torch.testing.assert_close(layer(x), second, atol=0, rtol=0)
    assert calls == [1, 1, 1, 1, 1]
