"""Triton, where it is installed, and whether a Triton kernel can run for a device.

Triton is optional: CPU installs and machines without it use the kernels' torch references.
Without CUDA, kernels run under Triton's CPU interpreter when TRITON_INTERPRET=1 (the tests set
it); the engine itself turns kernels on only on CUDA.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None


def runs_here(device: torch.device) -> bool:
    """True where a kernel can run: CUDA with Triton, or CPU tensors under the interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
