"""Access tokens for SDK users: fetched with a principal's client secret, refreshed before they
expire, and attached to every call on the channels this client makes.

    tokens = TokenClient("127.0.0.1:50051", "prn_…", client_secret="mlsec_…")
    records = RecordsServiceStub(tokens.channel("127.0.0.1:50053", "medledger.records"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from medledger_sdk.channels import make_channel
from medledger_sdk.identity_link import BearerTokenInterceptor, IdentityLink


class TokenClient:
    def __init__(
        self,
        identity_address: str,
        principal_id: str,
        *,
        client_secret: str | None = None,
        secret_file: Path | None = None,
    ) -> None:
        self.identity_address = identity_address
        self.link = IdentityLink(identity_address, principal_id, secret=client_secret, secret_file=secret_file)
        self._channels: list[grpc.aio.Channel] = []

    @property
    def principal_id(self) -> str:
        return self.link.principal_id

    async def token(self, audience: str) -> str:
        """A valid token for `audience` (``medledger.<service>``), fetched or refreshed as needed."""
        return await self.link.token(audience)

    def channel(self, target: str, audience: str, **options: Any) -> grpc.aio.Channel:
        """A channel to `target` whose calls carry this principal's token for `audience`."""
        channel = make_channel(target, interceptors=[BearerTokenInterceptor(self.link, audience)], **options)
        self._channels.append(channel)
        return channel

    async def aclose(self) -> None:
        for channel in self._channels:
            await channel.close()
        await self.link.aclose()

    async def __aenter__(self) -> TokenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
