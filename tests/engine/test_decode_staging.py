"""The decode step's host staging (server.engine.executor.stage_decode): what one step writes
into the int64 buffer its single host-to-device copy sends."""

from __future__ import annotations

import torch

from loraserve.server.engine.executor import stage_decode, staging_arrays
from loraserve.server.engine.planner import RowPlan

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
