"""End to end: every part of the runner on a tiny model (hidden 64, 2 layers), 2 requests each.

Checks structure only (every part ran, tokens were counted, ratios computed), never timings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loraserve.bench.run import main


def test_every_part_runs_on_a_tiny_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    argv = [
        "--size", "tiny", "--batch", "2", "--adapters", "2", "--rank", "4",
        "--prompt-len", "6", "--output-len", "3", "--repeats", "1",
        "--nsweep", "2,3", "--nsweep-requests", "2",
        "--trace-requests", "2", "--trace-adapters", "3",
        "--trace-prompt-len", "4,8", "--trace-output-len", "2,4",
        "--cold-samples", "1", "--grpc-requests", "2", "--grpc-server", "thread",
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-plot",
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "bench.json").read_text())
    assert not results["errors"]
    modes = results["batch"]["modes"]
    assert set(modes) == {
        "base",
        "loraserve-identical",
        "loraserve-distinct",
        "loraserve-uniform",
        "loraserve-skewed",
        "peft-mixed",
        "naive-swap",
    }
    for entry in modes.values():
        assert entry["tokens"] == 2 * 3  # same requests and lengths in every mode
        assert entry["errors"] == 0
    assert set(results["batch"]["distinct_sweep"]) == {"1", "2"}
    assert set(results["nsweep"]["by_n"]) == {"2", "3"}
    assert results["cold_start"]["cold_ttft_s"] > 0
    trace = results["trace"]
    assert trace["replay"]["base"]["requests"] == 2
    assert trace["replay"]["loraserve"]["errors"] == 0
    grpc = results["grpc"]["modes"]
    assert grpc["base"]["errors"] == 0 and grpc["loraserve"]["errors"] == 0
    for mode in ("base", "loraserve"):  # what the server's engine did, from its /metrics
        steps = grpc[mode]["server_steps"]
        assert steps["prefill_steps"] >= 1 and steps["decode_steps"] >= 3 - 1, steps
        assert steps["mean_rows_per_step"] >= 1
    names = {r["name"] for r in results["ratios"]}
    assert "loraserve-distinct / base" in names
    assert "cold / warm TTFT" in names
    printed = capsys.readouterr().out
    assert "loraserve-distinct / naive-swap" in printed


def test_cold_overlap_says_where_the_engine_thread_spent_each_round(
    tmp_path: Path, model_cache: Path
) -> None:
    """The cold-load overlap bench on the tiny model: cold rounds commit every joiner's adapter
    on the engine thread, warm rounds commit none, and the breakdown adds up to the round.
    (`model_cache` points LORASERVE_CACHE, where the bench builds its model, at the session's
    cache.)"""
    from loraserve.bench.cold_overlap import main as cold_overlap

    out = tmp_path / "overlap.json"
    argv = [
        "--size", "tiny", "--batch", "2", "--joiners", "3", "--rank", "4",
        "--prompt-len", "6", "--output-len", "8", "--rounds", "1", "--json", str(out),
    ]  # fmt: skip
    cold_overlap(argv)
    result = json.loads(out.read_text())
    assert result["tpot_cold_over_warm"] > 0
    (measured,) = result["rounds"]
    for mode, commits in (("warm", 0), ("cold", 3)):
        engine = measured[mode]["engine"]
        assert engine["commits"] == commits, mode
        assert engine["decode_steps"] >= 8 - 1 and engine["prefill_steps"] >= 2
        assert engine["eager_decode_steps"] == engine["decode_steps"]  # CPU: no graphs
        spent = engine["prefill_s"] + engine["commit_s"] + engine["other_s"]
        spent += engine["decode_step_mean_s"] * engine["decode_steps"]
        assert abs(spent - engine["wall_s"]) <= 1e-6 * max(1.0, engine["wall_s"])
        if sys.platform == "linux":  # per-thread CPU comes from /proc
            assert engine["thread_cpu_s"]["loraserve-engine"] >= 0
            assert engine["engine_cpu_per_decode_step_s"] >= 0


def test_cold_load_times_the_whole_load_and_its_parts(tmp_path: Path) -> None:
    from loraserve.bench.cold_load import main as cold_load

    out = tmp_path / "cold_load.json"
    result = cold_load(["--size", "tiny", "--adapters", "2", "--rounds", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["parts"]) == {"read", "sha256", "sha256 pieces", "validate", "stage"}
    for timing in (result["load_in_line"], result["load_beside"], *result["parts"].values()):
        assert 0 < timing["best_ms"] <= timing["median_ms"]
    assert result["beside_over_in_line"] > 0 and result["adapter_file_bytes"] > 0


def test_commit_cost_times_commits_with_room_and_with_an_eviction_each() -> None:
    from loraserve.bench.commit_cost import main as commit_cost

    result = commit_cost(["--size", "tiny", "--adapters", "20"])
    assert result["layers"] == 2 and result["modules"] == 8
    for label in ("with_room", "evicting"):
        timing = result[label]
        assert timing["commits"] >= 1 and 0 < timing["best_us"] <= timing["median_us"]


def test_detok_cost_times_both_algorithms_per_length() -> None:
    from loraserve.bench.detok_cost import main as detok_cost

    result = detok_cost(["--batch", "2", "--lengths", "3,5", "--repeats", "1"])
    assert set(result["lengths"]) == {"3", "5"}
    for entry in result["lengths"].values():
        assert entry["whole_ms_per_step"] > 0 and entry["window_ms_per_step"] > 0


def test_stream_cost_paces_every_stream_and_prices_its_messages(tmp_path: Path) -> None:
    """The pacing cost bench: with a 20 ms interval and a token every 1 ms, each stream sends
    far fewer messages than tokens (the first at once, then one per interval, the finish with
    the rest), and the loop's CPU is reported per message and per token."""
    from loraserve.bench.stream_cost import main as stream_cost

    out = tmp_path / "stream_cost.json"
    argv = ["--streams", "3", "--tokens", "40", "--step-ms", "1", "--interval-ms", "20"]
    result = stream_cost([*argv, "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert 2 <= result["messages_per_stream"] < 40
    assert result["loop_cpu_per_message_us"] >= 0 and result["loop_cpu_per_token_us"] >= 0


def test_host_step_times_every_decode_step_through_the_stub(tmp_path: Path) -> None:
    """The host-work bench: both modes run, every decode step went through the stubbed forward
    (the bench raises otherwise), and the per-step figures are reported."""
    from loraserve.bench.host_step import main as host_step

    out = tmp_path / "host_step.json"
    argv = ["--batch", "4", "--tokens", "6", "--adapters", "2", "--repeats", "1"]
    result = host_step([*argv, "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert [r["mode"] for r in result["results"]] == ["base", "distinct"]
    for r in result["results"]:
        assert r["wall_us_per_step"] > 0 and r["cpu_us_per_step"] >= 0


def test_grpc_overhead_compares_both_paths_on_the_stubbed_device(tmp_path: Path) -> None:
    """The gRPC-overhead bench: both paths serve every request of both modes (it raises on a
    failed request or a step that bypassed the stub) and report a ratio per mode."""
    from loraserve.bench.grpc_overhead import main as grpc_overhead

    out = tmp_path / "grpc_overhead.json"
    argv = ["--requests", "8", "--concurrency", "4", "--tokens", "4", "--adapters", "2"]
    result = grpc_overhead([*argv, "--repeats", "1", "--device-ms", "0.5", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert [r["mode"] for r in result["results"]] == ["base", "distinct"]
    for row in result["results"]:
        assert row["grpc_over_in_process"] > 0
        for path in ("in_process", "grpc"):
            assert len(row[path]) == 1 and row[path][0]["tokens_per_s"] > 0
            assert row[path][0]["engine_cpu_us_per_step"] >= 0
        assert row["grpc"][0]["loop_cpu_ms_per_request"] >= 0
