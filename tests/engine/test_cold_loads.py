"""Cold adapters load off the engine thread while the running rows keep decoding.

A real engine over a tiny Llama and a real store, with the store read replaced by a gated reader
passed to the engine (no hooks in production code): the read of a chosen adapter blocks until the
test opens the gate. While it is blocked, the running request must keep producing tokens (decode
steps are counted), and once the load lands the cold request must run and produce exactly what it
produces alone. Failed and deleted loads fail only the request that waits on them, with the
status the store gave, and leave nothing resident in either tier.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    store_adapter,
)
from transformers import AutoTokenizer

from loraserve.adapters.weights import AdapterWeights
from loraserve.server.engine.engine import SamplingOverrides
from loraserve.server.engine.host_cache import BesideChecksum
from loraserve.server.engine.types import (
    AdapterKey,
    AdapterRef,
    EngineError,
    ErrorEvent,
    ErrorKind,
    FinishEvent,
    TokenEvent,
)

TENANT = "t"
BASE_TOKENS = 120
"""The running request: long enough to be still decoding while a load is held."""
COLD_TOKENS = 10
HELD_STEPS = 6
"""Decode steps that must happen while the cold load is held at the gate."""
WAIT = 60.0
"""Upper bound on any wait (a hang guard, never a timing assertion)."""
SHAPES = {
    "cold": AdapterShape(rank=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=21),
    "other": AdapterShape(rank=4, alpha=8, targets=["o_proj"], seed=22),
}


class GatedReader:
    """The engine's store read; reads of `held` adapters wait at a gate the test opens."""

    def __init__(self, held: set[str]) -> None:
        self.real: Callable[..., AdapterWeights] | None = None
        self.held = held
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail: Exception | None = None
        self.reads: Counter[str] = Counter()
        self.beside: Counter[str] = Counter()
        """Reads asked to stage beside the checksum (by name)."""

    def __call__(
        self, key: AdapterKey, *, beside_checksum: BesideChecksum | None = None
    ) -> AdapterWeights:
        assert self.real is not None
        self.reads[key.name] += 1
        if beside_checksum is not None:  # the engine's cold loads stage beside the checksum
            self.beside[key.name] += 1
        if key.name not in self.held:
            return self.real(key, beside_checksum=beside_checksum)
        # The bytes are read (and staged) before a concurrent delete can land; what was
        # staged must stay unused until this returns.
        weights = self.real(key, beside_checksum=beside_checksum)
        self.entered.set()
        if not self.gate.wait(WAIT):
            raise TimeoutError("the test never opened the gate")
        if self.fail is not None:
            raise self.fail
        return weights


@dataclass(frozen=True)
class Setup:
    model_dir: Path
    adapter_dirs: dict[str, Path]
    prompts: list[list[int]]
    base_alone: list[int]
    cold_alone: list[int]
    other_alone: list[int]


def _harness(
    setup: Setup, data_dir: Path, reader: GatedReader | None = None, **overrides: object
) -> EngineHarness:
    harness = EngineHarness(setup.model_dir, data_dir, loader=reader, max_batch_size=4, **overrides)
    if reader is not None:
        reader.real = harness.service.load
    for name, directory in setup.adapter_dirs.items():
        store_adapter(harness.service, TENANT, name, directory)
    return harness


def _tokens(events: list) -> list[int]:
    assert events and isinstance(events[-1], FinishEvent), events[-1:]
    return list(events[-1].token_ids)


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.002)


@pytest.fixture(scope="module")
def setup(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    model_dir = build_test_model("llama", model_cache)
    root = tmp_path_factory.mktemp("cold-adapters")
    adapter_dirs = {n: make_peft_adapter(model_dir, root / n, s) for n, s in SHAPES.items()}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompts = [list(tokenizer(p)["input_ids"]) for p in ("The quick brown fox", "Hello there")]
    partial = Setup(model_dir, adapter_dirs, prompts, [], [], [])
    harness = _harness(partial, tmp_path_factory.mktemp("cold-reference"))
    try:
        alone = []
        for adapter, prompt, n in ((None, 0, BASE_TOKENS), ("cold", 1, COLD_TOKENS)):
            events = harness.submit(prompts[prompt], adapter, max_new_tokens=n, ignore_eos=True)
            harness.run([events])
            alone.append(_tokens(events))
        events = harness.submit(prompts[0], "other", max_new_tokens=COLD_TOKENS, ignore_eos=True)
        harness.run([events])
        alone.append(_tokens(events))
    finally:
        harness.close()
    assert alone[1] != alone[0][:COLD_TOKENS], "the adapter must change the output"
    return Setup(model_dir, adapter_dirs, prompts, *alone)


@dataclass
class Running:
    """An engine with a long base-model request decoding and a gated reader for `cold`."""

    harness: EngineHarness
    reader: GatedReader
    base: list


@pytest.fixture
def running(setup: Setup, tmp_path: Path) -> Iterator[Running]:
    reader = GatedReader(held={"cold"})
    harness = _harness(setup, tmp_path / "data", reader)
    base = harness.submit(setup.prompts[0], None, max_new_tokens=BASE_TOKENS, ignore_eos=True)
    harness.engine.start()
    _wait_for(lambda: any(isinstance(e, TokenEvent) for e in base), "the base request to decode")
    try:
        yield Running(harness, reader, base)
    finally:
        reader.gate.set()  # never leave a loader thread blocked
        harness.close()


def _submit_cold(running: Running, setup: Setup) -> list:
    return running.harness.submit(
        setup.prompts[1], "cold", max_new_tokens=COLD_TOKENS, ignore_eos=True
    )


def test_running_rows_keep_decoding_while_a_cold_adapter_loads(
    setup: Setup, running: Running
) -> None:
    scheduler = running.harness.engine.scheduler
    cold = _submit_cold(running, setup)
    assert running.reader.entered.wait(WAIT), "the cold load never started"
    steps, tokens = scheduler.steps, len(running.base)
    # The read is blocked: the engine must keep stepping the base request meanwhile.
    _wait_for(lambda: scheduler.steps >= steps + HELD_STEPS, "decode steps during the load")
    assert len(running.base) >= tokens + HELD_STEPS, "the running row stalled during the load"
    assert cold == [], "the cold request ran before its adapter was loaded"
    assert not isinstance(running.base[-1], FinishEvent), "the base request ended too early"

    running.reader.gate.set()
    running.harness.run([running.base, cold])
    assert _tokens(cold) == setup.cold_alone
    assert _tokens(running.base) == setup.base_alone
    assert running.reader.reads["cold"] == 1, "read once (prefetch and load share it)"
    pool = running.harness.engine.device_pool
    assert all(pins == 0 for pins in pool.resident().values())
    assert pool.cold_pending() == 0


@pytest.mark.parametrize(
    ("fault", "kind", "text"),
    [
        (
            EngineError(ErrorKind.INTERNAL, "stored adapter 'cold' is unusable"),
            ErrorKind.INTERNAL,
            "unusable",
        ),
        (OSError("disk read failed"), ErrorKind.INTERNAL, "adapter load failed: disk read failed"),
        (
            EngineError(ErrorKind.NOT_FOUND, "adapter 'cold' was deleted"),
            ErrorKind.NOT_FOUND,
            "deleted",
        ),
    ],
)
def test_a_failed_load_fails_only_its_request(
    setup: Setup, running: Running, fault: Exception, kind: ErrorKind, text: str
) -> None:
    running.reader.fail = fault
    cold = _submit_cold(running, setup)
    assert running.reader.entered.wait(WAIT)
    running.reader.gate.set()
    running.harness.run([cold])
    last = cold[-1]
    assert isinstance(last, ErrorEvent), last
    assert last.error.kind is kind
    assert text in last.error.message
    assert len(cold) == 1, "no token before the error"
    running.harness.run([running.base])
    assert _tokens(running.base) == setup.base_alone, "the running request was disturbed"
    pool = running.harness.engine.device_pool
    assert all(k.name != "cold" for k in pool.resident())
    assert pool.cold_pending() == 0
    # The failure is not sticky: the same adapter loads once the store is healthy again.
    running.reader.fail = None
    again = _submit_cold(running, setup)
    running.harness.run([again])
    assert _tokens(again) == setup.cold_alone


def test_a_delete_during_the_load_leaves_nothing_resident(setup: Setup, running: Running) -> None:
    engine = running.harness.engine
    cold = _submit_cold(running, setup)
    assert running.reader.entered.wait(WAIT)
    running.harness.service.delete(TENANT, "cold")  # deleted while its load is in flight
    running.reader.gate.set()
    running.harness.run([cold])
    last = cold[-1]
    assert isinstance(last, ErrorEvent), last
    assert last.error.kind is ErrorKind.NOT_FOUND
    assert "'cold'" in last.error.message
    running.harness.run([running.base])
    assert _tokens(running.base) == setup.base_alone
    engine.device_pool.collect()  # what the next engine iteration would do
    assert all(k.name != "cold" for k in engine.device_pool.resident())
    assert all(k.name != "cold" for k in engine.host_cache.resident())
    assert engine.device_pool.cold_pending() == 0
    # The engine keeps serving other adapters.
    other = running.harness.submit(
        setup.prompts[0], "other", max_new_tokens=COLD_TOKENS, ignore_eos=True
    )
    running.harness.run([other])
    assert _tokens(other) == setup.other_alone


def test_a_cancelled_request_does_not_leave_its_load_staged(setup: Setup, running: Running) -> None:
    """The load ends after its request is gone: the adapter becomes an ordinary warm one."""
    engine = running.harness.engine
    cold: list = []
    handle = engine.submit(
        tenant=TENANT,
        adapter=AdapterRef(TENANT, "cold"),
        prompt_ids=setup.prompts[1],
        sampling=engine.sampling(SamplingOverrides(max_new_tokens=COLD_TOKENS, ignore_eos=True)),
        sink=cold.append,
    )
    assert running.reader.entered.wait(WAIT)
    handle.cancel()  # the client leaves while its adapter is loading
    running.harness.run([cold])
    assert isinstance(cold[-1], ErrorEvent) and cold[-1].error.kind is ErrorKind.CANCELLED
    running.reader.gate.set()
    key = running.harness.service.resolve(AdapterRef(TENANT, "cold"))
    pool = engine.device_pool
    _wait_for(lambda: pool.ready(key), "the load to finish")
    running.harness.run([running.base])  # the engine is idle from here on
    pool.collect()  # what the next engine iteration would do
    assert pool.cold_pending() == 0, "staging memory was not given back"
    assert pool.resident() == {key: 0}, "the loaded adapter should be warm and unpinned"


def _start_with_base(setup: Setup, data_dir: Path, hold: float) -> Running:
    """An engine decoding a long base-model request, `cold` gated, the join hold at `hold`."""
    reader = GatedReader(held={"cold"})
    harness = _harness(setup, data_dir, reader, cold_join_hold_seconds=hold)
    base = harness.submit(setup.prompts[0], None, max_new_tokens=BASE_TOKENS, ignore_eos=True)
    harness.engine.start()
    _wait_for(lambda: any(isinstance(e, TokenEvent) for e in base), "the base request to decode")
    return Running(harness, reader, base)


def _submit(running: Running, setup: Setup, adapter: str) -> list:
    prompt = setup.prompts[1] if adapter == "cold" else setup.prompts[0]
    return running.harness.submit(prompt, adapter, max_new_tokens=COLD_TOKENS, ignore_eos=True)


def test_loaded_joiners_wait_for_the_loads_still_in_flight_and_share_one_prefill(
    setup: Setup, tmp_path: Path
) -> None:
    """`other` loads at once, `cold` is held at the gate: with a join hold, `other` keeps its
    place (the running row keeps decoding) until `cold` has loaded, then both join the batch
    in ONE prefill, each producing what it produces alone."""
    running = _start_with_base(setup, tmp_path / "data", hold=1.0)
    try:
        scheduler = running.harness.engine.scheduler
        cold = _submit(running, setup, "cold")
        assert running.reader.entered.wait(WAIT), "the cold load never started"
        other = _submit(running, setup, "other")
        _wait_for(lambda: scheduler.held_joins >= 3, "the loaded joiner to be held")
        steps = scheduler.steps
        _wait_for(lambda: scheduler.steps >= steps + HELD_STEPS, "decode steps during the hold")
        assert other == [] and cold == [], "a joiner ran while another load was in flight"
        prefills = len(scheduler.prefill_sizes)
        running.reader.gate.set()
        running.harness.run([cold, other])
        assert scheduler.prefill_sizes[prefills:] == [2], "the joiners shared one prefill"
        assert _tokens(cold) == setup.cold_alone and _tokens(other) == setup.other_alone
        running.harness.run([running.base])
        assert _tokens(running.base) == setup.base_alone
    finally:
        running.reader.gate.set()
        running.harness.close()


@pytest.mark.parametrize("hold", [0.0, 0.05], ids=["no hold", "hold expires"])
def test_a_loaded_joiner_is_not_held_past_the_hold(
    setup: Setup, tmp_path: Path, hold: float
) -> None:
    """Without a hold the loaded joiner is admitted at once; with one, once it has waited the
    hold out, even though the other load is still in flight (its gate stays shut)."""
    running = _start_with_base(setup, tmp_path / "data", hold=hold)
    try:
        scheduler = running.harness.engine.scheduler
        cold = _submit(running, setup, "cold")
        assert running.reader.entered.wait(WAIT), "the cold load never started"
        other = _submit(running, setup, "other")
        running.harness.run([other])  # finishes while `cold` is still at its gate
        assert _tokens(other) == setup.other_alone
        assert cold == [] and running.reader.gate.is_set() is False
        assert (scheduler.held_joins > 0) == (hold > 0)
    finally:
        running.reader.gate.set()
        running.harness.close()
