"""The runtime's HTTP server: declared routes served, the gRPC authentication on authenticated
routes, the body limit, metrics and a span per request, and a stop that drains in-flight requests.
Most tests run the server alone; one runs it inside a ServiceRuntime, as a service's main does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from medledger_devstack.testing import Kafka, TokenIssuer, b64u, span_exporter
from medledger_runtime.auth import Access, DeactivationSet, TokenVerifier, authenticate_bearer, current_caller
from medledger_runtime.errors import Unavailable
from medledger_runtime.http_server import HttpRoute, HttpServer, authenticate
from medledger_runtime.parts import AuthSources, ServiceParts
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.settings import ServiceSettings

NOW = 1_800_000_000
MAX_BODY = 1024


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello {request.match_info['name']}", headers={"Cache-Control": "no-cache"})


async def whoami(request: web.Request) -> web.Response:
    caller = current_caller()
    return web.json_response({"principal": caller.principal_id, "roles": sorted(caller.roles)})


UPLOADS: list[int] = []


async def upload(request: web.Request) -> web.Response:
    UPLOADS.append(1)
    return web.Response(text=str(len(await request.read())))


async def partly_open(request: web.Request) -> web.Response:
    """Public, but asks for a token itself, as audit's entry bundles do."""
    caller = await authenticate(request)
    return web.Response(text=caller.principal_id)


async def broken(request: web.Request) -> web.Response:
    raise Unavailable("the database is unavailable")


ROUTES = [
    HttpRoute.get("/hello/{name}", hello, public=True),
    HttpRoute.get("/me", whoami),
    HttpRoute.get("/audits", whoami, access=Access.of(roles=["auditor"])),
    HttpRoute("POST", "/upload", upload, public=True),
    HttpRoute.get("/partly-open", partly_open, public=True),
    HttpRoute.get("/broken", broken, public=True),
]


class Served:
    def __init__(self, server: HttpServer, issuer: TokenIssuer, deactivated: DeactivationSet) -> None:
        self.server = server
        self.issuer = issuer
        self.deactivated = deactivated
        self.base = f"http://127.0.0.1:{server.port}"


async def serve(routes: list[HttpRoute], grace: float = 5.0) -> Served:
    issuer = TokenIssuer(now=NOW)
    verifier = TokenVerifier(
        issuer="medledger.identity", audience="medledger.consent", fetch_jwks=issuer.fetch, clock=lambda: NOW + 10
    )
    deactivated = DeactivationSet()

    async def authenticate_header(authorization: str | None) -> Any:
        return await authenticate_bearer(authorization, verifier, deactivated)

    server = HttpServer(
        routes,
        host="127.0.0.1",
        port=0,
        authenticate=authenticate_header,
        max_body_bytes=MAX_BODY,
        shutdown_grace_seconds=grace,
    )
    await server.start()
    return Served(server, issuer, deactivated)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    span_exporter()  # a sampling tracer provider before the server asks for its tracer
    s = await serve(ROUTES)
    try:
        yield s
    finally:
        await s.server.stop()


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, str, Mapping[str, str]]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as response:
        return response.status, await response.text(), response.headers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_declared_route_is_served_with_its_headers_and_head_too(served: Served) -> None:
    assert served.server.port > 0
    status, body, headers = await fetch("GET", f"{served.base}/hello/world")
    assert (status, body, headers["Cache-Control"]) == (200, "hello world", "no-cache")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    status, body, _ = await fetch("HEAD", f"{served.base}/hello/world")
    assert (status, body) == (200, "")
    assert (await fetch("GET", f"{served.base}/nowhere"))[0] == 404
    assert (await fetch("DELETE", f"{served.base}/hello/world"))[0] == 405


async def test_an_authenticated_route_refuses_without_a_valid_token(served: Served) -> None:
    issuer = served.issuer
    head, _, signature = issuer.token().split(".")
    forged_claims = json.dumps(issuer.claims(roles=["admin"])).encode()
    refused = {
        "no header": {},
        "not bearer": {"Authorization": f"Basic {issuer.token()}"},
        "empty bearer": {"Authorization": "Bearer "},
        "expired": bearer(issuer.token(iat=NOW - 2000, nbf=NOW - 2000, exp=NOW - 1000)),
        "another audience": bearer(issuer.token(aud="medledger.records")),
        "bad signature": bearer(f"{head}.{b64u(forged_claims)}.{signature}"),
        "not a token": bearer("not-a-jwt"),
    }
    for why, headers in refused.items():
        status, body, response_headers = await fetch("GET", f"{served.base}/me", headers=headers)
        assert status == 401, why
        assert response_headers["WWW-Authenticate"] == "Bearer", why
        assert "rsr_1" not in body, why

    status, body, _ = await fetch("GET", f"{served.base}/me", headers=bearer(issuer.token()))
    assert status == 200
    assert json.loads(body) == {"principal": "rsr_1", "roles": ["pdp-client"]}

    # The access rule, as in a gRPC access table: the caller's roles do not include auditor.
    assert (await fetch("GET", f"{served.base}/audits", headers=bearer(issuer.token())))[0] == 403
    status, body, _ = await fetch("GET", f"{served.base}/audits", headers=bearer(issuer.token(roles=["auditor"])))
    assert (status, json.loads(body)["roles"]) == (200, ["auditor"])

    # A deactivated principal's still-valid token is refused from then on.
    token = issuer.token(sub="rsr_2")
    assert (await fetch("GET", f"{served.base}/me", headers=bearer(token)))[0] == 200
    served.deactivated.add("rsr_2")
    assert (await fetch("GET", f"{served.base}/me", headers=bearer(token)))[0] == 401


async def test_a_public_route_may_authenticate_a_request_itself(served: Served) -> None:
    status, body, headers = await fetch("GET", f"{served.base}/partly-open")
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    assert body == "this request needs an access token (Authorization: Bearer …)\n"
    status, body, _ = await fetch("GET", f"{served.base}/partly-open", headers=bearer(served.issuer.token()))
    assert (status, body) == (200, "rsr_1")


async def test_an_oversize_body_is_refused_with_413(served: Served) -> None:
    url = f"{served.base}/upload"
    assert (await fetch("POST", url, data=b"x" * MAX_BODY))[:2] == (200, str(MAX_BODY))
    uploads = len(UPLOADS)
    # Its length declared: refused before the handler runs.
    assert (await fetch("POST", url, data=b"x" * (MAX_BODY + 1)))[0] == 413
    assert len(UPLOADS) == uploads

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 512

    # No length (chunked): refused as the handler reads past the limit.
    assert (await fetch("POST", url, data=chunks()))[0] == 413


async def test_errors_map_to_statuses_without_detail_beyond_the_message(served: Served) -> None:
    status, body, _ = await fetch("GET", f"{served.base}/broken")
    assert (status, body) == (503, "the database is unavailable\n")


def requests_counted(method: str, route: str, status: str) -> float:
    labels = {"http_request_method": method, "http_route": route, "http_response_status_code": status}
    return REGISTRY.get_sample_value("http_server_requests_total", labels) or 0.0


def seconds_observed(method: str, route: str) -> float:
    labels = {"http_request_method": method, "http_route": route}
    return REGISTRY.get_sample_value("http_server_request_duration_seconds_count", labels) or 0.0


async def test_a_malformed_request_is_logged_without_its_content(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp's parser errors quote the line they stopped at: a search's parameters, a token.
    secret = "pat_SECRET_NAME_Jane_Doe"
    oversize = "a" * 9000
    requests = (
        f"GET /hello/x?name={secret}{oversize} HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /hello/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}{oversize}\r\n\r\n",
        f"G\x00T /hello/{secret} HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    with caplog.at_level("DEBUG"):
        for raw in requests:
            reader, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
            writer.write(raw.encode())
            await writer.drain()
            answer = await reader.read(65536)
            writer.close()
            assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    logged = [(r.levelname, r.getMessage(), caplog.handler.format(r)) for r in caplog.records]
    assert not [line for line in logged if secret in line[2]], "a malformed request's content was logged"
    refused = [(level, message) for level, message, _ in logged if "malformed HTTP request" in message]
    assert len(refused) == len(requests)
    assert ("WARNING", "refused a malformed HTTP request: LineTooLong (400)") in refused
    assert not [line for line in logged if line[0] in ("ERROR", "CRITICAL")]
    # The server goes on serving.
    async with aiohttp.ClientSession() as http, http.get(f"{served.base}/hello/again") as response:
        assert response.status == 200


async def test_a_request_is_counted_by_route_and_status_and_traced(served: Served) -> None:
    route = "/hello/{name}"
    # Created at zero with the server, so rate() works before the first request.
    assert (
        REGISTRY.get_sample_value(
            "http_server_requests_total",
            {"http_request_method": "GET", "http_route": "/me", "http_response_status_code": "500"},
        )
        == 0.0
    )
    ok, refused, timed = (
        requests_counted("GET", route, "200"),
        requests_counted("GET", "/me", "401"),
        seconds_observed("GET", route),
    )
    unmatched = requests_counted("GET", "unmatched", "404")
    exporter = span_exporter()
    exporter.clear()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    await fetch("GET", f"{served.base}/hello/someone", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    await fetch("GET", f"{served.base}/me")
    await fetch("GET", f"{served.base}/no/such/path")

    assert requests_counted("GET", route, "200") == ok + 1
    assert requests_counted("GET", "/me", "401") == refused + 1
    assert seconds_observed("GET", route) == timed + 1
    # Unmatched paths share one label: a scanner cannot grow the metric's series.
    assert requests_counted("GET", "unmatched", "404") == unmatched + 1

    spans = {s.name: s for s in exporter.get_finished_spans()}
    span = spans[f"GET {route}"]
    assert span.kind == SpanKind.SERVER
    assert span.context is not None and span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (int(trace_id, 16), int(parent_id, 16))
    assert span.attributes is not None
    assert span.attributes["http.route"] == route and span.attributes["http.response.status_code"] == 200
    # The path (here with "someone" in it) is not recorded, only the route.
    assert all("someone" not in str(v) for v in span.attributes.values())
    assert spans["GET /me"].attributes["http.response.status_code"] == 401  # type: ignore[index]
    assert spans["GET /me"].parent is None  # no traceparent: a trace of its own


async def test_stop_drains_an_in_flight_request_and_accepts_no_new_connection() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="finished")

    s = await serve([HttpRoute.get("/slow", slow, public=True)], grace=10.0)
    in_flight = asyncio.create_task(fetch("GET", f"{s.base}/slow"))
    await asyncio.wait_for(entered.wait(), 5)
    stopping = asyncio.create_task(s.server.stop())
    await asyncio.sleep(0.2)
    assert not stopping.done(), "stop returned while a request was in flight"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", s.server.port)
    release.set()
    status, body, _ = await asyncio.wait_for(in_flight, 5)
    assert (status, body) == (200, "finished")
    await asyncio.wait_for(stopping, 5)


@pytest.mark.parametrize("grace", [0.3, 0.0])
async def test_stop_gives_up_on_a_request_after_the_grace_period(grace: float) -> None:
    entered = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.Event().wait()
        return web.Response()

    s = await serve([HttpRoute.get("/stuck", stuck, public=True)], grace=grace)
    in_flight = asyncio.create_task(fetch("GET", f"{s.base}/stuck"))
    await asyncio.wait_for(entered.wait(), 5)
    t0 = time.monotonic()
    await asyncio.wait_for(s.server.stop(), 5)
    assert time.monotonic() - t0 < 3
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(in_flight, 5)


async def test_the_runtime_serves_the_routes_its_parts_declare_and_drains_them_on_stop(
    kafka: Kafka, tmp_path: Path
) -> None:
    issuer = TokenIssuer(now=time.time(), audience="medledger.consent")
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text=f"finished for {current_caller().principal_id}")

    async def nobody() -> list[str]:
        return []

    def build(runtime: ServiceRuntime[None]) -> ServiceParts[None]:
        return ServiceParts(
            service_descriptors=[],
            register=lambda server: None,
            access={},
            handle=None,
            auth=AuthSources(fetch_jwks=issuer.fetch, load_deactivated=nobody),
            http_routes=[HttpRoute.get("/hello/{name}", hello, public=True), HttpRoute.get("/slow", slow)],
        )

    settings = ServiceSettings(
        grpc_port=0,
        metrics_port=0,
        http_port=0,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'consent.db'}",
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        shutdown_grace_seconds=10,
    )
    runtime: ServiceRuntime[None] = ServiceRuntime("consent", settings, [])
    stopping: asyncio.Task[None] | None = None
    try:
        await runtime.start(build)
        base = f"http://127.0.0.1:{runtime.http_port}"
        assert runtime.http_port not in (0, runtime.grpc_port, runtime.metrics_port)
        assert (await fetch("GET", f"{base}/hello/runtime"))[:2] == (200, "hello runtime")
        assert (await fetch("GET", f"{base}/slow"))[0] == 401
        in_flight = asyncio.create_task(fetch("GET", f"{base}/slow", headers=bearer(issuer.token())))
        await asyncio.wait_for(entered.wait(), 5)
        stopping = asyncio.create_task(runtime.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done()
        release.set()
        assert (await asyncio.wait_for(in_flight, 5))[:2] == (200, "finished for rsr_1")
    finally:
        release.set()
        await asyncio.wait_for(stopping or runtime.stop(), 15)
