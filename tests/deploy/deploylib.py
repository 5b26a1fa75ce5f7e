"""What the static checks of deploy/ share: paths, the tools, rendering the chart, and the metrics
the services export (tests/deploy/conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import copy
import functools
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "medledger"
SERVICES = ("identity", "consent", "records", "audit", "anchoring")
# Stateless components in front of the services: no database, no Kafka, no keys.
GATEWAYS = ("fhir",)
# Everything the chart deploys as a medledger image.
COMPONENTS = (*SERVICES, *GATEWAYS)
SINGLE_WRITERS = ("audit", "anchoring")
KUBERNETES_VERSION = "1.30.0"
RELEASE, NAMESPACE = "medledger", "medledger"

# The values each scenario renders with, on top of the chart's values.yaml.
FULL = {
    # Everything switchable switched on: TLS with cert-manager, Strimzi, Prometheus Operator, Grafana.
    "tls": {"enabled": True},
    "kafka": {"strimzi": {"enabled": True, "storage": {"storageClass": "fast"}}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    },
    "dashboards": {"enabled": True},
}
# The chart's defaults with only what they leave to the installer (values.yaml, "Required"): Kafka,
# the AnchorRegistry, a PostgreSQL database per service, and Vault, without which identity, consent
# and records may not run their default two replicas and autoscalers. The bare defaults are refused.
REQUIRED = {
    "kafka": {"bootstrapServers": "kafka-0.kafka:9092,kafka-1.kafka:9092"},
    "chain": {"anchorRegistryAddress": "0x5FbDB2315678afecb367f032d93F642f64180aa3"},
    "components": {s: {"database": {"existingSecret": f"medledger-db-{s}"}} for s in SERVICES},
    "keyManager": {"type": "vault"},
}
SCENARIOS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "default": ([], REQUIRED),
    "production": (["values-production.yaml"], {}),
    "minimal": (["values-minimal.yaml"], {}),
    "dev": (["values-dev.yaml"], {}),
    "full": (["values-production.yaml"], FULL),
}


def tool(name: str, hint: str) -> str:
    """The path of a command-line tool the checks need; fails (never skips) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=str(ROOT / ".venv" / "bin"))
    if found is None:
        pytest.fail(f"{name} is not installed: {hint} (make setup installs it)", pytrace=False)
    return found


def validate_builtin(doc: dict[str, Any]) -> None:
    """kubernetes-validate's strict check against the Kubernetes schemas of KUBERNETES_VERSION.

    It reads and parses each schema file (one of them megabytes) on every call: cache that, the
    files do not change during a run."""
    import kubernetes_validate
    from kubernetes_validate import utils

    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.cache(utils.schema_contents)
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values: maps merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def scenario_values(name: str) -> dict[str, Any]:
    files, extra = SCENARIOS[name]
    values: dict[str, Any] = {}
    for f in files:
        values = merge(values, yaml.safe_load((DEPLOY / "helm" / f).read_text()) or {})
    return merge(values, extra)


def helm() -> Any:
    try:
        import helm_python
    except ImportError:  # pragma: no cover - the dev group installs it
        pytest.fail("helm-python-sdk is not installed: uv sync (make setup)", pytrace=False)
    return helm_python


def render(values: dict[str, Any]) -> dict[str, str]:
    """The chart's templates rendered offline (Helm's own engine), by template path."""
    with helm().Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(manifests: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"].get("app.kubernetes.io/component", ""))


# --- the metrics the services export, read from their code ------------------------------------

_METRIC_CALL = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"", re.S)


def exported_metrics() -> set[str]:
    """Every series name the services' Prometheus registries expose, from the metric
    definitions in libs/ and services/ (histograms as _bucket, _count and _sum), plus `up`,
    which Prometheus adds to every target."""
    names = {"up"}
    sources = [*ROOT.glob("libs/*/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py")]
    for path in sources:
        for kind, name in _METRIC_CALL.findall(path.read_text()):
            if kind == "Counter":
                names.add(name.removesuffix("_total") + "_total")
            elif kind == "Histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            elif kind == "Summary":
                names |= {name, f"{name}_count", f"{name}_sum"}
            else:
                names.add(name)
    return names


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_][a-zA-Z0-9_]*)(?=\s*(\{|\[|\)|$|\s|==|>|<|!=|,|\*|/|\+|-))")
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "predict_linear", "histogram_quantile", "abs",
    "absent", "absent_over_time", "ceil", "floor", "round", "clamp", "clamp_min", "clamp_max", "time",
    "timestamp", "vector", "scalar", "label_replace", "label_join", "sort", "sort_desc", "changes", "resets",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "quantile_over_time", "exp", "ln", "log2", "log10", "sqrt", "le", "inf", "nan", "atan2",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or
    recording rules, whose names hold a colon)."""
    expr = _QUOTED.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        word = match.group(1)
        if word.lower() in _PROMQL_WORDS or re.fullmatch(r"\d.*", word):
            continue
        names.add(word)
    return names
