"""Runs a StepPlan on the model: owns the KV memory, the static buffers and the CUDA graphs.

Two executors, one interface (`execute(plan) -> logits (rows, vocab)`; `execute_scored(plan,
scoring)` also scores every fed position of the prefill rows that asked for prompt_logprobs,
and only those, so a step where nobody asked runs exactly as `execute`):

* PagedExecutor, for the Llama family on loraserve's own forward (server.engine.llama): KV in
  blocks of 16 tokens from a pool sized at start; decode reads token ids, positions, validity,
  feeds (rows whose token is the previous step's output, still on the device: async_decode),
  block tables and adapter page tables from ONE static int64 device buffer filled by ONE
  host-to-device copy per step, and on CUDA replays a graph captured at start for the step's
  (batch bucket, KV-span bucket, adapter-table width). Prefill groups rows of similar length so
  padding stays small; a small group replays a graph captured for its padded shape
  (server.engine.prefill_graphs), a larger one runs eagerly.
* GenericExecutor, for other architectures (GPT-2): the transformers model with one KV row per
  request (server.engine.kv_cache, server.engine.runner).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loraserve.server.engine import fused_ops, lora_kernels, paged_attention, runner
from loraserve.server.engine.kv_cache import SlotKVCache
from loraserve.server.engine.llama import ATTENTION_KINDS, LlamaForCausalLM, PagedKV, StepInputs
from loraserve.server.engine.logprobs import PositionScoring, score_positions
from loraserve.server.engine.model import LoadedModel
from loraserve.server.engine.planner import (
    BLOCK_SIZE,
    BlockAllocator,
    RowPlan,
    StepPlan,
    blocks_for,
)
from loraserve.server.engine.prefill_graphs import (
    Capture,
    PrefillGraphs,
    PrefillKey,
    cuda_capture,
    prefill_shapes,
)
from loraserve.server.engine.side_stream import SideStream
from loraserve.server.engine.staging import (
    buffer_sections,
    prefill_sections,
    stage_decode,
    stage_prefill,
    staging_arrays,
)
from loraserve.server.engine.types import TokenLogprob

Scored = dict[int, list[TokenLogprob]]
"""Prompt positions scored in one prefill: plan row index -> one entry per scored position."""

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32)
"""Decode graph batch sizes; past 32, every multiple of 16 up to max_batch_size."""


class StartupError(RuntimeError):
    """The configuration does not fit the device (raised at start, never on a request)."""


@dataclass(frozen=True)
class ExecutorSettings:
    max_batch_size: int
    max_seq_len: int
    max_batch_tokens: int
    kv_cache_bytes: int = 0
    """KV pool size; 0 sizes it from kv_cache_fraction (CUDA) or for max_batch_size full-length
    requests (CPU)."""
    kv_cache_fraction: float = 0.5
    """Share of free device memory (after weights and adapter pages) the KV pool may take."""
    enforce_eager: bool = False
    """No CUDA graphs (debugging)."""
    attention: str = "sdpa"
    """Decode attention: "sdpa" or "triton" (paged_attention.decode, reading the KV blocks in
    place); the own forward only."""
    max_pages_per_row: int = 8
    """Adapter pages of the largest admitted rank (the widest page table a graph holds)."""
    adapter_pages: int = 0
    page_rank: int = 8
    lora_kernels: bool = True
    """Triton BGMV kernels for the adapter term where they run (CUDA with Triton); the torch
    reference otherwise."""
    lora_overlap: bool = False
    """With the kernels: each shrink on a side stream beside its base matmul (EngineConfig)."""
    fused_ops: bool = True
    """The fused_ops Triton kernels (add + RMSNorm, RoPE + KV writes, silu * mul) where they run
    (CUDA with Triton); the torch references otherwise."""
    prefill_graph_tokens: int = 2048
    """Prefills of up to this many padded tokens (rows x tokens per row) replay CUDA graphs
    captured at start (server.engine.prefill_graphs); 0 runs every prefill eagerly."""


GraphKey = tuple[int, int, int, frozenset[str] | None]
"""(batch bucket, KV span bucket, page-table width, adapter kinds: ATTENTION_KINDS or None)."""


def batch_buckets(max_batch_size: int) -> list[int]:
    buckets = [b for b in BATCH_BUCKETS if b < max_batch_size]
    b = 48
    while b < max_batch_size:
        buckets.append(b)
        b += 16
    return sorted({*buckets, max_batch_size})


class GenericExecutor:
    """The transformers path: one preallocated KV row per batch slot."""

    paged = False
    feeds_tokens = False
    """Takes no RowPlan.feed: decode steps here are never launched ahead (async_decode)."""

    def __init__(self, loaded: LoadedModel, settings: ExecutorSettings) -> None:
        self._loaded = loaded
        self.cache = SlotKVCache(
            loaded.model.config,
            max_rows=settings.max_batch_size,
            max_len=settings.max_seq_len,
            dtype=loaded.dtype,
            device=loaded.device,
        )
        self.allocator: BlockAllocator | None = None
        self._decode_lora: tuple[tuple, runner.BatchLoRAState] | None = None

    def kv_bytes(self) -> int:
        return self.cache.nbytes()

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Logits (len(plan.rows), vocab) after each row's last token."""
        return self.execute_scored(plan, {})[0]

    def execute_scored(
        self, plan: StepPlan, scoring: Mapping[int, PositionScoring]
    ) -> tuple[torch.Tensor, Scored]:
        """execute(), plus the prompt positions `scoring` asks of prefill rows (by row index).

        transformers computes the logits of the last k columns for the whole batch, k the
        longest chunk among the scored rows: (batch, k, vocab) float while scoring.
        """
        device = self._loaded.device
        if plan.kind == "prefill":
            inputs = [runner.RowInput(r.slot, list(r.tokens), r.start) for r in plan.rows]
            lora = runner.lora_state([r.pages for r in plan.rows], device)
            if not scoring:
                return runner.forward_rows(self._loaded, self.cache, inputs, lora), {}
            keep = max(len(plan.rows[i].tokens) for i in scoring)
            logits = runner.forward_rows_last(self._loaded, self.cache, inputs, lora, keep)
            scored: Scored = {}
            for i, want in scoring.items():
                first = keep - len(plan.rows[i].tokens)  # left padding: the row's first column
                row = logits[i, first:]  # (tokens, vocab)
                scored[i] = score_positions(lambda x: x, row, want.targets, want.top_n)
            return logits[:, -1, :], scored
        width = max(r.slot for r in plan.rows) + 1
        inputs = [runner.RowInput(row=i, tokens=[], start=0) for i in range(width)]
        pages: list[tuple[int, ...]] = [()] * width
        for r in plan.rows:
            inputs[r.slot] = runner.RowInput(r.slot, list(r.tokens), r.start)
            pages[r.slot] = r.pages
        signature = tuple(pages)
        if self._decode_lora is None or self._decode_lora[0] != signature:
            # Reused while the rows' adapters stay the same: gathered factors are reused too.
            self._decode_lora = (signature, runner.lora_state(pages, device))
        logits = runner.forward_rows(self._loaded, self.cache, inputs, self._decode_lora[1])
        return logits[[r.slot for r in plan.rows]], {}


class PagedExecutor:
    """The own Llama-family forward over paged KV, decode in CUDA graphs."""

    paged = True
    feeds_tokens = True
    """Decode rows may take their token from the previous step's output on the device."""

    def __init__(self, loaded: LoadedModel, settings: ExecutorSettings) -> None:
        assert isinstance(loaded.model, LlamaForCausalLM)
        self._loaded = loaded
        self._model: LlamaForCausalLM = loaded.model
        self._settings = settings
        device = loaded.device
        shape = self._model.shape
        self._graphs_on = device.type == "cuda" and not settings.enforce_eager
        if self._graphs_on and settings.adapter_pages:
            # Graphs read the adapter stacks at fixed addresses: allocate every page now.
            for group in self._model.groups():
                group.reserve(settings.adapter_pages, settings.page_rank)
            # The Triton kernels need every page to exist, which only reserved stacks promise.
            self._model.lora_kernels = (
                settings.lora_kernels
                and lora_kernels.available(device)
                and lora_kernels.self_check(device, loaded.dtype)
            )
            log.info("multi-LoRA: %s", "Triton kernels" if self._model.lora_kernels else "torch")
        if settings.lora_overlap:
            if device.type != "cuda":
                raise StartupError(f"--lora-overlap needs a CUDA device; this is {device}")
            if self._model.lora_kernels:
                self._model.lora_side = SideStream(device)
                log.info("multi-LoRA shrinks: on a side stream beside the base matmuls")
            else:
                log.warning(
                    "--lora-overlap: off, since the adapter term runs on the torch path "
                    "(no Triton kernels here, graphs off, or the kernels failed their self-check)"
                )
        self._model.fused_ops = (
            settings.fused_ops
            and device.type == "cuda"
            and fused_ops.available(device)
            and fused_ops.self_check(device, loaded.dtype)
        )
        log.info("norms, RoPE, SwiGLU: %s", "fused kernels" if self._model.fused_ops else "torch")
        if settings.attention == "triton":
            if not paged_attention.available(device):
                raise StartupError(
                    f"--attention triton needs Triton and a CUDA device; this is {device} "
                    f"{'without Triton' if paged_attention.triton is None else ''}".rstrip()
                )
            if not paged_attention.supports(shape.head_dim, BLOCK_SIZE):
                raise StartupError(
                    f"--attention triton: head_dim {shape.head_dim} is not a power of two "
                    ">= 16; use --attention sdpa"
                )
            self._model.paged_attention = True
        log.info("decode attention: %s", settings.attention)
        self.max_blocks = blocks_for(settings.max_seq_len)
        per_block = PagedKV.bytes_per_block(shape, BLOCK_SIZE, loaded.dtype.itemsize)
        wanted = settings.max_batch_size * self.max_blocks + 1
        if settings.kv_cache_bytes:
            num_blocks = settings.kv_cache_bytes // per_block
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            num_blocks = min(int(free * settings.kv_cache_fraction) // per_block, wanted)
        else:
            num_blocks = wanted
        if num_blocks - 1 < self.max_blocks:
            raise StartupError(
                f"KV pool: {num_blocks * per_block} bytes hold {max(num_blocks - 1, 0)} blocks of "
                f"{BLOCK_SIZE} tokens, fewer than one {settings.max_seq_len}-token request needs "
                f"({self.max_blocks}); give it more memory or lower max_seq_len"
            )
        try:
            self.kv = PagedKV(shape, num_blocks, BLOCK_SIZE, loaded.dtype, device)
        except torch.OutOfMemoryError as exc:
            raise StartupError(f"KV pool of {num_blocks} blocks does not fit: {exc}") from exc
        self.allocator = BlockAllocator(num_blocks)
        m, nb, np_ = settings.max_batch_size, self.max_blocks, settings.max_pages_per_row
        self._layout = (m, nb, np_)
        size = 4 * m + m * nb + m * np_
        # One int64 staging buffer: tokens, positions, valid, feeds, block tables, page tables.
        # Two on the host, used in turn: with async_decode a step's copy may still be queued
        # behind the step before it when the host already fills the next one.
        pinned = device.type == "cuda"
        self._hosts = [torch.zeros(size, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._host = self._hosts[0]
        self._host_arrays = {id(h): staging_arrays(h, self._layout) for h in self._hosts}
        self._dev = torch.zeros(size, dtype=torch.long, device=device)
        self._prev = torch.zeros(m, dtype=torch.long, device=device)
        """The last decode step's sampled tokens (remember_tokens), which feeds read."""
        # (batch, span, width, kinds) -> graph; kinds: ATTENTION_KINDS, or None for all.
        self._graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_steps = 0
        """Decode steps replayed from a captured graph (the others ran eagerly)."""
        self.batch_buckets = batch_buckets(m)
        self.span_buckets = sorted({min(b, nb) for b in (16, 64, 256, 1024)} | {nb})
        self.page_buckets = sorted({w for w in (2, np_) if w <= np_}) if np_ else []
        self.prefill_graphs = PrefillGraphs([], [0], device)
        """Empty until capture_prefill_graphs fills it (on CUDA, at start): prefills eager."""
        self._warm_up()
        if self._graphs_on:
            started = time.monotonic()
            try:
                self._capture()
            except RuntimeError:
                # A capture failure must not take the server down: decode runs eagerly.
                log.exception("CUDA graph capture failed; decoding eagerly")
                self._graphs.clear()
                self.prefill_graphs.clear()
            log.info(
                "captured %d decode and %d prefill graphs in %.1f s",
                len(self._graphs),
                len(self.prefill_graphs),
                time.monotonic() - started,
            )
            if self.prefill_graphs and not self._prefill_graphs_agree():
                log.warning("a prefill graph disagrees with the eager prefill; prefilling eagerly")
                self.prefill_graphs.clear()

    def kv_bytes(self) -> int:
        return self.kv.data.nbytes

    def remember_tokens(self, tokens: torch.Tensor) -> None:
        """Keeps a decode step's sampled tokens (batch,) on the device for the next step's
        feeds (RowPlan.feed); queued after the step, so it never waits for the device."""
        self._prev[: tokens.shape[0]].copy_(tokens)

    # ---- static buffer views -----------------------------------------------------------------

    def _decode_inputs(
        self, batch: int, span: int, width: int, kinds: frozenset[str] | None = None
    ) -> StepInputs:
        tokens, positions, valid, feeds, blocks, pages = buffer_sections(self._dev, self._layout)
        fed = feeds[:batch]  # (batch,): -1, or the row of the previous step's output
        # A fault code of the previous step (< 0) is clamped: that row's output is discarded.
        previous = self._prev.index_select(0, fed.clamp(min=0)).clamp(min=0)  # (batch,)
        input_ids = torch.where(fed >= 0, previous, tokens[:batch])  # (batch,)
        return StepInputs(
            input_ids=input_ids.view(batch, 1),
            positions=positions[:batch].view(batch, 1),
            block_tables=blocks[:batch, :span],
            valid=valid[:batch].view(batch, 1).bool(),
            page_table=pages[:batch, :width] if width else None,
            lora_kinds=kinds,
        )

    def _decode_forward(
        self, batch: int, span: int, width: int, kinds: frozenset[str] | None = None
    ) -> torch.Tensor:
        step = self._decode_inputs(batch, span, width, kinds)
        hidden = self._model(step, self.kv)  # (batch, 1, hidden)
        return self._model.logits(hidden[:, 0])  # (batch, vocab)

    # ---- start -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One largest prefill and one largest decode, writing only the scratch block, so a
        configuration that does not fit fails now with a clear message."""
        s = self._settings
        tokens = min(s.max_batch_tokens, s.max_seq_len)
        device = self._loaded.device
        step = StepInputs(
            input_ids=torch.zeros((1, tokens), dtype=torch.long, device=device),
            positions=torch.arange(tokens, device=device)[None],
            block_tables=torch.zeros((1, blocks_for(tokens)), dtype=torch.long, device=device),
            valid=torch.zeros((1, tokens), dtype=torch.bool, device=device),
            page_table=self._pages_or_none(1),
        )
        try:
            self._model(step, self.kv)
            self._dev.zero_()
            width = self._layout[2] if self._has_stacks() else 0
            self._decode_forward(s.max_batch_size, self.max_blocks, width)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except torch.OutOfMemoryError as exc:
            raise StartupError(
                f"warm-up forward ({tokens}-token prefill, batch {s.max_batch_size} decode) is "
                f"out of device memory; lower max_batch_tokens, max_batch_size or the KV pool: "
                f"{exc}"
            ) from exc

    def _has_stacks(self) -> bool:
        return any(g.a is not None for g in self._model.groups())

    def _pages_or_none(self, batch: int) -> torch.Tensor | None:
        if not self._has_stacks():
            return None
        width = max(1, self._layout[2])
        return torch.zeros((batch, width), dtype=torch.long, device=self._loaded.device)

    def _graph_widths(self) -> list[int]:
        """Page-table widths graphs are captured for: adapter graphs only over stacks that can
        never move (reserved at start)."""
        reserved = all(g.reserved for g in self._model.groups())
        return [0, *self.page_buckets] if reserved else [0]

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        widths = self._graph_widths()
        self._dev.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        capture = cuda_capture(pool, stream)
        with torch.cuda.stream(stream):
            for batch in reversed(self.batch_buckets):
                for span in self.span_buckets:
                    for width in widths:
                        # Adapter graphs twice: every kind, and attention-only adapters'.
                        for kinds in (None, ATTENTION_KINDS) if width else (None,):
                            self._graphs[(batch, span, width, kinds)] = capture(
                                lambda b=batch, s=span, w=width, k=kinds: self._decode_forward(
                                    b, s, w, k
                                )
                            )
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        if not self._settings.prefill_graph_tokens:
            return
        try:  # in the decode graphs' pool: one replays at a time, they share its memory
            with torch.cuda.stream(stream):
                self.capture_prefill_graphs(capture, widths)
        except Exception:
            # Prefills then run eagerly, as before prefill graphs; decode keeps its graphs.
            log.exception("prefill graph capture failed; prefilling eagerly")
            self.prefill_graphs.clear()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def capture_prefill_graphs(self, capture: Capture, widths: list[int]) -> None:
        """The prefill graphs of the settings' shapes and these page-table widths, each recorded
        with `capture` (cuda_capture at start; tests on CPU pass an eager stand-in, which
        exercises the same padding and static buffers)."""
        s = self._settings
        self.prefill_graphs = PrefillGraphs(
            prefill_shapes(s.prefill_graph_tokens, s.max_seq_len), widths, self._loaded.device
        )
        self.prefill_graphs.capture_all(self._static_prefill_forward, capture)

    def _static_prefill_forward(self, key: PrefillKey) -> torch.Tensor:
        """The prefill over the prefill graphs' static buffer for `key`: logits (batch, vocab)."""
        batch, _seq, width, kinds = key
        ids, positions, valid, blocks, pages, last = self.prefill_graphs.sections(key)
        step = StepInputs(
            input_ids=ids,
            positions=positions,
            block_tables=blocks,
            valid=valid != 0,
            page_table=pages[:, :width] if width else None,
            lora_kinds=kinds,
        )
        hidden = self._model(step, self.kv)  # (batch, seq, hidden)
        rows = torch.arange(batch, device=hidden.device)
        return self._model.logits(hidden[rows, last])  # (batch, vocab)

    @torch.inference_mode()
    def _prefill_graphs_agree(self) -> bool:
        """One small prefill through its graph and eagerly, on a real KV block: a capture that
        went wrong shows here, at start, instead of as wrong tokens."""
        blocks = self.allocator.allocate(1)
        if blocks is None:
            return False
        try:
            row = RowPlan(0, tokens=tuple(range(3, 15)), start=0, blocks=tuple(blocks), pages=())
            key = self.prefill_graphs.key_for([row], 0, None)
            if key is None:
                return False
            pin = self._loaded.device.type == "cuda"
            got = self.prefill_graphs.run(key, [row], pin=pin).float()
            want = self._prefill(StepPlan("prefill", (row,)), graphs=False).float()
            scale = want.abs().max().item()
            return bool((got - want).abs().max().item() <= 2e-2 * max(scale, 1e-6))
        except Exception:
            log.exception("a prefill graph failed its check")
            return False
        finally:
            self.allocator.free(blocks)

    # ---- steps -------------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Logits (len(plan.rows), vocab) after each row's last token."""
        return self.execute_scored(plan, {})[0]

    @torch.inference_mode()
    def execute_scored(
        self, plan: StepPlan, scoring: Mapping[int, PositionScoring]
    ) -> tuple[torch.Tensor, Scored]:
        """execute(), plus the prompt positions `scoring` asks of prefill rows (by row index):
        the LM head runs over those rows' hidden states only, SCORE_SLICE positions at a time."""
        if plan.kind == "decode":
            return self._decode(plan), {}
        scored: Scored = {}
        return self._prefill(plan, scoring, scored), scored

    def _decode(self, plan: StepPlan) -> torch.Tensor:
        _m, _nb, np_ = self._layout
        rows = plan.rows
        batch = len(rows)
        need_span = max(blocks_for(r.start + 1) for r in rows)
        need_pages = max(len(r.pages) for r in rows)
        kinds: frozenset[str] | None = None
        if need_pages:
            # Kinds where a row's page holds an adapter; none at all runs the base step.
            kinds = self._model.lora_index.kinds_for(p for r in rows for p in r.pages)
            need_pages = need_pages if kinds else 0
        graph_key = self._graph_key(batch, need_span, need_pages, kinds)
        # Rows past `batch` up to the graph's bucket are padding: no token, block / page 0.
        padded = graph_key[0] if graph_key is not None else batch
        self._host = self._hosts[1] if self._host is self._hosts[0] else self._hosts[0]
        stage_decode(self._host_arrays[id(self._host)], rows, padded, need_span, need_pages)
        self._dev.copy_(self._host, non_blocking=True)  # the step's one host-to-device copy
        if graph_key is not None:
            graph, out = self._graphs[graph_key]
            self.graph_steps += 1
            graph.replay()
            return out[:batch]
        # Live pages (kinds) imply their groups' stacks exist: no _has_stacks() scan needed.
        width = need_pages
        if width > np_:
            # A wider page table than the buffers hold: eager, with the fed tokens read back.
            return self._prefill(self._with_tokens_read(plan))
        if self._loaded.device.type == "cpu" and width:
            # The CPU (torch reference) path reuses each layer's gathered adapter rows while
            # the rows' routing is unchanged: the gather costs as much as the matmuls there.
            self._model.lora_reuse_key = (batch, width, tuple(r.pages for r in rows))
        try:
            return self._decode_forward(batch, need_span, width, kinds)
        finally:
            self._model.lora_reuse_key = None

    def _with_tokens_read(self, plan: StepPlan) -> StepPlan:
        """`plan` with every fed row's token read back from the device (waits for it)."""
        fed = [r.feed for r in plan.rows if r.feed >= 0]
        if not fed:
            return plan
        read = iter(self._prev[fed].tolist())  # fed: a list of ints (host indexing)
        rows = tuple(
            r._replace(tokens=(max(next(read), 0),), feed=-1) if r.feed >= 0 else r
            for r in plan.rows
        )
        return StepPlan(plan.kind, rows)

    def _graph_key(
        self, batch: int, span: int, width: int, kinds: frozenset[str] | None
    ) -> GraphKey | None:
        if not self._graphs:
            return None
        gb = next((b for b in self.batch_buckets if b >= batch), None)
        gs = next((s for s in self.span_buckets if s >= span), None)
        gw = 0 if width == 0 else next((w for w in self.page_buckets if w >= width), None)
        if gb is None or gs is None or gw is None:
            return None
        variant = ATTENTION_KINDS if gw and kinds is not None and kinds <= ATTENTION_KINDS else None
        key = (gb, gs, gw, variant)
        return key if key in self._graphs else None

    def _prefill(
        self,
        plan: StepPlan,
        scoring: Mapping[int, PositionScoring] | None = None,
        scored: Scored | None = None,
        *,
        graphs: bool = True,
    ) -> torch.Tensor:
        """Rows grouped by length so a short row is never padded to a long one; a group runs
        from its prefill graph where one holds it (unless `graphs` is False), else eagerly."""
        order = sorted(range(len(plan.rows)), key=lambda i: len(plan.rows[i].tokens))
        budget = max(self._settings.max_batch_tokens, max(len(r.tokens) for r in plan.rows))
        out: list[torch.Tensor | None] = [None] * len(plan.rows)
        group: list[int] = []
        for i in order:
            longest = len(plan.rows[i].tokens)  # sorted ascending: this row is the longest
            if group and (len(group) + 1) * longest > budget:
                self._prefill_group(plan, group, out, scoring, scored, graphs)
                group = []
            group.append(i)
        if group:
            self._prefill_group(plan, group, out, scoring, scored, graphs)
        return torch.stack(out)  # type: ignore[arg-type]

    def _prefill_group(
        self,
        plan: StepPlan,
        group: list[int],
        out: list,
        scoring: Mapping[int, PositionScoring] | None = None,
        scored: Scored | None = None,
        graphs: bool = True,
    ) -> None:
        rows = [plan.rows[i] for i in group]
        device = self._loaded.device
        seq = max(len(r.tokens) for r in rows)
        span = max(blocks_for(r.start + len(r.tokens)) for r in rows)
        width = max(len(r.pages) for r in rows)
        pin = device.type == "cuda"
        kinds = self._model.lora_index.kinds_for(p for r in rows for p in r.pages)
        if graphs and not (scoring and any(i in scoring for i in group)):
            # Prompt scoring reads every position's hidden state: eager only.
            key = self.prefill_graphs.key_for(rows, width if kinds else 0, kinds)
            if key is not None:
                logits = self.prefill_graphs.run(key, rows, pin=pin)  # (rows, vocab)
                for b, i in enumerate(group):
                    out[i] = logits[b]
                return
        host = stage_prefill(rows, seq, span, width, pin=pin)  # (total,) int64
        # One queued copy: a copy from pageable memory would wait for the decode step still on
        # the device (async_decode) before this prefill could even start launching.
        dev = host.to(device, non_blocking=pin)
        ids, positions, valid, blocks, pages, last = prefill_sections(dev, len(rows), seq, span)
        step = StepInputs(
            input_ids=ids,
            positions=positions,
            block_tables=blocks,
            valid=valid != 0,
            page_table=pages if width and kinds and self._has_stacks() else None,
            lora_kinds=kinds,
        )
        hidden = self._model(step, self.kv)  # (batch, seq, hidden)
        batch = len(rows)
        logits = self._model.logits(hidden[torch.arange(batch, device=device), last])
        for b, i in enumerate(group):
            out[i] = logits[b]
            if scoring and scored is not None and i in scoring:
                want = scoring[i]
                # Right-padded: the row's fed positions are columns 0..len(tokens)-1.
                scored[i] = score_positions(self._model.logits, hidden[b], want.targets, want.top_n)


def make_executor(loaded: LoadedModel, settings: ExecutorSettings):
    """The paged executor for the own forward, else the generic transformers path."""
    if loaded.own_forward:
        return PagedExecutor(loaded, settings)
    if settings.attention != "sdpa":
        raise StartupError(
            f"--attention {settings.attention} applies to the own Llama-family forward; "
            f"{loaded.architecture} runs on the generic transformers path (use --attention sdpa)"
        )
    if settings.lora_overlap:
        raise StartupError(
            f"--lora-overlap applies to the own Llama-family forward; {loaded.architecture} "
            "runs on the generic transformers path"
        )
    return GenericExecutor(loaded, settings)
