"""Target ratios, the text table and the JSON file, from hand-made results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraserve.bench.report import Ratio, compute_ratios, format_table, with_ratios, write_json
from loraserve.bench.stats import RequestResult, RunResult, percentile


def _results() -> dict:
    def mode(tps: float, distinct: int) -> dict:
        return {"tokens_per_s": tps, "samples_tokens_per_s": [tps], "distinct_adapters": distinct}

    return {
        "meta": {"device": "cpu", "dtype": "float32", "size": "small", "batch": 16},
        "batch": {
            "modes": {
                "base": mode(400.0, 0),
                "loraserve-identical": mode(390.0, 1),
                "loraserve-distinct": mode(380.0, 16),
                "loraserve-uniform": mode(385.0, 11),
                "loraserve-skewed": mode(388.0, 7),
                "peft-mixed": mode(200.0, 16),
                "naive-swap": mode(50.0, 16),
            },
            "distinct_sweep": {"1": mode(390.0, 1), "16": mode(380.0, 16)},
        },
        "nsweep": {
            "alpha": 1.0,
            "requests": 48,
            "base": mode(360.0, 0),
            "by_n": {"5": mode(350.0, 5), "1000": mode(300.0, 40)},
        },
        "cold_start": {
            "cold_ttft_s": 0.05,
            "warm_ttft_s": 0.04,
            "added_ttft_s": 0.01,
            "cold_over_warm": 1.25,
        },
        "trace": {
            "requests": 48,
            "adapters": 1000,
            "alpha": 1.0,
            "distinct_adapters": 39,
            "cv": 1.0,
            "prompt_len": [8, 64],
            "output_len": [8, 32],
            "rate_rps": 6.0,
            "load": 0.8,
            "slo_ttft_s": 2.0,
            "saturation": {"base": {"requests_per_s": 10.0}, "loraserve": {"requests_per_s": 7.5}},
            "replay": {
                "base": {
                    "tokens_per_s": 90.0,
                    "ttft_p50_s": 0.5,
                    "ttft_p99_s": 1.0,
                    "goodput_rps": 5.0,
                    "slo_attainment": 1.0,
                },
                "loraserve": {
                    "tokens_per_s": 88.0,
                    "ttft_p50_s": 0.6,
                    "ttft_p99_s": 1.5,
                    "goodput_rps": 4.5,
                    "slo_attainment": 0.9,
                },
            },
        },
    }


def test_ratios_and_targets() -> None:
    ratios = {r.name: r for r in compute_ratios(_results())}
    distinct = ratios["loraserve-distinct / base"]
    assert distinct.value == pytest.approx(0.95)
    assert distinct.met is True
    assert ratios["loraserve-distinct / peft-mixed"].value == pytest.approx(1.9)
    assert ratios["loraserve-distinct / peft-mixed"].met is True
    naive = ratios["loraserve-distinct / naive-swap"]
    assert naive.value == pytest.approx(7.6)
    assert naive.met is False
    assert naive.shortfall == pytest.approx(0.05)
    nsweep = ratios["n=1000 / n=5 registered"]
    assert nsweep.value == pytest.approx(300 / 350)
    assert nsweep.met is False
    cold = ratios["cold / warm TTFT"]
    assert cold.op == "<" and cold.met is True
    trace = ratios["trace p99 TTFT loraserve / base"]
    assert trace.value == pytest.approx(1.5)
    assert trace.met is None  # reported, no target


def test_grpc_is_compared_with_its_base_and_with_the_in_process_engine() -> None:
    results = _results()
    grpc = {"tokens_per_s": 0.0, "ttft_p99_s": 0.2}
    results["grpc"] = {
        "modes": {
            "base": {**grpc, "tokens_per_s": 360.0},
            "loraserve": {**grpc, "tokens_per_s": 304.0},
        }
    }
    ratios = {r.name: r for r in compute_ratios(results)}
    assert ratios["gRPC loraserve / base"].value == pytest.approx(304 / 360)
    assert ratios["gRPC loraserve / base"].met is False  # the CPU target: >= 0.90
    base = ratios["gRPC / in-process, base"]
    assert base.value == pytest.approx(0.9) and base.met is True
    lora = ratios["gRPC / in-process, adapters"]
    assert lora.value == pytest.approx(0.8) and lora.met is False
    only_grpc = {"grpc": results["grpc"]}  # nothing in process to compare it with
    assert [r.name for r in compute_ratios(only_grpc)] == ["gRPC loraserve / base"]


def test_missing_parts_give_no_ratios() -> None:
    assert compute_ratios({"meta": {}}) == []
    only_cold = {
        "cold_start": {
            "cold_over_warm": 3.0,
            "added_ttft_s": 0.1,
            "cold_ttft_s": 0.15,
            "warm_ttft_s": 0.05,
        }
    }
    (ratio,) = compute_ratios(only_cold)
    assert ratio.met is False
    assert ratio.shortfall == pytest.approx(1.0)  # 3.0 against the < 1.5 target


def test_ratio_lower_is_better() -> None:
    assert Ratio("x", 1.9, 2.0, "<").met is True
    assert Ratio("x", 2.0, 2.0, "<").met is False
    assert Ratio("x", None, 2.0).met is None


def test_table_shows_every_section_and_verdict() -> None:
    text = format_table(with_ratios(_results()))
    for needle in (
        "loraserve-distinct",
        "peft-mixed",
        "naive-swap",
        "n=1000",
        "TTFT p99",
        "cold / warm TTFT",
        "MISSED by 5.0%",
        "met",
        "(reported)",
        "vs base on the same requests",
    ):
        assert needle in text, needle


def test_the_header_says_when_requests_were_sampled() -> None:
    results = _results()
    assert "sampled" not in format_table(results).splitlines()[0]  # greedy by default
    results["meta"] = {**results.get("meta", {}), "temperature": 0.7, "top_p": 0.9}
    assert format_table(results).splitlines()[0].endswith(", sampled (temperature 0.7, top-p 0.9)")


def test_json_round_trip(tmp_path: Path) -> None:
    results = with_ratios(_results())
    results["meta"]["out_dir"] = Path("bench/results")
    results["meta"]["nsweep"] = (5, 1000)
    path = write_json(results, tmp_path / "sub" / "bench.json")
    loaded = json.loads(path.read_text())
    assert loaded["meta"]["out_dir"] == "bench/results"
    assert loaded["meta"]["nsweep"] == [5, 1000]
    assert {r["name"] for r in loaded["ratios"]} >= {"loraserve-distinct / base"}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from loraserve.bench.plot import plot_results

    path = plot_results(_results(), tmp_path / "bench.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_results({"meta": {}}, tmp_path / "none.png") is None


def test_run_result_summary() -> None:
    run = RunResult(
        wall_s=2.0,
        requests=[
            RequestResult(arrival_s=0, completion_tokens=10, ttft_s=0.1, total_s=1.0),
            RequestResult(arrival_s=0, completion_tokens=10, ttft_s=0.3, total_s=1.0),
            RequestResult(
                arrival_s=0,
                completion_tokens=0,
                ttft_s=float("nan"),
                total_s=0.0,
                error="not_found: x",
            ),
        ],
    )
    summary = run.summary(slo_ttft_s=0.2)
    assert summary["tokens"] == 20
    assert summary["tokens_per_s"] == pytest.approx(10.0)
    assert summary["errors"] == 1
    assert summary["ttft_p50_s"] == pytest.approx(0.2)
    assert summary["goodput_rps"] == pytest.approx(0.5)
    assert summary["slo_attainment"] == pytest.approx(0.5)
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
