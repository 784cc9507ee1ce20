"""What a bench server's engine did during a run, read from its own /metrics (loopback).

A run through gRPC is slower than the same requests in process for two different reasons: the
cost of the RPC layer, and a different shape of work (calls arriving over time are admitted in
groups, each group a prefill step of its own, and fewer rows decode per step). The server's
step counters tell the two apart: prefill steps and their seconds, decode steps, their seconds
and their mean batch, before and after a run. Its per-thread CPU seconds say what the RPC layer
costs: the event loop (MainThread) shares the GIL with the engine thread.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field, fields

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class StepTotals:
    """Running totals of one server's engine steps."""

    prefill_steps: float = 0.0
    prefill_s: float = 0.0
    decode_steps: float = 0.0
    decode_s: float = 0.0
    step_rows: float = 0.0
    """Rows summed over every step (prefill and decode): loraserve_batch_size's sum."""
    steps: float = 0.0
    """Every step: loraserve_batch_size's count."""
    thread_cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds by thread (loraserve_thread_cpu_seconds_total; empty off Linux)."""

    def since(self, before: StepTotals) -> dict[str, float]:
        """What happened between `before` and these totals, with the mean rows per step and
        each thread's CPU seconds as `cpu_s:<thread>`."""
        grown = {
            f.name: getattr(self, f.name) - getattr(before, f.name)
            for f in fields(self)
            if f.name != "thread_cpu_s"
        }
        steps = grown.pop("steps")
        rows = grown.pop("step_rows")
        grown["mean_rows_per_step"] = rows / steps if steps else float("nan")
        for thread, seconds in self.thread_cpu_s.items():
            grown[f"cpu_s:{thread}"] = seconds - before.thread_cpu_s.get(thread, 0.0)
        return grown


def parse_step_totals(text: str) -> StepTotals:
    """StepTotals from a Prometheus text exposition of loraserve's metrics."""
    values: dict[str, float] = {}
    thread_cpu: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loraserve_thread_cpu_seconds_total":
                thread_cpu[sample.labels.get("thread", "")] = sample.value
            elif sample.name == "loraserve_step_duration_seconds_count":
                values[f"{sample.labels.get('kind')}_steps"] = sample.value
            elif sample.name == "loraserve_step_duration_seconds_sum":
                values[f"{sample.labels.get('kind')}_s"] = sample.value
            elif sample.name == "loraserve_batch_size_sum":
                values["step_rows"] = sample.value
            elif sample.name == "loraserve_batch_size_count":
                values["steps"] = sample.value
    known = {f.name for f in fields(StepTotals)}
    return StepTotals(**{k: v for k, v in values.items() if k in known}, thread_cpu_s=thread_cpu)


def read_step_totals(metrics_port: int, timeout_s: float = 5.0) -> StepTotals | None:
    """The server's totals now, or None when it serves no metrics (port 0)."""
    if not metrics_port:
        return None
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # loopback only
        return parse_step_totals(response.read().decode())
