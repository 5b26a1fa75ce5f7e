"""The leak scan: personal data, record content, salts, keys, tokens and break-glass
justifications must appear nowhere outside the encrypted stores — not in any log, any Kafka
message (key, headers or value, dead-letter topics included), any transaction's calldata on the
chain, or any metric.

``scan(...)`` reads all of those from a running stack and returns where each secret was found
(empty: no leak). Used after the chaos run (tests/chaos/chaos.py) and after the story on
PostgreSQL (tests/integration/test_up.py).
"""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition


async def kafka_bytes(bootstrap: str) -> dict[str, bytes]:
    """Every message of every topic, keys, headers and values, as one blob per topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        # All of the cluster's metadata: `partitions_for_topic` only knows the topics a consumer
        # has subscribed to or been assigned, and this one reads every topic in turn.
        cluster = await consumer._client.fetch_all_metadata()
        topics = sorted(t for t in cluster.topics() if not t.startswith("__"))
        found: dict[str, bytes] = {}
        for topic in topics:
            partitions = [TopicPartition(topic, p) for p in cluster.partitions_for_topic(topic) or ()]
            if not partitions:
                continue
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            chunks: list[bytes] = []
            idle = 0
            while await _behind(consumer, ends) and idle < 10:  # ten empty fetches in a row: give up
                batch = await consumer.getmany(*partitions, timeout_ms=1000, max_records=5000)
                for records in batch.values():
                    for r in records:
                        chunks += [r.key or b"", r.value or b""]
                        chunks += [k.encode() + b"=" + (v or b"") for k, v in r.headers or ()]
                idle = 0 if batch else idle + 1
            found[topic] = b"\n".join(chunks)
        return found
    finally:
        await consumer.stop()


async def _behind(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    return any([await consumer.position(tp) < end for tp, end in ends.items()])


def _rpc(url: str, method: str, *params: object) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 (a local node the test started)
        return json.loads(reply.read())["result"]


def chain_calldata(rpc_url: str) -> bytes:
    """The input of every transaction on the chain, and the data of every log they emitted."""
    latest = int(str(_rpc(rpc_url, "eth_blockNumber")), 16)
    chunks: list[bytes] = []
    for number in range(latest + 1):
        block = _rpc(rpc_url, "eth_getBlockByNumber", hex(number), True)
        assert isinstance(block, dict)
        for tx in block["transactions"]:
            chunks.append(bytes.fromhex(tx["input"][2:]))
    logs = _rpc(rpc_url, "eth_getLogs", {"fromBlock": "0x0", "toBlock": "latest"})
    assert isinstance(logs, list)
    for log in logs:
        chunks.append(bytes.fromhex(log["data"][2:]))
        chunks += [bytes.fromhex(t[2:]) for t in log["topics"]]
    return b"\n".join(chunks)


def metrics_text(urls: Iterable[str]) -> dict[str, bytes]:
    found = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 (the stack's own /metrics)
            found[url] = reply.read()
    return found


def logs_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


async def scan(
    secrets: Mapping[str, str | bytes],
    *,
    logs: Path,
    bootstrap: str,
    rpc_url: str,
    metrics_urls: Iterable[str],
) -> list[str]:
    """Where each secret (name -> text or bytes) appears. A text is looked for as UTF-8, and a
    hex-looking one (salts, keys) also as the raw bytes it spells, since calldata is binary;
    bytes (a master key) as they are, in hex and in base64."""
    places: dict[str, bytes] = {}
    places |= {f"log {name}": data for name, data in logs_of(logs).items()}
    places |= {f"Kafka topic {topic}": data for topic, data in (await kafka_bytes(bootstrap)).items()}
    places["chain calldata and logs"] = chain_calldata(rpc_url)
    places |= {f"metrics {url}": data for url, data in metrics_text(metrics_urls).items()}
    found = []
    for what, secret in secrets.items():
        if isinstance(secret, bytes):
            forms = [secret, secret.hex().encode(), base64.b64encode(secret), base64.urlsafe_b64encode(secret)]
        else:
            forms = [secret.encode()]
            raw = secret.removeprefix("0x")
            if len(raw) >= 32 and all(c in "0123456789abcdefABCDEF" for c in raw) and len(raw) % 2 == 0:
                forms.append(bytes.fromhex(raw))
        for where, data in places.items():
            if any(form in data for form in forms):
                found.append(f"{what} in {where}")
    return found
