"""A TCP relay for tests: a port a test can open and close in front of a service (the registry) to take it away
and bring it back at the same address."""

from __future__ import annotations

import socket
import socketserver
import threading


class Relay(socketserver.BaseRequestHandler):
    """Relays a connection to its server's `target` (HOST, PORT)."""

    def handle(self) -> None:
        with socket.create_connection(self.server.target, timeout=30) as upstream:
            pump = threading.Thread(target=_copy, args=(upstream, self.request), daemon=True)
            pump.start()
            _copy(self.request, upstream)
            pump.join(30)


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
