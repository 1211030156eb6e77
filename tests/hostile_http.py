"""Loopback HTTP(S) servers that behave like hostile sources: they trickle, never end, redirect, or ask for
credentials, and record what each request carried. Real sockets (http.server in a thread), no mocks."""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL = b"the model bytes" * 100


@dataclass
class Server:
    port: int
    scheme: str
    seen: list[dict] = field(default_factory=list)  # per request: path, host, authorization
    metrics: str = "model"  # what /metrics does: any route below
    stop: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def do_GET(self):  # noqa: N802
            parsed = urllib.parse.urlsplit(self.path)
            server.seen.append({"path": parsed.path, "host": self.headers.get("Host", ""),
                                "authorization": self.headers.get("Authorization")})
            query = urllib.parse.parse_qs(parsed.query)
            route = parsed.path.rsplit("/", 1)[-1]
            if route == "metrics":
                route = server.metrics
                query = query or {"to": [server.url("/model", "localhost")]}
            try:
                if route == "trickle":  # one byte every 0.2 s of a promised megabyte
                    self._head(200, 1 << 20)
                    while not server.stop.is_set():
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                elif route == "endless":  # no length, bytes as fast as the socket takes them
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    block = b"y" * (1 << 16)
                    while not server.stop.is_set():
                        self.wfile.write(block)
                elif route == "slow-headers":  # nothing at all until the test ends
                    server.stop.wait(30)
                elif route == "redirect":
                    self.send_response(302)
                    self.send_header("Location", query["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif route == "model":
                    self._head(200, len(MODEL))
                    self.wfile.write(MODEL)
                elif route in ("secret-page", "secret-text"):  # a body that must never reach a status
                    body = b"internal-secret-token-42 {\n" * 4
                    self._head(500 if route == "secret-page" else 200, len(body))
                    self.wfile.write(body)
                elif parsed.path.startswith("/v2/"):  # a registry that asks every client for credentials
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Basic realm="{server.url("/auth")}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._head(404, 0)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                pass

        def _head(self, status: int, length: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.end_headers()

    return Handler


@contextmanager
def serve(tls: tuple[Path, Path] | None = None) -> Iterator[Server]:
    """A hostile server on 127.0.0.1 (https when ``tls`` = (certificate, key) files)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    httpd.daemon_threads = True
    server = Server(httpd.server_address[1], "https" if tls else "http")
    httpd.RequestHandlerClass = _handler(server)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
