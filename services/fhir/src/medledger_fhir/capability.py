"""What the gateway says it supports: the CapabilityStatement at [base]/metadata and the SMART
configuration at [base]/.well-known/smart-configuration.

Each route module declares what it serves as ``TypeSupport`` values beside its handlers, and the
statement is built from those declarations alone, so it claims exactly what is routed (a test
checks each claim against behaviour).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from medledger_fhir.http import BASE_PATH, base_url, fhir_response
from medledger_fhir.outcomes import answer_errors
from medledger_runtime.http_server import HttpRoute

FHIR_VERSION = "4.0.1"
# SMART App Launch 2.x scopes and capabilities the authorization server (identity) supports.
SMART_SCOPES = ("patient/*.rs", "user/*.cruds", "system/*.rs", "system/*.cruds")
SMART_CAPABILITIES = ("client-confidential-asymmetric", "permission-v2", "context-standalone-patient")


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: str  # FHIR search param type: token, date, reference, string, ...
    documentation: str = ""


@dataclass(frozen=True)
class TypeSupport:
    """One resource type's interactions (read, vread, history-instance, create, update,
    search-type), search parameters and operations, as a CapabilityStatement names them."""

    interactions: tuple[str, ...]
    search_params: tuple[SearchParam, ...] = ()
    operations: tuple[str, ...] = ()  # e.g. "everything"
    versioning: str = "versioned"
    conditional_create: bool = False
    read_history: bool = False
    # What a client needs to know beyond the interactions (CapabilityStatement.rest.resource.documentation).
    documentation: str = ""


def _merge(name: str, a: TypeSupport, b: TypeSupport) -> TypeSupport:
    twice = (
        set(a.interactions) & set(b.interactions)
        | {p.name for p in a.search_params} & {p.name for p in b.search_params}
        | set(a.operations) & set(b.operations)
    )
    if twice:
        raise ValueError(f"{name}: {sorted(twice)} declared twice")
    return TypeSupport(
        interactions=a.interactions + b.interactions,
        search_params=a.search_params + b.search_params,
        operations=a.operations + b.operations,
        versioning=a.versioning,
        conditional_create=a.conditional_create or b.conditional_create,
        read_history=a.read_history or b.read_history,
        documentation=" ".join(d for d in (a.documentation, b.documentation) if d),
    )


@dataclass
class Capabilities:
    """The declarations of every route module, merged by resource type; system interactions
    (``batch``, ``transaction``) apart."""

    types: dict[str, TypeSupport] = field(default_factory=dict)
    system_interactions: list[str] = field(default_factory=list)

    def declare(self, supports: Mapping[str, TypeSupport]) -> None:
        """Adds route modules' declarations; a type served by several modules (read in one,
        search in another) merges them, but no interaction, parameter or operation twice."""
        for name, support in supports.items():
            known = self.types.get(name)
            self.types[name] = support if known is None else _merge(name, known, support)

    def declare_system(self, interactions: Iterable[str]) -> None:
        self.system_interactions.extend(interactions)

    def statement(self, base: str, token_endpoint: str) -> dict[str, Any]:
        resources = []
        for name in sorted(self.types):
            s = self.types[name]
            resource: dict[str, Any] = {
                "type": name,
                "interaction": [{"code": code} for code in s.interactions],
                "versioning": s.versioning,
                "readHistory": s.read_history,
                "updateCreate": False,
                "conditionalCreate": s.conditional_create,
            }
            if s.documentation:
                resource["documentation"] = s.documentation
            if s.search_params:
                resource["searchParam"] = [
                    {"name": p.name, "type": p.type, **({"documentation": p.documentation} if p.documentation else {})}
                    for p in s.search_params
                ]
            if s.operations:
                resource["operation"] = [
                    {"name": op, "definition": f"http://hl7.org/fhir/OperationDefinition/{name}-{op}"}
                    for op in s.operations
                ]
            resources.append(resource)
        rest: dict[str, Any] = {
            "mode": "server",
            "security": {
                "cors": False,
                "service": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                "code": "SMART-on-FHIR",
                            }
                        ]
                    }
                ],
                "extension": [
                    {
                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                        "extension": [{"url": "token", "valueUri": token_endpoint}],
                    }
                ],
            },
            "resource": resources,
        }
        if self.system_interactions:
            rest["interaction"] = [{"code": code} for code in self.system_interactions]
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-12-07",
            "kind": "instance",
            "software": {"name": "medledger FHIR gateway"},
            "implementation": {"description": "medledger: consented, audited FHIR R4", "url": base},
            "fhirVersion": FHIR_VERSION,
            "format": ["json"],
            "rest": [rest],
        }


def smart_configuration(token_endpoint: str) -> dict[str, Any]:
    return {
        "token_endpoint": token_endpoint,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES384", "RS384"],
        "scopes_supported": list(SMART_SCOPES),
        "capabilities": list(SMART_CAPABILITIES),
    }


def routes(capabilities: Capabilities, *, public_base_url: str, token_endpoint: str) -> list[HttpRoute]:
    @answer_errors
    async def metadata(request: web.Request) -> web.StreamResponse:
        return fhir_response(capabilities.statement(base_url(request, public_base_url), token_endpoint))

    @answer_errors
    async def smart(request: web.Request) -> web.StreamResponse:
        return web.json_response(smart_configuration(token_endpoint))

    return [
        HttpRoute.get(f"{BASE_PATH}/metadata", metadata, public=True),
        HttpRoute.get(f"{BASE_PATH}/.well-known/smart-configuration", smart, public=True),
    ]
