"""Host staging of a step's inputs: one int64 buffer, one host-to-device copy.

A decode step's token ids, positions, validity, feeds, block tables and adapter page tables
live in ONE static int64 buffer (buffer_sections), filled on the host through NumPy views
(staging_arrays, stage_decode) and sent in one copy; a prefill group's inputs likewise
(stage_prefill, read back through prefill_sections on either side of the copy).
"""

from __future__ import annotations

import numpy as np
import torch

from loraserve.server.engine.planner import RowPlan


def buffer_sections(buf: torch.Tensor, layout: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Views of one staging buffer (host or device) for layout (m, nb, np_): tokens, positions,
    valid, feeds (m,) each, block tables (m, nb), page tables (m, np_)."""
    m, nb, np_ = layout
    tokens, positions, valid, feeds = (buf[i * m : (i + 1) * m] for i in range(4))  # (m,) each
    blocks = buf[4 * m : 4 * m + m * nb].view(m, nb)  # (m, nb)
    pages = buf[4 * m + m * nb :].view(m, np_)  # (m, np_)
    return tokens, positions, valid, feeds, blocks, pages


def staging_arrays(buf: torch.Tensor, layout: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """buffer_sections of a host buffer as NumPy arrays sharing its memory: the host fills a
    step's inputs with a few array writes where torch would dispatch a dozen small ops."""
    return tuple(section.numpy() for section in buffer_sections(buf, layout))


def stage_decode(
    arrays: tuple[np.ndarray, ...],
    rows: tuple[RowPlan, ...],
    padded: int,
    span: int,
    width: int,
) -> None:
    """Writes a decode step's rows into staging `arrays` (staging_arrays): block tables `span`
    wide, page tables `width` wide, rows len(rows)..padded as padding (no token, feed -1, block
    and page 0: the scratch block, the zero page)."""
    tokens, positions, valid, feeds, blocks, pages = arrays
    batch = len(rows)
    tokens[:batch] = [r.tokens[0] for r in rows]
    positions[:batch] = [r.start for r in rows]
    valid[:batch] = 1
    feeds[:batch] = [r.feed for r in rows]
    tokens[batch:padded] = 0
    positions[batch:padded] = 0
    valid[batch:padded] = 0
    feeds[batch:padded] = -1
    blocks[:padded] = 0
    blocks[:batch, :span] = padded_table([r.blocks for r in rows], span)
    pages[:padded] = 0
    if 0 < width <= pages.shape[1]:  # a wider table runs eagerly from the plan instead
        pages[:batch, :width] = padded_table([r.pages for r in rows], width)


def padded_table(entries: list[tuple[int, ...]], width: int) -> np.ndarray:
    """(len(entries), width) int64: each row's entries, cut or padded with 0 to `width`."""
    pad = (0,) * width
    flat: list[int] = []
    for row in entries:
        flat.extend(row[:width])
        flat.extend(pad[len(row) :])
    return np.asarray(flat, dtype=np.int64).reshape(len(entries), width)


def prefill_sections(
    buf: torch.Tensor, batch: int, seq: int, span: int
) -> tuple[torch.Tensor, ...]:
    """Views of a prefill group's staging buffer (stage_prefill; host or device): token ids,
    positions and validity (batch, seq) each, block tables (batch, span), page tables
    (batch, width >= 1), and each row's last fed column (batch,)."""
    cells = batch * seq
    ids, positions, valid = (buf[i * cells : (i + 1) * cells].view(batch, seq) for i in range(3))
    blocks = buf[3 * cells : 3 * cells + batch * span].view(batch, span)
    pages = buf[3 * cells + batch * span : buf.shape[0] - batch].view(batch, -1)
    last = buf[buf.shape[0] - batch :]
    return ids, positions, valid, blocks, pages, last


def prefill_size(batch: int, seq: int, span: int, width: int) -> int:
    """Elements of a prefill group's staging buffer (stage_prefill)."""
    return batch * (3 * seq + span + max(width, 1) + 1)


def stage_prefill(
    rows: list[RowPlan],
    seq: int,
    span: int,
    width: int,
    *,
    pin: bool,
    batch: int | None = None,
) -> torch.Tensor:
    """A prefill group's inputs in one int64 host buffer (pinned when `pin`), laid out as
    prefill_sections reads them: rows right-padded to `seq` (token 0, position 0, not valid),
    block tables cut or padded to `span`, page tables padded to max(width, 1) with the zero
    page. `batch` (default len(rows)) rows in all: those past len(rows) are padding rows (no
    valid token, block and page 0, last column 0). Filled through NumPy views: a few array
    writes per row, not a torch op per field."""
    batch = len(rows) if batch is None else batch
    assert batch >= len(rows), "fewer rows than the group holds"
    buf = torch.zeros(prefill_size(batch, seq, span, width), dtype=torch.long, pin_memory=pin)
    ids, positions, valid, blocks, pages, last = (
        section.numpy() for section in prefill_sections(buf, batch, seq, span)
    )  # (total,) zeros: padding rows and columns stay 0
    for b, r in enumerate(rows):
        n = len(r.tokens)
        ids[b, :n] = r.tokens
        positions[b, :n] = np.arange(r.start, r.start + n)
        valid[b, :n] = 1
        last[b] = n - 1
    if rows:
        blocks[: len(rows)] = padded_table([r.blocks for r in rows], span)
        pages[: len(rows)] = padded_table([r.pages for r in rows], pages.shape[1])
    return buf
