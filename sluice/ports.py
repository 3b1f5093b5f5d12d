"""Loopback ports: is one free, and a free one (for the stack, the tests, the demo)."""

from __future__ import annotations

import socket


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that is free on loopback right now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int, bus_offset: int = 10000) -> int:
    """The first of ``count`` consecutive loopback ports that are free right now, with the
    ports ``bus_offset`` above each free too (a Redis Cluster's bus ports; for tests)."""
    for _ in range(200):
        # An ephemeral port picked by the kernel, moved down so its block fits under 65536.
        base = free_port() % (65535 - bus_offset - count - 1024) + 1024
        wanted = [base + i for i in range(count)] + [base + bus_offset + i for i in range(count)]
        if all(port_is_free(port) for port in wanted):
            return base
    raise OSError(f"no {count} consecutive free loopback ports (and their +{bus_offset})")
