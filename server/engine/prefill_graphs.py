"""Small prefills replayed from CUDA graphs captured at start, as decode steps are.

An eager prefill of the own forward dispatches some sixty torch ops and eight Triton launches
per layer from Python. On an H200 (the bench's 1b model, bf16) a prefill of a few short rows
took 13-20 ms of which the device computed about one: the host launching kernels is the whole
cost. Those small prefills are the ones that stall running rows: a request joining the batch,
the joiners of a cold adapter, a wave of requests arriving through gRPC one by one. Captured
once per shape, one replay launches them all.

A graph's shape is its key: (batch bucket, seq bucket, page-table width, adapter kinds). A
prefill group runs in the smallest graph that holds it, padded as the eager prefill pads:

- rows right-padded to the seq bucket, their padding tokens not valid (K/V to the scratch slot);
- padding rows up to the batch bucket, with no valid token at all (stage_prefill's `batch`);
- block tables padded with block 0 to one fixed span, `span` blocks: key positions past a row's
  own are masked, so a wider table reads nothing more;
- page tables padded with the zero page to the width bucket.

Its logits (batch bucket, vocab) are a static output: `run` returns a copy of the group's rows,
since the next group of the same shape replays into the same memory. A group that needs a wider
KV span (a chunk deep into a long prompt), more rows or tokens than the largest graph holds, or
prompt scoring runs eagerly. Capture needs CUDA; `capture` is a parameter so that the bucketing,
padding and static buffer plumbing can be tested on CPU with an eager stand-in against the eager
prefill (tests/engine/test_prefill_graphs.py; CI also runs the whole engine suite so,
`--emulate-prefill-graphs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from loraserve.server.engine.llama import ATTENTION_KINDS
from loraserve.server.engine.planner import RowPlan, blocks_for
from loraserve.server.engine.staging import prefill_sections, prefill_size, stage_prefill

PREFILL_BATCHES = (1, 2, 4, 8, 12, 16)
PREFILL_SEQS = (32, 64, 128, 256)
"""Graph shapes: rows, and tokens per row (padded). The ones up to the token budget exist.

12 rows: a wave of requests arriving one by one through gRPC reaches a prefill in groups of
about 9-12 (on an H200, 11 on average over 96 requests), which 16 rows padded by a third or
more of compute-bound prefill; the 12-row graphs cost 3 shapes more per adapter variant at the
default budget (a prompt of 128 tokens: 1,536 padded tokens instead of 2,048)."""

PrefillKey = tuple[int, int, int, frozenset[str] | None]
"""(batch bucket, seq bucket, page-table width, adapter kinds: ATTENTION_KINDS or None)."""


class Replayable(Protocol):
    def replay(self) -> None: ...


Capture = Callable[[Callable[[], torch.Tensor]], tuple[Replayable, torch.Tensor]]
"""Records `forward` once: (what replays it, its static output)."""


def prefill_shapes(max_tokens: int, max_seq_len: int) -> list[tuple[int, int]]:
    """(batch, seq) graph shapes holding at most `max_tokens` padded tokens and no seq bucket
    past the first that holds `max_seq_len` (a longer row cannot exist), largest first."""
    longest = next((s for s in PREFILL_SEQS if s >= max_seq_len), PREFILL_SEQS[-1])
    seqs = [s for s in PREFILL_SEQS if s <= longest]
    shapes = [(b, s) for b in PREFILL_BATCHES for s in seqs if b * s <= max_tokens]
    return sorted(shapes, key=lambda shape: (-shape[0] * shape[1], -shape[0]))


def cuda_capture(pool: object, stream: torch.cuda.Stream) -> Capture:
    """Capture on CUDA, in `pool` on `stream` (the executor's decode graphs' own)."""

    def capture(forward: Callable[[], torch.Tensor]) -> tuple[Replayable, torch.Tensor]:
        forward()  # warm up: allocations and autotuning happen outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = forward()
        return graph, out

    return capture


class PrefillGraphs:
    """The prefill graphs of one executor and the static input buffer they all read."""

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        widths: Sequence[int],
        device: torch.device,
    ) -> None:
        """shapes: prefill_shapes(...); widths: page-table widths (0: no adapter term)."""
        self.shapes = list(shapes)
        self.widths = list(widths)
        self.span = blocks_for(max((s for _, s in self.shapes), default=1))
        """KV blocks every graph's block tables hold."""
        size = max(
            (prefill_size(b, s, self.span, w) for b, s in self.shapes for w in self.widths),
            default=1,
        )
        self.buffer = torch.zeros(size, dtype=torch.long, device=device)  # (size,)
        self._graphs: dict[PrefillKey, tuple[Replayable, torch.Tensor]] = {}
        self._logits: torch.Tensor | None = None
        """(largest batch, vocab): every graph's output, copied in last, so the graphs' own
        logits are pool memory they all reuse rather than one live tensor each."""
        self.replays = 0
        """Prefill groups run from a graph (the others ran eagerly)."""

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()

    def sections(self, key: PrefillKey) -> tuple[torch.Tensor, ...]:
        """prefill_sections of the static buffer for `key`'s shape (what its graph reads)."""
        batch, seq, width, _ = key
        size = prefill_size(batch, seq, self.span, width)
        return prefill_sections(self.buffer[:size], batch, seq, self.span)

    def capture_all(self, forward: Callable[[PrefillKey], torch.Tensor], capture: Capture) -> None:
        """One graph per shape and width, adapter ones twice (every kind, attention only).

        forward(key) must run the prefill over `sections(key)` and return its logits
        (batch bucket, vocab). The buffer is zeroed first: every token of a capture is
        padding, whose K/V go to the scratch slot."""
        self.buffer.zero_()
        for batch, seq in self.shapes:
            for width in self.widths:
                for kinds in (None, ATTENTION_KINDS) if width else (None,):
                    key = (batch, seq, width, kinds)
                    self._graphs[key] = capture(lambda key=key: self._shared(forward(key)))

    def _shared(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (batch, vocab) copied into the shared output; its view. The first call (the
        first capture's warm-up, outside the capture) allocates it."""
        if self._logits is None:
            self._logits = torch.empty(
                (max(b for b, _ in self.shapes), logits.shape[1]),
                dtype=logits.dtype,
                device=logits.device,
            )
        out = self._logits[: logits.shape[0]]
        out.copy_(logits)
        return out

    def key_for(
        self, rows: Sequence[RowPlan], width: int, kinds: frozenset[str] | None
    ) -> PrefillKey | None:
        """The graph that holds this prefill group, if any. width: the widest page table the
        group needs (0 without an adapter term); kinds: the adapter kinds its pages hold."""
        if not self._graphs:
            return None
        seq = max(len(r.tokens) for r in rows)
        if max(blocks_for(r.start + len(r.tokens)) for r in rows) > self.span:
            return None
        shape = next(
            ((b, s) for b, s in reversed(self.shapes) if b >= len(rows) and s >= seq), None
        )
        bucket = 0 if width == 0 else next((w for w in self.widths if w >= width), None)
        if shape is None or bucket is None:
            return None
        attention_only = kinds is not None and kinds <= ATTENTION_KINDS
        variant = ATTENTION_KINDS if bucket and attention_only else None
        key = (*shape, bucket, variant)
        return key if key in self._graphs else None

    def run(self, key: PrefillKey, rows: Sequence[RowPlan], *, pin: bool) -> torch.Tensor:
        """Logits (len(rows), vocab) of the group's last fed tokens, from `key`'s graph: its
        inputs staged and sent in one copy, the graph replayed, the rows' logits copied out."""
        batch, seq, width, _ = key
        host = stage_prefill(list(rows), seq, self.span, width, pin=pin, batch=batch)
        self.buffer[: host.shape[0]].copy_(host, non_blocking=pin)
        graph, out = self._graphs[key]
        graph.replay()
        self.replays += 1
        return out[: len(rows)].clone()  # (rows, vocab): `out` is the next replay's too
