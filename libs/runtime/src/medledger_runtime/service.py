"""The runtime that wires a service together: the same shape for all five services.

A service's ``main`` builds a ``ServiceRuntime`` with its settings, migrations, gRPC servicers,
HTTP routes and event handlers; the runtime starts logging, telemetry, the database, Kafka, the
outbox relay, the consumers, the HTTP server (when the service has routes) and the gRPC server,
reports SERVING, and on SIGTERM or SIGINT reports NOT_SERVING, drains calls and requests, and
stops everything in reverse order.

A stateless component (``stateless=True``: a gateway that only calls the services) gets the same
gRPC and HTTP serving, authentication, telemetry and graceful stop without a database, an outbox
or Kafka: it has no migrations, consumers or events of its own, and it follows deactivated
principals by reloading them from identity every ``STATELESS_DEACTIVATION_RELOAD_SECONDS`` (the
services it calls check each token against identity's events within a second anyway).

What a service hands the runtime is ``parts.ServiceParts``; its ``handle`` (the service's own
objects, a frozen dataclass of its main) the runtime, a ``ServiceRuntime[H]``, keeps as
``runtime.handle`` for tests and benchmarks. Migrations and opening the key managers, which come
before a service builds its parts, are in ``startup``. (Still a little over 400 lines: one object,
a service's life from start to stop in the order it happens, reads best in one file.)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Literal, TypeVar

from aiokafka import AIOKafkaProducer
from medledger.events.v1 import identity_events_pb2

from medledger_runtime.auth import AuthInterceptor, Caller, DeactivationSet, TokenVerifier, authenticate_bearer
from medledger_runtime.db import Database, Migration
from medledger_runtime.disclosures import DisclosureInterceptor, disclosing_methods
from medledger_runtime.errors import Unauthenticated
from medledger_runtime.events import TOPICS, unpack
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.grpc_client import client_tls_files
from medledger_runtime.grpc_server import GrpcServer, TLSFiles
from medledger_runtime.http_server import HttpServer
from medledger_runtime.kafka import ConsumedMessage, make_producer
from medledger_runtime.kafka_consumer import EventConsumer
from medledger_runtime.keys import KeyManager, KeyShredder
from medledger_runtime.logs import configure_logging
from medledger_runtime.outbox_relay import OutboxRelay
from medledger_runtime.parts import AuthSources, H, ServiceParts
from medledger_runtime.retry import Attempts, retry, supervised
from medledger_runtime.settings import ConfigError, ServiceSettings
from medledger_runtime.startup import (
    apply_migrations,
    check_migrated,
    migrate_only,
    open_key_manager,
    open_side_key_manager,
)
from medledger_runtime.telemetry import configure_tracing, start_metrics_server
from medledger_runtime.vocabulary import service_principal_id
from medledger_sdk.identity_link import TOKEN_ISSUER, IdentityLink

log = logging.getLogger(__name__)
_DEACTIVATED = identity_events_pb2.PrincipalDeactivated.DESCRIPTOR.full_name
_KEY_ROTATED = identity_events_pb2.SigningKeyRotated.DESCRIPTOR.full_name
STATELESS_DEACTIVATION_RELOAD_SECONDS = 5.0


class ServiceRuntime(Generic[H]):
    def __init__(
        self, name: str, settings: ServiceSettings, migrations: Sequence[Migration], *, stateless: bool = False
    ) -> None:
        self.name = name
        self.settings = settings
        self.migrations = migrations
        self.stateless = stateless
        if stateless and migrations:
            raise ConfigError(f"{name} is stateless: it has no database to migrate")
        self._db: Database | None = None
        self._producer: AIOKafkaProducer | None = None
        self._relay: OutboxRelay | None = None
        if not stateless:
            self._db = Database(settings.database_url, pool_size=settings.database_pool_size)
            self._producer = make_producer(settings.kafka_bootstrap_servers)
            self._relay = OutboxRelay(
                self._db,
                self._producer,
                service=name,
                bootstrap_servers=settings.kafka_bootstrap_servers,
                poll_seconds=settings.outbox_poll_seconds,
                retention_seconds=settings.outbox_retention_seconds,
            )
        self.keys: KeyManager | None = None
        self._shredder: KeyShredder | None = None
        self._legacy_keys: KeyManager | None = None
        self._side_keys: list[KeyManager] = []
        # What the service's build returned, once started.
        self._parts: ServiceParts[H] | None = None
        # Principals whose tokens every call refuses; loaded before SERVING, kept current.
        self.deactivated = DeactivationSet()
        self._identity: IdentityLink | None = None
        self._verifier: TokenVerifier | None = None
        self.server: GrpcServer | None = None
        self.grpc_port = 0
        self.http: HttpServer | None = None
        # 0 while the service has no HTTP routes (then it listens on no HTTP port).
        self.http_port = 0
        self.metrics_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._consumers: list[EventConsumer] = []
        self._stopping = asyncio.Event()
        self._disclosure_commit: OutboxGroupCommit | None = None

    @property
    def db(self) -> Database:
        if self._db is None:
            raise ConfigError(f"{self.name} is stateless: it has no database")
        return self._db

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise ConfigError(f"{self.name} is stateless: it sends no events")
        return self._producer

    @property
    def relay(self) -> OutboxRelay:
        if self._relay is None:
            raise ConfigError(f"{self.name} is stateless: it has no outbox")
        return self._relay

    @property
    def source(self) -> str:
        """The CloudEvents source of this service's events."""
        return f"medledger.{self.name}"

    @property
    def handle(self) -> H:
        """The service's own objects as its build made them (its main's ``<Name>Parts``)."""
        if self._parts is None:
            raise RuntimeError(f"{self.name} has not started: its parts are built at start")
        return self._parts.handle

    async def start(self, build: Callable[[ServiceRuntime[H]], ServiceParts[H]]) -> None:
        s = self.settings
        configure_tracing(self.name, s.trace_sampling_ratio, s.otlp_endpoint)
        self.metrics_port = start_metrics_server(s.grpc_host, s.metrics_port)
        if not self.stateless:
            # The database may still be starting (or restarting): wait for it as for Kafka.
            if s.migrations == "check":
                await _retry_until_up(
                    "database", lambda: check_migrated(self.db, self.name, self.migrations), only_outages=True
                )
            else:
                await _retry_until_up(
                    "database", lambda: apply_migrations(self.db, self.name, self.migrations), only_outages=True
                )
            await _retry_until_up("Kafka", self.producer.start)
        self.keys = await open_key_manager(s, self.name)
        parts = build(self)
        self._parts = parts
        if self.stateless and parts.consumers:
            raise ConfigError(f"{self.name} is stateless: it consumes no events")
        for spec in parts.consumers:
            consumer = EventConsumer(
                bootstrap_servers=s.kafka_bootstrap_servers,
                group_id=spec.group_id,
                handler=spec.handler,
                producer=self.producer,
                topics=spec.topics,
                pattern=spec.pattern,
                accept_malformed=spec.accept_malformed,
                name=spec.name,
                fetch_max_wait_ms=spec.fetch_max_wait_ms,
            )
            await _retry_until_up("Kafka consumer", consumer.start)
            self._consumers.append(consumer)
            task_name = f"consumer:{consumer.name}"
            self._tasks.append(asyncio.create_task(supervised(task_name, consumer.run), name=task_name))
        # After the consumers: a hook that loads a view in full then misses no event. A hook may
        # need the key manager (signing keys made on first start), which may be sealed or
        # restarting: wait for it as for the database, rather than exit.
        for hook in parts.on_start:
            await _retry_until_up("a start-up step's dependency", hook, only_outages=True)
        if self._relay is not None:
            self._tasks.append(asyncio.create_task(supervised("outbox-relay", self._relay.run), name="outbox-relay"))
        for job in parts.background:
            name = getattr(job, "__name__", "background")
            self._tasks.append(asyncio.create_task(supervised(name, job), name=name))
        auth = await self._start_authentication(parts)
        disclosures = self._disclosure_interceptors(parts)
        tls = TLSFiles(s.tls_cert_file, s.tls_key_file, s.tls_ca_file) if s.tls_cert_file and s.tls_key_file else None
        self.server = GrpcServer(
            host=s.grpc_host,
            port=s.grpc_port,
            max_message_bytes=s.grpc_max_message_bytes,
            service_descriptors=parts.service_descriptors,
            register=parts.register,
            interceptors=[auth, *parts.interceptors, *disclosures],
            tls=tls,
        )
        if parts.http_routes:
            # Before gRPC reports SERVING: a client that sees the service up finds its HTTP too.
            self.http = HttpServer(
                parts.http_routes,
                host=s.grpc_host,
                port=s.http_port,
                authenticate=self.authenticate_bearer,
                max_body_bytes=s.http_max_body_bytes,
                shutdown_grace_seconds=s.shutdown_grace_seconds,
                render_error=parts.http_error_renderer,
            )
            self.http_port = await self.http.start()
        self.grpc_port = await self.server.start()
        await self.server.set_serving(True)
        for t in self._tasks:
            t.add_done_callback(self._task_done)
        log.info(
            "service started",
            extra={
                "grpc_port": self.grpc_port,
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "tls": tls is not None,
            },
        )

    async def authenticate_bearer(self, authorization: str | None) -> Caller:
        """The caller behind an HTTP request's `Authorization: Bearer` header, checked as the
        gRPC interceptor checks calls (signature, audience, expiry, deactivation); for a
        service's HTTP endpoints. Unauthenticated otherwise."""
        if self._verifier is None:
            raise Unauthenticated("this service does not authenticate callers yet")
        return await authenticate_bearer(authorization, self._verifier, self.deactivated)

    def require_keys(self) -> KeyManager:
        """The key manager, for services that keep keys; a ConfigError names what is missing."""
        if self.keys is None:
            raise ConfigError(
                f"{self.name} needs a key manager: set MEDLEDGER_MASTER_KEY_FILE (local keyring) "
                "or MEDLEDGER_KEY_MANAGER=vault with MEDLEDGER_VAULT_ADDR and MEDLEDGER_VAULT_TOKEN_FILE"
            )
        return self.keys

    def key_shredder(self) -> KeyShredder:
        """The service's one way to destroy its keys, for its erasure path alone: a key manager
        opened with the erasure token (Vault), closed when the service stops. The local keyring
        is one file without access control, so there it is the everyday keyring."""
        if self._shredder is None:
            self._shredder = KeyShredder(self._side_key_manager("erasure"), reader=self.require_keys())
        return self._shredder

    def legacy_keys(self) -> KeyManager:
        """The key manager that reads the old shared ``patient-<id>`` keys, for the key-owner
        migration: the legacy token (Vault), else the everyday key manager (local keyring)."""
        if self._legacy_keys is None:
            self._legacy_keys = self._side_key_manager("legacy")
        return self._legacy_keys

    def _side_key_manager(self, credential: Literal["erasure", "legacy"]) -> KeyManager:
        """A key manager with the named credential, closed when the service stops (unless it is
        the everyday one: the local keyring)."""
        keys = self.require_keys()
        side = open_side_key_manager(self.settings, keys, credential)
        if side is not keys:
            self._side_keys.append(side)
        return side

    def identity_link(self) -> IdentityLink:
        """This service's link to identity, with its own principal's credentials."""
        if self._identity is None:
            if self.settings.client_secret_file is None:
                raise ConfigError(f"{self.name} needs MEDLEDGER_CLIENT_SECRET_FILE: its credentials for identity")
            s = self.settings
            self._identity = IdentityLink(
                s.identity_address,
                service_principal_id(self.name),
                secret_file=s.client_secret_file,
                # As every call to another service: TLS (mTLS) when the service has a CA file.
                tls=client_tls_files(s),
            )
        return self._identity

    def _disclosure_interceptors(self, parts: ServiceParts[H]) -> list[DisclosureInterceptor]:
        """The interceptor that logs the service's disclosures of personal data (none if its
        responses carry none), with the group commit that writes them."""
        methods = sorted(set(disclosing_methods(parts.service_descriptors)) - set(parts.discloses_itself))
        if not methods:
            return []
        public = set(parts.public_methods) & set(methods)
        if public or self.stateless:
            # A disclosure names who saw the data: an anonymous or unlogged one is a mistake.
            raise ConfigError(f"{self.name}: RPCs answering with personal data need a token and an outbox")
        commit = OutboxGroupCommit(self.db, what="the disclosure")
        commit.after_commit = self.relay.notify
        self._disclosure_commit = commit
        self._tasks.append(asyncio.create_task(supervised("disclosures", commit.run), name="disclosures"))
        return [DisclosureInterceptor(commit, source=self.source, topic=TOPICS[self.name], methods=methods)]

    async def _start_authentication(self, parts: ServiceParts[H]) -> AuthInterceptor:
        """Follow deactivations from now on, then load those made before, then authenticate.

        In that order, so that no deactivation falls between the load and the event stream.
        """
        sources = parts.auth
        if sources is None:
            link = self.identity_link()
            sources = AuthSources(fetch_jwks=link.fetch_jwks, load_deactivated=link.deactivated_principals)
        # Without Kafka the reload is all a stateless component has: more often, then.
        reload_seconds = STATELESS_DEACTIVATION_RELOAD_SECONDS if self.stateless else 30.0
        if not self.stateless:
            listener = EventConsumer(
                bootstrap_servers=self.settings.kafka_bootstrap_servers,
                group_id=None,
                name=f"{self.name}.deactivations",
                # A deactivation must stop the principal's calls within a second, on every replica.
                fetch_max_wait_ms=50,
                handler=self._on_identity_event,
                producer=self.producer,
                topics=[TOPICS["identity"]],
            )
            await _retry_until_up("Kafka consumer", listener.start)
            self._consumers.append(listener)
            self._tasks.append(
                asyncio.create_task(supervised("consumer:deactivations", listener.run), name="consumer:deactivations")
            )
        for principal_id in await _retry_until_up("identity", sources.load_deactivated):
            self.deactivated.add(principal_id)
        self.deactivated.loaded = True
        self._tasks.append(
            asyncio.create_task(self._reload_deactivated(sources, reload_seconds), name="deactivations-reload")
        )
        verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=self.source, fetch_jwks=sources.fetch_jwks)
        self._verifier = verifier
        return AuthInterceptor(
            verifier, self.deactivated, public_methods=parts.public_methods, access=parts.access, scopes=parts.scopes
        )

    async def _reload_deactivated(self, sources: AuthSources, every_seconds: float = 30.0) -> None:
        """Load the deactivated principals again now and then: the events bring them within
        milliseconds, and this makes sure a lost event costs at most `every_seconds`."""
        # Every round is a new attempt, whatever the last one met (identity unreachable for a
        # while: the events still flow); each failure is logged and counted as a retry.
        tries = Attempts("reload deactivated principals", attempts=None)
        while True:
            await asyncio.sleep(every_seconds)
            try:
                for principal_id in await sources.load_deactivated():
                    self.deactivated.add(principal_id)
                tries.succeeded()
            except Exception as exc:
                tries.next_delay(exc)

    async def _on_identity_event(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is None:
            return
        if event.type == _DEACTIVATED:
            self.deactivated.add(unpack(event, identity_events_pb2.PrincipalDeactivated).principal_id)  # type: ignore[attr-defined]
        elif event.type == _KEY_ROTATED:
            await self.token_keys_changed()

    async def token_keys_changed(self) -> None:
        """Fetch the JWKS again now: tokens of a new signing key arrive at once, and without
        this the verifier would wait out its 30 s refetch limit before accepting them."""
        if self._verifier is not None:
            await self._verifier.refresh_keys()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping.is_set():
            return
        exc = task.exception()
        log.error(
            "background task %s stopped (%s), shutting down",
            task.get_name(),
            type(exc).__name__ if exc else "returned",
            exc_info=exc,
            extra={"task": task.get_name(), "error": repr(exc)},
        )
        self._stopping.set()

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
        # Both drain at once, each within the grace period.
        draining = []
        if self.server is not None:
            draining.append(self.server.stop(self.settings.shutdown_grace_seconds))
        if self.http is not None:
            draining.append(self.http.stop())
        await asyncio.gather(*draining)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self._consumers:
            await c.stop()
        for hook in self._parts.on_stop if self._parts is not None else ():
            await hook()
        if self._disclosure_commit is not None:
            await self._disclosure_commit.close()
        if self._identity is not None:
            await self._identity.aclose()
        for side in self._side_keys:
            await side.aclose()
        if self.keys is not None:
            await self.keys.aclose()
        if self._producer is not None:
            await self._producer.stop()
        if self._db is not None:
            await self._db.close()
        log.info("service stopped")


T = TypeVar("T")


async def _retry_until_up(what: str, start: Callable[[], Awaitable[T]], *, only_outages: bool = False) -> T:
    """A start-up step, waiting for its dependencies: outages for up to two minutes (then the
    process exits and its supervisor starts it again), other errors a few times, or not at all
    with `only_outages` (a broken migration is not worth a second try)."""
    return await retry(start, f"start: {what}", outages_for_seconds=120.0, only_outages=only_outages)


def run_service(
    name: str,
    settings: ServiceSettings,
    migrations: Sequence[Migration],
    build: Callable[[ServiceRuntime[H]], ServiceParts[H]],
    *,
    stateless: bool = False,
) -> None:
    """Run a service until SIGTERM or SIGINT; the body of every service's ``main`` (a stateless
    component's too: no migrations, then)."""
    configure_logging(name, settings.log_level)
    if settings.migrations == "only":
        if not stateless:
            asyncio.run(migrate_only(name, settings, migrations))
        return

    async def _main() -> None:
        runtime: ServiceRuntime[H] = ServiceRuntime(name, settings, migrations, stateless=stateless)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.request_stop)
        try:
            await runtime.start(build)
            await runtime.wait()
        finally:
            await runtime.stop()

    asyncio.run(_main())
