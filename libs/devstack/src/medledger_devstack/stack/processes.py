"""The small process chores of a supervisor: logs that span runs, exit codes in words, our own
children (from /proc, Linux) and the gRPC health check."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LOG_TAIL_LINES = 25
LOG_RUN_HEADER = "----- medledger up: "


def serving(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code yet"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


def write_log_header(log: Path) -> None:
    # Logs are appended to across runs; the header lets the tail show only this run's lines.
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"{LOG_RUN_HEADER}{datetime.now().isoformat(timespec='seconds')} -----\n")


def log_tail(log: Path, count: int) -> list[str]:
    try:
        with log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    header = text.rfind(LOG_RUN_HEADER)
    if header >= 0:
        text = text[header:].split("\n", 1)[1] if "\n" in text[header:] else ""
    return text.splitlines()[-count:]


def own_children() -> list[int]:
    """Live (not zombie) processes whose parent is this process, from /proc (Linux)."""
    me = os.getpid()
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            children.append(int(entry.name))
    return children


def reap(pid: int) -> int | None:
    """The exit status if `pid` has exited (reaping it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0  # already reaped or not ours
    return status if done else None


def stop_children_since(before: set[int]) -> None:
    """Stop the children we lost track of: localstack's start_* functions raise on a start timeout
    without stopping the process they spawned. It is still our child, so find it that way — among
    the children that appeared since `before`, never one that was there before."""
    for pid in set(own_children()) - before:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            command = "?"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and reap(pid) is None:
            time.sleep(0.1)
        if reap(pid) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        print(f"stopped a leftover child process: {command} (pid {pid})")
