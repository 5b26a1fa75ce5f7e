"""Records' event handlers: the erasure participants' confirmations (see erasure_runner.py)."""

from __future__ import annotations

import logging

from medledger.events.v1 import records_events_pb2

from medledger_records.erasure_runner import ErasureRunner
from medledger_runtime.events import unpack
from medledger_runtime.kafka import ConsumedMessage

log = logging.getLogger(__name__)
CONFIRMATION_CONSUMER = "records.erasure-confirmations"
_DESTROYED = records_events_pb2.PatientKeysDestroyed.DESCRIPTOR.full_name


class ErasureConfirmationHandler:
    """Stores each participant's PatientKeysDestroyed (the first; redeliveries change nothing)
    and completes the erasure once every present participant has confirmed."""

    def __init__(self, runner: ErasureRunner) -> None:
        self.runner = runner

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is None or event.type != _DESTROYED:
            return
        confirmation = unpack(event, records_events_pb2.PatientKeysDestroyed)
        assert isinstance(confirmation, records_events_pb2.PatientKeysDestroyed)
        # A participant confirms for itself, on its own topic.
        if event.source != f"medledger.{confirmation.participant}":
            log.warning(
                "erasure confirmation ignored: its source is not the participant it names",
                extra={"erasure_id": confirmation.erasure_id, "source": event.source[:100]},
            )
            return
        await self.runner.confirm(confirmation)
