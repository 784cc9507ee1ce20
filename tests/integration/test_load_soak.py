"""CI's short share of the load and soak test (bench.soak): a real server child, 3 tenants.

About 15 s of load from 8 concurrent async clients, mixed unary and streaming Generate with and
without adapters plus a few ListAdapters, on the tiny default model. It asserts correctness and
bounded memory only, never wall-clock thresholds: zero unexpected errors, every tenant served,
finite p50/p99 latencies and TTFT reported, and the server's RSS growth after warm-up within the
stated bound. The longer run is `python -m loraserve.bench.soak --duration S`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from loraserve.bench.soak import SoakSettings, format_report, run_soak

TENANTS = ("acme", "globex", "initech")


def test_short_soak_has_no_errors_and_bounded_rss(default_model: Path, tmp_path: Path) -> None:
    settings = SoakSettings(
        duration_s=15.0,
        clients=8,
        tenants=TENANTS,
        max_requests=5000,
        warmup_s=4.0,
        server="process",
        model_dir=default_model,
    )
    report = run_soak(settings, tmp_path / "soak")
    print(format_report(report))  # shown with -s, or when the test fails

    assert report.results, "no calls were made"
    assert len(report.results) <= settings.max_requests
    assert report.unexpected() == [], report.by_status()
    assert set(report.by_status()) == {"OK"}
    ok = report.ok_by_tenant()
    assert set(ok) == set(TENANTS)
    assert all(n > 0 for n in ok.values()), ok

    kinds = {r.kind for r in report.results}
    assert {"unary", "stream"} <= kinds
    with_adapter = {r.tenant for r in report.results if r.adapter and r.status == "OK"}
    assert with_adapter == set(TENANTS), "every tenant's adapters were used"
    assert any(not r.adapter and r.kind != "list" for r in report.results), "base model used"

    overall = report.latency()
    for key in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"):
        value = overall[key]
        assert value is not None and math.isfinite(value) and value >= 0, (key, value)
    streams = report.latency("stream")
    assert streams["client_ttft_p99_s"] is not None
    assert math.isfinite(streams["client_ttft_p99_s"])
    throughput = report.throughput()
    assert throughput["tokens_per_s"] > 0 and math.isfinite(throughput["tokens_per_s"])

    memory = report.memory()
    assert memory["pid"] != 0 and memory["samples"] >= 5, memory
    assert memory["warm_at_s"] >= settings.warmup - 1.5, memory
    assert memory["within_bound"], memory
    assert memory["growth_mib"] <= memory["bound_mib"]
    assert report.failures() == []

    # The JSON form carries the same verdict and is serializable.
    data = json.loads(json.dumps(report.to_json(), default=str))
    assert data["passed"] is True
    assert data["unexpected_errors"] == 0
