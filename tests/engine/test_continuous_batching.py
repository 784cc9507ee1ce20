"""Continuous batching: requests join and leave at step boundaries, long prompts are read in
chunks under the token budget, KV rows are never re-copied, and outputs equal running alone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    store_adapter,
)

from loraserve.server.engine.types import (
    EngineError,
    ErrorKind,
    FinishEvent,
    LogprobOptions,
    TokenEvent,
)

PROMPT = [11, 12, 13, 14, 15]
LONG_PROMPT = [(7 * i) % 200 + 20 for i in range(70)]


@pytest.fixture(scope="module")
def model_and_adapter(model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    model = build_test_model("llama", model_cache)
    adapter = make_peft_adapter(
        model, tmp_path_factory.mktemp("cb") / "a", AdapterShape(8, 16, "all-linear", seed=3)
    )
    return model, adapter


def _harness(model_and_adapter, tmp_path: Path, **overrides: object) -> EngineHarness:
    model, adapter = model_and_adapter
    harness = EngineHarness(model, tmp_path, **overrides)
    store_adapter(harness.service, "t", "a", adapter)
    return harness


def _alone(model_and_adapter, tmp_path: Path, prompt: list[int], adapter: str | None, n: int):
    harness = _harness(model_and_adapter, tmp_path / "alone")
    try:
        job = harness.submit(prompt, adapter, max_new_tokens=n, ignore_eos=True)
        harness.run([job])
        return list(job[-1].token_ids)
    finally:
        harness.close()


def test_request_joins_a_running_batch_and_both_match_running_alone(
    model_and_adapter,
    tmp_path: Path,
) -> None:
    first_alone = _alone(model_and_adapter, tmp_path / "1", PROMPT, "a", 24)
    second_alone = _alone(model_and_adapter, tmp_path / "2", PROMPT[::-1], None, 8)
    harness = _harness(model_and_adapter, tmp_path / "data")
    scheduler = harness.engine.scheduler
    second: list = []
    decode_sizes_at_join: list[int] = []

    def first_sink(event: object) -> None:
        first.append(event)
        tokens = sum(1 for e in first if isinstance(e, TokenEvent))
        if tokens == 5 and not second:
            decode_sizes_at_join.append(len(scheduler.decode_sizes))
            second.append(harness.submit(PROMPT[::-1], None, max_new_tokens=8, ignore_eos=True))

    from loraserve.server.engine.engine import SamplingOverrides
    from loraserve.server.engine.types import AdapterRef

    first: list = []
    harness.engine.submit(
        tenant="t",
        adapter=AdapterRef("t", "a"),
        prompt_ids=PROMPT,
        sampling=harness.engine.sampling(SamplingOverrides(max_new_tokens=24, ignore_eos=True)),
        sink=first_sink,
    )
    try:
        harness.run([first])
        harness.run([second[0]])
    finally:
        harness.close()
    # The second request was admitted while the first was decoding, and they decoded together.
    assert scheduler.prefill_sizes == [1, 1]
    assert 2 in scheduler.decode_sizes[decode_sizes_at_join[0] :]
    assert list(first[-1].token_ids) == first_alone
    assert isinstance(second[0][-1], FinishEvent)
    assert list(second[0][-1].token_ids) == second_alone


def test_long_prompt_is_read_in_chunks_without_stalling_decoding(
    model_and_adapter,
    tmp_path: Path,
) -> None:
    long_alone = _alone(model_and_adapter, tmp_path / "1", LONG_PROMPT, "a", 6)
    short_alone = _alone(model_and_adapter, tmp_path / "2", PROMPT, None, 30)
    harness = _harness(model_and_adapter, tmp_path / "data", max_batch_tokens=20)
    short = harness.submit(PROMPT, None, max_new_tokens=30, ignore_eos=True)
    harness.run([])  # start the engine
    deadline = time.monotonic() + 60
    while sum(isinstance(e, TokenEvent) for e in short) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    from loraserve.server.engine.engine import SamplingOverrides
    from loraserve.server.engine.types import AdapterRef

    def short_tokens() -> int:
        return sum(isinstance(e, TokenEvent) for e in short)

    long: list = []
    short_tokens_at_long_first_token: list[int] = []

    def long_sink(event: object) -> None:  # on the engine thread, in step order
        if isinstance(event, TokenEvent) and not any(isinstance(e, TokenEvent) for e in long):
            short_tokens_at_long_first_token.append(short_tokens())
        long.append(event)

    short_tokens_at_submit = short_tokens()
    harness.engine.submit(
        tenant="t",
        adapter=AdapterRef("t", "a"),
        prompt_ids=LONG_PROMPT,
        sampling=harness.engine.sampling(SamplingOverrides(max_new_tokens=6, ignore_eos=True)),
        sink=long_sink,
    )
    try:
        harness.run([short, long])
    finally:
        harness.close()
    assert list(long[-1].token_ids) == long_alone
    assert list(short[-1].token_ids) == short_alone
    # 70 prompt tokens under a 20-token budget (minus the decoding row) take 4 prefill steps
    # (19 + 19 + 19 + 13); the long request's first token comes out of the last. The short
    # request decoded in the steps before it, i.e. while the long prompt was being read: no
    # stall. (A scheduler that prefilled without decoding would give it at most one token.)
    assert short_tokens_at_long_first_token, "the long request produced no token"
    assert short_tokens_at_long_first_token[0] - short_tokens_at_submit >= 3


def test_kv_blocks_are_never_recopied(model_and_adapter, tmp_path: Path) -> None:
    """Paged KV: a running request keeps its blocks, and their contents, while others come
    and go; the pool itself is never reallocated."""
    harness = _harness(model_and_adapter, tmp_path / "data", max_batch_size=4)
    scheduler = harness.engine.scheduler
    kv = scheduler.executor.kv
    snapshots: list[tuple[tuple[int, ...], torch.Tensor]] = []
    pointers: set[int] = set()

    def watch(event: object) -> None:
        pointers.add(kv.data.data_ptr())
        seq = next((s for s in scheduler.running if s.request.prompt_ids == PROMPT), None)
        if seq is not None:
            first = seq.blocks[0]
            block = kv.data[:, :, first * kv.block_size : first * kv.block_size + len(PROMPT)]
            snapshots.append((tuple(seq.blocks[:1]), block.clone()))
        events.append(event)

    from loraserve.server.engine.engine import SamplingOverrides

    events: list = []
    harness.engine.submit(
        tenant="t",
        adapter=None,
        prompt_ids=PROMPT,
        sampling=harness.engine.sampling(SamplingOverrides(max_new_tokens=40, ignore_eos=True)),
        sink=watch,
    )
    others = [harness.submit([30 + i] * (3 + i), "a", max_new_tokens=2 + 3 * i) for i in range(6)]
    try:
        harness.run([events, *others])
    finally:
        harness.close()
    assert len(pointers) == 1, "the KV pool was reallocated"
    assert len({blocks for blocks, _ in snapshots}) == 1, "a running request's block moved"
    first = snapshots[0][1]
    assert all(torch.equal(first, snap) for _, snap in snapshots), "its prompt KV changed"
    assert scheduler.executor.allocator.free_count == scheduler.executor.allocator.capacity


def test_prompt_longer_than_context_is_refused(model_and_adapter, tmp_path: Path) -> None:
    harness = _harness(model_and_adapter, tmp_path / "data", max_seq_len=32)
    try:
        assert harness.engine.max_prompt_tokens == 31
        with pytest.raises(EngineError) as err:
            harness.engine.encode("word " * 40, [])
        assert err.value.kind is ErrorKind.INVALID_ARGUMENT
        job = harness.submit(PROMPT, None, max_new_tokens=100, ignore_eos=True)
        harness.run([job])
        assert len(job[-1].token_ids) == 32 - len(PROMPT), "completion capped by the context"
    finally:
        harness.close()


def test_requests_that_cannot_grow_are_preempted_and_finish_as_if_alone(
    model_and_adapter, tmp_path: Path
) -> None:
    """A KV pool of 20 blocks (16 tokens each) for four 80-token requests: the pool runs out
    mid-generation, the latest admitted requests are preempted and requeued, and every request
    still produces exactly the tokens it produces alone."""
    prompts = [[40 + 3 * i + j for j in range(20)] for i in range(4)]
    adapters = ["a", None, "a", None]
    alone = [
        _alone(model_and_adapter, tmp_path / f"alone{i}", p, adapters[i], 60)
        for i, p in enumerate(prompts)
    ]
    probe = _harness(model_and_adapter, tmp_path / "probe")
    per_block = probe.engine.scheduler.executor.kv.data[:, :, :16].nbytes
    probe.close()
    harness = _harness(model_and_adapter, tmp_path / "data", kv_cache_bytes=20 * per_block)
    scheduler = harness.engine.scheduler
    try:
        # Rows 2 and 3 (admitted last, so preempted first) also ask for logprobs: a preempted
        # request keeps its entries and never scores its prompt twice while re-reading it.
        options = LogprobOptions(logprobs=True, top_logprobs=2, prompt_logprobs=True)
        jobs = [
            harness.submit(
                p,
                adapters[i],
                max_new_tokens=60,
                ignore_eos=True,
                logprobs=options if i >= 2 else None,
            )
            for i, p in enumerate(prompts)
        ]
        harness.run(jobs)
    finally:
        harness.close()
    assert scheduler.preemptions > 0, "the pool was meant to run out"
    for i, job in enumerate(jobs):
        assert isinstance(job[-1], FinishEvent), job[-1]
        assert list(job[-1].token_ids) == alone[i], i
        entries = [e.token_id for e in job[-1].logprobs]
        assert entries == (alone[i] if i >= 2 else []), i
        assert [e.token_id for e in job[-1].prompt_logprobs] == (prompts[i][1:] if i >= 2 else [])
        streamed = [t for e in job[:-1] if isinstance(e, TokenEvent) for t in e.token_ids]
        assert streamed + list(job[-1].new_token_ids) == alone[i], "each token sent once"
    allocator = scheduler.executor.allocator
    assert allocator.free_count == allocator.capacity
    assert harness.engine.device_pool.resident() and all(
        pins == 0 for pins in harness.engine.device_pool.resident().values()
    )
