"""Checks the files under deploy/: Prometheus config, recording and alerting rules, dashboard.

Fast and offline. promtool (from the Debian `prometheus` package, which CI installs) validates
the config and rules and runs the alerting-rule unit tests in tests/deploy/rules_test.yml.
Every metric name that a rule or a dashboard panel reads must be one that server/metrics.py
exports, so renaming a metric without updating deploy/ fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraserve.server.config import ServerConfig
from loraserve.server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
RULES_YML = DEPLOY / "rules.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "loraserve-dashboard.json"
RULES_TEST_YML = Path(__file__).resolve().parent / "rules_test.yml"

# The strings deploy/README.md documents for adapting a copy of prometheus.yml.
TARGET = "127.0.0.1:9400"
INTERVAL = "15s"

RECORDING_RULES = {
    "tenant:loraserve_time_to_first_token_seconds:p50_5m",
    "tenant:loraserve_time_to_first_token_seconds:p99_5m",
    "tenant:loraserve_request_duration_seconds:p99_5m",
    "tenant:loraserve_time_per_output_token_seconds:p99_5m",
    "tenant:loraserve_generated_tokens:rate5m",
    "tenant:loraserve_requests:error_ratio_rate5m",
    "tenant:loraserve_tenant_cost:hourly_rate5m",
    "tenant:loraserve_tenant_compute_seconds:share_rate5m",
}
ALERTS = {
    "LoraserveTenantHighTTFT",
    "LoraserveTenantHighErrorRate",
    "LoraserveDown",
    "LoraserveQueueBacklog",
}
# What the dashboard must show: latency, throughput, cost, adapter cache, load.
DASHBOARD_METRICS = {
    "loraserve_time_to_first_token_seconds_bucket",
    "loraserve_request_duration_seconds_bucket",
    "loraserve_time_per_output_token_seconds_bucket",
    "loraserve_queue_wait_seconds_bucket",
    "loraserve_generated_tokens_total",
    "loraserve_requests_total",
    "loraserve_tenant_cost_total",
    "loraserve_tenant_compute_seconds_total",
    "loraserve_engine_busy_seconds_total",
    "loraserve_tenant_adapter_byte_seconds_total",
    "loraserve_adapters_resident",
    "loraserve_adapter_resident_bytes",
    "loraserve_adapter_cache_lookups_total",
    "loraserve_adapter_evictions_total",
    "loraserve_adapter_load_duration_seconds_bucket",
    "loraserve_requests_running",
    "loraserve_requests_waiting",
    "loraserve_batch_size_bucket",
    "loraserve_batch_distinct_adapters_bucket",
}
# Grafana's variables, replaced by values that make a panel expression plain PromQL.
GRAFANA_VARIABLES = {
    "${datasource}": "",
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$tenant": ".*",
}

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_RECORD_NAME = re.compile(
    r"^(?P<level>[a-z_]+):(?P<metric>loraserve_[a-z0-9_]+):(?P<ops>[a-z0-9_]+)$"
)


# ---- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: install the Debian `prometheus` package "
            "(apt-get install prometheus), which provides promtool. CI installs it; these "
            "tests never skip."
        )
    return path


def run_promtool(promtool: str, *args: str | Path, context: str = "") -> str:
    """Runs promtool from the repository root; fails the test with its output unless it passes."""
    proc = subprocess.run(
        [promtool, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}{context}"
    return output


def exported_series_names() -> set[str]:
    """Every series name loraserve's registry exposes, as Prometheus stores it.

    prometheus_client reports a counter family without its `_total` suffix and a histogram
    family without `_bucket`/`_sum`/`_count`; this adds them back.
    """
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def referenced_names(expr: str) -> tuple[set[str], set[str]]:
    """(loraserve_* metric names, level:metric:ops recorded names) an expression reads.

    Quoted strings (label values, regexes) are removed first, so `outcome!~"ok"` or a
    Grafana legend never counts as a metric.
    """
    bare = _QUOTED.sub('""', expr)
    metrics, recorded = set(), set()
    for token in _IDENTIFIER.findall(bare):
        if ":" in token:
            recorded.add(token)
        elif token.startswith("loraserve_"):
            metrics.add(token)
    return metrics, recorded


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES_YML.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data: rows are containers, and their nested panels count."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and the tenant variable's query."""
    exprs = [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in data_panels(dashboard)
        for target in panel["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append((f"variable {variable['name']!r}", variable["definition"]))
    return exprs


def plain_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


# ---- the extractor itself ------------------------------------------------------------------


def test_referenced_names_ignores_label_values_and_splits_recorded_names() -> None:
    metrics, recorded = referenced_names(
        'sum by (tenant) (rate(loraserve_requests_total{outcome!~"loraserve_fake"}[5m]))'
        " / tenant:loraserve_requests:rate5m > on (tenant) loraserve_requests_waiting"
    )
    assert metrics == {"loraserve_requests_total", "loraserve_requests_waiting"}
    assert recorded == {"tenant:loraserve_requests:rate5m"}


def test_exported_names_include_suffixes() -> None:
    names = exported_series_names()
    assert "loraserve_requests_total" in names
    assert "loraserve_requests" not in names
    assert "loraserve_time_to_first_token_seconds_bucket" in names
    assert "loraserve_time_to_first_token_seconds" not in names
    assert "loraserve_requests_waiting" in names


# ---- prometheus.yml ------------------------------------------------------------------------


def test_prometheus_config_passes_promtool(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", PROMETHEUS_YML.relative_to(REPO))
    assert "1 rule files found" in output


def test_prometheus_config_scrapes_loraserve_defaults() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["global"] == {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL}
    assert config["rule_files"] == ["rules.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "loraserve"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    defaults = ServerConfig()
    assert f"{defaults.host}:{defaults.metrics_port}" == TARGET
    assert job["static_configs"] == [{"targets": [TARGET]}]


def test_prometheus_config_adapts_by_string_substitution(promtool: str, tmp_path: Path) -> None:
    text = PROMETHEUS_YML.read_text()
    assert text.count(TARGET) == 1, "the target address must occur exactly once"
    assert text.count(INTERVAL) == 2, "the interval must occur exactly twice"
    adapted = text.replace(TARGET, "127.0.0.1:19400").replace(INTERVAL, "1s")
    (tmp_path / "prometheus.yml").write_text(adapted)
    shutil.copy(RULES_YML, tmp_path / "rules.yml")
    run_promtool(promtool, "check", "config", tmp_path / "prometheus.yml")
    config = yaml.safe_load(adapted)
    assert config["global"] == {"scrape_interval": "1s", "evaluation_interval": "1s"}
    assert config["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:19400"]}]


# ---- rules.yml -----------------------------------------------------------------------------


def test_rules_pass_promtool(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", RULES_YML.relative_to(REPO))


def test_recording_rules_follow_naming_convention() -> None:
    """level:metric:operations, where metric is the exported name (a counter without `_total`,
    a histogram without `_bucket`) of a series the rule actually reads."""
    records = {rule["record"]: str(rule["expr"]) for rule in load_rules() if "record" in rule}
    assert set(records) >= RECORDING_RULES, f"missing: {sorted(RECORDING_RULES - set(records))}"
    for name, expr in records.items():
        match = _RECORD_NAME.match(name)
        assert match, f"{name} is not level:metric:operations"
        assert match["level"] == "tenant", name
        metrics, _ = referenced_names(expr)
        bases = {m.removesuffix("_total").removesuffix("_bucket") for m in metrics}
        assert match["metric"] in bases, f"{name}: {match['metric']} is not among {sorted(bases)}"


def test_alerting_rules_are_complete() -> None:
    alerts = {rule["alert"]: rule for rule in load_rules() if "alert" in rule}
    assert set(alerts) >= ALERTS, f"missing: {sorted(ALERTS - set(alerts))}"
    for name, rule in alerts.items():
        assert rule.get("for"), f"{name} has no `for` duration"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        assert "$value" in annotations["description"], f"{name}: description omits $value"
    for name in ("LoraserveTenantHighTTFT", "LoraserveTenantHighErrorRate"):
        annotations = alerts[name]["annotations"]
        assert "$labels.tenant" in annotations["summary"], name
        assert "$labels.tenant" in annotations["description"], name
    assert alerts["LoraserveTenantHighTTFT"]["for"] == "10m"
    assert alerts["LoraserveTenantHighErrorRate"]["for"] == "10m"
    assert alerts["LoraserveDown"]["for"] == "2m"
    assert alerts["LoraserveQueueBacklog"]["for"] == "5m"


def test_rules_read_only_exported_metrics() -> None:
    exported = exported_series_names()
    rules = load_rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    seen: set[str] = set()
    for rule in rules:
        name = rule.get("record") or rule["alert"]
        metrics, recorded_refs = referenced_names(str(rule["expr"]))
        assert metrics <= exported, f"{name} reads unknown metrics {sorted(metrics - exported)}"
        unknown = recorded_refs - recorded
        assert not unknown, f"{name} reads series no rule records: {sorted(unknown)}"
        seen |= metrics
    assert len(seen) >= 8, "the rules read suspiciously few metrics; is the parser broken?"


def test_alerting_rules_unit_tests_pass(promtool: str) -> None:
    output = run_promtool(promtool, "test", "rules", RULES_TEST_YML.relative_to(REPO))
    assert "SUCCESS" in output


def test_rules_unit_tests_cover_every_alert() -> None:
    document = yaml.safe_load(RULES_TEST_YML.read_text())
    firing = {
        case["alertname"]
        for test in document["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    assert alerts <= firing, f"no test makes these alerts fire: {sorted(alerts - firing)}"


# ---- Grafana dashboard ---------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    tenant = variables["tenant"]
    assert tenant["type"] == "query"
    assert tenant["definition"] == "label_values(loraserve_requests_total, tenant)"
    assert tenant["multi"] is True and tenant["includeAll"] is True
    assert tenant["datasource"]["uid"] == "${datasource}"

    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"}
    assert {"Latency per tenant", "Throughput", "Cost per tenant", "Adapter cache", "Load"} <= (
        titles
    )
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"


def test_every_panel_has_datasource_and_targets() -> None:
    panels = data_panels(load_dashboard())
    assert len(panels) >= 15
    for panel in panels:
        title = panel["title"]
        assert panel.get("datasource", {}).get("uid") == "${datasource}", title
        assert panel["targets"], f"panel {title!r} has no targets"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {title!r} has an empty target"
            assert target["datasource"]["uid"] == "${datasource}", title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {title!r} has no unit"


def test_dashboard_reads_only_exported_metrics() -> None:
    exported = exported_series_names()
    recorded = {rule["record"] for rule in load_rules() if "record" in rule}
    seen: set[str] = set()
    for where, expr in dashboard_expressions(load_dashboard()):
        metrics, recorded_refs = referenced_names(expr)
        assert metrics <= exported, f"{where} reads unknown metrics {sorted(metrics - exported)}"
        assert recorded_refs <= recorded, f"{where} reads unrecorded {recorded_refs - recorded}"
        seen |= metrics
    missing = DASHBOARD_METRICS - seen
    assert not missing, f"the dashboard shows none of {sorted(missing)}"


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, is valid PromQL (promtool parses
    rule expressions, so each becomes a throwaway recording rule)."""
    exprs = [
        (where, expr)
        for where, expr in dashboard_expressions(load_dashboard())
        if not expr.startswith("label_values(")
    ]
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": plain_promql(expr)}
        for i, (_, expr) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    legend = "".join(f"\n  query_{i}: {where}" for i, (where, _) in enumerate(exprs))
    run_promtool(promtool, "check", "rules", path, context=f"\nwhere:{legend}")
