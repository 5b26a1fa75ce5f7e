"""Identity's settings: the common ones under MEDLEDGER_, with identity's default ports."""

from pathlib import Path

from pydantic import Field

from medledger_runtime.settings import ServiceSettings


class IdentitySettings(ServiceSettings):
    grpc_port: int = 50051
    metrics_port: int = 9101
    database_url: str = "sqlite+aiosqlite:///.medledger/identity.db"
    # The HTTP port: the JWKS at /.well-known/jwks.json, for verifiers outside medledger.
    http_port: int = Field(default=9111, ge=0, le=65535)
    # The bootstrap admin's client secret (principal svc_admin); unset: no bootstrap admin.
    bootstrap_admin_secret_file: Path | None = None
    # A folder of <service>.secret files: each makes (or updates) principal svc_<service>.
    service_secrets_dir: Path | None = None
    # The OAuth 2.0 token endpoint's URL as SMART clients address it: their assertions' `aud`
    # must be exactly this. Empty: http://127.0.0.1:<http port>/oauth2/token.
    token_endpoint_url: str = ""
    # Where consent answers: asked before a patient's FHIR resource goes to a reader other than
    # the patient and their administrators.
    consent_address: str = "127.0.0.1:50052"
    # At most this many Argon2id computations at once (each takes 19 MiB and a core for ~30 ms).
    max_concurrent_hashing: int = Field(default=2, ge=1, le=64)
