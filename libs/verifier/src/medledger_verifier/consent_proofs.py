"""Which version of a consent was in force at a time, proved from ConsentRegistry: the patient's
documents and salts give the commitments; the registry's entry for each (its window, when the
chain recorded the grant and the revocation, and the revoking version) gives the answer, by the
same rule as the contract's ``isInForce`` (``RegistryEntry.in_force``), computed here so that a
registry deployed before that rule answered for the past still gives the right answer.

Several versions: give every version of the consent the patient holds. A change or revocation
revokes the version before it on chain, before its successor is granted, so at most one version
is in force at any time; that one is the answer. A revocation version is never granted itself:
the chain holds it as the ``revokedBy`` of the version it ended, which is how it is recognised.

The chain's times are block times, and they come after consent's: the anchoring lag (the
registry's ``recordedAt`` minus the Consent's ``dateTime``, when consent recorded the version).
Within it the chain does not yet know a version (or its revocation) that consent already
applied; the findings say so when the time asked falls there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from eth_utils.address import to_checksum_address

from medledger_verifier import chain
from medledger_verifier.consent_documents import ConsentDocument, whole_seconds

UNKNOWN, ACTIVE, REVOKED = 0, 1, 2
_STATUS_NAMES = {UNKNOWN: "unknown", ACTIVE: "granted", REVOKED: "revoked"}


class ChainUnusable(Exception):
    """The chain could not be asked, or is not the one trusted: nothing was proved."""


def when_text(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class RegistryEntry:
    """ConsentRegistry's ``statusOf(commitment)``; times are block times in Unix seconds."""

    status: int
    valid_from: int
    valid_until: int  # 0: no end
    recorded_at: int
    revoked_at: int
    revoked_by: bytes

    @classmethod
    def from_call(cls, value: Any) -> RegistryEntry:
        status, valid_from, valid_until, recorded_at, revoked_at, revoked_by = value
        return cls(int(status), int(valid_from), int(valid_until), int(recorded_at), int(revoked_at), bytes(revoked_by))

    @property
    def status_name(self) -> str:
        return _STATUS_NAMES.get(self.status, f"status {self.status}")

    def in_force(self, when: int) -> bool:
        """ConsentRegistry.isInForce: granted, recorded on chain at or before ``when``, in the
        window, and not revoked at or before ``when``."""
        if self.status == UNKNOWN or when < self.recorded_at or when < self.valid_from:
            return False
        if self.valid_until != 0 and when >= self.valid_until:
            return False
        return self.status != REVOKED or when < self.revoked_at

    def window_text(self) -> str:
        end = when_text(self.valid_until) if self.valid_until else "no end"
        return f"from {when_text(self.valid_from)} to {end}"


@dataclass(frozen=True)
class VersionFinding:
    """One version the patient gave, and what the chain holds for it."""

    document: ConsentDocument
    entry: RegistryEntry
    in_force: bool
    # Whether the registry's window is the document's period (None: the document's is unreadable).
    window_matches: bool | None
    # The given version that revoked this one, and the revocation version this one is.
    revoked_by: ConsentDocument | None = None
    revokes: VersionFinding | None = None

    @property
    def anchoring_lag(self) -> float | None:
        """Seconds from consent recording the version to the chain recording its grant."""
        if self.entry.status == UNKNOWN or self.document.recorded is None:
            return None
        return self.entry.recorded_at - self.document.recorded.timestamp()

    @property
    def revocation_lag(self) -> float | None:
        """Seconds from consent recording the revoking version to the chain recording it."""
        if self.entry.status != REVOKED or self.revoked_by is None or self.revoked_by.recorded is None:
            return None
        return self.entry.revoked_at - self.revoked_by.recorded.timestamp()

    def reasons(self, when: int) -> list[str]:
        """Why the version was not in force at ``when``, in words; and where the time asked falls
        within the anchoring lag, that the chain's answer differs from consent's there."""
        e, d = self.entry, self.document
        if e.status == UNKNOWN:
            if self.revokes is not None:
                return [f"it is a revocation: it ended {self.revokes.document.label}, and grants nothing itself"]
            if d.is_revocation:
                return ["it is a revocation (grants nothing); the version it ended was not given"]
            return ["the registry has no record of this commitment: never written there, or not this document or salt"]
        said: list[str] = []
        if when < e.recorded_at:
            said.append(f"the chain recorded it only at {when_text(e.recorded_at)}, after the time asked")
            if d.recorded is not None and d.recorded.timestamp() <= when:
                said.append(
                    f"consent had recorded it at {d.recorded:%Y-%m-%d %H:%M:%S} UTC: the time asked falls in "
                    "the anchoring lag, when the chain could not yet attest it"
                )
        if when < e.valid_from:
            said.append(f"its window starts only at {when_text(e.valid_from)}")
        if e.valid_until and when >= e.valid_until:
            said.append(f"its window ended at {when_text(e.valid_until)}")
        if e.status == REVOKED and when >= e.revoked_at:
            said.append(f"it was revoked on chain at {when_text(e.revoked_at)}")
        return said

    def caveats(self, when: int) -> list[str]:
        """Where the chain calls the version in force although consent had already revoked it."""
        revoker = self.revoked_by
        if not self.in_force or revoker is None or revoker.recorded is None:
            return []
        if revoker.recorded.timestamp() <= when:
            return [
                f"but consent had recorded {revoker.label}, which revoked it, at {revoker.recorded:%Y-%m-%d %H:%M:%S} "
                f"UTC, and the chain only at {when_text(self.entry.revoked_at)}: the time asked falls in that lag"
            ]
        return []


@dataclass(frozen=True)
class ConsentProof:
    """The chain's answer for the versions given, at the time asked, as of one confirmed block."""

    when: int
    chain_id: int
    registry: str
    block_number: int
    block_time: int
    confirmations: int
    findings: tuple[VersionFinding, ...]

    @property
    def in_force(self) -> list[VersionFinding]:
        return [f for f in self.findings if f.in_force]

    @property
    def verified(self) -> bool:
        """Exactly one given version was in force, and the registry's window is its document's."""
        found = self.in_force
        return len(found) == 1 and found[0].window_matches is True

    def verdict(self) -> str:
        at = when_text(self.when)
        found = self.in_force
        if not found:
            return f"NOT IN FORCE: none of the versions given was in force at {at}, as the chain recorded them."
        if len(found) > 1:
            labels = ", ".join(f.document.label for f in found)
            return f"NOT PROVED: several versions given ({labels}) were in force at {at}: the registry is inconsistent."
        (one,) = found
        if one.window_matches is not True:
            return (
                f"NOT PROVED: the registry calls {one.document.label} in force at {at}, but its window is not "
                "the document's period: the chain's answer does not describe this document."
            )
        consent = f" of consent {one.document.consent_id}" if one.document.consent_id else ""
        return f"IN FORCE: {one.document.label}{consent} was in force at {at}, as the chain recorded it."


def window_matches(document: ConsentDocument, entry: RegistryEntry) -> bool | None:
    """Whether the registry's window is the document's period, in the chain's whole seconds."""
    if entry.status == UNKNOWN:
        return None
    if document.period_start is None:
        return None
    end = whole_seconds(document.period_end) if document.period_end is not None else 0
    return (entry.valid_from, entry.valid_until) == (whole_seconds(document.period_start), end)


def findings(documents: list[ConsentDocument], entries: list[RegistryEntry], when: int) -> tuple[VersionFinding, ...]:
    """Each version's finding, revocations tied to the versions they ended (by ``revokedBy``)."""
    by_commitment = {d.commitment: d for d in documents}
    base = [
        VersionFinding(
            document=d,
            entry=e,
            in_force=e.in_force(when),
            window_matches=window_matches(d, e),
            revoked_by=by_commitment.get(e.revoked_by.hex()) if e.status == REVOKED else None,
        )
        for d, e in zip(documents, entries, strict=True)
    ]
    ended = {f.revoked_by.commitment: f for f in base if f.revoked_by is not None}
    return tuple(replace(f, revokes=ended.get(f.document.commitment)) for f in base)


async def prove_in_force(
    w3: chain.Web3,
    registry_address: str,
    documents: list[ConsentDocument],
    when: int,
    *,
    chain_id: int,
    min_confirmations: int = 1,
) -> ConsentProof:
    """Read each version's entry from the registry at the newest block with ``min_confirmations``
    and say which was in force at ``when``; ChainUnusable when the chain cannot answer or is not
    the trusted one."""
    try:
        served = await w3.eth.chain_id
        if served != chain_id:
            raise ChainUnusable(f"the RPC endpoint serves chain {served}, the trust policy's is chain {chain_id}")
        latest = await w3.eth.block_number
        block_number = latest - (min_confirmations - 1)
        if block_number < 0:
            raise ChainUnusable(f"the chain has {latest + 1} blocks, fewer than {min_confirmations} confirmations")
        if not await w3.eth.get_code(to_checksum_address(registry_address), block_number):
            raise ChainUnusable(f"there is no contract at {registry_address} on chain {served}")
        block: Any = await w3.eth.get_block(block_number)
        registry = chain.consent_registry_reader(w3, registry_address)
        entries = [
            RegistryEntry.from_call(
                await registry.functions.statusOf(bytes.fromhex(d.commitment)).call(block_identifier=block_number)
            )
            for d in documents
        ]
    except ChainUnusable:
        raise
    except Exception as exc:  # any RPC or decoding failure: the chain did not answer
        text = (str(exc).strip() or type(exc).__name__)[:300]
        raise ChainUnusable(f"could not ask the chain ({type(exc).__name__}: {text})") from None
    return ConsentProof(
        when=when,
        chain_id=served,
        registry=registry_address,
        block_number=block_number,
        block_time=int(block["timestamp"]),
        confirmations=latest - block_number + 1,
        findings=findings(documents, entries, when),
    )
