"""A bounded cache of adapter structure checks, keyed by the bytes they are a function of.

Every cold load validates the adapter it reads, and most of that validation is structure: the
config parsed and resolved against the base model, the safetensors header decoded and its entries
and tiling checked, every tensor's name and shape compared with the base layers
(`check_structure`). All of it is Python holding the GIL on a loader thread, which the engine
thread waits for between decode steps: with two loader threads on a 1B model's rank-16 q/k/v/o
adapters (128 tensors), py-spy `--gil` put about a third of the loaders' GIL time there.

And it is the same work again and again: adapters trained for one base model with one recipe
have byte-identical configs and headers (same names, shapes, dtypes and offsets), whatever their
values. So the outcome is kept by (config bytes, header bytes, file length): a hit checks only
the tensor values (`load_adapter_weights(structure=...)`), which differ per adapter and are
always checked. Failures are never kept: a bad file is refused by the full checks every time.

Bounded in entries and in the key bytes each may hold, since uploads choose those bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from loraserve.adapters.safetensors_check import DEFAULT_MAX_HEADER_BYTES
from loraserve.adapters.spec import BaseModelSpec
from loraserve.adapters.weights import AdapterStructure, check_structure

DEFAULT_ENTRIES = 64
"""Distinct adapter structures kept (a deployment has a handful: one per recipe and rank)."""
MAX_KEY_BYTES = 256 * 1024
"""Larger config + header pairs are checked every time, not kept: at most 64 x 256 KiB held.
A 7B model's all-linear adapter header is about 70 KB; a config is at most 64 KiB."""

StructureKey = tuple[bytes, bytes, int]
"""(config bytes, the weights file's first 8 + header-length bytes, the file's length)."""


def structure_key(
    config_bytes: bytes, weights_bytes: bytes | memoryview, max_key_bytes: int = MAX_KEY_BYTES
) -> StructureKey | None:
    """What check_structure's outcome depends on, besides the base model and the rank bound;
    None where the file is too short or its header too long, or the two together are over
    `max_key_bytes` (the checks then run, and refuse or pass it, as usual)."""
    view = memoryview(weights_bytes).cast("B")
    if len(view) < 8:
        return None
    header_len = int.from_bytes(view[:8], "little")
    if header_len > DEFAULT_MAX_HEADER_BYTES or 8 + header_len > len(view):
        return None
    if len(config_bytes) + 8 + header_len > max_key_bytes:
        return None
    return bytes(config_bytes), bytes(view[: 8 + header_len]), len(view)


class StructureCache:
    """check_structure for one base model and rank bound, remembered per StructureKey (LRU);
    thread-safe."""

    def __init__(
        self,
        spec: BaseModelSpec,
        *,
        max_rank: int,
        entries: int = DEFAULT_ENTRIES,
        max_key_bytes: int = MAX_KEY_BYTES,
    ) -> None:
        self._spec = spec
        self._max_key_bytes = max_key_bytes
        self._max_rank = max_rank
        self._entries = entries
        self._kept: OrderedDict[StructureKey, AdapterStructure] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    def check(self, config_bytes: bytes, weights_bytes: bytes | memoryview) -> AdapterStructure:
        """check_structure(config_bytes, weights_bytes, ...), from memory where these bytes
        were checked before; raises as check_structure does (and keeps nothing then)."""
        key = structure_key(config_bytes, weights_bytes, self._max_key_bytes)
        if key is not None:
            with self._lock:
                found = self._kept.get(key)
                if found is not None:
                    self._kept.move_to_end(key)
                    self.hits += 1
                    return found
        structure = check_structure(
            config_bytes, weights_bytes, self._spec, max_rank=self._max_rank
        )
        with self._lock:
            self.misses += 1
            if key is not None and self._entries > 0:
                self._kept[key] = structure
                while len(self._kept) > self._entries:
                    self._kept.popitem(last=False)
        return structure
