"""FHIR ids of medledger's records and principals, and back.

A medledger id (``rec_<hex>``, ``pat_<hex>``) is not a FHIR id, which allows letters, digits,
``-`` and ``.`` only; as FHIR it is the same id with ``_`` written ``-`` (``rec-<hex>``), as
records stamps it in the resources it stores. Ids are a prefix and hex, so this is one to one.
"""

from __future__ import annotations


def fhir_id(service_id: str) -> str:
    """``rec_3f…`` → ``rec-3f…``: a record's or a principal's FHIR id."""
    return service_id.replace("_", "-")


def service_id(resource_id: str) -> str:
    """``rec-3f…`` (or ``rec_3f…``) → ``rec_3f…``: the record or principal id of a FHIR id."""
    return resource_id.replace("-", "_")
