"""The names of the proto vocabularies as they appear in tokens, logs and README tables.

Roles and principal kinds are defined once, in ``medledger/types/v1/vocabulary.proto``; their
token names are derived from the enum value names (``ROLE_ORG_ADMIN`` → ``org-admin``), so a
role added to the proto needs no second list here.
"""

from __future__ import annotations

from medledger.types.v1 import vocabulary_pb2

Role = vocabulary_pb2.Role
PrincipalKind = vocabulary_pb2.PrincipalKind


def _names(enum: object, prefix: str) -> dict[int, str]:
    out = {}
    for value in enum.DESCRIPTOR.values:  # type: ignore[attr-defined]
        if value.number != 0:
            out[value.number] = value.name.removeprefix(prefix).lower().replace("_", "-")
    return out


ROLE_NAMES: dict[int, str] = _names(Role, "ROLE_")
ROLES_BY_NAME: dict[str, int] = {name: number for number, name in ROLE_NAMES.items()}
KIND_NAMES: dict[int, str] = _names(PrincipalKind, "PRINCIPAL_KIND_")
KINDS_BY_NAME: dict[str, int] = {name: number for number, name in KIND_NAMES.items()}


def role_name(role: int) -> str:
    """``ROLE_ORG_ADMIN`` → ``"org-admin"``; KeyError for unspecified or unknown values."""
    return ROLE_NAMES[role]


def kind_name(kind: int) -> str:
    """``PRINCIPAL_KIND_PATIENT`` → ``"patient"``; KeyError for unspecified or unknown values."""
    return KIND_NAMES[kind]


# Principal ids are `{prefix}_{32 hex}`: pseudonymous, yet a log or a Provenance can tell a
# patient from a practitioner or an application without asking identity.
PRINCIPAL_ID_PREFIX: dict[int, str] = {
    PrincipalKind.PRINCIPAL_KIND_PATIENT: "pat",
    PrincipalKind.PRINCIPAL_KIND_PRACTITIONER: "prn",
    PrincipalKind.PRINCIPAL_KIND_ORGANIZATION: "org",
    PrincipalKind.PRINCIPAL_KIND_RESEARCHER: "rsr",
    PrincipalKind.PRINCIPAL_KIND_SERVICE: "svc",
    PrincipalKind.PRINCIPAL_KIND_SMART_CLIENT: "cli",
}
_KIND_OF_PREFIX = {prefix: kind for kind, prefix in PRINCIPAL_ID_PREFIX.items()}


def principal_kind_of(principal_id: str) -> int | None:
    """The kind a principal id's prefix names (``pat_…`` → ``PRINCIPAL_KIND_PATIENT``); None
    for an id of no known prefix."""
    prefix, underscore, _ = principal_id.partition("_")
    return _KIND_OF_PREFIX.get(prefix) if underscore else None


def service_principal_id(service: str) -> str:
    """The fixed id of a platform service's principal, e.g. ``svc_records``."""
    return f"{PRINCIPAL_ID_PREFIX[PrincipalKind.PRINCIPAL_KIND_SERVICE]}_{service}"
