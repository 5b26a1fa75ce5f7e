"""free_port: a port for a server that listens later, out of the way of outgoing connections."""

from __future__ import annotations

import socket

from medledger_devstack import localstack


def test_ports_are_below_the_ephemeral_range_bindable_and_never_given_twice() -> None:
    low, _ = localstack._ephemeral_range()
    ports = [localstack.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    # Out of the ephemeral range, and out of the demo's stack blocks (10000 and up).
    assert all(p < min(low, 10_000) for p in ports)
    with socket.socket() as s:
        s.bind((localstack.HOST, ports[-1]))


def test_a_port_something_listens_on_is_not_given() -> None:
    low, _ = localstack._ephemeral_range()
    listeners = []
    try:
        # Every port from 5,000 to 5,199 taken: none of them may come back.
        for port in range(5_000, 5_200):
            s = socket.socket()
            try:
                s.bind((localstack.HOST, port))
                s.listen()
            except OSError:
                s.close()
                continue
            listeners.append(s)
        taken = {s.getsockname()[1] for s in listeners}
        given = {localstack.free_port() for _ in range(200)}
        assert not given & taken
        assert all(p < min(low, 10_000) for p in given)
    finally:
        for s in listeners:
            s.close()
