"""gRPC client channels: TLS or mTLS from files, trace context carried in metadata."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import propagate


def with_metadata(details: grpc.aio.ClientCallDetails, pairs: Sequence[tuple[str, str]]) -> grpc.aio.ClientCallDetails:
    """`details` with `pairs` added to its metadata: how client interceptors add headers."""
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in pairs:
        metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TraceContextInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Puts the current W3C trace context (``traceparent``) into the call's metadata."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if carrier:
            client_call_details = with_metadata(client_call_details, list(carrier.items()))
        return await continuation(client_call_details, request)


def make_channel(
    target: str,
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    max_message_bytes: int = 8 * 1024 * 1024,
    server_name_override: str | None = None,
    propagate_trace: bool = True,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel; TLS when ``ca_file`` is given, mTLS when a client cert is too."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if server_name_override:
        options.append(("grpc.ssl_target_name_override", server_name_override))
    chain: list[grpc.aio.ClientInterceptor] = [_TraceContextInterceptor()] if propagate_trace else []
    chain.extend(interceptors)
    if ca_file is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=chain)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=chain)
