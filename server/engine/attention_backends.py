"""Which SDPA kernels an eager forward may use on CUDA: never cuDNN's.

PyTorch prefers cuDNN's attention on Hopper, and cuDNN builds an execution plan the first time
it sees a shape. Eager forwards (prefills, and decode steps outside the captured graphs) see new
shapes all the time: every group of joining prompts has its own rows x length x span. On an H200
(bench/kernels.py --only first_calls, 1b model, bf16) a first prefill at a new shape took 69 to
1,495 ms with cuDNN allowed, 14 to 21 ms without it, and every running row waits that long;
the second call at the same shape took 13 to 20 ms with cuDNN, 13 to 17 without. So eager
forwards use the memory-efficient kernel (or flash, or the math fallback). Graph captures at
start keep torch's choice: their shapes are fixed, and their plans are built before serving.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

EAGER_BACKENDS = [
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.MATH,
]


def eager_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """Context for one forward: no cuDNN attention on CUDA unless a graph is being captured."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return contextlib.nullcontext()
    return sdpa_kernel(EAGER_BACKENDS)
