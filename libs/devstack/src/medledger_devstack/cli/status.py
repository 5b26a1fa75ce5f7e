"""``medledger status``: how the stack of `medledger up` is doing, in words — each service's
health (gRPC health checking), and from its Prometheus metrics: Kafka consumer lag, outbox
backlog, and for anchoring the entries waiting for an anchor, the anchored tree size and the
anchorer's balance; and the FHIR gateway's health (it has no lag or backlog: it keeps nothing).

Exit codes: 0 every service and the gateway SERVING, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from medledger_devstack.cli.up import port_number
from medledger_devstack.stack.layout import (
    DEFAULT_GRPC_PORT_BASE,
    DEFAULT_METRICS_PORT_BASE,
    GATEWAYS,
    HOST,
    SERVICES,
    Ports,
)

TIMEOUT_SECONDS = 3.0


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="the health, lag, backlog and anchoring of a running stack",
        description=(
            "Ask every service and the FHIR gateway of a running `medledger up` how it is; exit 0 only if all serve."
        ),
    )
    parser.add_argument("--grpc-port-base", type=port_number, default=DEFAULT_GRPC_PORT_BASE, help="as given to `up`")
    parser.add_argument(
        "--metrics-port-base", type=port_number, default=DEFAULT_METRICS_PORT_BASE, help="as given to `up`"
    )
    parser.set_defaults(func=run)


@dataclass
class ServiceStatus:
    name: str
    health: str
    # Metric name -> summed value over its labels, of the WANTED ones it exposes; None when
    # /metrics did not answer.
    metrics: dict[str, float] | None = field(default_factory=dict)


async def _health(port: int) -> str:
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            return "unreachable" if exc.code() == grpc.StatusCode.UNAVAILABLE else exc.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


WANTED = (
    "medledger_kafka_consumer_lag",
    "medledger_outbox_backlog",
    "medledger_anchoring_entries_waiting",
    "medledger_anchoring_anchored_tree_size",
    "medledger_anchoring_account_balance_ether",
)


def _metrics(port: int) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=TIMEOUT_SECONDS) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in WANTED:
            found[family.name] = sum(sample.value for sample in family.samples)
    return found


async def collect(ports: Ports) -> list[ServiceStatus]:
    """The services', then the gateway's status."""
    components = (*SERVICES, *GATEWAYS)
    healths = await asyncio.gather(*(_health(ports.grpc(s)) for s in components))
    metrics = await asyncio.gather(*(asyncio.to_thread(_metrics, ports.metrics(s)) for s in components))
    # The runtime exports the lag and backlog gauges in every process; the gateway consumes and
    # publishes nothing, so its zeros would say nothing.
    metrics = [{} if s in GATEWAYS and m is not None else m for s, m in zip(components, metrics, strict=True)]
    return [ServiceStatus(s, h, m) for s, h, m in zip(components, healths, metrics, strict=True)]


def describe(status: ServiceStatus) -> str:
    parts = [f"{status.name:<10} {status.health}"]
    if status.metrics is None:
        if status.health != "unreachable":
            parts.append("metrics did not answer")
        return ", ".join(parts)
    m = status.metrics
    if "medledger_kafka_consumer_lag" in m:
        parts.append(f"consumer lag {m['medledger_kafka_consumer_lag']:,.0f}")
    if "medledger_outbox_backlog" in m:
        parts.append(f"outbox backlog {m['medledger_outbox_backlog']:,.0f}")
    if "medledger_anchoring_entries_waiting" in m:
        parts.append(f"entries waiting for an anchor {m['medledger_anchoring_entries_waiting']:,.0f}")
    if "medledger_anchoring_anchored_tree_size" in m:
        parts.append(f"anchored tree size {m['medledger_anchoring_anchored_tree_size']:,.0f}")
    if "medledger_anchoring_account_balance_ether" in m:
        parts.append(f"anchorer balance {m['medledger_anchoring_account_balance_ether']:g} ETH")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    ports = Ports(kafka=0, anvil=0, grpc_base=args.grpc_port_base, metrics_base=args.metrics_port_base)
    statuses = asyncio.run(collect(ports))
    for status in statuses:
        print(describe(status))
    services = [s for s in statuses if s.name in SERVICES]
    gateways = [s for s in statuses if s.name in GATEWAYS]
    serving = sum(s.health == "SERVING" for s in services)
    gateways_serving = sum(s.health == "SERVING" for s in gateways)
    print(
        f"{serving} of {len(services)} services serving, "
        f"the FHIR gateway {'serving' if gateways_serving == len(gateways) else 'not serving'}"
    )
    return 0 if serving + gateways_serving == len(statuses) else 1
