"""Slot-based KV memory for continuous batching: one preallocated row per running sequence.

Each layer holds K and V of shape (rows, kv_heads, max_len + 1, head_dim). A sequence owns one
row from admission to retirement; every forward writes each token's K/V at that token's own
position in its own row (one index_put per layer), so joining or leaving the batch never copies
anyone else's cache. Column max_len is a scratch column: padding and idle rows write there, and
no mask ever lets a real token attend to it.

Plugs into Hugging Face models as their `Cache`: the model calls `update(k, v, layer)` in every
attention layer; we return the rows this forward attends over, and the 4D masks built here say
which positions each token may see (its own row's past, causal, and a sliding window where the
model's layers have one).

Only public, long-standing transformers API is used, so every transformers version pyproject admits
works: `DynamicCache()` built without arguments (the Cache interface models call: `update` and
`get_seq_length`, both overridden here), 4D masks passed as-is (the documented custom-mask path,
one per layer type where a model mixes them), and the layer types and window read from the
config's own public fields (`layer_types`, `sliding_window`) instead of transformers' private
cache helpers, whose signatures change between releases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class ForwardPlan:
    """Where the tokens of one forward go, and what they attend over."""

    rows: torch.Tensor
    """(batch,) int64: the KV row of each batch row."""
    write_positions: torch.Tensor
    """(batch, seq) int64: the column each token's K/V is written to (scratch for padding)."""
    kv_len: int
    """Columns attended over: positions 0..kv_len-1 of each row."""
    contiguous: bool
    """rows == 0..batch-1, so the attended K/V are views, not gathered copies."""


class SlotKVCache(DynamicCache):
    """Preallocated per-row KV memory for up to `max_rows` sequences of `max_len` tokens."""

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        max_rows: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # No arguments: the signature with `config=` only exists in newer transformers, and the
        # per-layer storage it would build is never used (update() below replaces it).
        super().__init__()
        self.max_rows = max_rows
        self.max_len = max_len
        self.scratch = max_len
        self._dtype = dtype
        self._device = device
        self.layer_types, self.windows = layer_windows(config)
        self._keys: list[torch.Tensor | None] = [None] * len(self.layer_types)
        self._values: list[torch.Tensor | None] = [None] * len(self.layer_types)
        self.plan: ForwardPlan | None = None

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self._keys, *self._values) if t is not None)

    def update(  # type: ignore[override]
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value_states: (batch, kv_heads, seq, d) -> attended (batch, kv_heads, kv_len, d)."""
        plan = self.plan
        assert plan is not None, "set a ForwardPlan before each forward"
        keys, values = self._buffers(layer_idx, key_states)
        rows = plan.rows[:, None]  # (batch, 1), broadcast against write_positions (batch, seq)
        # Advanced indices on dims 0 and 2 put the (batch, seq) dims first: (batch, seq, heads, d).
        keys[rows, :, plan.write_positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[rows, :, plan.write_positions] = value_states.transpose(1, 2).to(values.dtype)
        if plan.contiguous:
            batch = plan.rows.shape[0]
            return keys[:batch, :, : plan.kv_len], values[:batch, :, : plan.kv_len]
        return keys[plan.rows, :, : plan.kv_len], values[plan.rows, :, : plan.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.plan.kv_len if self.plan is not None else 0

    def _buffers(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._keys[layer_idx]
        if keys is None:
            # Shapes come from the first real K/V, so head counts and dims need no config parsing.
            shape = (self.max_rows, like.shape[1], self.max_len + 1, like.shape[3])
            keys = torch.zeros(shape, dtype=self._dtype, device=self._device)
            self._keys[layer_idx] = keys
            self._values[layer_idx] = torch.zeros_like(keys)
        values = self._values[layer_idx]
        assert values is not None
        return keys, values

    def attention_masks(
        self, query_positions: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive 4D masks (batch, 1, seq, kv_len) for the current plan.

        query_positions: (batch, seq) position of each token; valid: (batch, seq) bool, False for
        padding and idle rows (which may only see column 0, so softmax never sees an empty row).
        Returns one mask, or one per layer type when the model mixes full and sliding layers.
        """
        assert self.plan is not None
        masks = {
            kind: _mask(query_positions, valid, self.plan.kv_len, window, dtype)
            for kind, window in self.windows.items()
        }
        if len(masks) == 1:
            return next(iter(masks.values()))
        return masks


def layer_windows(config: PretrainedConfig) -> tuple[list[str], dict[str, int | None]]:
    """Each decoder layer's attention type, and the window of each type (None: full causal).

    Reads the config's public fields only. A config that lists `layer_types` (Qwen2, and newer
    releases of most models) is taken as written; otherwise a set `sliding_window` means every
    layer slides (Mistral's config in older transformers), else every layer is full attention.
    Layer types this cache cannot mask (chunked attention, shared KV, ...) are refused at
    start rather than served wrongly.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False:
        window = None  # Qwen2 keeps a sliding_window value around with the feature turned off
    declared = getattr(text, "layer_types", None)
    if declared:
        kinds = [str(kind) for kind in declared]
    elif isinstance(num_layers, int) and num_layers > 0:
        kinds = [SLIDING_ATTENTION if window is not None else FULL_ATTENTION] * num_layers
    else:
        raise ValueError(
            f"model config {type(text).__name__} names neither layer_types nor a layer count"
        )
    unsupported = sorted(set(kinds) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unsupported:
        raise ValueError(f"attention layer types {unsupported} are not supported by loraserve")
    if SLIDING_ATTENTION in kinds and not (isinstance(window, int) and window > 0):
        raise ValueError("sliding_attention layers need a positive sliding_window in the config")
    windows = {kind: (window if kind == SLIDING_ATTENTION else None) for kind in kinds}
    return kinds, windows


def _mask(
    query_positions: torch.Tensor,
    valid: torch.Tensor,
    kv_len: int,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    columns = torch.arange(kv_len, device=query_positions.device)  # (kv_len,)
    q = query_positions[:, :, None]  # (batch, seq, 1)
    allowed = columns[None, None, :] <= q  # (batch, seq, kv_len): causal within the row's past
    if window is not None:
        allowed &= columns[None, None, :] > q - window
    allowed = torch.where(valid[:, :, None], allowed, columns[None, None, :] == 0)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (batch, 1, seq, kv_len)
