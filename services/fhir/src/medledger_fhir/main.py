"""Wires the FHIR gateway: settings, the channels to the services, and the FHIR routes of each
route module, on the runtime in its stateless mode (no database, no Kafka, no keys)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from medledger_fhir import audit_events, bundles, capability, consents, resources, search
from medledger_fhir.admission import Admission
from medledger_fhir.backends import Backends
from medledger_fhir.capability import Capabilities
from medledger_fhir.config import FhirSettings
from medledger_fhir.outcomes import outcome_response
from medledger_runtime.auth import ScopeNeed
from medledger_runtime.http_server import HttpRoute
from medledger_runtime.parts import ServiceParts
from medledger_runtime.service import ServiceRuntime, run_service
from medledger_runtime.settings import load_settings_or_exit

NAME = "fhir"


@dataclass(frozen=True)
class FhirParts:
    """The gateway's own objects, reachable from tests as ``runtime.handle``."""

    backends: Backends
    capabilities: Capabilities


def scoped(route: HttpRoute) -> HttpRoute:
    """A FHIR route is reachable by any scoped token: the services it calls with that token check
    its scopes against the resources themselves (a token can do no more here than over gRPC)."""
    if route.public or route.scope is not None:
        return route
    return replace(route, scope=ScopeNeed.in_use_case())


def build(runtime: ServiceRuntime[FhirParts]) -> ServiceParts[FhirParts]:
    settings = runtime.settings
    assert isinstance(settings, FhirSettings)
    backends = Backends.connect(settings)
    capabilities = Capabilities()
    routes: list[HttpRoute] = []
    # Each route module declares its capabilities beside its handlers; metadata lists them all.
    routes += capability.routes(
        capabilities, public_base_url=settings.public_base_url, token_endpoint=settings.token_endpoint_url
    )
    routes += resources.routes(backends, public_base_url=settings.public_base_url)
    capabilities.declare(resources.declarations())
    routes += consents.routes(backends, public_base_url=settings.public_base_url)
    capabilities.declare(consents.SUPPORTS)
    routes += audit_events.routes(backends, public_base_url=settings.public_base_url)
    capabilities.declare(audit_events.SUPPORTS)
    routes += search.routes(backends, public_base_url=settings.public_base_url)
    capabilities.declare(search.declarations())
    capabilities.declare({"Patient": search.everything_declaration()})
    routes += bundles.routes(backends)
    capabilities.declare_system(bundles.SYSTEM_INTERACTIONS)
    admission = Admission(settings.max_in_flight)
    return ServiceParts(
        service_descriptors=[],
        register=lambda server: None,
        access={},
        handle=FhirParts(backends=backends, capabilities=capabilities),
        http_routes=[admission.wrap(scoped(route)) for route in routes],
        http_error_renderer=outcome_response,
        on_stop=[backends.close],
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(FhirSettings), (), build, stateless=True)


if __name__ == "__main__":
    main()
