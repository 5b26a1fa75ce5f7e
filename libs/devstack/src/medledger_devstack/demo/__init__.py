"""The medledger story, told through the SDK against a running stack.

A hospital, two of its practitioners, its privacy officer, a patient and a researcher are
registered; the patient grants one doctor read and write of Observations for treatment for 30
days; the doctor stores a blood-pressure Observation and reads it; the researcher is denied; an
emergency practitioner reads it after breaking the glass, and the privacy officer reviews that;
the patient revokes the consent and the doctor is denied; the patient lists who saw their data;
the record's proof is fetched once anchored and verified against the chain and the trust policy;
the latest checkpoint is shown anchored; the patient proves from the chain that the consent they
granted was in force until they revoked it and not since; the patient's erasure is requested, approved and carried
out, and a read then fails while the proof still verifies.

``story.run_story`` does all of it and returns every verification it made; ``medledger demo`` prints
the story as it happens and the table at the end, and the end-to-end test asserts on the result.
Nothing here reaches into a service: only the public gRPC APIs, as any client would use them.

The story is told in chapters: ``care`` (who may see the record), ``proofs`` (who saw it, and the
proofs anchored on chain), ``consent_proof`` (the consent, from ConsentRegistry) and ``erasure``;
``evidence`` writes the files ``--out`` asks for, and ``narrator`` says it all and keeps the
outcomes. ``fhir`` and ``terms`` are the story's synthetic resources and words, ``waiting`` how
it waits for a stack that is eventually consistent.
"""
