"""Small host values (page indexes, flags, sampling parameters) onto the device, queued.

A copy from pageable host memory makes the host wait until the device has finished everything
queued before it: with async_decode that is the decode step launched ahead, so one such copy
would undo the overlap. On CUDA these go through pinned memory instead, queued on the current
stream (the caching host allocator keeps the pinned block until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values` (a small host tensor) on `device`, without waiting for the device."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def page_index(pages: list[int], device: torch.device) -> torch.Tensor:
    """(n,) int64 of `pages` on `device`, for index copies and fills of page stacks."""
    return to_device(torch.tensor(pages, dtype=torch.long), device)
