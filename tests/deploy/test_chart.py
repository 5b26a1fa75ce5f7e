"""The Helm chart, statically: Helm's linter, the values schema, every rendered object against the
Kubernetes 1.30 schemas (built-in kinds) or the repository's schemas (custom resources), and the
rules the chart exists to keep: hardened containers with probes and limits, autoscalers only for
services that scale, the architecture's network flows and nothing else, migrations in a hook,
Vault per service, TLS, Kafka topics as the code names them, labels everywhere."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml
from deploylib import (
    CHART,
    COMPONENTS,
    DEPLOY,
    GATEWAYS,
    KUBERNETES_VERSION,
    NAMESPACE,
    REQUIRED,
    SCENARIOS,
    SERVICES,
    SINGLE_WRITERS,
    component,
    documents,
    helm,
    merge,
    of_kind,
    render,
    scenario_values,
    validate_builtin,
)

CUSTOM_KINDS = {"Certificate", "Kafka", "KafkaNodePool", "KafkaTopic", "ServiceMonitor", "PrometheusRule"}
PORTS = {
    "identity": {"grpc": 50051, "metrics": 9101, "http": 9111},
    "consent": {"grpc": 50052, "metrics": 9102},
    "records": {"grpc": 50053, "metrics": 9103},
    "anchoring": {"grpc": 50054, "metrics": 9104},
    "audit": {"grpc": 50055, "metrics": 9105, "http": 9115},
    "fhir": {"grpc": 50056, "metrics": 9106, "http": 8080},
}
# Who calls whom over gRPC (the architecture): every service authenticates against identity.
CALLS = {
    "identity": set(),
    "consent": {"identity"},
    "records": {"identity", "consent"},
    "audit": {"identity"},
    "anchoring": {"identity", "audit"},
    # The FHIR gateway calls the services with each caller's token; nothing calls it.
    "fhir": {"identity", "consent", "records", "audit"},
}


def deployment(docs: list[dict[str, Any]], service: str) -> dict[str, Any]:
    (found,) = [d for d in of_kind(docs, "Deployment") if component(d) == service]
    return found


def configmap(docs: list[dict[str, Any]], service: str) -> dict[str, str]:
    (found,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == f"medledger-{service}"]
    return dict(found["data"])


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            specs.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            specs.append((f"Pod/{d['metadata']['name']}", d["spec"]))
    return specs


# --- Helm's own checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_finds_no_warning_or_error(scenario: str) -> None:
    report = helm().lint(str(CHART), scenario_values(scenario), strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize(
    "bad",
    [
        {"surprise": True},
        {"components": {"identity": {"replicaz": 2}}},
        {"components": {"audit": {"autoscaling": {"enabled": True}}}},
        {"components": {"anchoring": {"autoscaling": {"enabled": True}}}},
        {"components": {"billing": {"enabled": True}}},
        {"components": {"records": {"settings": {"CONSENT_ADDRESS": "x:1"}}}},
        {"keyManager": {"type": "kms"}},
        {"chain": {"anchorRegistryAddress": "0x1234"}},
        {"tls": {"certManager": {"issuerRef": {"name": "ca", "kind": "Certificate"}}}},
    ],
)
def test_values_schema_refuses(bad: dict[str, Any]) -> None:
    with helm().Chart.load(str(CHART)) as chart, pytest.raises(Exception, match="medledger"):
        chart.validate_schema(bad)


def test_values_schema_accepts_every_example() -> None:
    with helm().Chart.load(str(CHART)) as chart:
        for scenario in SCENARIOS:
            chart.validate_schema(scenario_values(scenario))


# --- what a working installation needs, and no state kept per pod ---------------------------------


def refusal(values: dict[str, Any]) -> list[str]:
    """The problems the chart names when it refuses values (templates/checks.yaml), one a line."""
    with pytest.raises(Exception) as refused:
        render(values)
    text = str(refused.value)
    assert "medledger cannot work with these values:" in text, text
    return [line.removeprefix("- ") for line in text.splitlines() if line.startswith("- ")]


def with_default(over: dict[str, Any]) -> dict[str, Any]:
    """The default scenario (the chart's defaults and what they require) with `over` on top."""
    return merge(scenario_values("default"), over)


def test_the_bare_defaults_are_refused_naming_every_value_they_need() -> None:
    problems = refusal({})
    text = "\n".join(problems)
    assert any(p.startswith("kafka.bootstrapServers is empty") for p in problems), text
    assert any(p.startswith("chain.anchorRegistryAddress is empty") for p in problems), text
    for service in SINGLE_WRITERS:  # one replica: no database is the only problem
        assert any(
            p.startswith(f"{service} has no database: set components.{service}.database.existingSecret")
            and f"components.{service}.database.embedded: true" in p
            for p in problems
        ), text
    for service in ("identity", "consent", "records"):  # two replicas and an autoscaler by default
        scaled = f"components.{service}.autoscaling.enabled is true but"
        assert any(p.startswith(f"{scaled} {service} has no database") for p in problems), text
        assert any(p.startswith(f"{scaled} keyManager.type is local") for p in problems), text
    assert len(problems) == 2 + len(SINGLE_WRITERS) + 2 * 3, text


def test_every_shipped_values_file_renders() -> None:
    files = sorted(p.name for p in (DEPLOY / "helm").glob("values-*.yaml"))
    assert {f for files, _ in SCENARIOS.values() for f in files} == set(files), "a scenario per values file"
    for name in files:
        values = yaml.safe_load((DEPLOY / "helm" / name).read_text())
        assert of_kind(documents(render(values)), "Deployment"), name


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ({"kafka": {"bootstrapServers": ""}}, "kafka.bootstrapServers is empty: set it to your Kafka cluster's"),
        ({"chain": {"anchorRegistryAddress": ""}}, "chain.anchorRegistryAddress is empty: anchoring refuses to start"),
        (
            {"components": {"audit": {"database": {"existingSecret": ""}}}},
            "audit has no database: set components.audit.database.existingSecret",
        ),
        (
            {"components": {"anchoring": {"database": {"existingSecret": ""}}}},
            "anchoring has no database: set components.anchoring.database.existingSecret",
        ),
    ],
)
def test_a_missing_required_value_is_refused_by_name(missing: dict[str, Any], named: str) -> None:
    (problem,) = refusal(with_default(missing))
    assert problem.startswith(named), problem


@pytest.mark.parametrize(
    "instead",
    [
        {"kafka": {"bootstrapServers": "", "strimzi": {"enabled": True}}},
        {"chain": {"anchorRegistryAddress": ""}, "components": {"anchoring": {"enabled": False}}},
        {"components": {"audit": {"database": {"existingSecret": "", "url": "postgresql+asyncpg://u:p@pg/audit"}}}},
        {"components": {"audit": {"database": {"existingSecret": "", "embedded": True}}}},
    ],
)
def test_what_stands_in_for_a_required_value_renders(instead: dict[str, Any]) -> None:
    assert of_kind(documents(render(with_default(instead))), "Deployment")


SCALED = {
    "replicas 2": ({"replicas": 2, "autoscaling": {"enabled": False}}, "components.consent.replicas is 2 but"),
    "autoscaler": (
        {"replicas": 1, "autoscaling": {"enabled": True, "minReplicas": 1}},
        "components.consent.autoscaling.enabled is true but",
    ),
}
ONE_CONSENT_POD = "components.consent.replicas: 1 and components.consent.autoscaling.enabled: false"
# The local keyring, and one pod of each service that would otherwise scale out.
LOCAL_KEYRING_ONE_POD = {
    "keyManager": {"type": "local"},
    "components": {s: {"replicas": 1, "autoscaling": {"enabled": False}} for s in ("identity", "consent", "records")},
}


@pytest.mark.parametrize("scaled", SCALED)
def test_more_than_one_pod_with_the_local_keyring_is_refused(scaled: str) -> None:
    consent, how = SCALED[scaled]
    (problem,) = refusal(with_default(merge(LOCAL_KEYRING_ONE_POD, {"components": {"consent": consent}})))
    assert problem.startswith(f"{how} keyManager.type is local: each pod would keep its own keyring"), problem
    assert problem.endswith(f"set keyManager.type: vault, or {ONE_CONSENT_POD}"), problem


@pytest.mark.parametrize("scaled", SCALED)
@pytest.mark.parametrize(
    "database",
    [
        {"existingSecret": ""},
        {"existingSecret": "", "embedded": True},
        {"existingSecret": "", "url": "sqlite+aiosqlite:////var/lib/medledger/consent.db"},
    ],
)
def test_more_than_one_pod_without_a_shared_database_is_refused(scaled: str, database: dict[str, Any]) -> None:
    consent, how = SCALED[scaled]
    (problem,) = refusal(with_default({"components": {"consent": {**consent, "database": database}}}))
    assert problem.startswith(f"{how} consent has no database (components.consent.database.existingSecret or .url")
    assert "each pod would keep its own SQLite file" in problem
    assert problem.endswith(f"set a database, or {ONE_CONSENT_POD}"), problem


def test_a_second_single_writer_pod_needs_a_database_and_for_audit_vault() -> None:
    """audit and anchoring have no autoscaler: one value to set, replicas."""
    second_on_sqlite = {"components": {"anchoring": {"replicas": 2, "database": {"existingSecret": ""}}}}
    (problem,) = refusal(with_default(second_on_sqlite))
    assert problem.startswith("components.anchoring.replicas is 2 but anchoring has no database"), problem
    assert problem.endswith("set a database, or components.anchoring.replicas: 1"), problem
    local = LOCAL_KEYRING_ONE_POD
    (problem,) = refusal(with_default(merge(local, {"components": {"audit": {"replicas": 2}}})))
    assert problem == (
        "components.audit.replicas is 2 but keyManager.type is local: each pod would keep its own keyring on its"
        " own volume (its own signing and patients' keys); set keyManager.type: vault, or components.audit.replicas: 1"
    )
    # anchoring keeps no key in the key manager (its one key is the anchorer's Secret): a standby is fine.
    docs = documents(render(with_default(merge(local, {"components": {"anchoring": {"replicas": 2}}}))))
    assert deployment(docs, "anchoring")["spec"]["replicas"] == 2


def test_records_blobs_on_the_pods_volume_keep_records_to_one_pod() -> None:
    filesystem = {"components": {"records": {"settings": {"MEDLEDGER_BLOB_STORE": "filesystem"}}}}
    (problem,) = refusal(with_default(filesystem))
    assert problem.startswith(
        "components.records.autoscaling.enabled is true but components.records.settings.MEDLEDGER_BLOB_STORE"
        " is filesystem: each pod would keep its own blobs"
    ), problem
    one = {"components": {"records": {"replicas": 1, "autoscaling": {"enabled": False}}}}
    assert configmap(documents(render(with_default(merge(filesystem, one)))), "records")["MEDLEDGER_BLOB_STORE"] == (
        "filesystem"
    )


def test_one_pod_of_each_service_on_sqlite_and_the_local_keyring_renders() -> None:
    """What the refusals point to works: replicas 1 and no autoscaler, for every service at once."""
    one = {"replicas": 1, "autoscaling": {"enabled": False}, "database": {"existingSecret": "", "embedded": True}}
    values = with_default(
        {
            "keyManager": {"type": "local"},
            "components": {
                **{s: one for s in ("identity", "consent", "records")},
                **{s: {"database": {"existingSecret": "", "embedded": True}} for s in SINGLE_WRITERS},
            },
        }
    )
    docs = documents(render(values))
    # The stateless gateway keeps nothing per pod: it may still scale.
    assert {component(h) for h in of_kind(docs, "HorizontalPodAutoscaler")} == set(GATEWAYS)
    for service in SERVICES:
        assert deployment(docs, service)["spec"]["replicas"] == 1
        assert configmap(docs, service)["MEDLEDGER_MIGRATIONS"] == "start", "its own SQLite file"
    assert configmap(docs, "consent")["MEDLEDGER_KEY_MANAGER"] == "local"


def test_notes_say_what_the_installation_needs_and_what_these_values_give(notes: Any) -> None:
    default = notes("default")
    assert "kafka.bootstrapServers" in default and REQUIRED["kafka"]["bootstrapServers"] in default
    assert "components.<service>.database" in default
    for service in SERVICES:
        assert f"{service:<10} Secret medledger-db-{service}, key database-url" in default
    assert "chain.anchorRegistryAddress" in default and REQUIRED["chain"]["anchorRegistryAddress"] in default
    assert "keyManager.type" in default and "Vault transit at https://vault.vault.svc:8200" in default
    minimal = notes("minimal")
    for service in SERVICES:
        assert f"{service:<10} embedded SQLite file on the pod's volume (.embedded), lost with the pod" in minimal
    assert "medledger-kafka-kafka-bootstrap:9092   (the Strimzi cluster this chart makes)" in notes("dev")


# --- schemas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_builtin_kinds_validate_strictly_against_kubernetes_1_30(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    import kubernetes_validate

    docs = [d for d in rendered[scenario] if d["kind"] not in CUSTOM_KINDS]
    assert docs
    for doc in docs:
        try:
            validate_builtin(doc)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{doc['kind']} has neither a Kubernetes schema nor one in deploy/schemas/")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_kubernetes_check_would_catch_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    doc = json.loads(json.dumps(deployment(rendered["default"], "identity")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(doc)


def custom_schema(kind: str) -> dict[str, Any]:
    path = DEPLOY / "schemas" / f"{kind.lower()}.json"
    assert path.is_file(), f"no schema for {kind} in deploy/schemas/"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def test_custom_resources_validate_against_the_repositorys_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = [d for scenario in SCENARIOS for d in rendered[scenario] if d["kind"] in CUSTOM_KINDS]
    assert {d["kind"] for d in docs} == CUSTOM_KINDS, "the full scenario renders every custom resource"
    for doc in docs:
        schema = custom_schema(doc["kind"])
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors[0].message} at {list(errors[0].path)}"


def test_a_custom_resource_field_the_crd_does_not_know_is_refused(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (kafka,) = of_kind(rendered["full"], "Kafka")
    bad = json.loads(json.dumps(kafka))
    bad["spec"]["kafka"]["replicas"] = 3  # Strimzi's v1 API has node pools, not spec.kafka.replicas
    assert list(jsonschema.Draft202012Validator(custom_schema("Kafka")).iter_errors(bad))


# --- what every service gets --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "production"])
def test_every_service_has_its_objects(rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    docs = rendered[scenario]
    for kind in ("Deployment", "Service", "ServiceAccount", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"):
        assert {component(d) for d in of_kind(docs, kind)} >= set(COMPONENTS), kind
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert pdb["spec"]["maxUnavailable"] == 1
    for service in of_kind(docs, "Service"):
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        assert ports == PORTS[component(service)]
        assert all(p["targetPort"] == p["name"] for p in service["spec"]["ports"])


def test_labels_everywhere(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for doc in rendered["full"]:
        labels = doc["metadata"].get("labels", {})
        for key in ("name", "instance", "version", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks {key}"
        if doc["kind"] in ("Deployment", "Job"):
            assert "app.kubernetes.io/component" in doc["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_is_hardened_and_bounded(rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    for name, spec in pod_specs(rendered[scenario]):
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc.get("seccompProfile", pod.get("seccompProfile"))["type"] == "RuntimeDefault", where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where} {bound}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_services_have_grpc_probes_and_liveness_does_not_ask_readiness(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    tls = scenario_values(scenario).get("tls", {}).get("enabled", False)
    for doc in of_kind(rendered[scenario], "Deployment"):
        service = component(doc)
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        startup, ready, live = (container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe"))
        if tls:
            # The kubelet's gRPC probes speak plaintext: a TLS server gets TCP and /metrics.
            assert ready["tcpSocket"]["port"] == "grpc" and live["httpGet"]["port"] == "metrics"
            continue
        port = PORTS[service]["grpc"]
        assert startup["grpc"] == {"port": port} and ready["grpc"] == {"port": port}
        if service in GATEWAYS:  # no API of its own over gRPC: the overall health, set once at start
            assert live["grpc"] == {"port": port}
        else:
            assert live["grpc"] == {"port": port, "service": f"medledger.{service}.v1.{service.title()}Service"}
        assert live["failureThreshold"] * live["periodSeconds"] > ready["failureThreshold"] * ready["periodSeconds"]


@pytest.mark.parametrize("scenario", ["default", "production", "dev", "full"])
def test_only_identity_consent_records_and_the_gateway_autoscale(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    docs = rendered[scenario]
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    scaled = {hpa["spec"]["scaleTargetRef"]["name"].removeprefix("medledger-") for hpa in hpas}
    assert not scaled & set(SINGLE_WRITERS)
    if scenario != "dev":
        assert scaled == {"identity", "consent", "records", "fhir"}
    for hpa in hpas:
        assert "replicas" not in deployment(docs, component(hpa))["spec"], "the autoscaler owns replicas"


def test_configmaps_set_only_settings_the_services_read(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every MEDLEDGER_* variable the chart sets is a field of that service's settings class."""
    from medledger_anchoring.config import AnchoringSettings
    from medledger_audit.config import AuditSettings
    from medledger_consent.config import ConsentSettings
    from medledger_fhir.config import FhirSettings
    from medledger_identity.config import IdentitySettings
    from medledger_records.config import RecordsSettings

    classes = {
        "identity": IdentitySettings,
        "consent": ConsentSettings,
        "records": RecordsSettings,
        "audit": AuditSettings,
        "anchoring": AnchoringSettings,
        "fhir": FhirSettings,
    }
    for scenario in SCENARIOS:
        docs = rendered[scenario]
        for service, cls in classes.items():
            known = {f"MEDLEDGER_{field.upper()}" for field in cls.model_fields}
            data = configmap(docs, service)
            unknown = set(data) - known
            assert not unknown, f"{scenario}: {service} does not read {sorted(unknown)}"
            assert data["MEDLEDGER_GRPC_PORT"] == str(PORTS[service]["grpc"])
            assert data["MEDLEDGER_METRICS_PORT"] == str(PORTS[service]["metrics"])
            assert data["MEDLEDGER_GRPC_HOST"] == "0.0.0.0"  # noqa: S104 - a pod listens on its own address
            (container,) = deployment(docs, service)["spec"]["template"]["spec"]["containers"]
            env = {e["name"] for e in container.get("env", [])}
            assert not (env & known) - {"MEDLEDGER_DATABASE_URL"}, "settings come from the ConfigMap"


# --- the architecture's flows, and only those ---------------------------------------------------


def peers_to_components(peers: list[dict[str, Any]]) -> set[str]:
    return {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in peers
        if "podSelector" in p and "app.kubernetes.io/component" in p["podSelector"].get("matchLabels", {})
    }


@pytest.mark.parametrize("scenario", ["default", "production", "dev", "full"])
def test_network_policies_allow_the_architectures_flows_only(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    policies = {component(p): p["spec"] for p in of_kind(rendered[scenario], "NetworkPolicy")}
    assert set(policies) == set(COMPONENTS)
    for service, spec in policies.items():
        assert spec["policyTypes"] == ["Ingress", "Egress"], "deny by default both ways"
        reached = set()
        for rule in spec["egress"]:
            for callee in peers_to_components(rule.get("to", [])):
                assert [p["port"] for p in rule["ports"]] == [PORTS[callee]["grpc"]]
                reached.add(callee)
        assert reached == CALLS[service], service
        callers = {c for rule in spec["ingress"] for c in peers_to_components(rule.get("from", []))}
        assert callers - {"health-check"} == {s for s, calls in CALLS.items() if service in calls}, service
        metrics_rules = [r for r in spec["ingress"] if any(p["port"] == "metrics" for p in r["ports"])]
        assert len(metrics_rules) == 1 and metrics_rules[0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
        chain_egress = [r for r in spec["egress"] if any(p["port"] == 8545 for p in r["ports"])]
        assert bool(chain_egress) == (service == "anchoring"), "only anchoring reaches the chain"


# --- the FHIR gateway: stateless, in front of the services -----------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_fhir_gateway_keeps_nothing_and_calls_the_four_services(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    docs = rendered[scenario]
    data = configmap(docs, "fhir")
    kept = (
        "MEDLEDGER_KAFKA",
        "MEDLEDGER_OUTBOX",
        "MEDLEDGER_MIGRATIONS",
        "MEDLEDGER_DATABASE",
        "MEDLEDGER_KEY",
        "MEDLEDGER_VAULT",
    )
    assert not [k for k in data if k.startswith(kept)], data
    for callee in ("identity", "consent", "records", "audit"):
        assert data[f"MEDLEDGER_{callee.upper()}_ADDRESS"] == f"medledger-{callee}:{PORTS[callee]['grpc']}"
    assert data["MEDLEDGER_HTTP_PORT"] == "8080"
    token_endpoint = scenario_values(scenario)["components"].get("fhir", {}).get("tokenEndpointUrl")
    assert data["MEDLEDGER_TOKEN_ENDPOINT_URL"] == (token_endpoint or "http://medledger-identity:9111/oauth2/token")
    assert data["MEDLEDGER_CLIENT_SECRET_FILE"] == "/etc/medledger/credentials/client.secret"
    assert "fhir" not in {component(j).removesuffix("-migrate") for j in of_kind(docs, "Job")}
    spec = deployment(docs, "fhir")["spec"]["template"]
    assert spec["spec"]["automountServiceAccountToken"] is False, "no Vault agent logs in"
    assert not [k for k in spec["metadata"]["annotations"] if "vault" in k or "openbao" in k]
    (container,) = spec["spec"]["containers"]
    assert "MEDLEDGER_DATABASE_URL" not in {e["name"] for e in container.get("env", [])}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS["fhir"]
    (credentials,) = [v for v in spec["spec"]["volumes"] if v["name"] == "credentials"]
    assert credentials["secret"]["items"] == [{"key": "fhir.secret", "path": "client.secret"}]
    # identity provisions its principal, svc_fhir, from the same Secret.
    identity = deployment(docs, "identity")["spec"]["template"]["spec"]["volumes"]
    (service_secrets,) = [v for v in identity if v["name"] == "service-secrets"]
    assert {"key": "fhir.secret", "path": "fhir.secret"} in service_secrets["secret"]["items"]
    if not scenario_values(scenario).get("credentials", {}).get("existingSecret"):
        (secret,) = [d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == "medledger-credentials"]
        assert "fhir.secret" in secret["data"]
    if scenario_values(scenario).get("networkPolicy", {}).get("enabled", True):
        (policy,) = [p for p in of_kind(docs, "NetworkPolicy") if component(p) == "fhir"]
        egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
        assert not egress_ports & {9092, 5432, 8200, 8545}, "no Kafka, database, Vault or chain"
        clients = [r for r in policy["spec"]["ingress"] if {"port": "http", "protocol": "TCP"} in r["ports"]]
        assert clients, "FHIR clients reach the HTTP port"


def test_without_the_gateway_nothing_names_it() -> None:
    docs = documents(render(with_default({"components": {"fhir": {"enabled": False}}})))
    assert not [d for d in docs if component(d) == "fhir"]
    identity = deployment(docs, "identity")["spec"]["template"]["spec"]["volumes"]
    (service_secrets,) = [v for v in identity if v["name"] == "service-secrets"]
    assert "fhir.secret" not in {i["key"] for i in service_secrets["secret"]["items"]}
    for policy in of_kind(docs, "NetworkPolicy"):
        assert "fhir" not in {c for r in policy["spec"]["ingress"] for c in peers_to_components(r.get("from", []))}


def test_an_ingress_routes_fhir_base_to_the_gateway() -> None:
    assert not of_kind(documents(render(scenario_values("default"))), "Ingress"), "off by default"
    ingress = {
        "enabled": True,
        "className": "nginx",
        "host": "fhir.hospital.example",
        "tlsSecret": "fhir-tls",
        "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "32m"},
    }
    values = with_default(
        {"components": {"fhir": {"ingress": ingress, "publicBaseUrl": "https://fhir.hospital.example/fhir/R4"}}}
    )
    manifests = render(values)
    docs = documents(manifests)
    (found,) = of_kind(docs, "Ingress")
    validate_builtin(found)
    assert found["spec"]["ingressClassName"] == "nginx"
    assert found["spec"]["tls"] == [{"hosts": ["fhir.hospital.example"], "secretName": "fhir-tls"}]
    ((path,),) = [r["http"]["paths"] for r in found["spec"]["rules"]]
    assert path["path"] == "/fhir/R4" and path["backend"]["service"] == {
        "name": "medledger-fhir",
        "port": {"name": "http"},
    }
    assert configmap(docs, "fhir")["MEDLEDGER_PUBLIC_BASE_URL"] == "https://fhir.hospital.example/fhir/R4"
    notes = next(text for p, text in manifests.items() if p.endswith("NOTES.txt"))
    assert "https://fhir.hospital.example/fhir/R4" in notes


# --- migrations ---------------------------------------------------------------------------------


def test_migrations_run_in_a_hook_job_and_replicas_only_check(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    jobs = {component(j).removesuffix("-migrate"): j for j in of_kind(docs, "Job")}
    assert set(jobs) == set(SERVICES)
    for service, job in jobs.items():
        assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
        (container,) = job["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["MEDLEDGER_MIGRATIONS"]["value"] == "only"
        assert env["MEDLEDGER_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == f"medledger-db-{service}"
        assert container["image"] == deployment(docs, service)["spec"]["template"]["spec"]["containers"][0]["image"]
        assert configmap(docs, service)["MEDLEDGER_MIGRATIONS"] == "check"


def test_without_postgresql_each_pod_migrates_its_own_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["minimal"]
    assert not of_kind(docs, "Job")
    assert {configmap(docs, s)["MEDLEDGER_MIGRATIONS"] for s in SERVICES} == {"start"}


# --- keys: Vault per service, the local keyring only for development --------------------------------


def test_vault_agent_writes_each_key_keeping_services_token(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    for service in SERVICES:
        annotations = deployment(docs, service)["spec"]["template"]["metadata"]["annotations"]
        data = configmap(docs, service)
        if service == "anchoring":  # its only key is the anchorer's, a mounted Secret
            assert "vault.hashicorp.com/agent-inject" not in annotations
            assert "MEDLEDGER_KEY_MANAGER" not in data
            continue
        assert annotations["vault.hashicorp.com/agent-inject"] == "true"
        assert annotations["vault.hashicorp.com/role"] == f"medledger-{service}"
        assert "{{" in annotations["vault.hashicorp.com/agent-inject-template-token"]
        assert data["MEDLEDGER_KEY_MANAGER"] == "vault"
        assert data["MEDLEDGER_VAULT_TOKEN_FILE"] == "/vault/secrets/token"
        assert (DEPLOY / "vault" / f"{service}.hcl").is_file(), f"no Vault policy for {service}"
    for service in ("identity", "consent", "records", "audit"):  # each its own erasure token
        annotations = deployment(docs, service)["spec"]["template"]["metadata"]["annotations"]
        template = annotations["vault.hashicorp.com/agent-inject-template-erasure-token"]
        assert f"auth/token/create/medledger-{service}-erasure" in template
        everyday = annotations["vault.hashicorp.com/agent-inject-template-token"]
        assert f'auth/token/create/medledger-{service}"' in everyday
        assert configmap(docs, service)["MEDLEDGER_ERASURE_VAULT_TOKEN_FILE"] == "/vault/secrets/erasure-token"
        assert (DEPLOY / "vault" / f"{service}-agent.hcl").is_file()


def test_openbao_injector_takes_the_same_annotations_under_its_own_prefix(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """keyManager.vault.injector=openbao: OpenBao's injector (openbao-k8s) reads
    openbao.openbao.org/* and writes to /openbao/secrets; everything else is as for Vault."""
    values = merge(scenario_values("production"), {"keyManager": {"vault": {"injector": "openbao", "caSecret": "ca"}}})
    docs = documents(render(values))
    vault_docs = rendered["production"]
    for service in ("identity", "consent", "records", "audit"):
        annotations = deployment(docs, service)["spec"]["template"]["metadata"]["annotations"]
        ours = {k: v for k, v in annotations.items() if k.startswith("openbao.openbao.org/")}
        assert not [k for k in annotations if k.startswith("vault.hashicorp.com/")]
        on_vault = deployment(vault_docs, service)["spec"]["template"]["metadata"]["annotations"]
        expected = {
            k.replace("vault.hashicorp.com/", "openbao.openbao.org/"): v
            for k, v in on_vault.items()
            if k.startswith("vault.hashicorp.com/")
        }
        expected |= {"openbao.openbao.org/tls-secret": "ca", "openbao.openbao.org/ca-cert": "/openbao/tls/ca.crt"}
        assert ours == expected
        data = configmap(docs, service)
        assert data["MEDLEDGER_VAULT_TOKEN_FILE"] == "/openbao/secrets/token"
        assert data["MEDLEDGER_ERASURE_VAULT_TOKEN_FILE"] == "/openbao/secrets/erasure-token"
    with pytest.raises(Exception, match="injector"):
        render(merge(scenario_values("production"), {"keyManager": {"vault": {"injector": "bank-vault"}}}))


def hcl_rules(service: str) -> list[tuple[str, str]]:
    """(path, body) of each `path "..." { ... }` block of a policy."""
    import re

    text = "\n".join(line.split("#")[0] for line in (DEPLOY / "vault" / f"{service}.hcl").read_text().splitlines())
    return re.findall(r'path\s+"([^"]+)"\s*\{(.*?)\n?\}\s*(?=path|\Z)', text, re.S)


def test_records_everyday_policy_cannot_delete_keys_and_the_erasure_policy_only_can() -> None:
    for path, body in hcl_rules("records"):
        assert '"delete"' not in body, path
        if path.startswith("transit/keys/"):  # a list of what it may send, deletion_allowed not in it
            assert "allowed_parameters" in body and "deletion_allowed" not in body, path
    for service in ("identity", "consent", "records", "audit"):
        assert all('"delete"' not in body for _, body in hcl_rules(service)), service
        erasure = hcl_rules(f"{service}-erasure")
        # Its own per-patient keys only (records' include the patient's search key).
        own = {"audit": ("audit-subject-",), "records": ("records-patient-", "records-search-")}.get(
            service, (f"{service}-patient-",)
        )
        allowed = tuple(f"transit/keys/{prefix}" for prefix in (*own, "patient-"))
        assert erasure and all(path.startswith(allowed) for path, _ in erasure)
        assert all('"delete"' in body and "required_parameters" in body for _, body in erasure)


def test_local_keyring_master_keys_are_mounted_read_only_for_the_owner(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["minimal"]  # the local keyring: one replica each
    for service in ("identity", "consent", "records", "audit"):
        spec = deployment(docs, service)["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "keyring"]
        assert volume["secret"]["defaultMode"] == 0o400
        assert volume["secret"]["items"] == [{"key": f"{service}.master-key", "path": "master.key"}]
        assert configmap(docs, service)["MEDLEDGER_MASTER_KEY_FILE"] == "/etc/medledger/keyring/master.key"


# --- TLS ------------------------------------------------------------------------------------------


def test_tls_gives_every_service_a_certificate_and_mutual_tls(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["full"]
    certificates = {component(c): c["spec"] for c in of_kind(docs, "Certificate")}
    assert set(certificates) == set(COMPONENTS)
    for service, spec in certificates.items():
        assert f"medledger-{service}.{NAMESPACE}.svc" in spec["dnsNames"]
        assert {"server auth", "client auth"} <= set(spec["usages"])
        data = configmap(docs, service)
        assert data["MEDLEDGER_TLS_CERT_FILE"] == "/etc/medledger/tls/tls.crt"
        assert data["MEDLEDGER_TLS_CA_FILE"] == "/etc/medledger/tls/ca.crt"
        (volume,) = [v for v in deployment(docs, service)["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["secretName"] == spec["secretName"]
    for service in SERVICES:
        assert "MEDLEDGER_TLS_CERT_FILE" not in configmap(rendered["production"], service)


# --- Kafka ------------------------------------------------------------------------------------------


def test_strimzi_topics_are_the_codes_topics_and_their_dead_letters(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from medledger_runtime.events import TOPICS, dlq_topic

    docs = rendered["full"]
    topics = {t["spec"]["topicName"] for t in of_kind(docs, "KafkaTopic")}
    assert topics == set(TOPICS.values()) | {dlq_topic(t) for t in TOPICS.values()}
    (kafka,) = of_kind(docs, "Kafka")
    (pool,) = of_kind(docs, "KafkaNodePool")
    assert kafka["apiVersion"] == pool["apiVersion"] == "kafka.strimzi.io/v1"
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}, "KRaft: no ZooKeeper"
    bootstrap = f"{kafka['metadata']['name']}-kafka-bootstrap:9092"
    assert {configmap(docs, s)["MEDLEDGER_KAFKA_BOOTSTRAP_SERVERS"] for s in SERVICES} == {bootstrap}
    assert not of_kind(rendered["production"], "KafkaTopic")


# --- monitoring ------------------------------------------------------------------------------------


def test_prometheus_rule_embeds_the_plain_rules_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (rule,) = of_kind(rendered["full"], "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    plain = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]
    monitors = of_kind(rendered["full"], "ServiceMonitor")
    assert {component(m) for m in monitors} == set(COMPONENTS)
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/component", "job = the service's name"
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert not of_kind(rendered["default"], "PrometheusRule") and not of_kind(rendered["default"], "ServiceMonitor")


def test_runbook_links_can_point_at_the_repositorys_web_address() -> None:
    from deploylib import documents, merge, render

    base = "https://git.example.org/medledger/-/blob/main/deploy/RUNBOOKS.md"
    values = merge(scenario_values("full"), {"metrics": {"prometheusRule": {"runbookBaseUrl": base}}})
    (rule,) = of_kind(documents(render(values)), "PrometheusRule")
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert urls and all(u.startswith(base + "#medledger") for u in urls)


def test_dashboards_are_configmaps_for_the_grafana_sidecar(rendered: dict[str, list[dict[str, Any]]]) -> None:
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert len(files) >= 6, "an overview and one per service"
    maps = [c for c in of_kind(rendered["full"], "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard")]
    assert sorted(k for c in maps for k in c["data"]) == files
    for c in maps:
        assert c["metadata"]["labels"]["grafana_dashboard"] == "1"
        for text in c["data"].values():
            json.loads(text)


# --- what a platform engineer reads ---------------------------------------------------------------


def test_helm_test_pod_asks_every_services_health(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (pod,) = of_kind(rendered["default"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    addresses = {c["name"]: c["args"][0] for c in pod["spec"]["containers"]}
    assert addresses == {s: f"-addr=medledger-{s}:{PORTS[s]['grpc']}" for s in COMPONENTS}
    for container in pod["spec"]["containers"]:
        assert container["image"].startswith("ghcr.io/grpc-ecosystem/grpc-health-probe:v")


def test_notes_say_how_to_reach_the_services_and_what_the_trust_policy_is(notes: Any) -> None:
    default = notes("default")
    for service in COMPONENTS:
        assert f"medledger-{service}:{PORTS[service]['grpc']}" in default
    assert "FHIR R4 http://medledger-fhir:8080/fhir/R4" in default
    assert "port-forward svc/medledger-fhir 8080" in default
    assert "trust policy" in default.lower()
    assert "keyManager.type=local" not in default and "keyManager.type=local" in notes("minimal")
    production = notes("production")
    assert "WARNING" not in production and "configmap medledger-trust-policy" in production


def test_the_trust_policy_reaches_anchoring_as_a_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    (policy,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "medledger-trust-policy"]
    assert json.loads(policy["data"]["trust-policy.json"]) == scenario_values("production")["trustPolicy"]
    assert (
        configmap(docs, "anchoring")["MEDLEDGER_TRUST_POLICY_FILE"] == "/etc/medledger/trust-policy/trust-policy.json"
    )


def test_records_names_the_enabled_components_as_erasure_participants(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """A component disabled in the chart is no erasure participant: its certificates name it absent."""
    from medledger_records.config import RecordsSettings

    assert (
        configmap(rendered["default"], "records")["MEDLEDGER_ERASURE_PARTICIPANTS"] == "records,identity,consent,audit"
    )
    values = scenario_values("default")
    values.setdefault("components", {}).setdefault("audit", {})["enabled"] = False
    docs = documents(render(values))
    participants = configmap(docs, "records")["MEDLEDGER_ERASURE_PARTICIPANTS"]
    assert participants == "records,identity,consent"
    # records reads it as it is: audit absent.
    assert RecordsSettings(erasure_participants=participants).participants == ("identity", "consent", "records")
