"""deploy/monitoring: the Grafana dashboard, the Prometheus alerts and their promtool unit tests.

Always checked here: structure, and that every PromQL expression parses (promql-parser) and uses
only the metrics (and their labels) of the metrics contract below. ``promtool`` (Debian package
``prometheus``, which ``.ci/run`` installs) checks the rules, runs the alert unit tests and parses
the dashboard's queries; under CI (``CI`` set) its absence is a failure, elsewhere a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts.test.yml"

# The metrics contract (services/common/metrics.py): name → its own label names.
COUNTERS_AND_GAUGES: dict[str, frozenset[str]] = {
    "tlsrelay_ingest_connections_total": frozenset({"listener", "tls"}),
    "tlsrelay_ingest_messages_total": frozenset({"listener", "result"}),
    "tlsrelay_policy_decisions_total": frozenset({"circumstance", "tls_mode"}),
    "tlsrelay_delivery_attempts_total": frozenset({"tls_mode", "tls_outcome", "result"}),
    "tlsrelay_delivery_tls_versions_total": frozenset({"version"}),
    "tlsrelay_plaintext_fallback_total": frozenset({"reason"}),
    "tlsrelay_tls_required_deferrals_total": frozenset({"tls_mode"}),
    "tlsrelay_messages_final_total": frozenset({"result"}),
    "tlsrelay_dsn_sent_total": frozenset({"action"}),
    "tlsrelay_mta_sts_total": frozenset({"mode", "result"}),
    "tlsrelay_dane_total": frozenset({"result"}),
    "tlsrelay_posture_deliveries_total": frozenset({"transport"}),
    "tlsrelay_posture_would_defer_total": frozenset({"tls_mode"}),
    "tlsrelay_posture_recording_errors_total": frozenset(),
    "tlsrelay_queue_messages": frozenset({"queue"}),
    "tlsrelay_queue_oldest_age_seconds": frozenset({"queue"}),
    "tlsrelay_throttled_total": frozenset({"site", "reason"}),
    "tlsrelay_backoff_events_total": frozenset({"site"}),
    "tlsrelay_site_connections": frozenset({"site"}),
    "tlsrelay_site_backoff_steps": frozenset({"site"}),
    "tlsrelay_site_suspended": frozenset({"site"}),
    "up": frozenset(),  # Prometheus' own, per scrape target
}
HISTOGRAMS: dict[str, frozenset[str]] = {
    "tlsrelay_ingest_message_size_bytes": frozenset(),
    "tlsrelay_delivery_duration_seconds": frozenset(),
    "tlsrelay_end_to_end_seconds": frozenset(),
}
TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus to every scraped series
JOBS = ("tlsrelay-ingest", "tlsrelay-policy", "tlsrelay-deliver")


def _series_labels() -> dict[str, frozenset[str]]:
    """Every series name Prometheus stores for the contract, and the labels each may carry."""
    series = {name: labels | TARGET_LABELS for name, labels in COUNTERS_AND_GAUGES.items()}
    for name, labels in HISTOGRAMS.items():
        series[f"{name}_bucket"] = labels | TARGET_LABELS | {"le"}
        series[f"{name}_sum"] = labels | TARGET_LABELS
        series[f"{name}_count"] = labels | TARGET_LABELS
    return series


SERIES = _series_labels()

# ------------------------------------------------------------------------ PromQL, parsed
# By promql-parser (the Rust parser of the Prometheus ecosystem), not by a tokenizer of our own:
# an expression it rejects is one Prometheus would reject too.

GRAFANA_VARIABLES = {"$__rate_interval": "5m"}  # what Grafana substitutes before querying


@dataclass
class Selector:
    metric: str | None  # None: a bare {…} selector without __name__
    labels: set[str] = field(default_factory=set)


@dataclass
class Usage:
    """What one PromQL expression reads: its series selectors and the labels it groups by."""

    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    aggregated: bool = False  # sum/max/…: only the grouping labels survive

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors if s.metric}


def parse_promql(expr: str) -> promql_parser.Expr:
    """The syntax tree of ``expr`` (Grafana variables substituted); ValueError when invalid."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    try:
        return promql_parser.parse(expr)
    except ValueError as error:
        raise ValueError(f"invalid PromQL {expr!r}: {error}") from None


def _selector(node: promql_parser.VectorSelector) -> Selector:
    selector = Selector(node.name)
    for matcher in node.matchers.matchers:
        selector.labels.add(matcher.name)
        if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
            selector.metric = matcher.value
    return selector


def promql_usage(expr: str) -> Usage:
    """Metric names with their matcher labels, and the labels named in by/without/on/ignoring/
    group_left/group_right lists."""
    usage = Usage()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            usage.selectors.append(_selector(node))
        elif isinstance(node, promql_parser.AggregateExpr):
            usage.aggregated = True
            if node.modifier is not None:
                usage.grouping |= set(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                usage.grouping |= set(node.modifier.matching.labels)
            usage.grouping |= set(node.modifier.group_labels or ())

    promql_parser.walk(parse_promql(expr), visit)
    return usage


@pytest.mark.parametrize(
    ("expr", "selectors", "grouping"),
    [
        ("up", [("up", set())], set()),
        ('up{job=~"tlsrelay-.*"} == 0', [("up", {"job"})], set()),
        (
            'sum by (queue) (rate(foo_total{a="x", b=~"y|z{"}[5m] offset 1d)) > 2 * 3600',
            [("foo_total", {"a", "b"})],
            {"queue"},
        ),
        (
            "histogram_quantile(0.95, sum by (le) (rate(x_seconds_bucket[$__rate_interval])))",
            [("x_seconds_bucket", set())],
            {"le"},
        ),
        (
            "max(a) by (q) > 1e3 and on (q) deriv(b[1h30m:1m]) > 0 or vector(0) unless c",
            [("a", set()), ("b", set()), ("c", set())],
            {"q"},
        ),
        (
            "a / ignoring(x) group_left(y) b # a comment: not_a_metric",
            [("a", set()), ("b", set())],
            {"x", "y"},
        ),
        ('{__name__="m", job="j"}', [("m", {"__name__", "job"})], set()),
        ('count_values("v", m) > bool inf', [("m", set())], set()),
        ("m @ start() - m offset -5m", [("m", set()), ("m", set())], set()),
    ],
)
def test_promql_usage(
    expr: str, selectors: list[tuple[str | None, set[str]]], grouping: set[str]
) -> None:
    usage = promql_usage(expr)
    assert [(s.metric, s.labels) for s in usage.selectors] == selectors
    assert usage.grouping == grouping
    assert usage.aggregated == any(a in expr for a in ("sum", "max(", "count_values"))


def test_promql_usage_rejects_unknown_functions_and_garbage() -> None:
    with pytest.raises(ValueError, match="unknown function with name 'rates'"):
        promql_usage("rates(x[5m])")
    with pytest.raises(ValueError, match="invalid PromQL"):
        promql_usage("x ? y")


def contract_problems(expr: str, where: str) -> list[str]:
    """Everything in ``expr`` outside the metrics contract."""
    usage = promql_usage(expr)
    problems = []
    if not usage.selectors:
        problems.append(f"{where}: no metric in {expr!r}")
    allowed_grouping = set(TARGET_LABELS)
    for selector in usage.selectors:
        if selector.metric not in SERIES:
            problems.append(f"{where}: {selector.metric!r} is not in the metrics contract")
            continue
        allowed = SERIES[selector.metric]
        allowed_grouping |= allowed
        extra = selector.labels - allowed - {"__name__"}
        if extra:
            problems.append(f"{where}: {selector.metric} has no label(s) {sorted(extra)}")
    extra = usage.grouping - allowed_grouping
    if extra:
        problems.append(f"{where}: groups by label(s) {sorted(extra)} its metrics do not have")
    return problems


def test_contract_check_catches_strangers() -> None:
    assert contract_problems('sum by (queue) (tlsrelay_queue_messages{queue="x"})', "ok") == []
    assert contract_problems("rate(tlsrelay_delivery_duration_seconds_count[5m])", "ok") == []
    assert contract_problems("tlsrelay_queue_depth", "e") == [
        "e: 'tlsrelay_queue_depth' is not in the metrics contract"
    ]
    assert contract_problems('tlsrelay_dsn_sent_total{result="x"}', "e") == [
        "e: tlsrelay_dsn_sent_total has no label(s) ['result']"
    ]
    assert contract_problems("sum by (le) (tlsrelay_dsn_sent_total)", "e") == [
        "e: groups by label(s) ['le'] its metrics do not have"
    ]
    assert contract_problems("vector(1)", "e") == ["e: no metric in 'vector(1)'"]


# ------------------------------------------------------------------------ the dashboard


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return panels


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    for panel in graph_panels(dashboard):
        where = f"panel {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["targets"], f"{where} has no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target["datasource"]["uid"] == "${datasource}", where


def test_dashboard_queries_use_only_the_metrics_contract() -> None:
    problems = []
    used: set[str] = set()
    for panel in graph_panels(load_dashboard()):
        for target in panel["targets"]:
            where = f"panel {panel['title']!r} {target['refId']}"
            problems += contract_problems(target["expr"], where)
            used |= promql_usage(target["expr"]).metrics
    assert problems == []
    # …and the dashboard shows every metric of the contract.
    shown = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert set(COUNTERS_AND_GAUGES) | set(HISTOGRAMS) <= shown, "metrics missing from the dashboard"


def test_dashboard_has_the_promised_views() -> None:
    exprs = [t["expr"] for p in graph_panels(load_dashboard()) for t in p["targets"]]
    # Latency: p50, p95 and p99 of end-to-end and per-attempt durations.
    for histogram in ("tlsrelay_end_to_end_seconds", "tlsrelay_delivery_duration_seconds"):
        quantiles = {
            float(m.group(1))
            for e in exprs
            if f"{histogram}_bucket" in e
            for m in [re.match(r"histogram_quantile\(([\d.]+),", e)]
            if m
        }
        assert quantiles == {0.5, 0.95, 0.99}, histogram
    # TLS share: tls + tls_verified over the attempts that reached the TLS decision.
    assert any(
        'tls_outcome=~"tls|tls_verified"' in e and 'tls_outcome!="no_connection"' in e and "/" in e
        for e in exprs
    )
    groupings = {frozenset(promql_usage(e).grouping) for e in exprs}
    for labels in ({"result"}, {"reason"}, {"tls_mode"}, {"queue"}, {"action"}):
        assert frozenset(labels) in groupings, f"no panel broken down by {labels}"
    assert any("circumstance" in g for g in groupings)
    # Before you enforce: clear-text deliveries beside the what-if deferrals, in one panel.
    assert any(
        any('transport="clear"' in t["expr"] for t in p["targets"])
        and any("tlsrelay_posture_would_defer_total" in t["expr"] for t in p["targets"])
        for p in graph_panels(load_dashboard())
    )


# ------------------------------------------------------------------------ the alerts


def load_alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    rules = []
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), "rule group names are unique"
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"} and group["rules"], group
        rules += group["rules"]
    return rules


DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")


def test_alert_rules_structure_and_contract() -> None:
    rules = load_alerts()
    alerts = [r for r in rules if "alert" in r]
    assert alerts and len(alerts) == len(rules), "alerting rules only"
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "alert names are unique"
    problems = []
    for alert in alerts:
        where = f"alert {alert['alert']}"
        assert re.fullmatch(r"Tlsrelay[A-Z][A-Za-z]+", alert["alert"]), where
        assert set(alert) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert isinstance(alert["expr"], str) and alert["expr"].strip(), where
        assert DURATION.match(str(alert["for"])), f"{where}: for {alert['for']!r}"
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), where
        for key in ("summary", "description", "runbook"):
            assert str(alert["annotations"][key]).strip(), f"{where}: annotations.{key}"
        problems += contract_problems(alert["expr"], where)
        # Templates only name labels the alert can have.
        usage = promql_usage(alert["expr"])
        carried = set(usage.grouping)
        if not usage.aggregated:
            carried |= set().union(*(SERIES.get(m, set()) for m in usage.metrics))
        for text in alert["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                if label not in carried:
                    problems.append(f"{where}: annotation uses $labels.{label}, not carried")
    assert problems == []
    target_down = [a for a in alerts if a["expr"].startswith("up{")]
    assert target_down and 'job=~"tlsrelay-.*"' in target_down[0]["expr"]


def load_alert_tests() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(ALERT_TESTS.read_text())
    return doc


def test_alert_unit_tests_cover_every_alert() -> None:
    alerts = {a["alert"]: a for a in load_alerts()}
    doc = load_alert_tests()
    assert doc["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for series in case["input_series"]:
            problems = contract_problems(series["series"], f"test {case.get('name')!r}")
            assert problems == []
            assert isinstance(series["values"], str) and series["values"].strip()
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            assert name in alerts, f"test for an unknown alert {name}"
            if not check.get("exp_alerts"):
                silent.add(name)
                continue
            fires.add(name)
            for expected in check["exp_alerts"]:
                labels = expected["exp_labels"]
                assert labels["severity"] == alerts[name]["labels"]["severity"], name
                assert set(expected["exp_annotations"]) == set(alerts[name]["annotations"]), name
    assert fires == set(alerts), f"alerts never shown firing: {set(alerts) - fires}"
    assert silent == set(alerts), f"alerts never shown silent: {set(alerts) - silent}"


def test_rules_with_promtool(tmp_path: Path) -> None:
    """promtool (Debian package ``prometheus``) is the real judge: required in CI."""
    # Always: what promtool would be given exists and parses.
    doc = load_alert_tests()
    for rule_file in doc["rule_files"]:
        assert (MONITORING / rule_file).is_file(), rule_file
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail(
                "promtool is not installed: `make test` installs Debian's prometheus package"
            )
        # Only where `make test` could not install it (not root, or no apt-get): a system
        # package, not a Python one; the structural and PromQL checks above still ran.
        pytest.skip("promtool not on PATH and not installable here (apt-get install prometheus)")

    def run(*args: str) -> None:
        proc = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"

    # 1. alerts.yml parses and every expression is valid PromQL (promtool check rules).
    run("check", "rules", str(ALERTS))
    # 2. Every alert fires and stays silent as alerts.test.yml expects (promtool test rules),
    #    run from deploy/monitoring so rule_files resolves.
    proc = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=MONITORING,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"promtool test rules failed:\n{proc.stdout}\n{proc.stderr}"
    # 3. Every dashboard query is valid PromQL: as recording rules ($__rate_interval → 5m).
    rules = [
        {"record": f"dashboard:panel_{p['id']}_{t['refId']}",
         "expr": t["expr"].replace("$__rate_interval", "5m")}
        for p in graph_panels(load_dashboard())
        for t in p["targets"]
    ]  # fmt: skip
    (tmp_path / "dashboard-rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    run("check", "rules", "dashboard-rules.yml")
