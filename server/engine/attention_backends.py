"""Which SDPA kernels a prefill may use on CUDA: never cuDNN's.

PyTorch prefers cuDNN's attention on Hopper, and cuDNN builds an execution plan the first time
it sees a shape. Prefills see new shapes all the time: every group of joining prompts has its
own rows x length x span. On an H200 (bench/kernels.py --only first_calls, 1b model, bf16) a
first prefill at a new shape took 69 to 1,495 ms with cuDNN allowed and 14 to 21 ms without it,
and every running row waits that long; the second call at the same shape took 13 to 20 ms with
cuDNN, 13 to 17 without. So prefills use the memory-efficient kernel (or flash, or the math
fallback).

Decode forwards (one token per row) keep torch's choice. Their shapes are the captured graphs'
buckets, and the eager warm-up before each capture builds cuDNN's plan for that shape; a plan
built during a capture instead fails it (CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED,
seen on an H200 when every eager forward left cuDNN out). Prefill graphs are captured under the
prefill backends, as their eager warm-ups ran: the capture never meets a shape cuDNN has not
planned, because cuDNN is not among them.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PREFILL_BACKENDS = [
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.MATH,
]


def prefill_attention(
    device: torch.device, tokens_per_row: int
) -> contextlib.AbstractContextManager:
    """Context for one forward: no cuDNN attention on CUDA when rows carry more than one token."""
    if device.type != "cuda" or tokens_per_row <= 1:
        return contextlib.nullcontext()
    # Also while a prefill graph is captured (server.engine.prefill_graphs): its eager warm-up
    # ran under these backends, and cuDNN, left free inside the capture, would build its plan
    # there, which fails the capture (see above).
    return sdpa_kernel(PREFILL_BACKENDS)
