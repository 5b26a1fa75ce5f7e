"""The Tiltfile and the kind cluster, statically: the Tiltfile runs as Starlark (starlark-rust)
with Tilt's built-ins replaced by recorders, and what it asks Tilt to do is checked against the
chart it deploys and the cluster configuration it expects."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
import yaml
from deploylib import COMPONENTS, DEPLOY, GATEWAYS, ROOT, documents, render, scenario_values

TILT_BUILTINS = (
    "allow_k8s_contexts",
    "default_registry",
    "update_settings",
    "k8s_yaml",
    "k8s_resource",
    "local_resource",
    "sync",
    "run",
    "fall_back_on",
)
EXTENSIONS = {
    "ext://helm_resource": ("helm_resource", "helm_repo"),
    "ext://restart_process": ("docker_build_with_restart",),
}


@cache
def dev_objects() -> list[dict[str, Any]]:
    """The chart as values-dev.yaml renders it (once)."""
    return documents(render(scenario_values("dev")))


@dataclass
class Tilt:
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    helm_args: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)

    def named(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(a, k) for n, a, k in self.calls if n == name]


def run_tiltfile() -> Tilt:
    import starlark as sl

    tilt = Tilt()

    def recorder(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            tilt.calls.append((name, args, kwargs))
            return {"tilt": name, "args": list(args)}

        return call

    def helm(path: str, **kwargs: Any) -> str:
        tilt.helm_args.append(((path,), kwargs))
        values: dict[str, Any] = {}
        for f in kwargs.get("values", []):
            values.update(yaml.safe_load((ROOT / f).read_text()))
        assert values == scenario_values("dev"), "the Tiltfile deploys with values-dev.yaml"
        return yaml.safe_dump_all(dev_objects())

    modules = {}
    for url, names in EXTENSIONS.items():
        module = sl.Module()
        for name in names:
            module.add_callable(name, recorder(name))
        modules[url] = module.freeze()

    def load(url: str) -> Any:
        tilt.loaded.append(url)
        if url not in modules:
            pytest.fail(f"the Tiltfile loads {url}, which this test does not stub")
        return modules[url]

    main = sl.Module()
    for name in TILT_BUILTINS:
        main.add_callable(name, recorder(name))
    main.add_callable("blob", lambda text: text)
    main.add_callable("helm", helm)
    main.add_callable("decode_yaml_stream", lambda text: [d for d in yaml.safe_load_all(text) if d])
    main.add_callable("encode_yaml_stream", lambda objects: yaml.safe_dump_all(objects))

    dialect = sl.Dialect.extended()
    dialect.enable_top_level_stmt = True  # as Tilt's Starlark allows
    ast = sl.parse("Tiltfile", (ROOT / "Tiltfile").read_text(), dialect)
    sl.eval(main, ast, sl.Globals.standard(), sl.FileLoader(load))
    return tilt


@pytest.fixture(scope="module")
def tilt() -> Tilt:
    return run_tiltfile()


def test_the_tiltfile_parses_as_starlark() -> None:
    import starlark as sl

    dialect = sl.Dialect.extended()
    dialect.enable_top_level_stmt = True
    module = sl.parse("Tiltfile", (ROOT / "Tiltfile").read_text(), dialect)
    loads = {load.module_id: set(load.symbols) for load in module.loads()}
    assert loads == {k: set(v) for k, v in EXTENSIONS.items()}


def test_a_starlark_error_would_be_caught() -> None:
    import starlark as sl

    with pytest.raises(sl.StarlarkError):
        sl.parse("Tiltfile", 'docker_build("a", ".",\n', sl.Dialect.extended())


def test_builds_the_six_images_with_live_update(tilt: Tilt) -> None:
    builds = {args[0]: kwargs for args, kwargs in tilt.named("docker_build_with_restart")}
    assert set(builds) == {f"medledger/{s}" for s in COMPONENTS}
    syncs = {(a[0], a[1]) for a, _ in tilt.named("sync")}
    for gateway in GATEWAYS:  # its image needs no contract sources
        assert "contracts" not in builds[f"medledger/{gateway}"]["only"]
    for service in COMPONENTS:
        kwargs = builds[f"medledger/{service}"]
        assert kwargs["dockerfile"] == f"services/{service}/Dockerfile"
        assert (ROOT / kwargs["dockerfile"]).is_file()
        assert kwargs["entrypoint"] == ["python", "-m", f"medledger_{service}"]
        assert kwargs["live_update"], "live update"
        source = f"services/{service}/src/medledger_{service}"
        assert (ROOT / source).is_dir()
        assert any(src == source for src, _ in syncs)
    for src, dest in syncs:
        assert (ROOT / src).is_dir(), src
        assert dest.startswith("/var/lib/medledger/live/")


def test_live_update_targets_are_on_the_pods_python_path(tilt: Tilt) -> None:
    """The synced sources are imported only if the dev pods put their folder on PYTHONPATH."""
    docs = dev_objects()
    targets = {dest.rsplit("/", 1)[0] for (_, dest), _ in tilt.named("sync")}
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PYTHONPATH"] in targets
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert any(t.startswith(m) for t in targets for m in mounts), "the sync target is a writable volume"


def test_deploys_the_chart_with_the_development_values_through_helm(tilt: Tilt) -> None:
    ((args, kwargs),) = tilt.helm_args
    assert args == ("deploy/helm/medledger",)
    assert kwargs["values"] == ["deploy/helm/values-dev.yaml"]
    images = {
        c["image"].split(":")[0]
        for d in dev_objects()
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {f"medledger/{s}" for s in COMPONENTS}, "Tilt replaces the images it builds, by name"


def test_installs_the_development_dependencies_through_helm_resource(tilt: Tilt) -> None:
    assert "ext://helm_resource" in tilt.loaded
    charts = {args[1] for args, _ in tilt.named("helm_resource")}
    assert charts == {"strimzi/strimzi-kafka-operator", "cnpg/cloudnative-pg", "hashicorp/vault"}
    for args, kwargs in tilt.named("helm_resource"):
        assert any(f.startswith("--version=") for f in kwargs["flags"]), f"{args[0]}: chart version pinned"
    manifests = {
        args[0] for args, _ in tilt.named("k8s_yaml") if isinstance(args[0], str) and args[0].endswith(".yaml")
    }
    assert {"deploy/kind/postgres.yaml", "deploy/kind/anvil.yaml"} <= manifests
    for path in manifests:
        assert list(yaml.safe_load_all((ROOT / path).read_text()))


def test_resources_name_real_objects_and_forward_every_port(tilt: Tilt) -> None:
    docs = dev_objects()
    names = {(d["metadata"]["name"], d["kind"].lower()) for d in docs}
    for path in ("deploy/kind/postgres.yaml", "deploy/kind/anvil.yaml"):
        names |= {(d["metadata"]["name"], d["kind"].lower()) for d in yaml.safe_load_all((ROOT / path).read_text())}
    forwards = {}
    for args, kwargs in tilt.named("k8s_resource"):
        for ref in kwargs.get("objects", []):
            name, kind = ref.split(":")[:2]
            assert (name, kind) in names, f"k8s_resource names {ref}, which nothing deploys"
        if args:
            forwards[args[0]] = kwargs.get("port_forwards", [])
    ports = {
        "identity": [50051, 9101, 9111],
        "consent": [50052, 9102],
        "records": [50053, 9103],
        "anchoring": [50054, 9104],
        "audit": [50055, 9105, 9115],
        "fhir": [50056, 9106, 8080],
    }
    for service, wanted in ports.items():
        assert forwards[f"medledger-{service}"] == [f"{p}:{p}" for p in wanted]


def test_the_gateway_starts_after_the_services_it_calls(tilt: Tilt) -> None:
    deps = {args[0]: kwargs.get("resource_deps", []) for args, kwargs in tilt.named("k8s_resource") if args}
    for gateway in GATEWAYS:
        assert set(deps[f"medledger-{gateway}"]) == {
            f"medledger-{s}" for s in ("identity", "consent", "records", "audit")
        }


def test_resource_dependencies_exist(tilt: Tilt) -> None:
    defined = {a[0] for a, _ in tilt.named("local_resource")}
    defined |= {a[0] for a, _ in tilt.named("helm_resource")} | {a[0] for a, _ in tilt.named("helm_repo")}
    defined |= {k.get("new_name") or a[0] for a, k in tilt.named("k8s_resource")}
    for name in ("local_resource", "helm_resource", "k8s_resource"):
        for _, kwargs in tilt.named(name):
            for dep in kwargs.get("resource_deps", []):
                assert dep in defined, f"resource_deps names {dep}, which the Tiltfile does not define"
    for _, kwargs in tilt.named("local_resource"):
        script = kwargs["cmd"].split()[-1]
        assert (ROOT / script).is_file(), script


def test_kind_cluster_and_registry_are_the_ones_the_tiltfile_pushes_to(tilt: Tilt) -> None:
    ((registry,), _) = tilt.named("default_registry")[0]
    host, port = registry.split(":")
    kind = yaml.safe_load((DEPLOY / "kind" / "kind-config.yaml").read_text())
    assert kind["kind"] == "Cluster" and kind["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert any(f'"{registry}"' in patch for patch in kind["containerdConfigPatches"])
    assert kind["nodes"][0]["image"].startswith("kindest/node:v1.30.")
    registry_doc, cluster = yaml.safe_load_all((DEPLOY / "kind" / "cluster.yaml").read_text())
    assert registry_doc["kind"] == "Registry" and registry_doc["port"] == int(port) and host == "localhost"
    assert cluster["registry"] == registry_doc["name"]
    assert cluster["kindV1Alpha4Cluster"]["name"] == kind["name"]
    ((contexts,), _) = tilt.named("allow_k8s_contexts")[0]
    assert contexts == f"kind-{kind['name']}"
    hosting = yaml.safe_load((DEPLOY / "kind" / "local-registry-hosting.yaml").read_text())
    assert f'host: "{registry}"' in hosting["data"]["localRegistryHosting.v1"]


def test_dev_addresses_match_the_chain_setup() -> None:
    """dev_chain.py deploys the registries where values-dev.yaml expects them (Anvil's first
    account's first two contract addresses on a fresh chain)."""
    import rlp
    from eth_utils import keccak, to_checksum_address

    owner = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"  # Anvil's first development account

    def created(nonce: int) -> str:
        return to_checksum_address(keccak(rlp.encode([bytes.fromhex(owner[2:]), nonce]))[12:])

    chain = scenario_values("dev")["chain"]
    assert chain["anchorRegistryAddress"] == created(0)
    assert chain["consentRegistryAddress"] == created(1)
