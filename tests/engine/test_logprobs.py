"""Golden parity of logprobs and prompt_logprobs with PEFT, on the own Llama forward (paged KV)
and the generic transformers path (GPT-2).

Generated tokens: log_softmax(PEFT logits / temperature) (temperature 1 when greedy) at each
generated token, and its top-N, for rows of different tenants and adapters mixed in one batch,
greedy and sampled, and for a request that joins while another decodes. Prompt tokens:
log_softmax of PEFT's logits at every prompt position, with the prompt read in several chunks.
A batch where nobody asks computes no logprobs at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    store_adapter,
)
from transformers import AutoModelForCausalLM

from loraserve.server.engine import executor as executor_module
from loraserve.server.engine import scheduler as scheduler_module
from loraserve.server.engine.engine import Engine
from loraserve.server.engine.types import (
    EngineError,
    ErrorKind,
    FinishEvent,
    LogprobOptions,
    TokenEvent,
    TokenLogprob,
)

ADAPTERS = {  # name -> (tenant, shape)
    "a": ("t1", AdapterShape(rank=4, alpha=8, targets="all-linear", seed=21)),
    "b": ("t2", AdapterShape(rank=8, alpha=8, targets="all-linear", seed=22)),
}
PROMPTS = [[11, 12, 13, 14, 15], [40, 3, 99, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
LONG_PROMPT = [(7 * i) % 200 + 20 for i in range(45)]
MAX_NEW = 6


@dataclass
class Case:
    arch: str
    model_dir: Path
    adapter_dirs: dict[str, Path]
    peft: PeftModel


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request: pytest.FixtureRequest, model_cache: Path, tmp_path_factory) -> Case:
    arch = request.param
    model_dir = build_test_model(arch, model_cache)
    root = tmp_path_factory.mktemp(f"logprobs-{arch}")
    dirs = {name: make_peft_adapter(model_dir, root / name, s) for name, (_, s) in ADAPTERS.items()}
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    peft = PeftModel.from_pretrained(base, dirs["a"], adapter_name="a").eval()
    peft.load_adapter(dirs["b"], adapter_name="b")
    return Case(arch, model_dir, dirs, peft)


def _harness(case: Case, tmp_path: Path, **overrides: object) -> EngineHarness:
    harness = EngineHarness(case.model_dir, tmp_path, **overrides)
    for name, (tenant, _) in ADAPTERS.items():
        store_adapter(harness.service, tenant, name, case.adapter_dirs[name])
    return harness


def _peft_logits(case: Case, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """PEFT's float32 logits (len(ids), vocab) for one sequence."""
    with torch.no_grad():
        if adapter is None:
            with case.peft.disable_adapter():
                return case.peft(input_ids=torch.tensor([ids])).logits[0].float()
        case.peft.set_adapter(adapter)
        return case.peft(input_ids=torch.tensor([ids])).logits[0].float()


def _assert_entries(
    entries: list[TokenLogprob], logits: torch.Tensor, targets: list[int], top_n: int
) -> None:
    """entries[i] scores targets[i] under logits[i] (already temperature-scaled)."""
    expected = torch.log_softmax(logits, dim=-1)  # (n, vocab)
    assert [e.token_id for e in entries] == targets
    got = torch.tensor([e.logprob for e in entries])
    want = expected.gather(1, torch.tensor(targets)[:, None])[:, 0]
    # float32 through different kernels: relative to the magnitude, a little slack near 0.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    values, ids = torch.topk(expected, top_n, dim=-1)  # (n, top_n)
    for entry, row_ids, row_values in zip(entries, ids.tolist(), values, strict=True):
        assert [t.token_id for t in entry.top] == row_ids
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in entry.top]), row_values, rtol=1e-4, atol=1e-5
        )


def _generated_entries(events: list) -> tuple[list[int], list[TokenLogprob]]:
    """The completion and its entries, checking every event carries its own tokens' entries."""
    finish = events[-1]
    assert isinstance(finish, FinishEvent), finish
    streamed: list[TokenLogprob] = []
    for event in events[:-1]:
        assert isinstance(event, TokenEvent)
        assert [e.token_id for e in event.logprobs] == list(event.token_ids)
        streamed.extend(event.logprobs)
    assert [e.token_id for e in finish.new_logprobs] == list(finish.new_token_ids)
    streamed.extend(finish.new_logprobs)
    assert streamed == list(finish.logprobs)
    return list(finish.token_ids), list(finish.logprobs)


def _check_generated(
    case: Case, adapter: str | None, prompt: list[int], events: list, temperature: float, top: int
) -> None:
    tokens, entries = _generated_entries(events)
    assert len(entries) == len(tokens) == MAX_NEW
    logits = _peft_logits(case, adapter, prompt + tokens)[len(prompt) - 1 : -1]  # (new, vocab)
    _assert_entries(entries, logits / (temperature or 1.0), tokens, top)


def test_logprobs_match_peft_in_a_mixed_batch(case: Case, tmp_path: Path) -> None:
    harness = _harness(case, tmp_path)
    rows = [  # (tenant, adapter, prompt, temperature, top_logprobs, asks)
        ("t1", "a", PROMPTS[0], 0.0, 5, True),
        ("t2", "b", PROMPTS[1], 0.7, 3, True),
        ("t1", None, PROMPTS[2], 0.0, 0, False),
        ("t2", None, PROMPTS[0], 1.3, 0, True),
        ("t1", "a", PROMPTS[2], 0.9, 20, True),
    ]
    try:
        jobs = [
            harness.submit(
                prompt,
                adapter,
                tenant=tenant,
                logprobs=LogprobOptions(logprobs=True, top_logprobs=top) if asks else None,
                max_new_tokens=MAX_NEW,
                temperature=temperature,
                top_k=40 if temperature else None,  # truncation does not change the logprobs
                seed=5,
                ignore_eos=True,
            )
            for tenant, adapter, prompt, temperature, top, asks in rows
        ]
        harness.run(jobs)
        assert harness.engine.scheduler.prefill_sizes == [len(rows)]
        assert harness.engine.scheduler.decode_sizes[0] == len(rows)
    finally:
        harness.close()
    for (_, adapter, prompt, temperature, top, asks), events in zip(rows, jobs, strict=True):
        if asks:
            _check_generated(case, adapter, prompt, events, temperature, top)
        else:
            assert all(not e.logprobs and not e.prompt_logprobs for e in events)
            assert not events[-1].new_logprobs


def test_request_joining_mid_generation_gets_matching_logprobs(case: Case, tmp_path: Path) -> None:
    harness = _harness(case, tmp_path)
    # The joiner's adapter is loaded first: a cold load beside the running request could take
    # longer than that request's remaining tokens on a busy machine, and then nothing joins.
    harness.run([harness.submit(PROMPTS[1], "b", tenant="t2", max_new_tokens=1)])
    options = LogprobOptions(logprobs=True, top_logprobs=4)
    joined: list = []
    first: list = []

    def first_sink(event: object) -> None:
        first.append(event)
        if sum(isinstance(e, TokenEvent) for e in first) == 2 and not joined:
            joined.append(
                harness.submit(
                    PROMPTS[1],
                    "b",
                    tenant="t2",
                    logprobs=options,
                    max_new_tokens=MAX_NEW,
                    ignore_eos=True,
                )
            )

    from loraserve.server.engine.engine import SamplingOverrides
    from loraserve.server.engine.types import AdapterRef

    harness.engine.submit(
        tenant="t1",
        adapter=AdapterRef("t1", "a"),
        prompt_ids=PROMPTS[0],
        sampling=harness.engine.sampling(
            SamplingOverrides(max_new_tokens=MAX_NEW, ignore_eos=True)
        ),
        sink=first_sink,
        logprobs=options,
    )
    try:
        harness.run([first])
        harness.run([joined[0]])
    finally:
        harness.close()
    assert 2 in harness.engine.scheduler.decode_sizes
    _check_generated(case, "a", PROMPTS[0], first, 0.0, 4)
    _check_generated(case, "b", PROMPTS[1], joined[0], 0.0, 4)


def test_prompt_logprobs_match_peft_across_chunks(case: Case, tmp_path: Path) -> None:
    # 16 tokens per step: the 45-token prompt is read in three chunks beside a short one.
    harness = _harness(case, tmp_path, max_batch_tokens=16)
    options = LogprobOptions(prompt_logprobs=True, top_logprobs=3)
    try:
        long = harness.submit(LONG_PROMPT, "a", tenant="t1", logprobs=options, max_new_tokens=2)
        short = harness.submit(PROMPTS[1], None, tenant="t2", logprobs=options, max_new_tokens=2)
        plain = harness.submit(PROMPTS[0], "b", tenant="t2", max_new_tokens=2)
        harness.run([long, short, plain])
        assert len(harness.engine.scheduler.prefill_sizes) >= 3
    finally:
        harness.close()
    for adapter, prompt, events in (("a", LONG_PROMPT, long), (None, PROMPTS[1], short)):
        first, finish = events[0], events[-1]
        assert isinstance(finish, FinishEvent)
        assert list(first.prompt_logprobs) == list(finish.prompt_logprobs)
        assert all(not e.prompt_logprobs for e in events[1:-1])
        assert not finish.logprobs  # only prompt_logprobs was asked for
        logits = _peft_logits(case, adapter, prompt)[:-1]  # (prompt - 1, vocab)
        _assert_entries(list(finish.prompt_logprobs), logits, prompt[1:], 3)
    assert not plain[-1].prompt_logprobs


def test_a_batch_where_nobody_asks_computes_no_logprobs(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = _harness(case, tmp_path)
    calls: list[int] = []
    real = scheduler_module.token_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "token_logprobs", counting)

    def refuse(*args, **kwargs):
        raise AssertionError("prompt scoring ran for a batch where nobody asked")

    monkeypatch.setattr(executor_module, "score_positions", refuse)
    try:
        jobs = [
            harness.submit(p, a, tenant="t1", max_new_tokens=3, temperature=t, seed=1)
            for p, a, t in ((PROMPTS[0], "a", 0.0), (PROMPTS[1], None, 0.8))
        ]
        harness.run(jobs)
    finally:
        harness.close()
    assert calls == []
    for events in jobs:
        assert isinstance(events[-1], FinishEvent)
        assert not events[-1].logprobs and not events[-1].prompt_logprobs
        assert all(not e.logprobs for e in events)


def test_logprob_options_are_checked() -> None:
    assert Engine.logprob_options(True, 20, False) == LogprobOptions(True, 20, False)
    assert Engine.logprob_options(False, 0, True).prompt_logprobs
    for bad in ((True, 21, False), (False, 2, False)):
        with pytest.raises(EngineError) as info:
            Engine.logprob_options(*bad)
        assert info.value.kind is ErrorKind.INVALID_ARGUMENT
        assert "top_logprobs" in info.value.message


def test_token_logprobs_unit_per_row_temperature_and_top_n() -> None:
    from loraserve.server.engine.logprobs import token_logprobs

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((3, 50), generator=generator) * 4  # (rows, vocab)
    entries = token_logprobs(logits, [1, 2, 3], [0, 2, 50], [0.0, 0.5, 2.0])
    for row, (temperature, top) in enumerate(((1.0, 0), (0.5, 2), (2.0, 50))):
        expected = torch.log_softmax(logits[row] / temperature, dim=-1)  # (vocab,)
        assert entries[row].token_id == row + 1
        assert entries[row].logprob == pytest.approx(float(expected[row + 1]), rel=1e-5)
        assert len(entries[row].top) == top
        if top:
            assert entries[row].top[0].token_id == int(expected.argmax())
            assert [t.logprob for t in entries[row].top] == sorted(
                (t.logprob for t in entries[row].top), reverse=True
            )
    assert token_logprobs(logits[:0], [], [], None) == []


def test_score_positions_unit_spans_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraserve.server.engine import logprobs as module

    monkeypatch.setattr(module, "SCORE_SLICE", 4)
    head = torch.randn((8, 30), generator=torch.Generator().manual_seed(1))  # (hidden, vocab)
    hidden = torch.randn((11, 8), generator=torch.Generator().manual_seed(2))  # (positions, hidden)
    targets = [(5 * i) % 30 for i in range(10)]  # one fewer than positions: the last predicts
    slices: list[int] = []

    def project(x: torch.Tensor) -> torch.Tensor:
        slices.append(x.shape[0])
        return x @ head

    entries = module.score_positions(project, hidden, targets, 1)
    assert slices == [4, 4, 2]
    expected = torch.log_softmax(hidden[:10] @ head, dim=-1)
    assert [e.token_id for e in entries] == targets
    torch.testing.assert_close(
        torch.tensor([e.logprob for e in entries]),
        expected[torch.arange(10), torch.tensor(targets)],
        rtol=1e-5,
        atol=1e-6,
    )
    assert module.prompt_targets([9, 8, 7, 6, 5], 0, 2) == [8, 7]
    assert module.prompt_targets([9, 8, 7, 6, 5], 3, 2) == [5]  # the last position: generation
    assert module.prompt_targets([9], 0, 1) == []
