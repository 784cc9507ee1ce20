"""bench.kernels (the GPU kernel bench) runs its whole path on CPU under Triton's interpreter.

Times need CUDA events; here a stand-in timer returns a count, so these tests check that every
variant is built, captured and reported, that the variants compute the same step, and that the
command refuses to run without CUDA. The timings themselves come from `scripts/gpu_check.sh`.
"""

from __future__ import annotations

import os

import pytest
import torch

from loraserve.bench import kernels as kernel_bench
from loraserve.server.engine import lora_kernels

pytestmark = pytest.mark.skipif(
    lora_kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton's CPU interpreter",
)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake_time(fn, settings) -> float:
        fn()
        calls.append(1)
        return float(len(calls))

    monkeypatch.setattr(kernel_bench, "time_graph", fake_time)
    return calls


def test_every_variant_runs_and_is_reported(counted: list[int], model_cache) -> None:
    settings = kernel_bench.KernelBenchSettings(size="tiny", dtype="float32", batch=4, adapters=6)
    results = {
        "lora": kernel_bench.bench_lora(settings, torch.float32, torch.device("cpu")),
        "step": kernel_bench.bench_step(settings, torch.float32, torch.device("cpu")),
    }
    assert set(results["lora"]) == {"qkv", "o", "gate_up", "down"}
    variants = {f"distinct, {v}" for v in kernel_bench.STEP_VARIANTS}
    assert set(results["step"]["triton"]) == {
        "base",
        "base, unfused",
        *variants,
        "distinct, attention kinds only",
        "distinct, attention kinds only, shrinks beside",
        "distinct, shrinks beside",
    }
    assert results["step"]["single-pass vs split-K, max relative difference"] < 1e-5
    table = kernel_bench.format_table(results)
    assert "| gate_up |" in table and "| triton | distinct, split-K |" in table
    assert "gate_up sweep" in table
    sweeps = sum(len(row["sweep"]) for row in results["lora"].values())
    assert "| qkv | " in table.split("the whole projection")[1]  # W0 x with the adapter term
    assert len(counted) == 4 * 7 + sweeps + 2 * (5 + len(variants))


def test_profile_and_first_calls_are_reported() -> None:
    """The GPU-only parts' rows (measured by scripts/gpu_check.sh) reach the printed table."""
    results = {
        "first_calls": {
            "default": {"1 x 61": [1495.0, 16.2]},
            "no cuDNN": {"1 x 63": [21.2, 12.6]},
        },
        "profile": {
            "base": {
                "graph_us": 1429.0,
                "kernels_per_step": 232.0,
                "kernel_us_per_step": 1316.0,
                "top": [["_add_rms_norm", 33.0, 58.4]],
            }
        },
    }
    table = kernel_bench.format_table(results)
    assert "SDPA default (ms, first then second call): 1 x 61: 1495.0 then 16.2" in table
    assert "SDPA no cuDNN (ms, first then second call): 1 x 63: 21.2 then 12.6" in table
    assert "base: 232 kernels, 1316 µs of kernel time per step; in a graph 1429 µs" in table
    assert "| _add_rms_norm | 33.0 | 58.4 |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        kernel_bench.main([])
    assert exc.value.code == 2
    assert "needs a CUDA device" in capsys.readouterr().err
