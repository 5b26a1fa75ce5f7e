"""Write the JSON schema of a custom resource's *used* fields from its upstream CRD.

    python deploy/schemas/prune_crd.py CRD.yaml VERSION RENDERED.yaml... > deploy/schemas/<kind>.json

It keeps, from the CRD version's openAPIV3Schema, only the properties that the chart's rendered
resources of that kind use (so the file stays short enough to read), with their types, enums,
patterns, formats and required lists, and closes every object it keeps (`additionalProperties:
false`) unless the CRD leaves it open (`x-kubernetes-preserve-unknown-fields`, maps). A field the
chart starts using that the CRD does not know then fails tests/deploy until the schema is
regenerated from the CRD — and a misspelt one fails for good.

The CRDs it was run on: Strimzi's packaging/install/cluster-operator (kafka.strimzi.io/v1,
Strimzi 1.2), cert-manager's deploy/crds (cert-manager.io/v1), prometheus-operator's
example/prometheus-operator-crd (monitoring.coreos.com/v1, 0.93).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

KEEP = ("type", "enum", "pattern", "format", "minimum", "maximum", "minItems", "maxItems", "minLength", "maxLength")


def prune(schema: dict[str, Any], used: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: schema[k] for k in KEEP if k in schema}
    if "x-kubernetes-int-or-string" in schema:
        out["type"] = ["integer", "string"]
    if "description" in schema:
        out["description"] = schema["description"].split("\n")[0][:200]
    if schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema:
        # An open object or a map: keep what the CRD says about its values, check no deeper.
        if isinstance(schema.get("additionalProperties"), dict):
            out["additionalProperties"] = {k: v for k, v in schema["additionalProperties"].items() if k in KEEP}
        return out
    props = schema.get("properties")
    if props is not None:
        seen = sorted({k for u in used if isinstance(u, dict) for k in u})
        out["properties"] = {
            k: prune(props[k], [u[k] for u in used if isinstance(u, dict) and k in u]) for k in seen if k in props
        }
        out["additionalProperties"] = False
        if "required" in schema:
            out["required"] = schema["required"]
    if "items" in schema:
        out["items"] = prune(schema["items"], [i for u in used if isinstance(u, list) for i in u])
    return out


def main() -> None:
    crd_file, version, *rendered = sys.argv[1:]
    crd = yaml.safe_load(Path(crd_file).read_text())
    kind = crd["spec"]["names"]["kind"]
    group = crd["spec"]["group"]
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    docs = [d for f in rendered for d in yaml.safe_load_all(Path(f).read_text()) if d and d.get("kind") == kind]
    if not docs:
        raise SystemExit(f"no {kind} in {rendered}")
    root = v["schema"]["openAPIV3Schema"]
    spec = prune(root["properties"]["spec"], [d["spec"] for d in docs])
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"{kind} {group}/{version}: the fields medledger's chart uses, from the upstream CRD "
        "(deploy/schemas/prune_crd.py)",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": f"{group}/{version}"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "spec": spec,
        },
    }
    json.dump(schema, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
