"""A lean threaded HTTP/1.1 server (RFC 9112 framing) built to face hostile clients.

Why threads and no framework: onnxruntime releases the GIL in ``session.run``, so running inference
on the connection's thread avoids an executor hand-off per request; benchmarks/runtime.py measures this
server against granian and uvicorn+httptools serving the same app (it is the fastest of them at batch 1).

Limits (``Limits``; defaults fit a 1 GiB pod), each refusal reported to ``refused(reason)``:

* a whole-request deadline for the request line + headers and another for the body (a watchdog thread
  closes sockets past their deadline: a byte now and then does not restart any clock);
* a connection cap; when it is reached a new client evicts the longest-idle keep-alive connection (else
  the slowest one still sending its headers, else the body that has sent nothing for longest, once it has
  stalled for ``STALL_SECONDS``) instead of being turned away;
* a body limit per route (``body_limit(method, path)``, e.g. what the model's inputs can need) and an
  in-flight budget for all bodies together, counted before the body is read; JSON counts
  ``JSON_EXPANSION`` times its size, for what parsing it can cost;
* a cap on requests with a body running in the app at once: 503 with Retry-After beyond it.

Strict framing: CRLF line ends, token methods and header names, no obs-fold, exactly one Host on
HTTP/1.1, Content-Length of ASCII digits only, chunk sizes of hex digits only, chunk data followed by
CRLF; anything else is 400 and the connection closes.

Graceful shutdown: stop accepting, answer in-flight requests (with ``Connection: close``), close idle
keep-alive connections, and wait for busy ones up to a deadline.
"""

from __future__ import annotations

import io
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import NoReturn, cast

from .budget import MemoryBudget
from .config import Limits

__all__ = ["HTTPServer", "Limits", "RequestParser"]  # Limits: where callers have always found it

log = logging.getLogger("edgefleet_runtime.http")

REASONS = {s.value: s.phrase for s in HTTPStatus}
JSON_EXPANSION = 24  # parsed JSON can take this many times its text in memory (e.g. `[{},{},...]`)
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET = re.compile(rb"^/[\x21-\x7e]*$")
_VERSION = re.compile(rb"^HTTP/[0-9]\.[0-9]$")
_DIGITS = re.compile(r"^[0-9]{1,18}$")
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,15})(?:[ \t]*;[\x09\x20-\x7e\x80-\xff]*)?\r\n$")
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# a whole request line / field line in one match: the fast path; anything else goes to the slow path
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"++) (/[\x21-\x7e]*+) (HTTP/1\.[01])\r\n")
_FIELD = re.compile(rb"(" + _TCHAR + rb"++):[ \t]*+([\t\x20-\x7e\x80-\xff]*+)\r\n")  # possessive: linear time
STALL_SECONDS = 1.0  # a body silent this long may be evicted at the connection cap
BODY_PIECE = 65536  # bodies are read in pieces of this size, each one marking the connection as alive
_FRAMING = ("content-length", "transfer-encoding", "host", "inference-header-content-length")

# app(method, path, headers(lowercase name -> value), body) -> (status, [(name, value)], body)
Headers = dict[str, str]
App = Callable[[str, str, Headers, bytes | bytearray], tuple[int, list[tuple[str, str]], bytes]]
Reader = io.BufferedReader  # the socket's buffered reader
Alive = Callable[[], None]


class HTTPError(Exception):
    def __init__(self, status: int, message: str, reason: str = "bad_request",
                 headers: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = list(headers)


class _Closed(Exception):
    """The client went away (or the watchdog closed it) mid-request."""


def _error_body(message: str) -> bytes:
    import orjson

    return orjson.dumps({"error": message})


IDLE, HEAD, BODY, APP, WRITE, DONE = range(6)
_TIMEOUT_REASON = {IDLE: "idle_timeout", HEAD: "header_timeout", BODY: "body_timeout", WRITE: "write_timeout"}


class _Conn:
    __slots__ = ("sock", "state", "since", "deadline", "closed_by", "heard")

    def __init__(self, sock: socket.socket, idle_seconds: float):
        self.sock = sock
        self.state = IDLE
        self.since = self.heard = time.monotonic()
        self.deadline = self.since + idle_seconds
        self.closed_by: str | None = None

    def enter(self, state: int, seconds: float) -> None:
        now = time.monotonic()
        self.since = self.heard = now
        self.deadline, self.state = now + seconds, state

    def alive(self) -> None:
        """Part of the body arrived (read on the connection's own thread)."""
        self.heard = time.monotonic()

    def close(self, why: str) -> None:
        """Called from other threads: unblock the connection's thread, which then closes the socket."""
        if self.closed_by is None:
            self.closed_by = why
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class HTTPServer:
    def __init__(
        self,
        app: App,
        host: str = "0.0.0.0",
        port: int = 8080,
        limits: Limits | None = None,
        refused: Callable[[str], None] | None = None,
        reuse_port: bool = False,
        budget: MemoryBudget | None = None,
    ):
        self.app = app
        self.limits = limits or Limits()
        self.refused = refused or (lambda reason: None)
        self.body_limit = getattr(app, "body_limit", None)  # (method, path) -> int | None
        self.parser = RequestParser(self.limits)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # serve --workers: each worker listens on the port, the kernel spreads connections
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self._drained = False
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()  # guards _conns, _running
        self.budget = budget or getattr(app, "budget", None) or MemoryBudget(self.limits.body_budget_bytes)
        self._running = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="http-accept", daemon=True).start()
        threading.Thread(target=self._watchdog, name="http-watchdog", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                sock, _addr = self.sock.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.01)
                continue
            conn = _Conn(sock, self.limits.idle_seconds)
            with self._lock:
                admitted = len(self._conns) < self.limits.max_connections or self._evict_one()
                if admitted:
                    self._conns.add(conn)
            if not admitted:
                self.refused("connections")
                self._reject(sock, 503, "too many connections; retry later")
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _evict_one(self) -> bool:
        """At the cap: close the longest-idle keep-alive connection, else the oldest one still in its headers,
        else the body that has been silent longest (at least STALL_SECONDS)."""
        open_ = [c for c in self._conns if c.closed_by is None]
        idle = [c for c in open_ if c.state == IDLE]
        slow = [c for c in open_ if c.state == HEAD]
        stalled_before = time.monotonic() - STALL_SECONDS
        stalled = [c for c in open_ if c.state == BODY and c.heard < stalled_before]
        for group, reason in ((idle, "evicted_idle"), (slow, "evicted_slow"), (stalled, "evicted_stalled_body")):
            if group:
                victim = min(group, key=lambda c: c.heard)
                victim.close(reason)
                self.refused(reason)
                return True
        return False

    def _watchdog(self) -> None:
        while not self._drained:  # deadlines hold during a drain too: a slow client cannot stall it
            time.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                late = [(c, c.state, c.deadline) for c in self._conns
                        if c.state in _TIMEOUT_REASON and now > c.deadline and not c.closed_by]
            for c, state, deadline in late:
                if c.state != state or c.deadline != deadline:
                    continue  # it moved on since: the request (or the next one) is within its own deadline
                reason = _TIMEOUT_REASON[state]
                if reason != "idle_timeout":
                    self.refused(reason)
                c.close(reason)

    def _reject(self, sock: socket.socket, status: int, message: str,
                headers: tuple[tuple[str, str], ...] = ()) -> None:
        try:
            sock.settimeout(1.0)
            body = _error_body(message)
            head = self._head(status, [("Content-Type", "application/json"), *headers], len(body), False)
            sock.sendall(head + body)
        except OSError:
            pass
        finally:
            sock.close()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop accepting, close idle connections, wait for in-flight requests. True if drained."""
        try:
            return self._drain(timeout)
        finally:
            self._drained = True

    def _drain(self, timeout: float) -> bool:
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                if c.state in (IDLE, DONE):
                    c.close("shutdown")
            if not conns:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("drain deadline passed", extra={"connections": len(conns)})
                return False
            time.sleep(min(left, 0.02))

    # ------------------------------------------------------------------ per connection
    @staticmethod
    def _head(status: int, headers: list[tuple[str, str]], length: int, keep_alive: bool) -> bytes:
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
            rfile = cast(Reader, sock.makefile("rb", 65536))
            keep = True
            while keep and not self.stopping:
                conn.enter(IDLE, self.limits.idle_seconds)
                try:
                    if not rfile.peek(1):
                        return
                except OSError:
                    return
                conn.enter(HEAD, self.limits.header_seconds)
                keep = self._one_request(conn, rfile)
        finally:
            conn.state = DONE
            with self._lock:
                self._conns.discard(conn)
            try:
                sock.close()
            except OSError:
                pass

    def _one_request(self, conn: _Conn, rfile: Reader) -> bool:
        """Read one request, answer it; return keep-alive."""
        reserved = 0
        try:
            try:
                method, path, version, headers = self.parser.read_head(rfile)
                reserved, limit = self._admit_body(method, path, version, headers)
                body = self._read_body(conn, rfile, headers, limit)
            except HTTPError as e:
                self.refused(e.reason)
                hdrs = [("Content-Type", "application/json"), *e.headers]
                self._send(conn, e.status, hdrs, _error_body(e.message), False)
                self._linger(conn.sock)
                return False
            except (_Closed, OSError, ValueError):
                return False
            return self._answer(conn, method, path, version, headers, body)
        finally:
            if reserved:
                self.budget.give(reserved)

    def _answer(self, conn: _Conn, method: str, path: str, version: bytes, headers: Headers,
                body: bytes | bytearray) -> bool:
        conn_hdr = headers.get("connection", "").lower()
        keep = (version == b"HTTP/1.1" and "close" not in conn_hdr) or (
            version == b"HTTP/1.0" and "keep-alive" in conn_hdr
        )
        limited = method == "POST"
        if limited:
            with self._lock:
                over = self._running >= self.limits.max_concurrency
                if not over:
                    self._running += 1
            if over:
                self.refused("concurrency")
                self._send(conn, 503, [("Content-Type", "application/json"), ("Retry-After", "1")],
                           _error_body("the server is at its concurrency limit; retry after 1 s"), keep)
                return keep
        conn.state = APP
        try:
            status, out_headers, out_body = self.app(method, path, headers, body)
        except Exception:  # the app turns expected errors into responses; this is a bug
            log.exception("unhandled error", extra={"path": path})
            status, out_headers, out_body = 500, [("Content-Type", "application/json")], _error_body("internal error")
        finally:
            if limited:
                with self._lock:
                    self._running -= 1
        keep = keep and not self.stopping
        if method == "HEAD":
            self._send(conn, status, out_headers, b"", keep, length=len(out_body))
        else:
            self._send(conn, status, out_headers, out_body, keep)
        return keep

    @staticmethod
    def _linger(sock: socket.socket, seconds: float = 1.0, limit: int = 1 << 20) -> None:
        """Discard a little of what the client is still sending so that it reads our error, not a reset."""
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

    def _send(self, conn: _Conn, status: int, headers: list[tuple[str, str]], body: bytes, keep: bool,
              length: int | None = None) -> None:
        conn.enter(WRITE, self.limits.write_seconds)
        head = self._head(status, headers, len(body) if length is None else length, keep)
        try:
            if len(body) < 65536:
                conn.sock.sendall(head + body)
            else:
                conn.sock.sendall(head)
                conn.sock.sendall(body)
        except OSError:
            pass

    # ------------------------------------------------------------------ bodies
    def _admit_body(self, method: str, path: str, version: bytes, headers: Headers) -> tuple[int, int]:
        """Check framing headers and limits before reading a byte of body; return (bytes reserved, body limit)."""
        chunked, size = self.parser.body_framing(version, headers)
        limit = self._limit_for(method, path)
        if size > limit:
            raise HTTPError(413, self._too_large(size, limit), "body_too_large")
        if not chunked and size == 0:
            return 0, limit
        declared = limit if chunked else size
        hl = headers.get("inference-header-content-length")
        json_part = int(hl) if hl is not None and _DIGITS.match(hl) and int(hl) < declared else declared
        reserve = declared + json_part * (JSON_EXPANSION - 1)
        if not self.budget.take(reserve):
            if reserve > self.budget.capacity:
                share = f" (--body-budget-bytes / --workers {self.limits.workers})" if self.limits.workers > 1 else ""
                raise HTTPError(413, f"a body of {size} bytes needs {reserve} bytes of the server's body budget "
                                f"of {self.budget.capacity}{share} (JSON counts {JSON_EXPANSION}x): send "
                                "tensors with the binary tensor data extension, or raise --body-budget-bytes",
                                "body_too_large")
            raise HTTPError(503, "the server has too many request bodies in flight; retry after 1 s",
                            "body_budget", [("Retry-After", "1")])
        return reserve, limit

    def _limit_for(self, method: str, path: str) -> int:
        limit = self.limits.max_body_bytes
        if self.body_limit is not None:
            route = self.body_limit(method, path)
            if route is not None:
                limit = min(limit, route)
        return limit

    @staticmethod
    def _too_large(size: int, limit: int) -> str:
        return (f"request body of {size} bytes is over this route's limit of {limit} bytes (what the model's "
                "inputs can need at --max-batch, capped by --max-body-bytes)")

    def _read_body(self, conn: _Conn, rfile: Reader, headers: Headers, limit: int) -> bytes | bytearray:
        chunked = "transfer-encoding" in headers
        if not chunked and headers.get("content-length", "0") == "0":
            return b""
        if headers.get("expect", "").lower() == "100-continue":
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.enter(BODY, self.limits.body_seconds)
        return self.parser.read_body(rfile, headers, limit, conn.alive)


class RequestParser:
    """RFC 9112 request framing from a buffered reader; raises HTTPError (answer and close) or _Closed."""

    def __init__(self, limits: Limits):
        self.limits = limits

    def line(self, rfile: Reader, what: str, line: bytes | None = None) -> bytes:
        """One CRLF-terminated line without its CRLF (``line``: already read); 4xx or _Closed otherwise."""
        if line is None:
            line = rfile.readline(self.limits.max_line_bytes + 1)
        if not line:
            raise _Closed(f"connection closed in {what}")
        if len(line) > self.limits.max_line_bytes:
            raise HTTPError(414 if what == "request line" else 431, f"{what} is longer than "
                            f"{self.limits.max_line_bytes} bytes")
        if not line.endswith(b"\r\n"):
            if line.endswith(b"\n"):
                raise HTTPError(400, f"{what} must end with CRLF, not a bare LF")
            raise _Closed(f"connection closed in {what}")
        if line.find(b"\r", 0, -2) >= 0:
            raise HTTPError(400, f"bare CR in {what}")
        return line[:-2]

    def read_head(self, rfile: Reader) -> tuple[str, str, bytes, Headers]:
        raw = rfile.readline(self.limits.max_line_bytes + 1)
        m = _REQUEST_LINE.fullmatch(raw)
        if m is None:  # the slow path says exactly what is wrong (or skips leading empty lines)
            method, target, version = self._request_line(rfile, raw)
        else:
            method, target, version = m.groups()
        headers = self.read_fields(rfile, "header")
        if version == b"HTTP/1.1" and "host" not in headers:
            raise HTTPError(400, "HTTP/1.1 request without a Host header")
        return method.decode("ascii"), target.decode("ascii"), version, headers

    def _request_line(self, rfile: Reader, raw: bytes) -> tuple[bytes, bytes, bytes]:
        line = self.line(rfile, "request line", raw)
        for _ in range(4):  # RFC 9112 2.2: ignore a few empty lines before the request line
            if line:
                break
            line = self.line(rfile, "request line")
        parts = line.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _VERSION.match(parts[2]):
            raise HTTPError(400, "malformed HTTP request line; expected METHOD /path HTTP/1.1")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise HTTPError(505, f"HTTP version {version.decode()} is not supported; use HTTP/1.1")
        if not _TARGET.match(target):
            raise HTTPError(400, "the request target must be a path of printable ASCII starting with /")
        return method, target, version

    def read_fields(self, rfile: Reader, what: str) -> dict[str, str]:
        fields: dict[str, str] = {}
        total = 0
        limit = self.limits.max_line_bytes + 1
        for _ in range(self.limits.max_headers + 1):
            raw = rfile.readline(limit)
            total += len(raw)
            if total > self.limits.max_header_bytes:
                raise HTTPError(431, f"{what}s are larger than {self.limits.max_header_bytes} bytes")
            m = _FIELD.fullmatch(raw)
            if m is None:
                if raw == b"\r\n":
                    return fields
                self._bad_field(rfile, raw, what)
                continue  # not reached: _bad_field raises
            name, value = m.groups()
            key = name.lower().decode("ascii")
            text = value.decode("latin-1").rstrip(" \t")
            if key in fields:
                if key in _FRAMING:
                    raise HTTPError(400, f"duplicate {what} {name.decode()}")
                fields[key] += ", " + text
            else:
                fields[key] = text
        raise HTTPError(431, f"more than {self.limits.max_headers} {what}s")

    def _bad_field(self, rfile: Reader, raw: bytes, what: str) -> NoReturn:
        """Raise the error that says what is wrong with a field line the fast pattern refused."""
        line = self.line(rfile, f"{what} line", raw)
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HTTPError(400, f"malformed {what} line {line[:60]!r} (obs-fold and spaces before ':' "
                            "are not allowed)")
        raise HTTPError(400, f"{what} {name.decode()} has a control character in its value")

    @staticmethod
    def body_framing(version: bytes, headers: Headers) -> tuple[bool, int]:
        """(chunked, Content-Length or 0) after RFC 9112 6.1-6.3 checks; 400/501/417 otherwise."""
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if te is not None:
            if cl is not None:
                raise HTTPError(400, "both Content-Length and Transfer-Encoding given")
            if version != b"HTTP/1.1":
                raise HTTPError(400, "Transfer-Encoding needs HTTP/1.1")
            if te.lower() != "chunked":
                raise HTTPError(501, f"Transfer-Encoding {te[:40]!r} is not supported; use chunked or Content-Length")
        elif cl is not None and not _DIGITS.match(cl):
            raise HTTPError(400, f"header Content-Length {cl[:40]!r} is not a number of ASCII digits")
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            raise HTTPError(417, f"Expect {expect[:40]!r} is not supported")
        return te is not None, int(cl) if cl is not None else 0

    def read_body(self, rfile: Reader, headers: Headers, limit: int, alive: Alive = lambda: None) -> bytes | bytearray:
        """The body whose framing ``body_framing`` accepted (at most ``limit`` bytes); ``alive()`` after each
        piece that arrives."""
        if "transfer-encoding" in headers:
            return self.read_chunked(rfile, limit, alive)
        return _read_exact(rfile, int(headers.get("content-length", "0")), alive, "body")

    def read_chunked(self, rfile: Reader, limit: int, alive: Alive = lambda: None) -> bytes:
        """RFC 9112 7.1: hex sizes only, each chunk's data followed by CRLF, trailers read and dropped."""
        body = bytearray()  # one buffer: tiny chunks cost no per-chunk objects
        while True:
            line = rfile.readline(self.limits.max_line_bytes + 1)
            if not line.endswith(b"\n"):
                if len(line) > self.limits.max_line_bytes:
                    raise HTTPError(400, "chunk size line is too long")
                raise _Closed("connection closed in chunked body")
            m = _CHUNK_SIZE.match(line)
            if not m:
                raise HTTPError(400, f"malformed chunk size line {line[:40]!r}; expected hex digits then CRLF")
            size = int(m.group(1), 16)
            if size == 0:
                self.read_fields(rfile, "trailer")
                return bytes(body)
            if len(body) + size > limit:
                raise HTTPError(413, f"chunked body is over the limit of {limit} bytes", "body_too_large")
            body += _read_exact(rfile, size, alive, "chunk")
            alive()
            end = rfile.read(2)
            if end != b"\r\n":
                if len(end) < 2:
                    raise _Closed("connection closed in chunk")
                raise HTTPError(400, f"chunk data is longer than its size {size} (no CRLF after it)")


def _read_exact(rfile: Reader, n: int, alive: Alive, what: str) -> bytes | bytearray:
    """``n`` bytes in pieces of BODY_PIECE, calling ``alive()`` after each; _Closed if the client stops short."""
    if n <= BODY_PIECE:
        data = rfile.read(n)
        if len(data) != n:
            raise _Closed(f"connection closed in {what}")
        return data
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = rfile.readinto(view[got : got + BODY_PIECE])
        if not k:
            raise _Closed(f"connection closed in {what}")
        got += k
        alive()
    return buf  # bytes-like: what reads the body takes a bytearray too (no second copy)
