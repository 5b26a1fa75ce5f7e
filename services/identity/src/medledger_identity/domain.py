"""Identity's domain rules, free of I/O."""

from __future__ import annotations

import uuid

from medledger.types.v1 import vocabulary_pb2

from medledger_common.errors import InvalidArgument

PrincipalKind = vocabulary_pb2.PrincipalKind

# Pseudonymous id prefixes: readable in logs without saying anything about the person.
_ID_PREFIX = {
    PrincipalKind.PRINCIPAL_KIND_PATIENT: "pat",
    PrincipalKind.PRINCIPAL_KIND_PRACTITIONER: "prn",
    PrincipalKind.PRINCIPAL_KIND_ORGANIZATION: "org",
    PrincipalKind.PRINCIPAL_KIND_RESEARCHER: "rsr",
    PrincipalKind.PRINCIPAL_KIND_SERVICE: "svc",
}


def new_principal_id(kind: vocabulary_pb2.PrincipalKind.ValueType) -> str:
    return f"{_ID_PREFIX[kind]}_{uuid.uuid4().hex}"


def check_registration(kind: vocabulary_pb2.PrincipalKind.ValueType, organization_id: str) -> None:
    """A principal needs a known kind; a practitioner belongs to an organization."""
    if kind not in _ID_PREFIX:
        raise InvalidArgument.field("kind", "must be one of patient, practitioner, organization, researcher, service")
    if kind == PrincipalKind.PRINCIPAL_KIND_PRACTITIONER and not organization_id:
        raise InvalidArgument.field("organization_id", "required for a practitioner")
    if kind != PrincipalKind.PRINCIPAL_KIND_PRACTITIONER and organization_id:
        raise InvalidArgument.field("organization_id", "only practitioners belong to an organization")
