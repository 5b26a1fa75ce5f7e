"""Where the local stack's parts answer: the five services and the FHIR gateway in port order, and
the ports of one ``up``."""

from __future__ import annotations

from dataclasses import dataclass

from medledger_devstack import localstack

HOST = localstack.HOST
# In port order: identity gets the base port, audit base + 4.
SERVICES = ("identity", "consent", "records", "anchoring", "audit")
# Stateless components in front of the services: no database, no Kafka topic, no keys. They take
# the gRPC and metrics ports after the services' (the FHIR gateway: base + 5, health only) and
# start once every service serves.
GATEWAYS = ("fhir",)
# Everything `up` runs as a medledger process, in port order.
COMPONENTS = (*SERVICES, *GATEWAYS)

DEFAULT_KAFKA_PORT = 9092
DEFAULT_ANVIL_PORT = 8545
DEFAULT_GRPC_PORT_BASE = 50051
DEFAULT_METRICS_PORT_BASE = 9101
# OpenBao's API; its cluster port (raft) is the next one.
DEFAULT_OPENBAO_PORT = 8200
# The FHIR gateway's HTTP port, where FHIR R4 REST answers at /fhir/R4.
DEFAULT_FHIR_PORT = 8080
FHIR_BASE_PATH = "/fhir/R4"
# Where the service keys live: a real OpenBao server (the default: the key manager a deployment
# uses, with policies that decide which service may do what), or each service's local keyring
# file (for a machine without the bao binary).
KEY_MANAGERS = ("openbao", "local")

DEFAULT_LOG_ORIGIN = "medledger.local/audit"


@dataclass(frozen=True)
class Ports:
    kafka: int
    anvil: int
    grpc_base: int
    metrics_base: int
    openbao: int = DEFAULT_OPENBAO_PORT
    fhir: int = DEFAULT_FHIR_PORT

    def grpc(self, component: str) -> int:
        return self.grpc_base + COMPONENTS.index(component)

    def metrics(self, component: str) -> int:
        return self.metrics_base + COMPONENTS.index(component)

    @property
    def fhir_base_url(self) -> str:
        """[base] of the FHIR gateway's REST API."""
        return f"http://{HOST}:{self.fhir}{FHIR_BASE_PATH}"

    @property
    def jwks(self) -> int:
        """identity's HTTP port, where the JWKS is: 9111 with the default metrics ports."""
        return self.metrics_base + 10

    @property
    def tiles(self) -> int:
        """audit's HTTP port, where the log's tiles are: 9115 with the default metrics ports."""
        return self.metrics_base + 14

    @property
    def openbao_cluster(self) -> int:
        return self.openbao + 1

    def purposes(self, keys: str = "openbao") -> list[tuple[int, str]]:
        """Every port the stack needs, with what it is for."""
        needed = [(self.kafka, "Kafka (Tansu)"), (self.anvil, "Anvil JSON-RPC")]
        if keys == "openbao":
            needed += [(self.openbao, "OpenBao API"), (self.openbao_cluster, "OpenBao cluster")]
        needed += [(self.grpc(s), f"{s} gRPC") for s in COMPONENTS]
        needed += [(self.metrics(s), f"{s} metrics") for s in COMPONENTS]
        needed.append((self.jwks, "identity JWKS over HTTP"))
        needed.append((self.tiles, "audit log tiles over HTTP"))
        needed.append((self.fhir, "FHIR R4 REST over HTTP"))
        return needed
