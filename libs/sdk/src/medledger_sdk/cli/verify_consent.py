"""``medledger verify consent DOCUMENT... --trust POLICY --rpc URL [--salt HEX]... [--at TIME]``: which
version of a consent was in force at a time, proved from ConsentRegistry with the documents and
salts the patient holds (``medledger_verifier.consent_proofs``).

Several versions of one consent may be given (every version the patient holds, each with its
salt): the answer is the one in force. Salts come from ``--salt``, one per document in the same
order, or else from ``<document stem>.salt`` beside each document (as ``medledger demo --out``
writes them). Exit 0 when a given version was in force at the time, 1 when none was (or the
chain does not know them, or cannot be asked), 2 on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import string
import time
from pathlib import Path

from medledger_sdk.cli.errors import CommandError
from medledger_verifier import chain
from medledger_verifier.consent_documents import ConsentDocument, parse_salt, parse_time, whole_seconds
from medledger_verifier.consent_proofs import (
    REVOKED,
    UNKNOWN,
    ChainUnusable,
    ConsentProof,
    VersionFinding,
    prove_in_force,
    when_text,
)
from medledger_verifier.errors import InvalidArgument
from medledger_verifier.proof_files import TrustPolicy

USAGE = 2
RPC_TIMEOUT_SECONDS = 15.0


def parse_when(text: str | None) -> int:
    """``--at``: Unix seconds, or an RFC 3339 time with its zone; now when not given."""
    if text is None:
        return int(time.time())
    if text.isdigit():
        return int(text)
    moment = parse_time(text)
    if moment is None:
        raise CommandError(
            f"--at is a time with its zone (e.g. 2026-03-01T12:00:00Z) or Unix seconds, not {text[:60]!r}", USAGE
        )
    return whole_seconds(moment)


def _salts(args: argparse.Namespace, paths: list[Path]) -> list[str]:
    given: list[str] = args.salt or []
    if given:
        if len(given) != len(paths):
            raise CommandError(
                f"{len(paths)} consent document(s) but {len(given)} --salt: one salt per document", USAGE
            )
        return given
    salts = []
    for path in paths:
        salt_file = path.with_suffix(".salt")
        try:
            salts.append(salt_file.read_text())
        except (OSError, UnicodeDecodeError):
            raise CommandError(f"no --salt given and no readable {salt_file} beside {path}", USAGE) from None
    return salts


def read_documents(args: argparse.Namespace, files: list[str]) -> list[ConsentDocument]:
    paths = [Path(f) for f in files]
    documents = []
    for path, salt_text in zip(paths, _salts(args, paths), strict=True):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read the consent document {path}: {exc.strerror or exc}", USAGE) from None
        try:
            salt = parse_salt(salt_text)
        except InvalidArgument:
            raise CommandError(f"the salt for {path} is not 32 bytes as 64 hex digits", USAGE) from None
        try:
            documents.append(ConsentDocument.parse(data, salt, source=str(path)))
        except InvalidArgument as exc:
            raise CommandError(f"{path} is not a consent document: {exc.message}", USAGE) from None
    consents = {d.consent_id for d in documents if d.consent_id is not None}
    if len(consents) > 1:
        raise CommandError(f"the documents are versions of different consents ({', '.join(sorted(consents))})", USAGE)
    seen: dict[str, str] = {}
    for d in documents:
        if d.commitment in seen:
            raise CommandError(f"{d.source} is the same version as {seen[d.commitment]}", USAGE)
        seen[d.commitment] = d.source
    return documents


def run_consent(args: argparse.Namespace, policy: TrustPolicy, files: list[str]) -> int:
    if not files:
        raise CommandError("usage: medledger verify consent DOCUMENT... --trust POLICY --rpc URL [--salt HEX]", USAGE)
    if args.rpc is None:
        raise CommandError("verifying a consent needs --rpc URL (the chain)", USAGE)
    registry = args.consent_registry or policy.consent_registry
    if not registry:
        raise CommandError(
            f"the trust policy {args.trust} names no ConsentRegistry: give --consent-registry ADDRESS", USAGE
        )
    if not (registry.startswith("0x") and len(registry) == 42 and all(c in string.hexdigits for c in registry[2:])):
        raise CommandError(f"the ConsentRegistry address {registry[:60]!r} is not 20 bytes of 0x-hex", USAGE)
    when = parse_when(args.at)
    documents = read_documents(args, files)
    print(
        f"verifying {len(documents)} consent version(s) against ConsentRegistry {registry} on chain {policy.chain_id}"
    )
    print(f"the time asked: {when_text(when)} ({when})")
    try:
        proof = asyncio.run(_prove(args.rpc, registry, documents, when, policy))
    except ChainUnusable as exc:
        print(f"  ✗ NOT VERIFIED: {exc}")
        return 1
    print_proof(proof)
    return 0 if proof.verified else 1


async def _prove(
    rpc_url: str, registry: str, documents: list[ConsentDocument], when: int, policy: TrustPolicy
) -> ConsentProof:
    w3 = chain.connect(rpc_url, timeout=RPC_TIMEOUT_SECONDS)
    try:
        return await prove_in_force(
            w3, registry, documents, when, chain_id=policy.chain_id, min_confirmations=policy.min_confirmations
        )
    finally:
        await w3.provider.disconnect()


def _lag(seconds: float | None, what: str) -> str:
    if seconds is None:
        return f"{what} unknown (the document has no dateTime with a time and zone)"
    return f"{what} {seconds:.1f} s after the document's dateTime (when consent recorded it)"


def print_finding(finding: VersionFinding, when: int) -> None:
    d, e = finding.document, finding.entry
    kind = "a revocation" if d.is_revocation else "a grant"
    recorded = f", recorded by consent at {d.recorded.isoformat(timespec='milliseconds')}" if d.recorded else ""
    print(f"{d.label} ({d.source}): {kind}{recorded}")
    print(f"    commitment {d.commitment}")
    print(f"    on chain: {e.status_name}")
    if finding.revokes is not None:
        ended = finding.revokes
        print(
            f"    recorded on chain as the revocation of {ended.document.label} at {when_text(ended.entry.revoked_at)} "
            f"(block time); {_lag(ended.revocation_lag, 'anchoring lag')}"
        )
    if e.status != UNKNOWN:
        print(f"    validity window on chain: {e.window_text()}")
        if finding.window_matches is False:
            print("    ✗ the window on chain is not the document's provision.period")
        elif finding.window_matches is None:
            print("    ? the document's provision.period is unreadable: the window cannot be compared")
        lag = _lag(finding.anchoring_lag, "anchoring lag")
        print(f"    granted on chain at {when_text(e.recorded_at)} (block time); {lag}")
        if e.status == REVOKED:
            by = finding.revoked_by.label if finding.revoked_by else f"0x{e.revoked_by.hex()} (a version not given)"
            print(f"    revoked on chain at {when_text(e.revoked_at)} (block time) by {by}")
    if finding.in_force:
        print(f"    ✓ in force at {when_text(when)}")
        for caveat in finding.caveats(when):
            print(f"      {caveat}")
    else:
        print(f"    ✗ not in force at {when_text(when)}: " + "; ".join(finding.reasons(when)))


def print_proof(proof: ConsentProof) -> None:
    print(
        f"as the chain stood at block {proof.block_number} ({when_text(proof.block_time)}, "
        f"{proof.confirmations} confirmation(s))"
    )
    if proof.when > proof.block_time:
        print("  (the time asked is after that block: a revocation recorded later could still change the answer)")
    for finding in proof.findings:
        print_finding(finding, proof.when)
    print(proof.verdict())
