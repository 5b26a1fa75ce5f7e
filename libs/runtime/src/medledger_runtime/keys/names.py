"""Key names: the rule every key name follows, and the per-patient key of each owner (see
KEYS.md, "One owner per key")."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from medledger_runtime.errors import InvalidArgument

# Lower-case letters, digits and ``.``, ``_``, ``-`` inside; starts and ends with a letter or digit.
# A subset of the names Vault's transit engine accepts, safe in URLs, file names and metrics.
_KEY_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,126}[a-z0-9])?$")


def validate_key_name(name: str) -> str:
    """Return ``name`` if it is a valid key name, else raise InvalidArgument naming the rule."""
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise InvalidArgument.field(
            "key_name",
            "must be 1-128 characters of a-z, 0-9, '.', '_', '-', starting and ending with a letter or digit",
        )
    return name


PatientKeyOwner = Literal["identity", "consent", "records", "records-search", "audit"]
"""A service that keeps per-patient key material of its own (see KEYS.md, "One owner per key")."""

# Each owner's prefix: a policy glob on it matches that owner's keys and no other's. Audit's HMAC
# subject keys keep the name they have always had.
PATIENT_KEY_PREFIXES: Mapping[str, str] = {
    "identity": "identity-patient-",
    "consent": "consent-patient-",
    "records": "records-patient-",
    # records' blind-index key of the patient (an hmac key, never rotated): its search terms.
    "records-search": "records-search-",
    "audit": "audit-subject-",
}
# The owners whose patient keys replaced the shared ``patient-<pseudonym>``: only their keys have
# a legacy twin (audit's subject keys and records' search keys never were shared).
LEGACY_TWIN_OWNERS = frozenset({"identity", "consent", "records"})
LEGACY_PATIENT_KEY_PREFIX = "patient-"
"""The name every service once shared (``patient-<pseudonym>``): only the key-owner migration
reads it, and erasures destroy it."""


def patient_key_name(owner: PatientKeyOwner, pseudonym: str) -> str:
    """The name of ``owner``'s per-patient key, e.g. ``records-patient-<pseudonym>``.

    ``pseudonym`` is the patient's stable pseudonym (never a name, MRN or other identifier that
    is personal data): key names appear in Vault's audit log and in URLs. Each service's keys
    are its own, so no other service's token can use them (deploy/vault/*.hcl).
    """
    prefix = PATIENT_KEY_PREFIXES.get(owner)
    if prefix is None:
        raise ValueError(f"no per-patient keys for {owner!r}; owners: {', '.join(PATIENT_KEY_PREFIXES)}")
    return validate_key_name(f"{prefix}{pseudonym.lower()}")


def legacy_patient_key_name(pseudonym: str) -> str:
    """``patient-<pseudonym>``: the key identity, consent and records shared before each owned its
    own. Read by the key-owner migration only; destroyed by every service's erasure."""
    return validate_key_name(f"{LEGACY_PATIENT_KEY_PREFIX}{pseudonym.lower()}")


def audit_subject_key_name(pseudonym: str) -> str:
    """The audit log's HMAC key for a patient's entries' `subject`: ``audit-subject-<pseudonym>``
    (audit erases it when it appends the patient's erasure certificate, which names it)."""
    return patient_key_name("audit", pseudonym)
