"""Channels from one service to another: the SDK's channel with this service's TLS files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

from medledger_runtime.settings import ServiceSettings
from medledger_sdk.channels import make_channel


def client_tls_files(settings: ServiceSettings) -> dict[str, Path | None]:
    """``make_channel``'s TLS arguments for calls from this service to another: when
    ``MEDLEDGER_TLS_CA_FILE`` is set, the server must prove itself with a certificate of that CA,
    and this service presents its own certificate (mTLS) if it has one — the same files its
    server uses. Without a CA file, none: the channel is plaintext."""
    ca = settings.tls_ca_file
    return {
        "ca_file": ca,
        "cert_file": settings.tls_cert_file if ca else None,
        "key_file": settings.tls_key_file if ca else None,
    }


def service_channel(
    settings: ServiceSettings, target: str, *, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()
) -> grpc.aio.Channel:
    """A channel from this service to another (consent, audit), with ``client_tls_files``."""
    tls = client_tls_files(settings)
    return make_channel(
        target,
        ca_file=tls["ca_file"],
        cert_file=tls["cert_file"],
        key_file=tls["key_file"],
        max_message_bytes=settings.grpc_max_message_bytes,
        interceptors=interceptors,
    )
