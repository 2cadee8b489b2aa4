"""Ports on 127.0.0.1: a free one, whether one is taken, whether something answers on one."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_in_use(port: int) -> bool:
    """True when something listens on 127.0.0.1:`port` (or on all addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port whose last connections are in TIME_WAIT is free for a server.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def port_open(port: int, host: str = "127.0.0.1", *, timeout: float = 0.5) -> bool:
    """True when a TCP connection to `host`:`port` is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port: int, *, timeout: float, host: str = "127.0.0.1") -> bool:
    """Wait until `host`:`port` accepts connections; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not port_open(port, host):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
