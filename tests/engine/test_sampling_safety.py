"""Sampling cannot overflow, and a row that cannot be sampled fails alone.

Unit level (server.engine.sampling) and engine level: a request whose adapter drives its logits
to NaN shares one prefill step with other tenants' sampled requests; only it fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from serving_support import (
    AdapterShape,
    EngineHarness,
    build_test_model,
    make_peft_adapter,
    store_adapter,
)

from loraserve.server.engine.engine import SamplingOverrides
from loraserve.server.engine.sampling import (
    MAX_SEED,
    MIN_TEMPERATURE,
    SamplingFault,
    make_generator,
    select_next_tokens,
)
from loraserve.server.engine.types import (
    EngineError,
    ErrorEvent,
    FinishEvent,
    LogprobOptions,
    SamplingParams,
)


def test_the_smallest_temperature_cannot_overflow_float32() -> None:
    # Logits far beyond any real model's, at the smallest temperature: still finite.
    # (9999 would round to 1e4's bfloat16, 9984: a tie, which only the old sampler's seed broke.)
    logits = torch.tensor([[1e4, -1e4, 0.0, 9000.0]], dtype=torch.bfloat16)  # (1, vocab)
    params = [SamplingParams(temperature=MIN_TEMPERATURE, seed=1)]
    tokens = select_next_tokens(logits, params, [make_generator(params[0])])
    assert tokens == [0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_row_with_non_finite_logits_gets_a_fault_of_its_own(bad: float) -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, bad, 1.0], [5.0, 0.0, 0.0]])  # (3, vocab)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(3)]
    tokens = select_next_tokens(logits, params, [make_generator(p) for p in params])
    assert isinstance(tokens[1], SamplingFault) and "not finite" in str(tokens[1])
    assert all(isinstance(t, int) for t in (tokens[0], tokens[2]))


def test_minus_infinity_is_a_filtered_token_not_a_fault() -> None:
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf")]])  # (1, vocab)
    params = [SamplingParams(temperature=1.0, seed=0)]
    assert select_next_tokens(logits, params, [make_generator(params[0])]) == [1]


def test_a_row_with_no_finite_logit_is_a_fault() -> None:
    logits = torch.full((1, 4), float("-inf"))  # (1, vocab)
    params = [SamplingParams(temperature=1.0, seed=0)]
    (token,) = select_next_tokens(logits, params, [make_generator(params[0])])
    assert isinstance(token, SamplingFault)


@pytest.fixture(scope="module")
def model_dir(model_cache: Path) -> Path:
    return build_test_model("llama", model_cache)


def test_engine_refuses_unsafe_values(model_dir: Path, tmp_path: Path) -> None:
    h = EngineHarness(model_dir, tmp_path)
    for given in (
        SamplingOverrides(temperature=1e-45),
        SamplingOverrides(temperature=MIN_TEMPERATURE / 2),
        SamplingOverrides(seed=MAX_SEED + 1),
        SamplingOverrides(seed=-1),
    ):
        with pytest.raises(EngineError):
            h.engine.sampling(given)
    assert h.engine.sampling(SamplingOverrides(temperature=0.01, seed=MAX_SEED)).seed == MAX_SEED


@pytest.mark.parametrize("asks", [False, True], ids=["plain", "logprobs"])
def test_a_nan_row_fails_alone_inside_one_prefill_step(
    model_dir: Path, tmp_path: Path, asks: bool
) -> None:
    """Also when every row asks for logprobs and prompt_logprobs: scoring never fails a step."""
    options = LogprobOptions(logprobs=True, top_logprobs=3, prompt_logprobs=True) if asks else None
    out = make_peft_adapter(
        model_dir, tmp_path / "mlp", AdapterShape(rank=4, alpha=8, targets=["down_proj"])
    )
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    for key, value in tensors.items():
        if "lora_B" in key:  # entries up to 1e38: the residual stream overflows to Inf
            value = value.float()
            tensors[key] = (value / value.abs().max().clamp_min(1e-30) * 1e38).contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    h = EngineHarness(model_dir, tmp_path / "data")
    try:
        store_adapter(h.service, "t", "blowup", out)
        # Queued before the engine starts, so all five share the first prefill step.
        good = [
            h.submit(
                [1, 2, 3 + i],
                None,
                tenant="t",
                logprobs=options,
                temperature=1.0,
                seed=i,
                max_new_tokens=3,
            )
            for i in range(4)
        ]
        bad = h.submit(
            [1, 2, 3], "blowup", tenant="t", logprobs=options, temperature=1.0, max_new_tokens=3
        )
        h.run([*good, bad])
        assert isinstance(bad[-1], ErrorEvent) and "not finite" in bad[-1].error.message
        assert all(isinstance(events[-1], FinishEvent) for events in good)
        for events in good:
            finish = events[-1]
            assert len(finish.logprobs) == (len(finish.token_ids) if asks else 0)
            assert len(finish.prompt_logprobs) == (2 if asks else 0)
            assert all(torch.isfinite(torch.tensor(e.logprob)) for e in finish.logprobs)
        assert h.engine.scheduler.prefill_sizes[0] == 5
    finally:
        h.close()
