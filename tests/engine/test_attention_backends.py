"""Prefills on CUDA leave cuDNN's attention out (its per-shape plan builds stall every running
row); decode forwards, whose shapes the captured graphs fix, and CPU keep torch's choice."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from loraserve.server.engine.attention_backends import PREFILL_BACKENDS, prefill_attention


def test_only_cuda_prefills_restrict_the_backends() -> None:
    assert isinstance(prefill_attention(torch.device("cpu"), 128), contextlib.nullcontext)
    assert isinstance(prefill_attention(torch.device("cuda"), 1), contextlib.nullcontext)
    restricted = prefill_attention(torch.device("cuda"), 2)
    assert not isinstance(restricted, contextlib.nullcontext)
    assert SDPBackend.CUDNN_ATTENTION not in PREFILL_BACKENDS
    assert SDPBackend.EFFICIENT_ATTENTION in PREFILL_BACKENDS  # takes an additive mask


def test_the_restricted_backends_still_run_a_masked_attention() -> None:
    """The context is entered for real (here on CPU tensors, where MATH serves) and SDPA under it
    gives the unrestricted result."""
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    mask = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with prefill_attention(torch.device("cuda"), 5):
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want)


def test_a_prefill_graph_capture_restricts_them_too(monkeypatch) -> None:
    """A prefill graph is captured under the backends its eager warm-up ran with: cuDNN, free
    inside the capture, would build its plan there and fail the capture."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not isinstance(prefill_attention(torch.device("cuda"), 32), contextlib.nullcontext)
    assert isinstance(prefill_attention(torch.device("cuda"), 1), contextlib.nullcontext)
