"""The gateway's settings: the common ones under MEDLEDGER_, with the gateway's default ports and
where the services it calls are."""

from pydantic import Field

from medledger_runtime.settings import ServiceSettings


class FhirSettings(ServiceSettings):
    # The gateway serves no RPC of its own: the gRPC port answers health checks only.
    grpc_port: int = 50056
    metrics_port: int = 9106
    # FHIR REST at [base] = http://host:http_port/fhir/R4.
    http_port: int = Field(default=8080, ge=0, le=65535)
    # A FHIR bundle of a few thousand resources fits; a larger body is refused with 413.
    http_max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    # Requests in the gateway at once; more are answered 429 with Retry-After.
    max_in_flight: int = Field(default=512, ge=1, le=100_000)
    consent_address: str = "127.0.0.1:50052"
    records_address: str = "127.0.0.1:50053"
    audit_address: str = "127.0.0.1:50055"
    # The base URL clients reach the gateway at (behind an ingress, say), for `Location`, bundle
    # `fullUrl`s and paging links; empty: http://<Host header>/fhir/R4.
    public_base_url: str = ""
    # identity's OAuth 2.0 token endpoint, as clients reach it, for the SMART configuration.
    token_endpoint_url: str = "http://127.0.0.1:9111/oauth2/token"  # noqa: S105 - a URL, not a secret
