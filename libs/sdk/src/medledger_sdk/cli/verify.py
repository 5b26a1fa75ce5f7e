"""``medledger verify``: check an anchored proof as a third party, trusting only a trust policy
and a chain RPC endpoint (``medledger_verifier.anchored_proofs.verify_anchored_proof``); and
``medledger verify certificate FILE``: check an erasure certificate's signature against the trust
policy's certificate keys, offline, and say what it certifies; and ``medledger verify consent
DOCUMENT...``: which version of a consent was in force at a time, from ConsentRegistry
(``verify_consent``).

Exit codes: 0 verified, 1 not verified, 2 a usage error or a file that cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import string
from pathlib import Path
from typing import Any

from medledger_sdk.cli.errors import CommandError
from medledger_sdk.cli.verify_consent import run_consent
from medledger_verifier import chain, notes
from medledger_verifier.anchored_proofs import verify_anchored_proof
from medledger_verifier.erasure_certificates import open_certificate
from medledger_verifier.errors import InvalidArgument
from medledger_verifier.proof_checks import Verification
from medledger_verifier.proof_files import TrustPolicy

PROOF_SUFFIX = ".tlog-proof"
RPC_TIMEOUT_SECONDS = 15.0
USAGE = 2


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify",
        help="verify an anchored proof against a trust policy and the chain",
        description=(
            "Verify that an entry of the transparency log (and, given the record and its salt, the record "
            "it commits to) is in a checkpoint signed by the log's keys and anchored on chain. Trusts only "
            "the trust policy and the chain behind --rpc. `verify certificate FILE --trust POLICY` checks an "
            "erasure certificate offline. `verify consent DOCUMENT... --trust POLICY --rpc URL [--at TIME]` says "
            "which of the consent versions given (FHIR Consent JSON, each with its salt) was in force at the time, "
            "from ConsentRegistry. Exit 0 verified (in force), 1 not verified, 2 usage error."
        ),
    )
    parser.add_argument(
        "proof",
        metavar="PROOF",
        help="the proof, <stem>.tlog-proof; or the word 'certificate' followed by FILE, or 'consent' followed by "
        "DOCUMENT...",
    )
    parser.add_argument(
        "files",
        metavar="FILE",
        nargs="*",
        help="with 'certificate': an erasure certificate (signed note); with 'consent': the consent version "
        "documents, as GetConsent returned them",
    )
    parser.add_argument("--trust", required=True, metavar="POLICY", help="the trust policy (JSON)")
    parser.add_argument("--rpc", metavar="URL", help="a JSON-RPC URL of the chain (proofs only)")
    parser.add_argument("--entry", metavar="FILE", help="the entry's bytes (default: <stem>.entry)")
    parser.add_argument("--anchor", metavar="FILE", help="the anchor (default: <stem>-anchor.json)")
    parser.add_argument("--record", metavar="FILE", help="the record as returned by GetRecord (needs --salt)")
    parser.add_argument(
        "--salt",
        metavar="HEX",
        action="append",
        help="the record version's salt, 64 hex digits (from its receipt); with 'consent', one per document in "
        "order (default: <document stem>.salt beside each)",
    )
    parser.add_argument("--media-type", metavar="TYPE", help="the record is a document of this media type")
    parser.add_argument(
        "--at", metavar="TIME", help="with 'consent': the time asked, RFC 3339 with its zone or Unix seconds (now)"
    )
    parser.add_argument(
        "--consent-registry",
        metavar="ADDRESS",
        help="with 'consent': the ConsentRegistry (default: the trust policy's)",
    )
    parser.set_defaults(func=run)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read the {what} {path}: {exc.strerror or exc}", USAGE) from None


def _policy(path: str) -> TrustPolicy:
    try:
        return TrustPolicy.parse(_read(Path(path), "trust policy"))
    except InvalidArgument as exc:
        raise CommandError(f"the trust policy {path} is not usable: {exc.message}", USAGE) from None


def run_certificate(args: argparse.Namespace) -> int:
    """Verify an erasure certificate offline; 0 verified, 1 refused (forged, altered, unknown key)."""
    policy = _policy(args.trust)
    if not policy.erasure_certificate_keys:
        raise CommandError(
            f"the trust policy {args.trust} names no erasure-certificate key (written before certificates were "
            "signed): take the one `medledger up` writes now",
            USAGE,
        )
    try:
        verifiers = [notes.NoteVerifier.parse(k) for k in policy.erasure_certificate_keys]
    except InvalidArgument as exc:
        raise CommandError(f"the trust policy {args.trust} is not usable: {exc.message}", USAGE) from None
    data = _read(Path(args.certificate), "certificate")
    print(f"verifying the erasure certificate {args.certificate}")
    print(f"trusting the certificate key(s) {', '.join(v.name + '+' + v.key_id.hex() for v in verifiers)}")
    try:
        certificate = open_certificate(data, policy.erasure_certificate_keys)
    except InvalidArgument as exc:
        print(f"  ✗ NOT VERIFIED: {exc.message}")
        print("This certificate is not one the trusted key signed (forged or altered): do not rely on it.")
        return 1
    print("  ✓ signed by a certificate key of the trust policy")
    for line in certificate.describe():
        print(line)
    print("VERIFIED: the erasure certificate is authentic.")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.proof == "certificate":
        if len(args.files) != 1:
            raise CommandError("usage: medledger verify certificate FILE --trust POLICY", USAGE)
        args.certificate = args.files[0]
        return run_certificate(args)
    if args.proof == "consent":
        return run_consent(args, _policy(args.trust), args.files)
    if args.files:
        raise CommandError(f"one PROOF only, not {' '.join(args.files)}", USAGE)
    if args.at is not None or args.consent_registry is not None:
        raise CommandError("--at and --consent-registry go with 'consent'", USAGE)
    if args.rpc is None:
        raise CommandError("verifying a proof needs --rpc URL (the chain)", USAGE)
    proof_path = Path(args.proof)
    if not proof_path.name.endswith(PROOF_SUFFIX):
        raise CommandError(f"PROOF is a <stem>{PROOF_SUFFIX} file, not {proof_path}", USAGE)
    stem = proof_path.name.removesuffix(PROOF_SUFFIX)
    entry_path = Path(args.entry) if args.entry else proof_path.with_name(f"{stem}.entry")
    anchor_path = Path(args.anchor) if args.anchor else proof_path.with_name(f"{stem}-anchor.json")
    if (args.record is None) != (args.salt is None):
        raise CommandError("--record and --salt go together", USAGE)
    if args.media_type is not None and args.record is None:
        raise CommandError("--media-type needs --record and --salt", USAGE)
    if args.salt is not None and len(args.salt) != 1:
        raise CommandError("one --salt with a record", USAGE)
    salt = args.salt[0].removeprefix("0x") if args.salt is not None else None
    if salt is not None and (len(salt) != 64 or any(c not in string.hexdigits for c in salt)):
        raise CommandError("--salt is the 32-byte salt as 64 hex digits", USAGE)
    policy = _policy(args.trust)
    proof = _read(proof_path, "proof")
    entry = _read(entry_path, "entry")
    anchor = _read(anchor_path, "anchor")
    record = _read(Path(args.record), "record") if args.record is not None else None

    print(f"verifying {proof_path} (entry {entry_path}, anchor {anchor_path})")
    print(f"trusting the log {policy.origin}, chain {policy.chain_id}, registry {policy.anchor_registry}")
    result = asyncio.run(_verify(policy, proof, entry, anchor, args.rpc, record, salt, args.media_type))
    print_report(result)
    return 0 if result.verified else 1


async def _verify(
    policy: TrustPolicy,
    proof: bytes,
    entry: bytes,
    anchor: bytes,
    rpc_url: str,
    record: bytes | None,
    salt: str | None,
    media_type: str | None,
) -> Verification:
    w3 = chain.connect(rpc_url, timeout=RPC_TIMEOUT_SECONDS)
    try:
        return await verify_anchored_proof(
            policy, proof, entry, anchor, w3, record=record, salt_hex=salt, media_type=media_type
        )
    finally:
        await w3.provider.disconnect()


def print_report(result: Verification) -> None:
    for check in result.checks:
        if check.passed is None:
            print(f"  - {check.name}: {check.title} (not run)")
        else:
            mark = "✓" if check.passed else "✗"
            outcome = "" if check.passed else " — FAILED"
            print(f"  {mark} {check.name}: {check.title}{outcome}")
            print(f"      {check.detail}")
    print(result.verdict())
