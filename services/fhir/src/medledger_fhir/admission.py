"""Admission: at most so many requests in the gateway at once; beyond that, 429 at once.

A request waiting on the services holds memory and a connection to them; answering
``429 Too Many Requests`` with ``Retry-After`` while the gateway is full keeps a burst from
piling up behind the services (FHIR clients retry on 429), instead of queueing without bound.
"""

from __future__ import annotations

from dataclasses import replace

from aiohttp import web
from prometheus_client import Counter

from medledger_fhir.outcomes import outcome_response
from medledger_runtime.http_server import HttpRoute

REFUSED = Counter("medledger_fhir_requests_refused_total", "Requests answered 429 because the gateway was full.")


class Admission:
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    def wrap(self, route: HttpRoute) -> HttpRoute:
        handler = route.handler

        async def admitted(request: web.Request) -> web.StreamResponse:
            if self.in_flight >= self.max_in_flight:
                REFUSED.inc()
                return outcome_response(429, "the gateway is busy; retry after the time in Retry-After")
            self.in_flight += 1
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1

        return replace(route, handler=admitted)
