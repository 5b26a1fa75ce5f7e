"""Alert rules, their unit tests, runbooks and dashboards: promtool checks and tests the rules file,
every alert has a test that fires it and a runbook section, and every metric a rule or a panel
names is one the services export (read from their code)."""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploylib import CHART, DEPLOY, ROOT, metric_names, tool

RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
RUNBOOKS = DEPLOY / "RUNBOOKS.md"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))


def promtool() -> str:
    return tool("promtool", "Debian package prometheus (apt-get install prometheus)")


@cache
def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


@cache
def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every query."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target["expr"]))
    return out


def test_promtool_check_rules() -> None:
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules() -> None:
    proc = subprocess.run(
        [promtool(), "test", "rules", RULES_TEST.name], capture_output=True, text=True, cwd=RULES_TEST.parent
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a case that expects it to fire, not only silence
    }
    names = {a["alert"] for a in alerts()}
    assert names - fired == set(), f"alerts without a firing test: {sorted(names - fired)}"


def test_the_alerts_the_issue_asks_for_exist() -> None:
    names = {a["alert"] for a in alerts()}
    for wanted in (
        "MedledgerServiceDown",
        "MedledgerErrorRatioHigh",
        "MedledgerLatencyBudgetBurn",
        "MedledgerConsumerLagHigh",
        "MedledgerOutboxBacklog",
        "MedledgerDeadLetters",
        "MedledgerAnchoringStalled",
        "MedledgerAnchorerBalanceLow",
        "MedledgerCheckpointTooOld",
        "MedledgerBreakGlassUsed",
        "MedledgerAuditVerifyFailed",
        "MedledgerAuditVerifyStale",
        "MedledgerKeyManagerErrors",
    ):
        assert wanted in names


def test_burn_rate_alerts_are_multiwindow() -> None:
    for alert in alerts():
        if "BudgetBurn" not in alert["alert"]:
            continue
        windows = set(re.findall(r":rate(\d+[mhd])\b", alert["expr"]))
        assert len(windows) == 4, f"{alert['alert']}: two long windows, each confirmed by a short one"


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_alert_has_a_severity_and_a_runbook_section() -> None:
    sections = anchors(RUNBOOKS.read_text())
    for alert in alerts():
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
        url = alert["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "deploy/RUNBOOKS.md" and anchor in sections, f"{alert['alert']}: {url}"


def test_the_metric_name_reader_finds_names_and_skips_the_rest() -> None:
    assert metric_names('sum by (job, le) (rate(foo_bucket{job=~"a|b", le="0.25"}[5m])) / on (job) bar') == {
        "foo_bucket",
        "bar",
    }
    assert metric_names('time() - max(x_seconds{namespace=~"$namespace"}) > 300 and up == 0') == {"x_seconds", "up"}
    assert metric_names("job:grpc_server_error_ratio:rate5m > (14.4 * 0.001)") == set()


def test_every_metric_in_the_rules_is_exported_by_the_code(code_metrics: set[str]) -> None:
    assert {"grpc_server_handled_total", "medledger_anchoring_entries_waiting"} <= code_metrics
    for rule in rules():
        unknown = metric_names(rule["expr"]) - code_metrics
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: no service exports {sorted(unknown)}"
        for used in re.findall(r"\b\w+:\w+:\w+\b", rule["expr"]):
            assert used in recorded(), f"{used} is not a recording rule of rules.yml"


def test_every_metric_in_the_dashboards_is_exported_by_the_code(code_metrics: set[str]) -> None:
    queries = dashboard_exprs()
    assert len(queries) > 50
    for dashboard, title, expr in queries:
        unknown = metric_names(expr) - code_metrics
        assert not unknown, f"{dashboard} / {title}: no service exports {sorted(unknown)}"
        for used in re.findall(r"\b\w+:\w+:\w+\b", expr):
            assert used in recorded(), f"{dashboard} / {title}: {used} is not recorded by rules.yml"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query as the expression of a recording rule."""
    concrete = [
        {"record": f"dashboard:query:{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")}
        for i, (_, _, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": concrete}]}))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_uses_the_datasource_variable(path: Path) -> None:
    board = json.loads(path.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert board["uid"].startswith("medledger-") and board["title"].startswith("medledger / ")
    for panel in board["panels"]:
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboards_cover_what_operators_watch() -> None:
    names = {p.stem for p in DASHBOARDS}
    assert names == {"overview", "identity", "consent", "records", "audit", "anchoring", "fhir"}
    text = {p.stem: p.read_text() for p in DASHBOARDS}
    for board in ("identity", "consent", "records", "audit", "anchoring"):
        for metric in (
            "grpc_server_started_total",
            "grpc_server_handling_seconds_bucket",
            "medledger_kafka_consumer_lag",
        ):
            assert metric in text[board], f"{board} lacks {metric}"
    for metric in ("medledger_consent_break_glass_uses_total", "medledger_consent_break_glass_refusals_total"):
        assert metric in text["consent"]
    for metric in (
        "medledger_anchoring_entries_waiting",
        "medledger_anchoring_gas_used_total",
        "medledger_anchoring_account_balance_ether",
        "medledger_anchoring_time_to_anchor_seconds_bucket",
    ):
        assert metric in text["anchoring"]
    for metric in (
        "medledger_audit_tree_size",
        "medledger_audit_checkpoint_signed_timestamp_seconds",
        "medledger_audit_last_verified_timestamp_seconds",
    ):
        assert metric in text["audit"]
    # The FHIR gateway: requests by route and status, latency p50 and p99, on its board and the overview.
    for board in ("fhir", "overview"):
        assert (
            "http_server_requests_total" in text[board] and "http_server_request_duration_seconds_bucket" in text[board]
        )
        assert 'job=\\"fhir\\"' in text[board], board
    fhir = [t["expr"] for p in json.loads(text["fhir"])["panels"] for t in p.get("targets", [])]
    assert any(
        "http_route" in e and "http_response_status_code" in e and "http_server_requests_total" in e for e in fhir
    )
    assert {q for e in fhir for q in re.findall(r"histogram_quantile\((0\.\d+)", e)} >= {"0.5", "0.99"}


def test_slo_document_states_the_numbers_the_rules_use() -> None:
    slo = (CHART / "SLO.md").read_text()
    for number in ("99.9%", "99%", "250 ms", "1 s", "60 s", "30 s"):
        assert number in slo, number
    for service in ("identity", "consent", "records", "audit", "anchoring"):
        assert service in slo
    assert str(RULES.relative_to(ROOT)) in slo
