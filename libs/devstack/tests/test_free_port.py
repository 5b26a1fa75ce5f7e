"""free_port: a port for a server that listens later, out of the way of outgoing connections."""

from __future__ import annotations

import socket

from medledger_devstack import localstack


def test_ports_are_out_of_the_ephemeral_range_bindable_and_never_given_twice() -> None:
    ports = [localstack.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    window = localstack.listen_ports()
    if window is not None:  # None: an ephemeral range set so low that the kernel picks
        low, _ = localstack._ephemeral_range()
        assert all(p in window and p < low for p in ports)
        # Below `medledger up`'s default ports and the demo's stack blocks.
        assert all(p < 8_080 for p in ports)
    with socket.socket() as s:
        s.bind((localstack.HOST, ports[-1]))


def test_a_port_something_listens_on_is_not_given() -> None:
    # A window of its own, below free_port's and the ephemeral range, where no other test (or
    # test worker) looks and no outgoing connection goes; all of it held listening but the last
    # 100 ports (any a service of the machine listens on: skipped).
    window = range(1_024, 2_000)
    listeners = []
    try:
        for port in window[:-100]:
            s = socket.socket()
            try:
                s.bind((localstack.HOST, port))
                s.listen()
            except OSError:
                s.close()
                continue
            listeners.append(s)
        taken = {s.getsockname()[1] for s in listeners}
        assert len(taken) > 800
        given = {localstack.free_port(window) for _ in range(50)}
        assert not given & taken
        assert all(p in window for p in given)
    finally:
        for s in listeners:
            s.close()
