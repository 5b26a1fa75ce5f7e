"""Errors as a FHIR client sees them: each service status (and reason) as its HTTP status and
OperationOutcome, and the gateway's admission limit."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from grpc.aio import Metadata

from medledger_fhir.admission import Admission
from medledger_fhir.outcomes import FhirError, answer_errors, from_rpc_error
from medledger_runtime.errors import (
    ERASED,
    TOO_LARGE,
    VERSION_CONFLICT,
    FailedPrecondition,
    InvalidArgument,
    MedledgerError,
    PermissionDenied,
    ResourceExhausted,
)
from medledger_runtime.grpc_server import status_for
from medledger_runtime.http_server import HttpRoute
from medledger_sdk.calls import RpcError


def rpc_error(error: MedledgerError) -> RpcError:
    """The error a client of the service gets for `error`, details and all."""
    status = status_for(error)
    raw = grpc.aio.AioRpcError(status.code, Metadata(), Metadata(*status.trailing_metadata), status.details)
    return RpcError(raw)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidArgument.field("patient_id", "required"), 400),
        (PermissionDenied("consent NO_CONSENT: none", reason="NO_CONSENT"), 403),
        (FailedPrecondition("this patient's records were erased", reason=ERASED), 410),
        (FailedPrecondition("version 3 is the latest", reason=VERSION_CONFLICT), 412),
        (FailedPrecondition("something else"), 409),
        (ResourceExhausted("a record is at most 4 MiB", reason=TOO_LARGE), 413),
        (ResourceExhausted("break-glass limit reached"), 429),
    ],
)
def test_each_service_error_answers_its_http_status(error: MedledgerError, status: int) -> None:
    assert from_rpc_error(rpc_error(error)).status == status


async def test_a_denial_is_an_operation_outcome_naming_consents_reason() -> None:
    @answer_errors
    async def denied(request: web.Request) -> web.StreamResponse:
        raise rpc_error(PermissionDenied("consent NO_CONSENT: nothing applies", reason="NO_CONSENT"))

    response = await denied(make_mocked_request("GET", "/fhir/R4/Observation/1"))
    assert isinstance(response, web.Response) and response.status == 403
    assert response.content_type == "application/fhir+json"
    assert response.text is not None
    issue = json.loads(response.text)["issue"][0]
    assert issue["code"] == "forbidden" and issue["details"]["coding"][0]["code"] == "NO_CONSENT"


async def test_a_bad_field_names_its_expression() -> None:
    @answer_errors
    async def bad(request: web.Request) -> web.StreamResponse:
        raise FhirError(422, "no subject", expression=("Observation.subject",))

    response = await bad(make_mocked_request("POST", "/fhir/R4/Observation"))
    assert response.status == 422 and isinstance(response, web.Response) and response.text is not None
    assert json.loads(response.text)["issue"][0]["expression"] == ["Observation.subject"]


async def test_admission_refuses_beyond_its_limit_with_retry_after() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="done")

    route = Admission(max_in_flight=2).wrap(HttpRoute.get("/x", slow))
    busy = [asyncio.create_task(route.handler(make_mocked_request("GET", "/x"))) for _ in range(2)]
    await asyncio.sleep(0)
    refused = await route.handler(make_mocked_request("GET", "/x"))
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    release.set()
    assert [r.status for r in await asyncio.gather(*busy)] == [200, 200]
    # Room again once they finished.
    release.set()
    assert (await route.handler(make_mocked_request("GET", "/x"))).status == 200
