"""identity's principals as FHIR references, and back.

A principal id (``pat_<32 hex>``) is not a FHIR id: FHIR ids allow no ``_``. As FHIR it is
``pat-<32 hex>``, of the resource type its kind is (``Patient/pat-…``); consent renders the
grantee and the patient as logical references by identifier (system ``PRINCIPAL_SYSTEM``, the
principal id as value). Both forms, and the bare id either way, are read back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# consent's system for principals in its FHIR Consents.
PRINCIPAL_SYSTEM = "https://medledger.dev/principal"
# The FHIR resource type of each principal kind that has one.
RESOURCE_TYPE_OF = {"pat": "Patient", "prn": "Practitioner", "org": "Organization"}
_PRINCIPAL = re.compile(r"(pat|prn|org|rsr|svc)[-_]([0-9a-f]{32})")


def from_reference(value: str, kinds: Iterable[str]) -> str | None:
    """The principal id a FHIR reference string names: ``Patient/pat-…``, ``[base]/Patient/pat-…``,
    ``pat-…`` or ``pat_…``; None when it names no principal of these kinds (``pat``, ``prn``,
    …) or a resource type that is not the kind's."""
    text = value.strip()
    parts = text.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]  # a versioned reference names the same principal
    resource_type = parts[-2] if len(parts) >= 2 else ""
    match = _PRINCIPAL.fullmatch(parts[-1]) if parts else None
    if match is None or match.group(1) not in set(kinds):
        return None
    if resource_type and resource_type != RESOURCE_TYPE_OF.get(match.group(1)):
        return None
    return f"{match.group(1)}_{match.group(2)}"


def from_fhir_reference(reference: Mapping[str, Any], kinds: Iterable[str]) -> str | None:
    """The principal a FHIR ``Reference`` names, by ``reference`` or by identifier (consent's
    form); None when it names none of these kinds."""
    kinds = tuple(kinds)
    if isinstance(reference.get("reference"), str):
        return from_reference(reference["reference"], kinds)
    identifier = reference.get("identifier")
    if isinstance(identifier, Mapping) and identifier.get("system") == PRINCIPAL_SYSTEM:
        value = identifier.get("value")
        if isinstance(value, str) and (found := from_reference(value, kinds)) == value:
            return found
    return None
