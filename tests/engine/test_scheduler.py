"""Scheduler tests over a tiny Llama and PEFT adapters: batching, limits, cancellation, failures.

Every request's greedy tokens are compared with the same request run alone, so batching, KV row
placement, early exits and failures of neighbours must never change what a request produces.
Requests are queued before the engine thread starts, which makes batch composition deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from transformers import AutoTokenizer

from loraserve.server.engine.device_pool import DEFAULT_PAGE_RANK
from loraserve.server.engine.engine import SamplingOverrides
from loraserve.server.engine.model import load_base_model
from loraserve.server.engine.scheduler import RequestHandle
from loraserve.server.engine.types import (
    AdapterKey,
    AdapterRef,
    EngineError,
    ErrorEvent,
    ErrorKind,
    Event,
    FinishEvent,
    FinishReason,
    TokenEvent,
)

MAX_NEW = 12
TENANT = "t"
PROMPTS = ["The quick brown fox", "Hello", "What is the capital of the small island, and why?"]
SHAPES = {
    "a": AdapterShape(rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1),
    "b": AdapterShape(rank=8, alpha=16, use_rslora=True, targets="all-linear", seed=2),
    "c": AdapterShape(rank=16, alpha=8, targets=r".*\.mlp\.(gate|up|down)_proj", seed=3),
}
ADAPTERS: list[str | None] = [None, "a", "b", "c"]


@dataclass(frozen=True)
class Setup:
    model_dir: Path
    adapter_dirs: dict[str, Path]
    prompts: list[list[int]]
    reference: dict[tuple[str | None, int], list[int]]
    """(adapter or None, prompt index) -> greedy tokens of that request run alone."""


@dataclass
class Job:
    """One submitted request and what its sink received."""

    adapter: str | None
    prompt: int
    handle: RequestHandle
    events: list[Event] = field(default_factory=list)
    batch: int | None = None
    """1-based index of the batch that produced its first token."""

    @property
    def finish(self) -> FinishEvent:
        assert self.events, "no events"
        last = self.events[-1]
        assert isinstance(last, FinishEvent), last
        return last

    @property
    def error(self) -> EngineError:
        assert self.events, "no events"
        last = self.events[-1]
        assert isinstance(last, ErrorEvent), last
        return last.error

    @property
    def tokens(self) -> list[int]:
        return list(self.finish.token_ids)


def _harness(setup: Setup, data_dir: Path, **overrides: object) -> EngineHarness:
    harness = EngineHarness(setup.model_dir, data_dir, **overrides)
    for name, directory in setup.adapter_dirs.items():
        store_adapter(harness.service, TENANT, name, directory)
    return harness


def _submit(
    harness: EngineHarness,
    adapter: str | None,
    prompt: int,
    setup: Setup,
    on_event: Callable[[Job, Event], None] | None = None,
    **sampling: object,
) -> Job:
    """Submits through Engine.submit (for the handle); records events and the batch index."""
    sampling.setdefault("max_new_tokens", MAX_NEW)
    jobs: list[Job] = []
    scheduler = harness.engine.scheduler

    def sink(event: Event) -> None:
        job = jobs[0]
        if isinstance(event, TokenEvent | FinishEvent) and job.batch is None:
            job.batch = len(scheduler.prefill_sizes)
        job.events.append(event)
        if on_event is not None:
            on_event(job, event)

    handle = harness.engine.submit(
        tenant=TENANT,
        adapter=None if adapter is None else AdapterRef(TENANT, adapter),
        prompt_ids=setup.prompts[prompt],
        sampling=harness.engine.sampling(SamplingOverrides(**sampling)),  # type: ignore[arg-type]
        sink=sink,
    )
    jobs.append(Job(adapter, prompt, handle))
    return jobs[0]


def _run(harness: EngineHarness, jobs: list[Job]) -> None:
    harness.run([job.events for job in jobs], timeout=60)


def _key(harness: EngineHarness, name: str) -> AdapterKey:
    return harness.service.resolve(AdapterRef(TENANT, name))


def _assert_unpinned(harness: EngineHarness) -> None:
    resident = harness.engine.device_pool.resident()
    assert all(pins == 0 for pins in resident.values()), resident


@pytest.fixture(scope="module")
def setup(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    model_dir = build_test_model("llama", model_cache)
    root = tmp_path_factory.mktemp("scheduler-adapters")
    adapter_dirs = {
        name: make_peft_adapter(model_dir, root / name, shape) for name, shape in SHAPES.items()
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompts = [list(tokenizer(p)["input_ids"]) for p in PROMPTS]
    partial = Setup(model_dir, adapter_dirs, prompts, {})
    harness = _harness(partial, tmp_path_factory.mktemp("scheduler-reference"))
    reference: dict[tuple[str | None, int], list[int]] = {}
    try:
        for adapter in ADAPTERS:
            for i in range(len(prompts)):
                job = _submit(harness, adapter, i, partial)
                _run(harness, [job])
                reference[(adapter, i)] = job.tokens
        assert harness.engine.scheduler.prefill_sizes == [1] * len(reference)
    finally:
        harness.close()
    # The adapters must change the output, or "matches the reference" would prove little.
    for i in range(len(prompts)):
        outputs = {tuple(reference[(adapter, i)]) for adapter in ADAPTERS}
        assert len(outputs) == len(ADAPTERS), f"adapters do not change prompt {i}"
    return Setup(model_dir, adapter_dirs, prompts, reference)


@pytest.fixture
def make_harness(setup: Setup, tmp_path: Path) -> Iterator[Callable[..., EngineHarness]]:
    made: list[EngineHarness] = []

    def make(**overrides: object) -> EngineHarness:
        harness = _harness(setup, tmp_path / f"data{len(made)}", **overrides)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def _check_reference(setup: Setup, jobs: list[Job]) -> None:
    for job in jobs:
        assert job.tokens == setup.reference[(job.adapter, job.prompt)], (job.adapter, job.prompt)


def test_requests_queued_before_start_run_in_one_batch(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    harness = make_harness()
    order = [(None, 0), ("a", 1), ("b", 2), (None, 1), ("c", 0), ("a", 2)]
    jobs = [_submit(harness, adapter, prompt, setup) for adapter, prompt in order]
    assert harness.engine.scheduler.waiting_count() == len(jobs)
    _run(harness, jobs)
    assert harness.engine.scheduler.prefill_sizes == [len(jobs)]
    assert [job.batch for job in jobs] == [1] * len(jobs)
    _check_reference(setup, jobs)
    for job in jobs:
        assert job.finish.finish_reason is FinishReason.LENGTH
        streamed = [e for e in job.events if isinstance(e, TokenEvent)]
        assert len(streamed) == MAX_NEW - 1
        assert job.finish.new_token_ids == (job.tokens[-1],)
        assert job.finish.adapter_version == (0 if job.adapter is None else 1)
    assert harness.engine.scheduler.steps == MAX_NEW  # one prefill + MAX_NEW - 1 decode steps
    _assert_unpinned(harness)


def test_max_batch_size_splits_in_arrival_order(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    harness = make_harness(max_batch_size=2)
    order = [("c", 2), (None, 0), ("a", 1), ("b", 0), (None, 2)]
    jobs = [_submit(harness, adapter, prompt, setup) for adapter, prompt in order]
    _run(harness, jobs)
    assert harness.engine.scheduler.prefill_sizes == [2, 2, 1]
    assert [job.batch for job in jobs] == [1, 1, 2, 2, 3]
    _check_reference(setup, jobs)


def test_full_waiting_queue_is_resource_exhausted(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    harness = make_harness(max_waiting_requests=2)
    jobs = [_submit(harness, None, 0, setup), _submit(harness, "a", 1, setup)]
    with pytest.raises(EngineError) as caught:
        _submit(harness, "b", 2, setup)
    assert caught.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "queue" in caught.value.message
    assert harness.engine.scheduler.waiting_count() == 2
    _run(harness, jobs)
    _check_reference(setup, jobs)
    # Once drained, the queue accepts requests again.
    later = _submit(harness, "b", 2, setup)
    _run(harness, [later])
    _check_reference(setup, [later])


def _pages_bytes(setup: Setup, pages: int) -> int:
    """A device budget of exactly `pages` adapter pages for the test model."""
    loaded = load_base_model(setup.model_dir, device="cpu", dtype="float32")
    return pages * sum(
        layer.page_bytes(DEFAULT_PAGE_RANK, 4) for layer in loaded.lora_layers.values()
    )


def test_more_adapters_than_fit_the_device_budget_are_split_across_batches(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    # Two pages: a (rank 4) and b (rank 8) take one each, c (rank 16) needs both.
    harness = make_harness(adapter_device_bytes=_pages_bytes(setup, 2))
    order = [("a", 0), ("b", 1), ("c", 2), ("a", 1), (None, 2), ("c", 0)]
    jobs = [_submit(harness, adapter, prompt, setup) for adapter, prompt in order]
    _run(harness, jobs)
    # c does not fit next to a and b: it waits (keeping its order) while the rest run.
    assert harness.engine.scheduler.prefill_sizes == [4, 2]
    assert [job.batch for job in jobs] == [1, 1, 2, 1, 1, 2]
    for batch in (1, 2):
        adapters = {job.adapter for job in jobs if job.batch == batch} - {None}
        assert len(adapters) <= 2, (batch, adapters)
    _check_reference(setup, jobs)
    _assert_unpinned(harness)


def test_warm_adapters_are_not_counted_twice_when_admitting(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    """a and b are warm in both pages; a batch of a, c and b needs four pages, so c must wait."""
    harness = make_harness(adapter_device_bytes=_pages_bytes(setup, 2))
    pool = harness.engine.device_pool
    for name in ("a", "b"):
        pool.acquire(_key(harness, name))
        pool.release(_key(harness, name))
    assert pool.resident() == {_key(harness, "a"): 0, _key(harness, "b"): 0}
    jobs = [_submit(harness, "a", 0, setup), _submit(harness, "c", 1, setup)]
    jobs.append(_submit(harness, "b", 2, setup))
    _run(harness, jobs)
    for job in jobs:
        assert isinstance(job.events[-1], FinishEvent), (job.adapter, job.events[-1])
    assert harness.engine.scheduler.prefill_sizes == [2, 1]
    _check_reference(setup, jobs)


def test_cancelled_request_stops_within_one_step_and_releases_its_pin(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    harness = make_harness()
    seen_at_cancel: list[dict[AdapterKey, int]] = []

    def cancel_on_first_token(job: Job, event: Event) -> None:
        if isinstance(event, TokenEvent):
            job.handle.cancel()
        elif isinstance(event, ErrorEvent):
            seen_at_cancel.append(harness.engine.device_pool.resident())

    others = [_submit(harness, "b", 0, setup)]
    victim = _submit(harness, "a", 1, setup, on_event=cancel_on_first_token)
    others.append(_submit(harness, None, 2, setup))
    jobs = [*others, victim]
    _run(harness, jobs)

    assert victim.error.kind is ErrorKind.CANCELLED
    assert [type(e) for e in victim.events] == [TokenEvent, ErrorEvent], "one step, then stop"
    key_a, key_b = _key(harness, "a"), _key(harness, "b")
    assert seen_at_cancel == [{key_a: 0, key_b: 1}], "the pin goes when the request is retired"
    assert harness.engine.scheduler.prefill_sizes == [3]
    _check_reference(setup, others)  # the others ran on to the end, unchanged
    _assert_unpinned(harness)


def test_request_cancelled_while_queued_never_runs(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    harness = make_harness()
    cancelled = _submit(harness, "a", 0, setup)
    kept = _submit(harness, None, 1, setup)
    cancelled.handle.cancel()
    _run(harness, [kept])
    assert harness.engine.scheduler.prefill_sizes == [1]
    _check_reference(setup, [kept])
    assert not any(isinstance(e, TokenEvent | FinishEvent) for e in cancelled.events)
    assert harness.engine.device_pool.resident() == {}, (
        "a cancelled request must not load its adapter"
    )


def test_rows_finishing_early_leave_without_changing_the_others(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    harness = make_harness()
    # The highest-rank adapter (c) leaves first, so the batch's rank shrinks mid-run.
    plan = [("c", 0, 1), ("a", 0, 3), (None, 1, MAX_NEW), ("b", 2, 7), ("c", 2, 5)]
    jobs = [
        _submit(harness, adapter, prompt, setup, max_new_tokens=n) for adapter, prompt, n in plan
    ]
    _run(harness, jobs)
    assert harness.engine.scheduler.prefill_sizes == [len(jobs)]
    for job, (adapter, prompt, n) in zip(jobs, plan, strict=True):
        assert job.tokens == setup.reference[(adapter, prompt)][:n], (adapter, prompt, n)
        assert job.finish.finish_reason is FinishReason.LENGTH
        assert job.finish.usage.completion_tokens == n
    assert harness.engine.scheduler.steps == MAX_NEW
    _assert_unpinned(harness)


def test_eos_finishes_with_reason_eos_unless_ignore_eos(
    setup: Setup, make_harness: Callable[..., EngineHarness], monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = make_harness()
    expected = setup.reference[("a", 0)]
    # Declare a token the model greedily emits mid-completion to be EOS.
    at = next(i for i in range(2, MAX_NEW - 2) if expected[i] not in expected[:i])
    monkeypatch.setattr(harness.loaded, "eos_token_ids", frozenset({expected[at]}))
    stops = _submit(harness, "a", 0, setup)
    ignores = _submit(harness, "a", 0, setup, ignore_eos=True)
    _run(harness, [stops, ignores])
    assert stops.finish.finish_reason is FinishReason.EOS
    assert stops.tokens == expected[: at + 1]
    assert ignores.finish.finish_reason is FinishReason.LENGTH
    assert ignores.tokens == expected


def test_adapter_deleted_after_submission_is_not_found(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    harness = make_harness()
    gone = _submit(harness, "a", 0, setup)
    others = [_submit(harness, "b", 1, setup), _submit(harness, None, 2, setup)]
    harness.service.delete(TENANT, "a")
    _run(harness, [gone, *others])
    assert gone.error.kind is ErrorKind.NOT_FOUND
    assert "'a'" in gone.error.message
    assert not any(isinstance(e, TokenEvent) for e in gone.events)
    _check_reference(setup, others)
    assert all(k.name != "a" for k in harness.engine.device_pool.resident())
    # The engine keeps serving.
    later = _submit(harness, "c", 0, setup)
    _run(harness, [later])
    _check_reference(setup, [later])


def test_running_request_keeps_its_adapter_when_deleted_mid_generation(
    setup: Setup, make_harness: Callable[..., EngineHarness]
) -> None:
    harness = make_harness()
    key_b = _key(harness, "b")

    def delete_on_first_token(job: Job, event: Event) -> None:
        if isinstance(event, TokenEvent) and len(job.events) == 1:
            harness.service.delete(TENANT, "b")

    running = _submit(harness, "b", 0, setup, on_event=delete_on_first_token)
    _run(harness, [running])
    _check_reference(setup, [running])
    assert key_b not in harness.engine.device_pool.resident(), (
        "a deleted version is freed on release"
    )
    again = _submit(harness, "b", 0, setup)
    _run(harness, [again])
    assert again.error.kind is ErrorKind.NOT_FOUND


def test_failed_forward_fails_only_its_batch(
    setup: Setup, make_harness: Callable[..., EngineHarness], monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = make_harness()
    executor = harness.engine.scheduler.executor
    real = executor.execute
    calls: list[int] = []
    failures: list[int] = []

    def flaky(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # the first decode step, after a good prefill
            failures.append(1)
            raise RuntimeError("injected device fault")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(executor, "execute", flaky)
    failed = [_submit(harness, "a", 0, setup), _submit(harness, None, 1, setup)]
    _run(harness, failed)
    for job in failed:
        assert job.error.kind is ErrorKind.INTERNAL
        assert job.handle.request_id in job.error.message
        assert "injected device fault" in job.error.message
    ids = {job.handle.request_id for job in failed}
    assert len(ids) == 2
    for job in failed:
        other = (ids - {job.handle.request_id}).pop()
        assert other not in job.error.message, "each error names its own request"
    _assert_unpinned(harness)
    # Later requests succeed. Both are queued before the engine thread looks (it waits for
    # the scheduler's lock), so they share one prefill whatever the thread timing.
    with harness.engine.scheduler._cond:
        later = [_submit(harness, "a", 0, setup), _submit(harness, "b", 2, setup)]
    _run(harness, later)
    _check_reference(setup, later)
    assert failures == [1]
    assert harness.engine.scheduler.prefill_sizes == [2, 2]
