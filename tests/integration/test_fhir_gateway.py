"""The FHIR gateway in front of the services: what it says it supports, and its errors as
OperationOutcomes."""

from __future__ import annotations

from typing import Any

import aiohttp

from medledger_sdk.auth import TokenClient


async def fetch(url: str, token: str | None = None, **kw: Any) -> tuple[int, dict[str, Any], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers, **kw) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


async def test_metadata_and_smart_configuration_and_errors(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack:
        base = stack.fhir_base
        status, headers, body = await fetch(f"{base}/metadata")
        assert status == 200 and headers["Content-Type"].startswith("application/fhir+json")
        assert body["resourceType"] == "CapabilityStatement" and body["fhirVersion"] == "4.0.1"
        status, _, smart = await fetch(f"{base}/.well-known/smart-configuration")
        assert status == 200
        assert smart["token_endpoint"].endswith("/oauth2/token")
        assert "private_key_jwt" in smart["token_endpoint_auth_methods_supported"]
        # An unknown path: 404, as an OperationOutcome.
        status, _, outcome = await fetch(f"{base}/NoSuchType/1")
        assert status == 404 and outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "not-found"
        # A token for the gateway is issued for it and the services behind it.
        admin: TokenClient = stack.admin()
        token = await admin.token("medledger.fhir")
        assert token
