"""Addresses of the dev cluster: its service and pod ranges, free loopback ports (also for the image builder's
throwaway registry)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.1/16"


def free_port() -> int:
    """A free loopback port below the ephemeral range, so that no client connection's source port takes it
    between now and the caller's bind (ports the kernel hands out for port 0 are in that range)."""
    low = _ephemeral_low()
    for _ in range(50):
        port = random.randint(10000, low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return max(10001, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768
