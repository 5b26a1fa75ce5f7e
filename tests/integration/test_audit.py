"""The audit log through its API, with identity, consent and records running: a stored record's
commitment is found in the log and proven included in a signed checkpoint (offline, as a C2SP
tlog-proof, with the published verifier keys); consistency between checkpoints verifies; a
patient reads the entries about themselves only, an auditor reads all, others are refused; the
AuditEvent export validates."""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
from fhir.resources.R4B.bundle import Bundle
from medledger.audit.v1 import audit_service_pb2 as pb
from medledger.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as rec_pb
from medledger.records.v1 import records_service_pb2_grpc as rec_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack.testing import eventually, status_of
from medledger_sdk.channels import make_channel
from medledger_verifier import notes, tlog

CODE = grpc.StatusCode


def rid() -> str:
    return str(uuid.uuid4())


async def test_a_record_is_proven_in_the_log_and_entries_are_read_by_whom_they_concern(start_stack) -> None:
    async with start_stack(records=True, audit=True) as stack:
        assert stack.audit is not None and stack.records is not None
        audit_address = f"127.0.0.1:{stack.audit.grpc_port}"
        public = pb_grpc.AuditServiceStub(make_channel(audit_address))
        identity_public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        fhir = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
        patient = await identity_public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
        )
        patient_id = patient.principal.principal_id
        patient_client = stack.client(patient_id, patient.client_secret)
        records = rec_grpc.RecordsServiceStub(
            patient_client.channel(f"127.0.0.1:{stack.records.grpc_port}", "medledger.records")
        )
        observation = {"resourceType": "Observation", "status": "final", "code": {"text": "heart rate"}}
        stored = await records.PutRecord(
            rec_pb.PutRecordRequest(
                request_id=rid(),
                patient_id=patient_id,
                category=vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
                content=json.dumps(observation).encode(),
                media_type="application/fhir+json",
            )
        )

        # The commitment reaches the log (found by whoever holds it: a signed-in caller), and a
        # checkpoint covering it is signed.
        find = pb.FindCommitmentRequest(commitment=stored.receipt.commitment)
        assert await status_of(public.FindCommitment(find)) == CODE.UNAUTHENTICATED
        # FindCommitment needs a token: use the patient's.
        audit_as_patient = pb_grpc.AuditServiceStub(patient_client.channel(audit_address, "medledger.audit"))

        async def found_as_patient() -> Any:
            try:
                request = pb.FindCommitmentRequest(commitment=stored.receipt.commitment)
                return (await audit_as_patient.FindCommitment(request)).entry
            except grpc.aio.AioRpcError as exc:
                if exc.code() == CODE.NOT_FOUND:
                    return None
                raise

        entry = await eventually(found_as_patient, "the record's entry")
        parsed = json.loads(entry.entry)
        assert parsed["type"] == "record.stored" and parsed["record_id"] == stored.record_id
        assert patient_id not in entry.entry.decode() and entry.leaf_hash == tlog.leaf_hash(entry.entry)

        async def covering_checkpoint() -> Any:
            try:
                latest = await public.GetLatestCheckpoint(pb.GetLatestCheckpointRequest())
            except grpc.aio.AioRpcError:
                return None
            return latest if latest.tree_size > entry.index else None

        latest = await eventually(covering_checkpoint, "a checkpoint covering the entry")
        keys = await public.GetVerifierKeys(pb.GetVerifierKeysRequest())
        verifiers = [notes.NoteVerifier.parse(k) for k in keys.verifier_keys]
        checkpoint, _ = notes.open_checkpoint(latest.note, verifiers, origin=keys.origin, require_all=True)

        # Included: by the RFC 9162 proof, and offline from a C2SP tlog-proof.
        proof = await public.GetInclusionProof(
            pb.GetInclusionProofRequest(index=entry.index, tree_size=checkpoint.tree_size)
        )
        assert proof.leaf_hash == entry.leaf_hash
        assert tlog.verify_inclusion(entry.index, checkpoint.tree_size, entry.leaf_hash, proof.hashes, checkpoint.root)
        forged = [bytes(32), *proof.hashes[1:]]
        assert not tlog.verify_inclusion(entry.index, checkpoint.tree_size, entry.leaf_hash, forged, checkpoint.root)
        text = (await public.GetTlogProof(pb.GetTlogProofRequest(index=entry.index))).tlog_proof
        assert text.startswith("c2sp.org/tlog-proof@v1\n")
        offline = notes.verify_tlog_proof(notes.TlogProof.parse(text), entry.leaf_hash, verifiers, origin=keys.origin)
        assert offline.tree_size >= checkpoint.tree_size

        # Consistent with an older signed tree.
        older = await public.GetCheckpoint(pb.GetCheckpointRequest(tree_size=checkpoint.tree_size))
        assert older.note == latest.note
        consistency = await public.GetConsistencyProof(
            pb.GetConsistencyProofRequest(old_size=1, new_size=checkpoint.tree_size)
        )
        first_root = await tlog.tree_root(stack.audit.handle.checkpointer.tiles, 1)
        assert tlog.verify_consistency(1, checkpoint.tree_size, first_root, checkpoint.root, consistency.hashes)
        assert (
            await status_of(public.GetInclusionProof(pb.GetInclusionProofRequest(index=0, tree_size=10**9)))
            == CODE.FAILED_PRECONDITION
        )

        # Entries: the patient's own, an auditor's all, anyone else's nothing.
        own = await audit_as_patient.ListEntries(pb.ListEntriesRequest())
        assert own.entries and all(json.loads(e.entry)["subject"] == parsed["subject"] for e in own.entries)
        assert entry.index in [e.index for e in own.entries]
        someone_else = pb.ListEntriesRequest(patient_id="pat_" + "0" * 32)
        assert await status_of(audit_as_patient.ListEntries(someone_else)) == CODE.PERMISSION_DENIED
        reply = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=rid(), kind=vocab.PrincipalKind.PRINCIPAL_KIND_RESEARCHER)
        )
        researcher = pb_grpc.AuditServiceStub(
            stack.client(reply.principal.principal_id, reply.client_secret).channel(audit_address, "medledger.audit")
        )
        assert await status_of(researcher.ListEntries(pb.ListEntriesRequest())) == CODE.PERMISSION_DENIED
        await admin.AssignRole(
            id_pb.AssignRoleRequest(
                request_id=rid(), principal_id=reply.principal.principal_id, role=vocab.Role.ROLE_AUDITOR
            )
        )
        auditor = pb_grpc.AuditServiceStub(
            stack.client(reply.principal.principal_id, reply.client_secret).channel(audit_address, "medledger.audit")
        )
        everything = await auditor.ListEntries(pb.ListEntriesRequest(page_size=1000))
        assert len(everything.entries) > len(own.entries)
        by_record = await auditor.ListEntries(pb.ListEntriesRequest(record_id=stored.record_id))
        assert [e.index for e in by_record.entries] == [entry.index]
        first_page = await auditor.ListEntries(pb.ListEntriesRequest(page_size=2))
        second_page = await auditor.ListEntries(
            pb.ListEntriesRequest(page_size=2, page_token=first_page.next_page_token)
        )
        assert [e.index for e in first_page.entries] + [e.index for e in second_page.entries] == [
            e.index for e in everything.entries[:4]
        ]

        # The patient's export is a FHIR Bundle of AuditEvents that validates.
        exported = await audit_as_patient.ExportAuditEvents(pb.ExportAuditEventsRequest())
        bundle = Bundle.model_validate_json(exported.fhir_bundle_json)
        assert exported.entries == len(own.entries) == len(bundle.entry)
        assert patient_id not in exported.fhir_bundle_json.decode()
        # Paged: one AuditEvent a page, `entry-<index>` each, the pages in log order.
        first = await audit_as_patient.ExportAuditEvents(pb.ExportAuditEventsRequest(page_size=1))
        rest = await audit_as_patient.ExportAuditEvents(pb.ExportAuditEventsRequest(page_token=first.next_page_token))
        paged = [e["resource"]["id"] for b in (first, rest) for e in json.loads(b.fhir_bundle_json)["entry"]]
        assert first.entries == 1 and first.next_page_token and not rest.next_page_token
        # (Reading is itself logged, so later pages may hold more than the listing had.)
        assert paged[: len(own.entries)] == [f"entry-{e.index}" for e in own.entries]

        # Redaction for retention: the payload goes, the leaf stays, every proof still verifies.
        redact = pb.RedactEntryRequest(request_id=rid(), index=entry.index, reason="retention rule R-7")
        assert await status_of(auditor.RedactEntry(redact)) == CODE.PERMISSION_DENIED
        await admin.AssignRole(
            id_pb.AssignRoleRequest(
                request_id=rid(), principal_id=reply.principal.principal_id, role=vocab.Role.ROLE_PRIVACY_OFFICER
            )
        )
        officer = pb_grpc.AuditServiceStub(
            stack.client(reply.principal.principal_id, reply.client_secret).channel(audit_address, "medledger.audit")
        )
        redacted = await officer.RedactEntry(redact)
        assert redacted.entry.redacted and not redacted.entry.entry and redacted.entry.leaf_hash == entry.leaf_hash
        assert (await officer.RedactEntry(redact)).redaction_index == redacted.redaction_index  # a retry
        again = pb.RedactEntryRequest(request_id=rid(), index=entry.index, reason="again")
        assert await status_of(officer.RedactEntry(again)) == CODE.FAILED_PRECONDITION
        proof = await public.GetInclusionProof(
            pb.GetInclusionProofRequest(index=entry.index, tree_size=checkpoint.tree_size)
        )
        assert tlog.verify_inclusion(entry.index, checkpoint.tree_size, entry.leaf_hash, proof.hashes, checkpoint.root)
        listed = await auditor.ListEntries(pb.ListEntriesRequest(record_id=stored.record_id))
        assert [(e.index, e.redacted, e.leaf_hash) for e in listed.entries] == [(entry.index, True, entry.leaf_hash)]

        async def recorded() -> Any:
            page = await auditor.ListEntries(pb.ListEntriesRequest(page_size=1000))
            return [json.loads(e.entry) for e in page.entries if e.index == redacted.redaction_index]

        (record_of_it,) = await eventually(recorded, "the redaction's entry")
        assert record_of_it["type"] == "entry.redacted" and record_of_it["redacted_index"] == entry.index
        from medledger_audit.verify import verify_log

        checkpointer = stack.audit.handle.checkpointer
        assert (await verify_log(stack.audit.db, checkpointer.verifiers, checkpointer.origin)).ok


async def test_the_log_is_served_as_c2sp_tiles_and_bundles_are_for_auditors(start_stack) -> None:
    import aiohttp

    async with start_stack(records=True, audit=True) as stack:
        assert stack.audit is not None and stack.records is not None
        identity_public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        fhir = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
        patient = await identity_public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
        )
        reply = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=rid(), kind=vocab.PrincipalKind.PRINCIPAL_KIND_RESEARCHER)
        )
        await admin.AssignRole(
            id_pb.AssignRoleRequest(
                request_id=rid(), principal_id=reply.principal.principal_id, role=vocab.Role.ROLE_AUDITOR
            )
        )
        public = pb_grpc.AuditServiceStub(make_channel(f"127.0.0.1:{stack.audit.grpc_port}"))

        async def signed() -> Any:
            try:
                latest = await public.GetLatestCheckpoint(pb.GetLatestCheckpointRequest())
            except grpc.aio.AioRpcError:
                return None
            return latest if latest.tree_size >= 2 else None

        latest = await eventually(signed, "a checkpoint")
        keys = await public.GetVerifierKeys(pb.GetVerifierKeysRequest())
        verifiers = [notes.NoteVerifier.parse(k) for k in keys.verifier_keys]
        base = f"http://127.0.0.1:{stack.audit.http_port}"
        auditor_token = await stack.client(reply.principal.principal_id, reply.client_secret).token("medledger.audit")
        patient_token = await stack.client(patient.principal.principal_id, patient.client_secret).token(
            "medledger.audit"
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/checkpoint") as r:
                checkpoint, _ = notes.open_checkpoint(await r.text(), verifiers, origin=keys.origin)
            assert checkpoint.tree_size >= latest.tree_size

            class HttpTiles:
                async def read_tiles(self, wanted: Any) -> list[bytes]:
                    out = []
                    for tile in wanted:
                        async with http.get(f"{base}/{tile.path()}") as response:
                            assert response.status == 200, tile.path()
                            out.append(await response.read())
                    return out

            # A verifier that has only HTTP recomputes the signed root from the public tiles.
            assert await tlog.tree_root(HttpTiles(), checkpoint.tree_size) == checkpoint.root
            beyond = tlog.Tile(0, 5, 256)
            async with http.get(f"{base}/{beyond.path()}") as r:
                assert r.status == 404
            bundle_path = f"{base}/{tlog.Tile(tlog.ENTRIES_LEVEL, 0, checkpoint.tree_size).path()}"
            async with http.get(bundle_path) as r:
                assert r.status == 401
            async with http.get(bundle_path, headers={"Authorization": f"Bearer {patient_token}"}) as r:
                assert r.status == 403
            async with http.get(bundle_path, headers={"Authorization": f"Bearer {auditor_token}"}) as r:
                assert r.status == 200
                bundle = tlog.decode_entry_bundle(await r.read(), checkpoint.tree_size)
            leaves = (await HttpTiles().read_tiles([tlog.Tile(0, 0, checkpoint.tree_size)]))[0]
            assert b"".join(tlog.leaf_hash(e) for e in bundle) == leaves
