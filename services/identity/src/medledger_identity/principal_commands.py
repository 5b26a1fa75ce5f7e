"""Identity's principal use cases' commands and results: plain values, apart from any
transport. The use cases are ``principals.Directory``."""

from __future__ import annotations

from dataclasses import dataclass

from medledger_identity import storage

# Commands.


@dataclass(frozen=True)
class RegisterPatient:
    fhir_patient: bytes


@dataclass(frozen=True)
class RegisterPrincipal:
    kind: int
    organization_id: str
    fhir_resource: bytes


@dataclass(frozen=True)
class GetPrincipal:
    principal_id: str
    include_fhir_resource: bool = False
    # Why a reader other than the patient (and the patient's administrators) asks for a
    # patient's resource: a medledger.types.v1 PurposeOfUse, asked of consent.
    purpose: int = 0


@dataclass(frozen=True)
class FindPrincipals:
    """Principals of `kind` with the FHIR identifier `identifier` (``system|value``)."""

    kind: int
    identifier: str


@dataclass(frozen=True)
class RegisterSmartClient:
    """A SMART Backend Services client of an organization: its public JWKS (JSON) and the SMART
    v2 system/ scopes it may be granted."""

    organization_id: str
    jwks_json: str
    allowed_scopes: tuple[str, ...]


@dataclass(frozen=True)
class ListPrincipals:
    kind: int = 0  # 0: every kind
    organization_id: str = ""
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class UpdatePrincipalResource:
    principal_id: str
    fhir_resource: bytes


@dataclass(frozen=True)
class DeactivatePrincipal:
    principal_id: str


@dataclass(frozen=True)
class ChangeRole:
    """Assign (`grant`) or revoke `role` (a medledger.types.v1 Role)."""

    principal_id: str
    role: int
    grant: bool


# Results.


@dataclass(frozen=True)
class Registered:
    """A new principal and its client secret, shown this once."""

    principal: storage.PrincipalRow
    client_secret: str


@dataclass(frozen=True)
class Found:
    principal: storage.PrincipalRow
    fhir_resource: bytes = b""  # only when asked for, allowed, and not erased


@dataclass(frozen=True)
class PrincipalPage:
    principals: list[storage.PrincipalRow]
    next_page_token: str
