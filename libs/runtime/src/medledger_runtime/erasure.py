"""The one erasure protocol, the parts every participant and every verifier share (no I/O but
the participant's key manager).

records coordinates: when an erasure starts RUNNING it emits `PatientKeysErasureRequested`;
each participant that holds patient material destroys its own keys of the patient
(:func:`destroy_keys`) and answers with `PatientKeysDestroyed` on its own topic
(:func:`keys_destroyed_event`), on every delivery (a redelivered request re-confirms; a key
already gone counts as destroyed). records assembles the certificate once every present
participant has confirmed, signs it as a C2SP signed note (:func:`certificate_text`), and the
audit log appends it, destroying the patient's subject key as it does.

The certificate's note text, one fact per line (keys in the order the participants gave them;
``medledger_verifier.erasure_certificates`` reads it)::

    medledger erasure certificate v1
    erasure era_…
    patient pat_…
    requested-by pat_…
    requested-at 2026-12-06T15:00:00Z
    authorized-by privacy-officer prn_…
    erased-at 2026-12-06T15:00:02Z
    unrecoverable-after 2027-01-05T15:00:02Z
    records-erased 2
    versions-erased 2
    participant audit destroyed-at-append
    key audit audit-subject-pat_… all
    participant consent destroyed
    key consent patient-pat_… 1
    participant identity absent
    participant records destroyed
    key records patient-pat_… 1,2
"""

from __future__ import annotations

from datetime import UTC, datetime

from medledger.events.v1 import records_events_pb2 as ev

from medledger_runtime.errors import InvalidArgument
from medledger_runtime.events import Event, new_event, unpack
from medledger_runtime.keys import KeyShredder
from medledger_runtime.timestamps import seconds
from medledger_verifier.erasure_certificates import (
    ABSENT,
    CERTIFICATE_HEADER,
    DESTROYED,
    DESTROYED_AT_APPEND,
)

# Every service that can hold patient material. Which of them a deployment runs is records'
# setting; the others are named absent in each certificate.
PARTICIPANTS = ("identity", "consent", "records", "audit")
# The audit log destroys its key when it appends the certificate, so it is never waited for.
AT_APPEND = frozenset({"audit"})
# The records key-manager key (ed25519) that signs certificates, and the name it signs as.
CERTIFICATE_KEY = "records-erasure-certificate"
CERTIFICATE_SIGNER_NAME = "medledger-erasure-certificate"

_OUTCOME_WORDS = {
    ev.ErasureOutcome.ERASURE_OUTCOME_DESTROYED: DESTROYED,
    ev.ErasureOutcome.ERASURE_OUTCOME_ABSENT: ABSENT,
    ev.ErasureOutcome.ERASURE_OUTCOME_DESTROYED_AT_APPEND: DESTROYED_AT_APPEND,
}


_ASKED = ev.PatientKeysErasureRequested.DESCRIPTOR.full_name


def erasure_asked_of(event: Event | None, participant: str) -> ev.PatientKeysErasureRequested | None:
    """The erasure request `event` carries when it asks `participant`, else None (another type,
    or an erasure that names it absent)."""
    if event is None or event.type != _ASKED:
        return None
    request = unpack(event, ev.PatientKeysErasureRequested)
    assert isinstance(request, ev.PatientKeysErasureRequested)
    return request if participant in request.participants else None


async def destroy_keys(shredder: KeyShredder, names: list[str]) -> list[ev.DestroyedKey]:
    """Destroy each key (crypto-shredding) through the service's erasure credential, naming the
    versions it had; a key already gone is destroyed (`already_gone`, its versions unknown now)."""
    out = []
    for name in names:
        versions = await shredder.key_versions(name)
        await shredder.shred(name)  # also when gone: its legacy twin may not be
        if versions:
            out.append(ev.DestroyedKey(key_name=name, versions=versions))
        else:
            out.append(ev.DestroyedKey(key_name=name, already_gone=True))
    return out


def keys_destroyed_event(
    source: str, participant: str, request: ev.PatientKeysErasureRequested, keys: list[ev.DestroyedKey]
) -> Event:
    """A participant's confirmation, keyed like the request (by erasure)."""
    payload = ev.PatientKeysDestroyed(
        erasure_id=request.erasure_id, patient_id=request.patient_id, participant=participant, keys=keys
    )
    return new_event(
        source=source, payload=payload, aggregate_id=request.erasure_id, version=0, subject=request.patient_id
    )


# --- the certificate as a note ---------------------------------------------------------------


def _time(ts: object) -> str:
    return datetime.fromtimestamp(seconds(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # type: ignore[arg-type]


def _versions(key: ev.DestroyedKey, outcome: int) -> str:
    if outcome == ev.ErasureOutcome.ERASURE_OUTCOME_DESTROYED_AT_APPEND:
        return "all"
    if key.already_gone or not key.versions:
        return "already-gone"
    return ",".join(str(v) for v in key.versions)


def _token(value: str, what: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise InvalidArgument.field(what, "a certificate field is non-empty, without spaces")
    return value


def certificate_text(c: ev.ErasureCertificate) -> str:
    """The note text of a certificate (see the module)."""
    lines = [
        CERTIFICATE_HEADER,
        f"erasure {_token(c.erasure_id, 'erasure_id')}",
        f"patient {_token(c.patient_id, 'patient_id')}",
        f"requested-by {_token(c.requested_by, 'requested_by')}",
        f"requested-at {_time(c.requested_at)}",
        f"authorized-by {c.authorized_by}",
        f"erased-at {_time(c.erased_at)}",
        f"unrecoverable-after {_time(c.unrecoverable_after)}",
        f"records-erased {c.records_erased}",
        f"versions-erased {c.versions_erased}",
    ]
    for p in sorted(c.participants, key=lambda p: p.participant):
        lines.append(f"participant {_token(p.participant, 'participant')} {_OUTCOME_WORDS[p.outcome]}")
        lines.extend(f"key {p.participant} {_token(k.key_name, 'key_name')} {_versions(k, p.outcome)}" for k in p.keys)
    return "\n".join(lines) + "\n"
