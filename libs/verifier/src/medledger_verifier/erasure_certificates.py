"""Erasure certificates as a verifier reads them: a C2SP signed note from records, one fact per
line (``medledger_runtime.erasure`` writes them and documents the format). Parsed strictly:
anything else is refused, naming what is wrong."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medledger_verifier import notes
from medledger_verifier.errors import InvalidArgument

CERTIFICATE_HEADER = "medledger erasure certificate v1"
# What a participant did with its keys of the patient, in the certificate's words.
DESTROYED = "destroyed"
ABSENT = "absent"
DESTROYED_AT_APPEND = "destroyed-at-append"
_OUTCOMES = frozenset({DESTROYED, ABSENT, DESTROYED_AT_APPEND})


@dataclass(frozen=True)
class CertifiedKey:
    name: str
    # Version numbers, or "all" (destroyed at append) or "already-gone".
    versions: str


@dataclass(frozen=True)
class CertifiedParticipant:
    name: str
    outcome: str
    keys: tuple[CertifiedKey, ...]


@dataclass(frozen=True)
class Certificate:
    """What a certificate's note text says (parsed strictly: anything else is refused)."""

    facts: dict[str, str]
    participants: tuple[CertifiedParticipant, ...]

    def describe(self) -> list[str]:
        """The certificate in words."""
        f = self.facts
        out = [
            f"Erasure {f['erasure']} of patient {f['patient']}:",
            f"  requested by {f['requested-by']} at {f['requested-at']}, authorized by {f['authorized-by']};",
            f"  erased at {f['erased-at']}: {f['records-erased']} record(s), {f['versions-erased']} version(s);",
            f"  no copy of the patient's data can be decrypted after {f['unrecoverable-after']} "
            "(every key-manager backup and data-key cache holding the keys has expired by then).",
        ]
        for p in self.participants:
            if p.outcome == "absent":
                out.append(f"  {p.name}: absent from this deployment (holds no patient material)")
                continue
            at_append = p.outcome == "destroyed-at-append"
            for k in p.keys:
                if k.versions == "all":
                    what = "every version"
                elif k.versions == "already-gone":
                    what = "already gone when asked"
                else:
                    what = f"version(s) {k.versions}"
                if at_append:
                    out.append(f"  {p.name}: destroys key {k.name} ({what}) when it appends this certificate")
                else:
                    out.append(f"  {p.name}: destroyed key {k.name} ({what})")
            if not p.keys:
                out.append(f"  {p.name}: {p.outcome} (no key)")
        return out


_FACTS = (
    "erasure",
    "patient",
    "requested-by",
    "requested-at",
    "authorized-by",
    "erased-at",
    "unrecoverable-after",
    "records-erased",
    "versions-erased",
)


def parse_certificate(text: str) -> Certificate:
    """Parse a certificate's note text; InvalidArgument naming what is wrong."""

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument.field("certificate", why)

    lines = text.removesuffix("\n").split("\n")
    if not lines or lines[0] != CERTIFICATE_HEADER:
        raise bad(f"not an erasure certificate (its first line is not {CERTIFICATE_HEADER!r})")
    facts: dict[str, str] = {}
    for name, line in zip(_FACTS, lines[1 : 1 + len(_FACTS)], strict=False):
        label, _, value = line.partition(" ")
        if label != name or not value:
            raise bad(f"line {name!r} missing or out of place")
        facts[name] = value
    if len(facts) != len(_FACTS):
        raise bad("truncated")
    participants: list[CertifiedParticipant] = []
    keys: list[CertifiedKey] = []
    current: tuple[str, str] | None = None
    for line in lines[1 + len(_FACTS) :]:
        parts = line.split(" ")
        if parts[0] == "participant" and len(parts) == 3 and parts[2] in _OUTCOMES:
            if current is not None:
                participants.append(CertifiedParticipant(*current, tuple(keys)))
            current, keys = (parts[1], parts[2]), []
        elif parts[0] == "key" and len(parts) == 4 and current is not None and parts[1] == current[0]:
            keys.append(CertifiedKey(parts[2], parts[3]))
        else:
            raise bad(f"unexpected line {line[:80]!r}")
    if current is not None:
        participants.append(CertifiedParticipant(*current, tuple(keys)))
    if not participants:
        raise bad("names no participant")
    return Certificate(facts, tuple(participants))


def open_certificate(data: str | bytes, verifier_keys: Sequence[str]) -> Certificate:
    """Verify a signed certificate against the trusted verifier keys (C2SP note verifier form)
    and parse it; InvalidArgument when it is forged, altered, unsigned by those keys or malformed."""
    verifiers = [notes.NoteVerifier.parse(k) for k in verifier_keys]
    if not verifiers:
        raise InvalidArgument.field("trust_policy", "no erasure-certificate key to verify with")
    return parse_certificate(notes.open_note(data, verifiers).text)
