"""Erasure certificates: what a completed erasure certifies (each participant, its keys and their
versions; absent participants named; audit's key destroyed when it appends the certificate), and
its signature, a C2SP note under records' own Ed25519 key ``records-erasure-certificate``, whose
verifier key the trust policy publishes as ``erasure_certificate_keys``."""

from __future__ import annotations

from medledger.events.v1 import records_events_pb2 as ev

from medledger_records import erasure_storage
from medledger_runtime.erasure import (
    AT_APPEND,
    CERTIFICATE_KEY,
    CERTIFICATE_SIGNER_NAME,
    PARTICIPANTS,
    certificate_text,
)
from medledger_runtime.keys import KeyManager, KeyType, audit_subject_key_name, patient_key_name
from medledger_runtime.keys.note_signer import key_manager_signer
from medledger_runtime.timestamps import timestamp
from medledger_verifier import notes

GRACE_PERIOD = "grace-period"
Outcome = ev.ErasureOutcome


def certificate(
    row: erasure_storage.ErasureRow,
    confirmed: dict[str, tuple[bytes, float]],
    now: float,
    *,
    unrecoverable_after: float,
) -> ev.ErasureCertificate:
    """The certificate of a running erasure every present participant but audit has confirmed
    (`confirmed`: participant -> (its PatientKeysDestroyed, when it was stored))."""
    participants = []
    for name in [*PARTICIPANTS, *(p for p in row.participants if p not in PARTICIPANTS)]:
        if name not in row.participants:
            participants.append(ev.ErasureParticipant(participant=name, outcome=Outcome.ERASURE_OUTCOME_ABSENT))
        elif name in AT_APPEND:
            participants.append(
                ev.ErasureParticipant(
                    participant=name,
                    outcome=Outcome.ERASURE_OUTCOME_DESTROYED_AT_APPEND,
                    keys=[ev.DestroyedKey(key_name=audit_subject_key_name(row.patient_id))],
                )
            )
        else:
            data, at = confirmed[name]
            destroyed = ev.PatientKeysDestroyed.FromString(data)
            participants.append(
                ev.ErasureParticipant(
                    participant=name,
                    outcome=Outcome.ERASURE_OUTCOME_DESTROYED,
                    keys=destroyed.keys,
                    confirmed_at=timestamp(at),
                )
            )
    return ev.ErasureCertificate(
        erasure_id=row.erasure_id,
        patient_id=row.patient_id,
        requested_by=row.requested_by,
        requested_at=timestamp(row.requested_at),
        authorized_by=f"privacy-officer {row.approved_by}" if row.approved_by else GRACE_PERIOD,
        erased_at=timestamp(now),
        key_name=patient_key_name("records", row.patient_id),
        key_versions=row.key_versions,
        records_erased=row.records_erased or 0,
        versions_erased=row.versions_erased or 0,
        unrecoverable_after=timestamp(unrecoverable_after),
        participants=participants,
    )


class Certifier:
    """Builds and signs certificates; its signing key is in the everyday key manager."""

    def __init__(
        self, signing_keys: KeyManager, *, backup_retention_seconds: float, cache_max_age_seconds: float = 0.0
    ) -> None:
        self.signing_keys = signing_keys
        self.backup_retention_seconds = backup_retention_seconds
        self.cache_max_age_seconds = cache_max_age_seconds
        self._signer: notes.NoteSigner | None = None

    async def signer(self) -> notes.NoteSigner:
        """The certificate signing key (made once) and its signer."""
        if self._signer is None:
            await self.signing_keys.ensure_key(CERTIFICATE_KEY, KeyType.ED25519)
            self._signer = await key_manager_signer(self.signing_keys, CERTIFICATE_KEY, CERTIFICATE_SIGNER_NAME)
        return self._signer

    async def verifier_key(self) -> str:
        """The C2SP verifier key of erasure certificates (for the trust policy)."""
        return (await self.signer()).verifier.text()

    async def certify(
        self, row: erasure_storage.ErasureRow, confirmed: dict[str, tuple[bytes, float]], now: float
    ) -> tuple[ev.ErasureCertificate, str]:
        """The certificate and its signed note."""
        # No backup of the key manager, and no data-key cache, holds any key after this.
        unrecoverable = now + max(self.backup_retention_seconds, self.cache_max_age_seconds)
        issued = certificate(row, confirmed, now, unrecoverable_after=unrecoverable)
        note = await notes.sign_note(certificate_text(issued), [await self.signer()])
        return issued, note.format()
