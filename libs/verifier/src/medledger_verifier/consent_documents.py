"""A consent version as its patient holds it: the FHIR R4 Consent JSON that consent's `GetConsent`
returns (``fhir_consent_json``) and the version's salt. From these alone the patient recomputes
the commitment ConsentRegistry holds, and reads what the chain's answer is compared with: which
consent and version it is, whether it grants or revokes, when consent recorded it (the Consent's
``dateTime``) and its window (``provision.period``). Pure: no chain, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from medledger_verifier import commitments
from medledger_verifier.errors import InvalidArgument

# How consent names a consent in the document (`identifier`); the version is `meta.versionId`.
CONSENT_ID_SYSTEM = "https://medledger.dev/consent"


def parse_salt(text: str) -> bytes:
    """A version's salt as given (64 hex digits, ``0x`` allowed); InvalidArgument otherwise."""
    digits = text.strip().lower().removeprefix("0x")
    if len(digits) != 2 * commitments.SALT_BYTES or any(c not in "0123456789abcdef" for c in digits):
        raise InvalidArgument.field("salt", "the 32-byte salt as 64 hex digits")
    return bytes.fromhex(digits)


def parse_time(text: str) -> datetime | None:
    """A FHIR dateTime or instant with a time and a zone, in UTC; None for anything vaguer (a
    date alone says too little to compare with a block time)."""
    if "T" not in text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else None


def whole_seconds(moment: datetime) -> int:
    """The chain's form of a time: Unix seconds, the fraction dropped (as anchoring writes it)."""
    return math.floor(moment.timestamp())


@dataclass(frozen=True)
class ConsentDocument:
    """What one version's document says, and its commitment under the salt given with it."""

    commitment: str
    consent_id: str | None
    version: int | None
    # FHIR Consent.status: "active" for a grant or change, "inactive" for a revocation.
    status: str
    # When consent recorded the version (the Consent's dateTime).
    recorded: datetime | None
    period_start: datetime | None
    period_end: datetime | None
    # The path given, for messages.
    source: str = ""

    @property
    def is_revocation(self) -> bool:
        return self.status != "active"

    @property
    def label(self) -> str:
        if self.version is not None:
            return f"version {self.version}"
        return f"the version in {self.source}" if self.source else f"commitment {self.commitment[:16]}…"

    @classmethod
    def parse(cls, data: bytes, salt: bytes, *, source: str = "") -> ConsentDocument:
        """The document's fields and commitment; InvalidArgument (field ``consent``) when it is
        not a FHIR Consent in JSON that RFC 8785 represents exactly."""
        try:
            value = commitments.parse_json(data)
        except InvalidArgument as exc:
            raise InvalidArgument.field("consent", exc.message.removeprefix("content: ")) from None
        if not isinstance(value, dict) or value.get("resourceType") != "Consent":
            raise InvalidArgument.field("consent", "not a FHIR Consent (resourceType is not 'Consent')")
        status = value.get("status")
        if not isinstance(status, str):
            raise InvalidArgument.field("consent", "the Consent has no status")
        provision = _object(value.get("provision"))
        period = _object(provision.get("period"))
        return cls(
            commitment=commitments.consent_commitment(value, salt),
            consent_id=_consent_id(value),
            version=_version(value),
            status=status,
            recorded=_time(value.get("dateTime")),
            period_start=_time(period.get("start")),
            period_end=_time(period.get("end")),
            source=source,
        )


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _consent_id(value: dict[str, Any]) -> str | None:
    identifiers = value.get("identifier")
    for identifier in identifiers if isinstance(identifiers, list) else []:
        if isinstance(identifier, dict) and identifier.get("system") == CONSENT_ID_SYSTEM:
            found = identifier.get("value")
            return found if isinstance(found, str) else None
    return None


def _version(value: dict[str, Any]) -> int | None:
    meta = value.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return int(version) if isinstance(version, str) and version.isdigit() else None


def _time(value: Any) -> datetime | None:
    return parse_time(value) if isinstance(value, str) else None
