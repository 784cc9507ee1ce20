"""Triton multi-LoRA kernels (Punica's BGMV) over the fused page stacks of a LoRAGroup.

Semantics: for token rows t with page tables P_t (n pages, 0-padded) and a group whose members
j = 0..M-1 write output columns seg^-1(j),

    xa[t, i, j, :] = A[P_t[i], j] @ x[t]                           (shrink, fp32 accumulate)
    y[t, o]       += sum_i  B[P_t[i], o, :] . xa[t, i, seg[o], :]    (expand, in place)

which is LoRAGroup.delta (the torch reference, also the CPU path) added to y. A and B are read
in place from the stacks through each row's page table: no per-row copies, two launches per
fused projection, capturable in CUDA graphs. Prefill uses the same kernels with the page table
repeated per token (a segment of tokens sharing an adapter reads the same pages: SGMV).

Two things keep decode short, where a batch has few rows and each row's A is a long, thin
(rank x d_in) read:
- split-K: the shrink splits d_in across programs (each writes a partial sum; the expand adds
  the partials), so a 32-row batch runs hundreds of short programs instead of a few dozen that
  each walk the whole of d_in in series;
- dead pages are skipped: page 0 (no adapter) always, and, given the group's `live` flags, any
  page that holds no adapter for this group (an adapter of q/k/v/o leaves the MLP's pages of the
  same page number empty). Such a row reads no A or B and writes nothing.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:  # Triton is optional: CPU installs and machines without it use the torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

BLOCK_K = 256
"""d_in columns one shrink step reads (a rank-8 page: 8 x 256 values, 4 KiB in bf16)."""
BLOCK_O = 512
"""Output columns of one expand program. Each program sums the shrink's partials of its rows
again, so fewer, wider programs pay that less often: at decode on an H200 (bench/kernels.py)
512 beat 128 by up to 2.6x for gate/up (16,384 columns) and was never slower."""
TARGET_PROGRAMS = 512
"""Shrink programs to aim for. More splits shorten the shrink but cost the expand (above); on
an H200 at batch 32 the best split was 4 for q/k/v and gate/up and 8 for o (bench/kernels.py
sweep), which this target gives; past it the expand's partial sums cost more than they save."""


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def shrink_splits(tokens: int, slots: int, d_in: int) -> int:
    """How many programs share one row's d_in in the shrink: a power of two, at most one
    BLOCK_K tile each, and only as many as it takes to reach TARGET_PROGRAMS in all.

    tokens * slots programs exist before splitting (slots = pages per row * members)."""
    tiles = -(-d_in // BLOCK_K)
    splits = 1
    while splits * 2 <= tiles and tokens * slots * splits < TARGET_PROGRAMS:
        splits *= 2
    return splits


if triton is not None:

    @triton.jit
    def _shrink(
        x_ptr,  # (T, d_in)
        a_ptr,  # (pages, M, R, d_in)
        table_ptr,  # (T, n) int64
        live_ptr,  # (pages,) int32, when HAS_LIVE
        out_ptr,  # (SPLITS, T, n, M, R) float32 partial sums
        table_stride,
        tokens,
        d_in: tl.constexpr,
        n: tl.constexpr,
        M: tl.constexpr,
        R: tl.constexpr,
        K_PER_PROGRAM: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_LIVE: tl.constexpr,
    ):
        t = tl.program_id(0)
        slot = tl.program_id(1)  # i * M + j
        split = tl.program_id(2)
        i = slot // M
        j = slot % M
        page = tl.load(table_ptr + t * table_stride + i)
        live = page != 0
        if HAS_LIVE:
            live = live & (tl.load(live_ptr + page) != 0)
        if live:
            rows = tl.arange(0, R)
            acc = tl.zeros((R,), dtype=tl.float32)
            base = a_ptr + ((page * M + j) * R) * d_in
            k_begin = split * K_PER_PROGRAM
            for k0 in range(0, K_PER_PROGRAM, BLOCK_K):
                ks = k_begin + k0 + tl.arange(0, BLOCK_K)
                kmask = ks < d_in
                xv = tl.load(x_ptr + t * d_in + ks, mask=kmask, other=0.0).to(tl.float32)
                av = tl.load(
                    base + rows[:, None] * d_in + ks[None, :], mask=kmask[None, :], other=0.0
                ).to(tl.float32)
                acc += tl.sum(av * xv[None, :], axis=1)
            tl.store(out_ptr + (((split * tokens + t) * n + i) * M + j) * R + rows, acc)

    @triton.jit
    def _expand(
        y_ptr,  # (T, O) in place
        xa_ptr,  # (SPLITS, T, n, M, R) float32 partial sums
        b_ptr,  # (pages, O, R)
        seg_ptr,  # (O,) int64 member of each output column
        table_ptr,  # (T, n) int64
        live_ptr,  # (pages,) int32, when HAS_LIVE
        table_stride,
        tokens,
        out_features: tl.constexpr,
        n: tl.constexpr,
        M: tl.constexpr,
        R: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_O: tl.constexpr,
        HAS_LIVE: tl.constexpr,
    ):
        t = tl.program_id(0)
        os_ = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        omask = os_ < out_features
        rs = tl.arange(0, R)
        ss = tl.arange(0, SPLITS)
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        touched = t < 0  # a scalar False: no live page yet
        for i in range(0, n):
            page = tl.load(table_ptr + t * table_stride + i)
            live = page != 0
            if HAS_LIVE:
                live = live & (tl.load(live_ptr + page) != 0)
            touched = touched | live
            if live:
                seg = tl.load(seg_ptr + os_, mask=omask, other=0)
                bv = tl.load(
                    b_ptr + (page * out_features + os_[:, None]) * R + rs[None, :],
                    mask=omask[:, None],
                    other=0.0,
                ).to(tl.float32)  # (BLOCK_O, R)
                xv = tl.zeros((BLOCK_O, R), dtype=tl.float32)
                for j in tl.static_range(M):
                    # Member j's rank vector for this page: the shrink's partials, summed.
                    parts = tl.load(
                        xa_ptr + (((ss[:, None] * tokens + t) * n + i) * M + j) * R + rs[None, :]
                    )  # (SPLITS, R)
                    xj = tl.sum(parts, axis=0)  # (R,)
                    xv += tl.where(seg[:, None] == j, xj[None, :], 0.0)
                acc += tl.sum(bv * xv, axis=1)
        if touched:
            yp = y_ptr + t * out_features + os_
            yv = tl.load(yp, mask=omask, other=0.0).to(tl.float32)
            tl.store(yp, (yv + acc).to(y_ptr.dtype.element_ty), mask=omask)


def shrink_buffer(
    x: torch.Tensor, a: torch.Tensor, table: torch.Tensor, *, splits: int | None = None
) -> torch.Tensor:
    """The shrink's output for x (T, d_in) routed by table (T, n) over a (pages, M, R, d_in):
    (splits, T, n, M, R) float32, uninitialised (each split's partial sum; slots of skipped
    pages stay unwritten and unread, as the expand checks the same flags).

    splits: programs per row's d_in, a power of two (default shrink_splits; 1 walks d_in in one
    program). Allocated apart from `shrink` so a caller running the shrink on another stream
    can allocate it on its own (the buffer then belongs to the stream that reads it last)."""
    tokens, d_in = x.shape
    pages_per_row = table.shape[1]
    members, rank = a.shape[1], a.shape[2]
    if splits is None:
        splits = shrink_splits(tokens, pages_per_row * members, d_in)
    return torch.empty(
        (splits, tokens, pages_per_row, members, rank), dtype=torch.float32, device=x.device
    )


def shrink(
    xa: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    table: torch.Tensor,
    live: torch.Tensor | None = None,
) -> None:
    """xa (from shrink_buffer) = each row's A pages times x (T, d_in), split over d_in."""
    tokens, d_in = x.shape
    splits, pages_per_row = xa.shape[0], table.shape[1]
    members, rank = a.shape[1], a.shape[2]
    k_per_program = -(-d_in // (splits * BLOCK_K)) * BLOCK_K
    has_live = live is not None
    live_arg = live if live is not None else table  # any pointer; not read without HAS_LIVE
    _shrink[(tokens, pages_per_row * members, splits)](
        x,
        a,
        table,
        live_arg,
        xa,
        table.stride(0),
        tokens,
        d_in=d_in,
        n=pages_per_row,
        M=members,
        R=rank,
        K_PER_PROGRAM=k_per_program,
        BLOCK_K=BLOCK_K,
        HAS_LIVE=has_live,
    )


def expand(
    y: torch.Tensor,
    xa: torch.Tensor,
    b: torch.Tensor,
    segment: torch.Tensor,
    table: torch.Tensor,
    live: torch.Tensor | None = None,
    *,
    block_o: int = BLOCK_O,
) -> None:
    """y (T, O) += each row's B pages times its shrink partials xa, summed; in place.

    block_o: output columns per program, a power of two."""
    splits, tokens, pages_per_row, members, rank = xa.shape
    out_features = b.shape[1]
    has_live = live is not None
    live_arg = live if live is not None else table  # any pointer; not read without HAS_LIVE
    _expand[(tokens, triton.cdiv(out_features, block_o))](
        y,
        xa,
        b,
        segment,
        table,
        live_arg,
        table.stride(0),
        tokens,
        out_features=out_features,
        n=pages_per_row,
        M=members,
        R=rank,
        SPLITS=splits,
        BLOCK_O=block_o,
        HAS_LIVE=has_live,
    )


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    segment: torch.Tensor,
    table: torch.Tensor,
    live: torch.Tensor | None = None,
    *,
    splits: int | None = None,
    block_o: int = BLOCK_O,
) -> None:
    """y (T, O) += the fused group's low-rank term for x (T, d_in), rows routed by table (T, n):
    shrink then expand on the current stream.

    a: (pages, M, R, d_in) and b: (pages, O, R) contiguous; every page in `table` must exist;
    table's rows may be strided (a slice of a wider static buffer), its columns contiguous.
    live: (pages,) int32, non-zero where the page holds an adapter for this group (LoRAGroup.live);
    other pages are skipped, as page 0 always is. splits and block_o: as shrink_buffer and expand.
    """
    xa = shrink_buffer(x, a, table, splits=splits)
    shrink(xa, x, a, table, live)
    expand(y, xa, b, segment, table, live, block_o=block_o)


def self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """Runs the kernels once against the torch reference (LoRAGroup.delta semantics)."""
    from loraserve.server.engine.lora import LoRAGroup, MultiLoRALinear

    try:
        torch.manual_seed(0)
        outs, d_in = [96, 32, 32], 80
        members = [
            MultiLoRALinear(torch.nn.Linear(d_in, o).to(device=device, dtype=dtype), context=None)
            for o in outs
        ]
        group = LoRAGroup(members)
        group.reserve(6, 8)
        assert group.a is not None and group.b is not None
        group.a.normal_()
        group.b.normal_()
        group.a[0].zero_()
        group.b[0].zero_()
        table = torch.tensor([[1, 2], [0, 0], [3, 0], [5, 6]], device=device)
        x = torch.randn(4, 3, d_in, device=device, dtype=dtype)  # (batch, seq, d_in)
        want = group.delta(x, table).float()
        y = torch.zeros(12, sum(outs), device=device, dtype=dtype)
        add_lora(
            y, x.reshape(12, d_in), group.a, group.b, group.segment, table.repeat_interleave(3, 0)
        )
        got = y.float().view(4, 3, -1)
        scale = want.abs().max().item()
        ok = bool(((got - want).abs().max() <= 2e-2 * scale).item())
        if not ok:
            log.warning("LoRA kernels disagree with the reference; using the torch path")
        return ok
    except Exception:
        log.exception("LoRA kernels failed their self-check; using the torch path")
        return False
