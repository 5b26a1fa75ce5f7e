"""A principal's personal data as identity keeps it: its FHIR resource encrypted by the key
manager, and its identifiers only as blind indexes (HMAC of ``system|value``).

A patient's resource is under the patient's own key, ``identity-patient-<id>`` (deleting that
key erases it); every other principal's under ``identity-resources``. The blind-index key is
pinned to one version, so that an index never changes when the key rotates.
"""

from __future__ import annotations

from collections.abc import Callable

from medledger.types.v1 import vocabulary_pb2

from medledger_identity import domain, storage
from medledger_runtime.key_owners import decrypt_owned
from medledger_runtime.keys import KeyManager, KeyType, patient_key_name

BLIND_INDEX_KEY = "identity-blind-index"
# The blind index must not change when its key rotates: always this version.
BLIND_INDEX_VERSION = 1
RESOURCE_KEY = "identity-resources"
_PATIENT = vocabulary_pb2.PrincipalKind.PRINCIPAL_KIND_PATIENT


def resource_key(principal_id: str, kind: int) -> str:
    """A patient's resource is under the patient's own key: deleting it erases the resource."""
    return patient_key_name("identity", principal_id) if kind == _PATIENT else RESOURCE_KEY


class Resources:
    """Encrypts and decrypts resources and computes blind indexes through the key manager."""

    def __init__(self, keys: KeyManager, legacy_keys: Callable[[], KeyManager] | None = None) -> None:
        self.keys = keys
        # Reads the old shared patient keys until the key-owner migration has moved every resource.
        self.legacy_keys = legacy_keys

    async def start(self) -> None:
        await self.keys.ensure_key(BLIND_INDEX_KEY, KeyType.HMAC)
        await self.keys.ensure_key(RESOURCE_KEY, KeyType.AES256_GCM96)

    async def blind_indexes(self, resource: domain.FhirResource) -> list[str]:
        return [await self.blind_index(system, value) for system, value in resource.identifiers]

    async def blind_index(self, system: str, value: str) -> str:
        """The blind index of one identifier: what is stored, and what a lookup compares."""
        return await self.keys.hmac(
            BLIND_INDEX_KEY, domain.identifier_index_input(system, value), key_version=BLIND_INDEX_VERSION
        )

    async def encrypt(self, principal_id: str, kind: int, resource: domain.FhirResource, *, new: bool = False) -> str:
        """The resource's ciphertext, bound to the principal; `new`: make the key first (a
        patient's own key is made at registration)."""
        key = resource_key(principal_id, kind)
        if new:
            await self.keys.ensure_key(key, KeyType.AES256_GCM96)
        return await self.keys.encrypt(key, resource.json, associated_data=principal_id.encode())

    async def decrypt(self, row: storage.PrincipalRow) -> bytes:
        """The stored resource; NotFound when the patient's key was deleted (erased)."""
        assert row.fhir_resource
        principal = row.principal_id.encode()
        if row.kind != _PATIENT:
            return await self.keys.decrypt(RESOURCE_KEY, row.fhir_resource, associated_data=principal)
        # A patient's may still be under the old shared key until the key-owner migration moves it.
        return await decrypt_owned(
            self.keys, self._legacy, "identity", row.principal_id, row.fhir_resource, associated_data=principal
        )

    def _legacy(self) -> KeyManager:
        # Without a legacy credential (the local keyring) the everyday key manager reads them.
        return self.legacy_keys() if self.legacy_keys is not None else self.keys
