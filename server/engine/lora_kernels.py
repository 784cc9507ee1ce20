"""Triton multi-LoRA kernels (Punica's BGMV) over the fused page stacks of a LoRAGroup.

Semantics: for token rows t with page tables P_t (n pages, 0-padded) and a group whose members
j = 0..M-1 write output columns seg^-1(j),

    xa[t, i, j, :] = A[P_t[i], j] @ x[t]                           (shrink, fp32 accumulate)
    y[t, o]       += sum_i  B[P_t[i], o, :] . xa[t, i, seg[o], :]    (expand, in place)

which is LoRAGroup.delta (the torch reference, also the CPU path) added to y. A and B are read
in place from the stacks through each row's page table: no per-row copies, two launches per
fused projection, capturable in CUDA graphs. Prefill uses the same kernels with the page table
repeated per token (a segment of tokens sharing an adapter reads the same pages: SGMV).
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


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _shrink(
        x_ptr,  # (T, d_in)
        a_ptr,  # (pages, M, R, d_in)
        table_ptr,  # (T, n) int64
        out_ptr,  # (T, n, M, R) float32
        table_stride,
        d_in: tl.constexpr,
        n: tl.constexpr,
        M: tl.constexpr,
        R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        t = tl.program_id(0)
        slot = tl.program_id(1)  # i * M + j
        i = slot // M
        j = slot % M
        page = tl.load(table_ptr + t * table_stride + i)
        rows = tl.arange(0, R)
        acc = tl.zeros((R,), dtype=tl.float32)
        base = a_ptr + ((page * M + j) * R) * d_in
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < d_in
            xv = tl.load(x_ptr + t * d_in + ks, mask=kmask, other=0.0).to(tl.float32)
            av = tl.load(
                base + rows[:, None] * d_in + ks[None, :], mask=kmask[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
        tl.store(out_ptr + ((t * n + i) * M + j) * R + rows, acc)

    @triton.jit
    def _expand(
        y_ptr,  # (T, O) in place
        xa_ptr,  # (T, n, M, R) float32
        b_ptr,  # (pages, O, R)
        seg_ptr,  # (O,) int64 member of each output column
        table_ptr,  # (T, n) int64
        table_stride,
        out_features: tl.constexpr,
        n: tl.constexpr,
        M: tl.constexpr,
        R: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        t = tl.program_id(0)
        os_ = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        omask = os_ < out_features
        seg = tl.load(seg_ptr + os_, mask=omask, other=0)
        rs = tl.arange(0, R)
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for i in range(0, n):
            page = tl.load(table_ptr + t * table_stride + i)
            bv = tl.load(
                b_ptr + (page * out_features + os_[:, None]) * R + rs[None, :],
                mask=omask[:, None],
                other=0.0,
            ).to(tl.float32)
            xv = tl.load(
                xa_ptr + ((t * n + i) * M + seg[:, None]) * R + rs[None, :],
                mask=omask[:, None],
                other=0.0,
            )
            acc += tl.sum(bv * xv, axis=1)
        yp = y_ptr + t * out_features + os_
        yv = tl.load(yp, mask=omask, other=0.0).to(tl.float32)
        tl.store(yp, (yv + acc).to(y_ptr.dtype.element_ty), mask=omask)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    segment: torch.Tensor,
    table: torch.Tensor,
) -> None:
    """y (T, O) += the fused group's low-rank term for x (T, d_in), rows routed by table (T, n).

    a: (pages, M, R, d_in) and b: (pages, O, R) contiguous; every page in `table` must exist;
    table's rows may be strided (a slice of a wider static buffer), its columns contiguous.
    """
    tokens, d_in = x.shape
    pages_per_row = table.shape[1]
    members, rank = a.shape[1], a.shape[2]
    out_features = b.shape[1]
    xa = torch.empty(
        (tokens, pages_per_row, members, rank), dtype=torch.float32, device=x.device
    )  # (T, n, M, R)
    _shrink[(tokens, pages_per_row * members)](
        x,
        a,
        table,
        xa,
        table.stride(0),
        d_in=d_in,
        n=pages_per_row,
        M=members,
        R=rank,
        BLOCK_K=256,
    )
    block_o = 128
    _expand[(tokens, triton.cdiv(out_features, block_o))](
        y,
        xa,
        b,
        segment,
        table,
        table.stride(0),
        out_features=out_features,
        n=pages_per_row,
        M=members,
        R=rank,
        BLOCK_O=block_o,
    )


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
