"""bench.pyspy_report: py-spy raw profiles summed per function, filtered by thread and stack."""

from __future__ import annotations

from pathlib import Path

from loraserve.bench.pyspy_report import main, read_profile

RAW = "\n".join(
    [
        "thread (11): loraserve-engine;run (s.py:1);_decode_step (s.py:5);decode (d.py:9) 6",
        "thread (11): loraserve-engine;run (s.py:1);_decode_step (s.py:5);decode (d.py:12) 2",
        "thread (11): loraserve-engine;run (s.py:1);_prefill_step (s.py:8);linear (t.py:3) 5",
        "thread (12): loraserve-server;run_once (b.py:7);select (sel.py:4) 9",
        "thread (13): MainThread;main (/x/site-packages/pkg/m.py:2) 1",
        "not a sample line",
    ]
)


def test_self_and_inclusive_counts_are_per_function_not_per_line() -> None:
    profile = read_profile(RAW, thread="loraserve-engine")
    assert profile.samples == 13
    assert profile.self_time["decode (d.py)"] == 8  # two lines of one function
    assert profile.self_time["linear (t.py)"] == 5
    assert profile.inclusive["run (s.py)"] == 13
    assert profile.inclusive["_decode_step (s.py)"] == 8


def test_within_keeps_only_stacks_through_that_function() -> None:
    profile = read_profile(RAW, thread="loraserve-engine", within="_decode_step")
    assert profile.samples == 8
    assert "linear (t.py)" not in profile.self_time


def test_thread_prefix_and_site_packages_paths() -> None:
    assert read_profile(RAW, thread="loraserve-server").samples == 9
    everything = read_profile(RAW)
    assert everything.samples == 23
    assert everything.self_time["main (pkg/m.py)"] == 1
    # A profile recorded without --threads has no names: a thread filter keeps nothing.
    unnamed = "run (s.py:1);decode (d.py:9) 4"
    assert read_profile(unnamed).samples == 4
    assert read_profile(unnamed, thread="loraserve-engine").samples == 0


def test_command_prints_shares(tmp_path: Path, capsys) -> None:
    path = tmp_path / "prof.txt"
    path.write_text(RAW)
    text = main([str(path), "--thread", "loraserve-engine", "--within", "_decode_step"])
    assert "8 samples" in text and "100.0%  decode (d.py)" in text
    assert capsys.readouterr().out.strip() == text
