"""The steps' host staging (server.engine.staging.stage_decode, stage_prefill): what one step
writes into the int64 buffer its single host-to-device copy sends."""

from __future__ import annotations

import torch

from loraserve.server.engine.planner import RowPlan
from loraserve.server.engine.staging import (
    prefill_sections,
    prefill_size,
    stage_decode,
    stage_prefill,
    staging_arrays,
)

LAYOUT = (4, 3, 2)  # (max rows, blocks per row, pages per row)


def _buffer() -> torch.Tensor:
    m, nb, np_ = LAYOUT
    return torch.full((4 * m + m * nb + m * np_,), 99, dtype=torch.long)  # stale values


def _row(slot: int, token: int, start: int, blocks: tuple[int, ...], pages=(), feed=-1) -> RowPlan:
    return RowPlan(slot=slot, tokens=(token,), start=start, blocks=blocks, pages=pages, feed=feed)


def test_arrays_are_views_of_the_buffer_sections() -> None:
    buf = _buffer()
    tokens, positions, valid, feeds, blocks, pages = staging_arrays(buf, LAYOUT)
    tokens[0], feeds[3], blocks[1, 2], pages[3, 1] = 1, 2, 3, 4
    assert buf[0] == 1 and buf[3 * 4 + 3] == 2
    assert buf[16 + 1 * 3 + 2] == 3 and buf[16 + 12 + 3 * 2 + 1] == 4
    assert positions.shape == valid.shape == (4,)


def test_rows_padding_and_tables() -> None:
    buf = _buffer()
    arrays = staging_arrays(buf, LAYOUT)
    rows = (
        _row(0, token=11, start=20, blocks=(5, 6), pages=(7,)),
        _row(1, token=12, start=3, blocks=(8,), feed=1),
    )
    stage_decode(arrays, rows, padded=3, span=2, width=1)
    tokens, positions, valid, feeds, blocks, pages = (a.tolist() for a in arrays)
    assert tokens[:3] == [11, 12, 0] and positions[:3] == [20, 3, 0]
    assert valid[:3] == [1, 1, 0] and feeds[:3] == [-1, 1, -1]
    # A short row is padded with the scratch block; every column past the span is 0.
    assert blocks[:3] == [[5, 6, 0], [8, 0, 0], [0, 0, 0]]
    assert pages[:3] == [[7, 0], [0, 0], [0, 0]]
    # Rows past the padded bucket are never read: left as they were.
    assert tokens[3] == 99 and blocks[3] == [99, 99, 99]


def test_blocks_past_the_span_are_cut() -> None:
    arrays = staging_arrays(_buffer(), LAYOUT)
    stage_decode(arrays, (_row(0, 1, 0, blocks=(4, 5, 6)),), padded=1, span=1, width=0)
    assert arrays[4][0].tolist() == [4, 0, 0]
    assert arrays[5][0].tolist() == [0, 0]  # no adapter: the zero page


def test_a_table_wider_than_the_buffer_is_not_staged() -> None:
    # The executor runs such a step eagerly from the plan; staging must not fail on it.
    arrays = staging_arrays(_buffer(), LAYOUT)
    stage_decode(arrays, (_row(0, 1, 0, blocks=(4,), pages=(1, 2, 3)),), 1, span=1, width=3)
    assert arrays[5][0].tolist() == [0, 0]


def test_a_second_step_overwrites_the_first() -> None:
    arrays = staging_arrays(_buffer(), LAYOUT)
    stage_decode(arrays, (_row(0, 1, 40, (1, 2, 3), (4, 5)), _row(1, 2, 40, (6, 7, 8))), 2, 3, 2)
    stage_decode(arrays, (_row(0, 9, 2, (1,)),), padded=2, span=1, width=0)
    assert arrays[0][:2].tolist() == [9, 0] and arrays[2][:2].tolist() == [1, 0]
    assert arrays[4][:2].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert arrays[5][:2].tolist() == [[0, 0], [0, 0]]


def _prefill_row(slot: int, tokens: tuple[int, ...], start: int, blocks, pages=()) -> RowPlan:
    return RowPlan(slot=slot, tokens=tokens, start=start, blocks=blocks, pages=pages, feed=-1)


def test_prefill_rows_are_right_padded_and_tables_cut_to_the_span() -> None:
    rows = [
        _prefill_row(0, (5, 6, 7), start=16, blocks=(3, 4, 9), pages=(2,)),
        _prefill_row(1, (8,), start=0, blocks=(1,)),
    ]
    buf = stage_prefill(rows, seq=3, span=2, width=1, pin=False)
    ids, positions, valid, blocks, pages, last = (
        s.tolist() for s in prefill_sections(buf, batch=2, seq=3, span=2)
    )
    assert ids == [[5, 6, 7], [8, 0, 0]]
    assert positions == [[16, 17, 18], [0, 0, 0]]
    assert valid == [[1, 1, 1], [1, 0, 0]]
    assert blocks == [[3, 4], [1, 0]]  # a block past the span is not sent; short rows pad 0
    assert pages == [[2], [0]]  # no adapter: the zero page
    assert last == [2, 0]  # each row's last fed column: where its next token's logits are
    assert buf.numel() == 2 * (3 * 3 + 2 + 1 + 1)


def test_prefill_without_adapters_still_has_a_page_column() -> None:
    rows = [_prefill_row(0, (1, 2), start=0, blocks=(7,))]
    sections = prefill_sections(stage_prefill(rows, 2, 1, 0, pin=False), 1, 2, 1)
    assert sections[4].shape == (1, 1) and sections[4].tolist() == [[0]]
    assert sections[5].tolist() == [1]


def test_prefill_sections_of_a_copy_read_the_same_values() -> None:
    # The executor slices the device copy with the same function as the host fill.
    rows = [_prefill_row(0, (4, 5), start=2, blocks=(6,), pages=(3, 1))]
    host = stage_prefill(rows, 2, 1, 2, pin=False)
    copy = host.clone()
    for a, b in zip(prefill_sections(host, 1, 2, 1), prefill_sections(copy, 1, 2, 1), strict=True):
        assert a.tolist() == b.tolist()
    assert prefill_sections(copy, 1, 2, 1)[4].tolist() == [[3, 1]]


def test_prefill_padding_rows_are_empty() -> None:
    # A prefill graph's batch bucket holds more rows than the group: the rest are padding.
    rows = [_prefill_row(0, (5, 6), start=0, blocks=(3,), pages=(2, 4))]
    buf = stage_prefill(rows, seq=4, span=2, width=2, pin=False, batch=3)
    assert buf.numel() == prefill_size(3, 4, 2, 2)
    ids, positions, valid, blocks, pages, last = (
        s.tolist() for s in prefill_sections(buf, batch=3, seq=4, span=2)
    )
    assert ids == [[5, 6, 0, 0], [0] * 4, [0] * 4]
    assert positions == [[0, 1, 0, 0], [0] * 4, [0] * 4]
    assert valid == [[1, 1, 0, 0], [0] * 4, [0] * 4]  # no valid token: K/V to the scratch slot
    assert blocks == [[3, 0], [0, 0], [0, 0]] and pages == [[2, 4], [0, 0], [0, 0]]
    assert last == [1, 0, 0]
