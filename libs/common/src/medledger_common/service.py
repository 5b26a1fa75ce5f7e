"""The runtime that wires a service together: the same shape for all five services.

A service's ``main`` builds a ``ServiceRuntime`` with its settings, migrations, gRPC servicers
and event handlers; the runtime starts logging, telemetry, the database, Kafka, the outbox
relay, the consumers and the gRPC server, reports SERVING, and on SIGTERM or SIGINT reports
NOT_SERVING, drains calls, and stops everything in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer

from medledger_common.db import Database, Migration
from medledger_common.grpc_server import GrpcServer, TLSFiles
from medledger_common.kafka import EventConsumer, Handler, make_producer
from medledger_common.logs import configure_logging
from medledger_common.outbox import COMMON_MIGRATIONS, OutboxRelay
from medledger_common.settings import ServiceSettings
from medledger_common.telemetry import configure_tracing, start_metrics_server

log = logging.getLogger(__name__)


@dataclass
class ConsumerSpec:
    """An event handler and what it listens to."""

    group_id: str
    handler: Handler
    topics: Sequence[str] = ()
    pattern: str | None = None
    accept_malformed: bool = False


@dataclass
class ServiceParts:
    """What a service contributes to the runtime; built by its ``wiring`` from the runtime."""

    service_descriptors: Sequence[Any]
    register: Callable[[grpc.aio.Server], None]
    consumers: Sequence[ConsumerSpec] = ()
    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()
    on_stop: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=list)


class ServiceRuntime:
    def __init__(self, name: str, settings: ServiceSettings, migrations: Sequence[Migration]) -> None:
        self.name = name
        self.settings = settings
        self.migrations = migrations
        self.db = Database(settings.database_url)
        self.producer: AIOKafkaProducer = make_producer(settings.kafka_bootstrap_servers)
        self.relay = OutboxRelay(
            self.db,
            self.producer,
            service=name,
            bootstrap_servers=settings.kafka_bootstrap_servers,
            poll_seconds=settings.outbox_poll_seconds,
            retention_seconds=settings.outbox_retention_seconds,
        )
        self.server: GrpcServer | None = None
        self.grpc_port = 0
        self.metrics_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._consumers: list[EventConsumer] = []
        self._stopping = asyncio.Event()

    @property
    def source(self) -> str:
        """The CloudEvents source of this service's events."""
        return f"medledger.{self.name}"

    async def start(self, build: Callable[[ServiceRuntime], ServiceParts]) -> None:
        s = self.settings
        configure_tracing(self.name, s.trace_sampling_ratio, s.otlp_endpoint)
        self.metrics_port = start_metrics_server(s.grpc_host, s.metrics_port)
        for step in await self.db.migrate("common", COMMON_MIGRATIONS):
            log.info("migration applied", extra={"migration": step})
        for step in await self.db.migrate(self.name, self.migrations):
            log.info("migration applied", extra={"migration": step})
        await _retry_until_up("Kafka", self.producer.start)
        parts = build(self)
        self._on_stop = list(parts.on_stop)
        for spec in parts.consumers:
            consumer = EventConsumer(
                bootstrap_servers=s.kafka_bootstrap_servers,
                group_id=spec.group_id,
                handler=spec.handler,
                producer=self.producer,
                topics=spec.topics,
                pattern=spec.pattern,
                accept_malformed=spec.accept_malformed,
            )
            await _retry_until_up("Kafka consumer", consumer.start)
            self._consumers.append(consumer)
            self._tasks.append(asyncio.create_task(consumer.run(), name=f"consumer:{spec.group_id}"))
        self._tasks.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
        for job in parts.background:
            self._tasks.append(asyncio.create_task(job(), name=getattr(job, "__name__", "background")))
        tls = TLSFiles(s.tls_cert_file, s.tls_key_file, s.tls_ca_file) if s.tls_cert_file and s.tls_key_file else None
        self.server = GrpcServer(
            host=s.grpc_host,
            port=s.grpc_port,
            max_message_bytes=s.grpc_max_message_bytes,
            service_descriptors=parts.service_descriptors,
            register=parts.register,
            interceptors=parts.interceptors,
            tls=tls,
        )
        self.grpc_port = await self.server.start()
        await self.server.set_serving(True)
        for t in self._tasks:
            t.add_done_callback(self._task_done)
        log.info(
            "service started",
            extra={"grpc_port": self.grpc_port, "metrics_port": self.metrics_port, "tls": tls is not None},
        )

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping.is_set():
            return
        exc = task.exception()
        log.error("background task stopped, shutting down", extra={"task": task.get_name(), "error": repr(exc)})
        self._stopping.set()

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace_seconds)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self._consumers:
            await c.stop()
        for hook in getattr(self, "_on_stop", []):
            await hook()
        await self.producer.stop()
        await self.db.close()
        log.info("service stopped")


async def _retry_until_up(what: str, start: Callable[[], Awaitable[None]], attempts: int = 60) -> None:
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            await start()
            return
        except Exception as exc:
            if attempt == attempts:
                raise
            log.warning(f"{what} not reachable yet, retrying", extra={"error": type(exc).__name__})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def run_service(
    name: str,
    settings: ServiceSettings,
    migrations: Sequence[Migration],
    build: Callable[[ServiceRuntime], ServiceParts],
) -> None:
    """Run a service until SIGTERM or SIGINT; the body of every service's ``main``."""
    configure_logging(name, settings.log_level)

    async def _main() -> None:
        runtime = ServiceRuntime(name, settings, migrations)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.request_stop)
        try:
            await runtime.start(build)
            await runtime.wait()
        finally:
            await runtime.stop()

    asyncio.run(_main())
