"""A lean threaded HTTP/1.1 server: one thread per keep-alive connection, no framework.

Why not asyncio: onnxruntime releases the GIL in ``session.run``, so running inference directly on
the connection's thread avoids an executor hand-off per request (measured in benchmarks/runtime.py);
edge nodes see few concurrent clients, and a connection cap bounds the thread count.

Graceful shutdown: stop accepting, answer in-flight requests (with ``Connection: close``), close idle
keep-alive connections, and wait for busy ones up to a deadline.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

log = logging.getLogger("edgefleet_runtime.http")

MAX_LINE = 8192
_VERSION = re.compile(r"^HTTP/[0-9]\.[0-9]$")
MAX_HEADERS = 100
REASONS = {s.value: s.phrase for s in HTTPStatus}

# app(method, path, headers(lowercase name -> value), body) -> (status, [(name, value)], body)
App = Callable[[str, str, dict, bytes], tuple[int, list, bytes]]


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _error_body(message: str) -> bytes:
    import orjson

    return orjson.dumps({"error": message})


class _Conn:
    __slots__ = ("sock", "busy", "lock")

    def __init__(self, sock):
        self.sock = sock
        self.busy = False
        self.lock = threading.Lock()


class HTTPServer:
    def __init__(
        self,
        app: App,
        host: str = "0.0.0.0",
        port: int = 8080,
        max_body_bytes: int = 64 << 20,
        max_connections: int = 256,
        keepalive_seconds: float = 75.0,
        read_timeout_seconds: float = 30.0,
    ):
        self.app = app
        self.max_body = max_body_bytes
        self.max_connections = max_connections
        self.keepalive = keepalive_seconds
        self.read_timeout = read_timeout_seconds
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self._conns: set[_Conn] = set()
        self._conns_lock = threading.Lock()
        self._inflight = 0
        self._idle = threading.Condition()
        self._accept_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._accept_thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                sock, _addr = self.sock.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.01)
                continue
            with self._conns_lock:
                too_many = len(self._conns) >= self.max_connections
                conn = _Conn(sock)
                if not too_many:
                    self._conns.add(conn)
            if too_many:
                self._reject(sock, 503, "too many connections")
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _reject(self, sock, status, message):
        try:
            body = _error_body(message)
            sock.sendall(self._head(status, [("Content-Type", "application/json")], len(body), False) + body)
        except OSError:
            pass
        finally:
            sock.close()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop accepting, close idle connections, wait for in-flight requests. True if drained."""
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        deadline = time.monotonic() + timeout
        while True:
            with self._conns_lock:
                conns = list(self._conns)
            for c in conns:
                with c.lock:
                    if not c.busy:
                        try:
                            c.sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
            with self._idle:
                if self._inflight == 0 and not conns:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("drain deadline passed", extra={"inflight": self._inflight})
                    return False
                self._idle.wait(min(left, 0.05))

    # ------------------------------------------------------------------ per connection
    @staticmethod
    def _head(status: int, headers: list, length: int, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
        lines.extend(f"{k}: {v}" for k, v in headers)
        lines.append(f"Content-Length: {length}")
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _serve_conn(self, conn: _Conn) -> None:
        sock = conn.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rfile = sock.makefile("rb", 65536)
            while not self.stopping:
                sock.settimeout(self.keepalive)
                try:
                    line = rfile.readline(MAX_LINE + 1)
                except (TimeoutError, OSError):
                    return
                if not line:
                    return
                with conn.lock:  # a request has started: the drain must wait for it, not close it
                    conn.busy = True
                with self._idle:
                    self._inflight += 1
                try:
                    keep = self._one_request(sock, rfile, line)
                finally:
                    with self._idle:
                        self._inflight -= 1
                        self._idle.notify_all()
                    with conn.lock:
                        conn.busy = False
                if not keep:
                    return
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            try:
                sock.close()
            except OSError:
                pass
            with self._idle:
                self._idle.notify_all()

    def _one_request(self, sock, rfile, line: bytes) -> bool:
        """Read one request (request line already read), answer it; return keep-alive."""
        sock.settimeout(self.read_timeout)
        try:
            method, path, version, headers, body = self._read_request(sock, rfile, line)
        except HTTPError as e:
            self._send(sock, e.status, [("Content-Type", "application/json")], _error_body(e.message), False)
            self._linger(sock)
            return False
        except (TimeoutError, OSError, ValueError):
            return False
        conn_hdr = headers.get("connection", "").lower()
        keep = (version == "HTTP/1.1" and "close" not in conn_hdr) or (
            version == "HTTP/1.0" and "keep-alive" in conn_hdr
        )
        try:
            status, out_headers, out_body = self.app(method, path, headers, body)
        except Exception:  # the app turns expected errors into responses; this is a bug
            log.exception("unhandled error", extra={"path": path})
            status, out_headers, out_body = (
                500,
                [("Content-Type", "application/json")],
                _error_body("internal server error"),
            )
        keep = keep and not self.stopping
        if method == "HEAD":
            self._send(sock, status, out_headers, b"", keep, length=len(out_body))
        else:
            self._send(sock, status, out_headers, out_body, keep)
        return keep

    @staticmethod
    def _linger(sock, seconds: float = 1.0, limit: int = 256 << 20) -> None:
        """Discard what the client is still sending so that it reads our error instead of a reset."""
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + seconds
            seen = 0
            while seen < limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    break
                seen += len(data)
        except OSError:
            pass

    def _send(self, sock, status, headers, body, keep, length=None):
        head = self._head(status, headers, len(body) if length is None else length, keep)
        try:
            if len(body) < 65536:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
        except OSError:
            pass

    def _read_request(self, sock, rfile, line: bytes):
        if len(line) > MAX_LINE:
            raise HTTPError(414, "request line too long")
        try:
            method, path, version = line.decode("latin-1").rstrip("\r\n").split(" ")
        except ValueError:
            raise HTTPError(400, "malformed HTTP request line") from None
        if not method.isalpha() or not path.startswith("/") or not _VERSION.match(version):
            raise HTTPError(400, "malformed HTTP request line")
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HTTPError(505, f"HTTP version {version!r} is not supported")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            h = rfile.readline(MAX_LINE + 1)
            if not h:
                raise ValueError("connection closed in headers")
            if len(h) > MAX_LINE:
                raise HTTPError(431, "header line too long")
            if h in (b"\r\n", b"\n"):
                break
            name, sep, value = h.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise HTTPError(400, f"malformed header line {h[:60]!r}")
            key = name.lower()
            value = value.strip()
            if key in headers and key in ("content-length", "transfer-encoding", "inference-header-content-length"):
                raise HTTPError(400, f"duplicate header {name}")
            headers[key] = value
        else:
            raise HTTPError(431, f"more than {MAX_HEADERS} headers")

        te = headers.get("transfer-encoding")
        if te is not None:
            if "content-length" in headers:
                raise HTTPError(400, "both Content-Length and Transfer-Encoding given")
            if te.lower() != "chunked":
                raise HTTPError(501, f"Transfer-Encoding {te!r} is not supported")
            self._continue(sock, headers)
            body = self._read_chunked(rfile)
        else:
            cl = headers.get("content-length", "0")
            if not cl.isdigit():
                raise HTTPError(400, f"header Content-Length {cl!r} is not a non-negative integer")
            n = int(cl)
            if n > self.max_body:
                raise HTTPError(
                    413, f"request body of {n} bytes is over the limit of {self.max_body} bytes (--max-body-bytes)"
                )
            if n:
                self._continue(sock, headers)
                body = rfile.read(n)
                if len(body) != n:
                    raise ValueError("connection closed in body")
            else:
                body = b""
        return method, path, version, headers, body

    @staticmethod
    def _continue(sock, headers):
        if headers.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_chunked(self, rfile) -> bytes:
        parts, total = [], 0
        while True:
            size_line = rfile.readline(MAX_LINE + 1)
            if not size_line:
                raise ValueError("connection closed in chunked body")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HTTPError(400, "malformed chunk size in chunked body") from None
            if size < 0:
                raise HTTPError(400, "malformed chunk size in chunked body")
            if size == 0:
                while rfile.readline(MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > self.max_body:
                raise HTTPError(413, f"request body is over the limit of {self.max_body} bytes (--max-body-bytes)")
            chunk = rfile.read(size)
            if len(chunk) != size:
                raise ValueError("connection closed in chunk")
            parts.append(chunk)
            rfile.readline(MAX_LINE + 1)
