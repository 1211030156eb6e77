"""Unary gRPC over HTTP/2 on plain threads: the default gRPC transport of ``serve --grpc-port``.

Why not grpcio's server: its own cost per call (polling thread, hand-off to a pool, condition variables) was above
what REST costs for a whole inference (docs/runtime.md), and ``h2`` (hyper-h2) cost as much. Here HTTP/2 framing
is the project's ``http2`` (the server side unary gRPC needs) on a thread per connection, as the REST server
(``httpserver``) does; a complete call runs on the
connection's thread when it is the connection's only open call (calls beside others go to a pool, so that
multiplexing clients run in parallel and the connection keeps reading), decoded and answered by the same
``grpcserver.InferenceService`` that grpcio serves (``--grpc-server grpcio``). Only unary methods are served.

Limits (``Limits``), each refusal counted in ``refused_total``:

* connections: at most ``max_connections``; at the cap a new one evicts the longest-idle connection (no call
  open), else one still in its handshake, else one whose every open call has been silent STALL_SECONDS;
* the client preface and SETTINGS within ``header_seconds``; a connection with no call open closes after
  ``idle_seconds``; a response not written within ``write_seconds`` closes the connection;
* a call's message: its length prefix is checked against the method's limit (ModelInfer: what the model can
  need, capped by --max-body-bytes) and charged to the process's memory budget before any of it is kept;
  flow-control credit beyond the first window is granted only for a charged message; the whole message must
  arrive within ``body_seconds`` and the client's ``grpc-timeout``;
* HTTP/2 (``http2``): MAX_CONCURRENT_STREAMS per connection (a stream over it is reset REFUSED_STREAM), a header
  block of at most ``max_header_bytes`` in at most 32 CONTINUATION frames, frames of at most 16 KiB; calls open
  in the whole process beyond ``calls_limit`` are refused RESOURCE_EXHAUSTED, after evicting a call silent for
  STALL_SECONDS; streams reset by the client (CVE-2023-44487 "rapid reset") and control frames (PING, SETTINGS,
  PRIORITY, empty DATA, unknown frames) are rate-limited per connection (token buckets; each call adds a few
  control tokens, as clients answer responses with WINDOW_UPDATE and PING): past the limit the connection gets
  GOAWAY ENHANCE_YOUR_CALM and is closed; a response the client gives no window for is reset after
  ``write_seconds``;
* large messages (over 64 KiB) are taken in by at most ``receivers()`` calls at once (grpcio's pool size, from
  the memory budget); the others wait without flow-control credit, so what they send is bounded by one window.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc

from . import http2
from .budget import Lease
from .grpcserver import MESSAGE_EXPANSION, SERVICE, InferenceService, message_limit, pb, receivers
from .tensors import MemoryRefused, charge

if TYPE_CHECKING:
    from .config import Limits
    from .dataplane import DataPlane

log = logging.getLogger("edgefleet_runtime.grpc")

MAX_STREAMS = 64  # SETTINGS_MAX_CONCURRENT_STREAMS, as grpcio's server
SMALL_MESSAGE = 64 << 10  # every method but ModelInfer takes a tiny request
STALL_SECONDS = 2.0  # a call (or connection) silent this long may be evicted at a cap
CONTROL_BURST, CONTROL_RATE = 400, 100.0  # control frames per connection: a bucket of 400, refilled 100/s
CONTROL_PER_CALL = 4  # and by this many per call (clients answer each response with WINDOW_UPDATE, PING)
RESET_BURST, RESET_RATE = 200, 20.0  # streams reset by the client per connection
RECV_BYTES = 65536
FIRST_WINDOW = 65535  # a stream's flow-control window before its message is admitted (HTTP/2's default)
CONNECTION_WINDOW = 1 << 20  # connection-level credit: every byte taken in is charged or dropped at once
_PREFIX = struct.Struct(">BI")
_RESPONSE_HEADERS = b"\x88" + http2.literal(b"content-type", b"application/grpc")  # :status 200 is static 8
_OK = http2.literal(b"grpc-status", b"0")
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
PREFACE, OPEN, CLOSED = range(3)


class Abort(Exception):
    """A call ends with this status (``grpc.StatusCode``) and message."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: list[tuple[str, str]] | None = None):
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers or []


class Context:
    """What ``InferenceService`` uses of grpcio's ServicerContext."""

    def __init__(self) -> None:
        self.trailers: list[tuple[str, str]] = []

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailers = [(str(k), str(v)) for k, v in metadata]

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Abort(code, details, self.trailers)


class Bucket:
    """A token bucket: ``take`` is False once more than ``burst`` events came faster than ``rate`` per second."""

    def __init__(self, burst: int, rate: float):
        self.burst, self.rate = burst, rate
        self.tokens, self.at = float(burst), time.monotonic()

    def add(self, n: int) -> None:
        self.tokens = min(self.burst, self.tokens + n)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= 1
        return self.tokens >= 0


class Call:
    """One stream: its method, deadline and message as it arrives (charged to ``lease`` once its size is known)."""

    __slots__ = ("sid", "method", "deadline", "heard", "early", "buf", "need", "lease", "state", "conn", "slot",
                 "waiting", "ended")

    def __init__(self, conn: Conn, sid: int, method: str, deadline: float):
        self.conn, self.sid, self.method, self.deadline = conn, sid, method, deadline
        self.heard = time.monotonic()
        self.early = bytearray()  # what arrives before the message is admitted (at most the first window)
        self.buf = bytearray()
        self.need = -1  # message bytes still to come; -1: not admitted yet
        self.lease: Lease | None = None
        self.slot = False  # holds one of the receive slots (messages over SMALL_MESSAGE)
        self.waiting = False  # its length is known, it waits for a receive slot (no flow-control credit)
        self.ended = False  # END_STREAM arrived
        self.state = "receiving"  # -> "ready" (message complete) -> "running" -> "done"


class Conn:
    """One connection: the h2 state machine and the socket, both used under ``lock``."""

    def __init__(self, sock: socket.socket, header_bytes: int, header_seconds: float):
        self.sock = sock
        self.h2 = http2.Connection(MAX_STREAMS, header_bytes)
        self.lock = threading.Lock()
        self.calls: dict[int, Call] = {}
        self.pending: dict[int, tuple[memoryview, bytes, float]] = {}  # sid -> output left, trailers, deadline
        self.state = PREFACE
        self.heard = time.monotonic()
        self.deadline = self.heard + header_seconds  # PREFACE: the handshake's deadline; OPEN: idle deadline
        self.writing_since = 0.0  # when a blocked write began (0: none)
        self.closed_by: str | None = None
        self.control = Bucket(CONTROL_BURST, CONTROL_RATE)
        self.resets = Bucket(RESET_BURST, RESET_RATE)

    def close(self, why: str) -> None:
        """From any thread: unblock the connection's thread, which then closes the socket."""
        if self.closed_by is None:
            self.closed_by = why
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def flush(self) -> None:
        """Send what h2 has queued (holding ``lock``); a write blocked past write_seconds is closed by the watchdog."""
        data = self.h2.take_out()
        if data:
            self.writing_since = time.monotonic()
            try:
                self.sock.sendall(data)
            except OSError:
                self.close("write_failed")
            finally:
                self.writing_since = 0.0


def grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` header (1-8 ASCII digits and a unit); None when malformed."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit() or not digits.isascii():
        return None
    return int(digits) * unit


def _percent(text: str) -> bytes:
    """grpc-message encoding: printable ASCII but '%' as is, everything else %XX of its UTF-8."""
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in text.encode())


class GRPCH2Server:
    def __init__(self, plane: DataPlane, host: str, port: int, limits: Limits):
        self.plane = plane
        self.limits = limits
        self.service = InferenceService(plane, limits)
        self.refused: Callable[[str], None] = plane.metrics.count_refused
        self.pool_size = receivers(limits, message_limit(plane, limits))
        self.calls_limit = self.pool_size * 4  # calls open in the process at once (grpcio's bound, same numbers)
        self.pool = ThreadPoolExecutor(self.pool_size, thread_name_prefix="grpc")
        self.methods = {
            f"/{SERVICE}/{name}": (getattr(self.service, name), getattr(pb, f"{name}Request"))
            for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata")
        }
        self.methods[f"/{SERVICE}/ModelInfer"] = (self.service.ModelInfer, None)  # parsed by the service
        self.settings = {
            http2.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            http2.SETTINGS_MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            http2.SETTINGS_ENABLE_PUSH: 0,
        }
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self._stopped = False
        self._lock = threading.Lock()  # guards _conns and _open
        self._conns: set[Conn] = set()
        self._open: set[Call] = set()  # calls from their HEADERS until answered or reset
        self._slots = 0  # receive slots held (of pool_size)
        self._waiting: collections.deque[Call] = collections.deque()  # calls waiting for a receive slot

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="grpc-accept", daemon=True).start()
        threading.Thread(target=self._watchdog, name="grpc-watchdog", daemon=True).start()

    def shutdown(self, timeout: float) -> bool:
        """GOAWAY to every connection, wait for calls in progress up to ``timeout``, close everything."""
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # GOAWAY NO_ERROR: the calls already open are still answered
            with c.lock:
                if c.state == OPEN and c.closed_by is None:
                    c.h2.close(http2.NO_ERROR)
                    with contextlib.suppress(OSError):
                        c.sock.sendall(c.h2.take_out())
        deadline = time.monotonic() + timeout
        while self._open and time.monotonic() < deadline:
            time.sleep(0.02)
        drained = not self._open
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close("shutdown")
        self._stopped = True
        self.pool.shutdown(wait=False)
        return drained

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.01)
                continue
            conn = Conn(sock, self.limits.max_header_bytes, self.limits.header_seconds)
            with self._lock:
                admitted = len(self._conns) < self.limits.max_connections or self._evict_conn()
                if admitted:
                    self._conns.add(conn)
            if not admitted:
                self.refused("connections")
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="grpc-conn", daemon=True).start()

    def _evict_conn(self) -> bool:
        """At the connection cap (holding ``_lock``): close the longest-idle connection with no call open, else
        the oldest still in its handshake, else one whose open calls have all been silent STALL_SECONDS."""
        open_ = [c for c in self._conns if c.closed_by is None]
        stalled_before = time.monotonic() - STALL_SECONDS
        idle = [c for c in open_ if c.state == OPEN and not c.calls]
        slow = [c for c in open_ if c.state == PREFACE]
        stalled = [c for c in open_ if c.calls and c.heard < stalled_before
                   and all(k.state == "receiving" and not k.waiting for k in list(c.calls.values()))]  # fmt: skip
        for group, reason in ((idle, "evicted_idle"), (slow, "evicted_slow"), (stalled, "evicted_stalled_body")):
            if group:
                victim = min(group, key=lambda c: c.heard)
                victim.close(reason)
                self.refused(reason)
                return True
        return False

    def _watchdog(self) -> None:
        while not self._stopped:
            time.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                if c.closed_by is None:
                    self._police(c, now)
            self._admit_waiting()

    def _police(self, c: Conn, now: float) -> None:
        """Deadlines of one connection: handshake, idle, a blocked write, calls whose message is late."""
        if c.writing_since and now - c.writing_since > self.limits.write_seconds:
            self.refused("write_timeout")
            c.close("write_timeout")
        elif c.state == PREFACE and now > c.deadline:
            self.refused("header_timeout")
            c.close("header_timeout")
        elif c.state == OPEN and not c.calls and now > c.deadline:
            c.close("idle_timeout")
        elif c.calls and c.lock.acquire(timeout=0.05):
            try:
                for call in [k for k in c.calls.values() if k.state == "receiving" and now > k.deadline]:
                    self.refused("body_timeout")
                    late = Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request message did not arrive before the "
                                 f"call's deadline (grpc-timeout, at most --body-timeout {self.limits.body_seconds} s)")
                    self._answer_error(call, late)
                for sid in [sid for sid, p in c.pending.items() if now > p[2]]:  # the client gives no window
                    self.refused("write_timeout")
                    c.h2.reset(sid, http2.CANCEL)
                    self._forget(c, sid)
                c.flush()
            finally:
                c.lock.release()

    # ------------------------------------------------------------------ per connection
    def _serve(self, c: Conn) -> None:
        sock = c.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with c.lock:
                c.h2.start(self.settings, CONNECTION_WINDOW)
                c.flush()
            while c.closed_by is None:
                try:
                    data = sock.recv(RECV_BYTES)
                except OSError:
                    return
                if not data:
                    return
                c.heard = time.monotonic()
                ready = self._receive(c, data)
                if len(ready) == 1 and len(c.calls) == 1:  # the connection's only call: run it here, as REST does
                    self._run(ready[0])
                else:  # calls beside others on this connection run in parallel, and reading goes on
                    for call in ready:
                        self.pool.submit(self._run, call)
        finally:
            c.state = CLOSED
            with self._lock:
                self._conns.discard(c)
                self._open.difference_update(c.calls.values())
            for call in list(c.calls.values()):
                self._release(call)
            try:
                sock.close()
            except OSError:
                pass

    def _receive(self, c: Conn, data: bytes) -> list[Call]:
        """Feed bytes to h2, handle its events; return the calls whose message is complete."""
        ready: list[Call] = []
        with c.lock:
            try:
                for ev in c.h2.receive(data):
                    self._event(c, ev, ready)
            except http2.ProtocolError as e:
                self._goaway(c, e.code, "protocol_error", e.message)
            except _Calm as e:
                self._goaway(c, http2.ENHANCE_YOUR_CALM, e.reason, e.reason)
            c.flush()
        return ready

    def _goaway(self, c: Conn, code: int, reason: str, why: str) -> None:
        self.refused(f"grpc_{reason}")
        c.h2.close(code, why[:200].encode(errors="replace"))
        c.flush()
        c.close(reason)

    def _event(self, c: Conn, ev: http2.Event, ready: list[Call]) -> None:
        kind = ev.kind
        if kind == "data":
            call = c.calls.get(ev.sid)
            c.h2.give_back(ev.size)
            if not ev.data and not ev.end:
                self._control(c)  # empty DATA frames cost work and carry nothing
            elif call is not None and call.state == "receiving" and ev.data:
                self._data(call, ev.data)
            if ev.end and call is not None:
                self._ended(call, ready)
        elif kind == "headers":
            self._request(c, ev)
            call = c.calls.get(ev.sid)
            if ev.end and call is not None:
                self._ended(call, ready)
        elif kind == "reset":
            if not c.resets.take():
                raise _Calm("rapid_reset")
            self._forget(c, ev.sid)
        elif kind == "window":
            self._control(c)
            if c.pending:
                self._send_pending(c)
        elif kind == "settings":
            if c.state == PREFACE:
                c.state = OPEN
                c.deadline = time.monotonic() + self.limits.idle_seconds
            self._control(c)
        elif kind == "refused":  # over MAX_CONCURRENT_STREAMS: reset by http2, counted as a reset
            if not c.resets.take():
                raise _Calm("rapid_reset")
        else:  # ping, priority, goaway, unknown frames, DATA on streams that are over
            self._control(c)

    def _control(self, c: Conn) -> None:
        if not c.control.take():
            raise _Calm("control_flood")

    # ------------------------------------------------------------------ calls
    def _request(self, c: Conn, ev: http2.Event) -> None:
        headers = dict(ev.headers or [])
        sid = ev.sid
        c.control.add(CONTROL_PER_CALL)
        timeout = self.limits.body_seconds
        given = headers.get(b"grpc-timeout")
        call = Call(c, sid, headers.get(b":path", b"").decode("latin-1"), 0.0)
        if given is not None:
            seconds = grpc_timeout(given)
            if seconds is None:
                return self._trailers_only(call, Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                                       f"malformed grpc-timeout {given[:20]!r}"))
            timeout = min(timeout, seconds)
        call.deadline = call.heard + timeout
        error = self._check_headers(headers, call.method)
        if self.stopping:
            error = Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if error is not None:
            return self._trailers_only(call, error)
        victim = None
        with self._lock:
            if len(self._open) >= self.calls_limit:
                victim = self._stalled_call()
            full = len(self._open) >= self.calls_limit
            if not full:
                self._open.add(call)
        if victim is not None:
            self._evict(c, victim)
        if full:
            self.refused("grpc_queue_full")
            return self._trailers_only(call, Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                   "the server has too many calls in progress; retry after 1 s"))
        c.calls[sid] = call
        return None

    def _check_headers(self, headers: dict[bytes, bytes], method: str) -> Abort | None:
        if headers.get(b":method") != b"POST":
            return Abort(grpc.StatusCode.UNIMPLEMENTED, "gRPC calls use POST")
        if not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            return Abort(grpc.StatusCode.INVALID_ARGUMENT, "content-type must be application/grpc")
        if headers.get(b"grpc-encoding", b"identity") != b"identity":
            return Abort(grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported (grpc-encoding)")
        if method not in self.methods:
            return Abort(grpc.StatusCode.UNIMPLEMENTED, f"method {method[:200]} is not served")
        return None

    def _stalled_call(self) -> Call | None:
        """At the cap on open calls (holding ``_lock``): take out the call silent longest, if STALL_SECONDS."""
        before = time.monotonic() - STALL_SECONDS
        stalled = [k for k in self._open if k.state == "receiving" and not k.waiting and k.heard < before]
        if not stalled:
            return None
        victim = min(stalled, key=lambda k: k.heard)
        self._open.discard(victim)
        return victim

    def _evict(self, c: Conn, victim: Call) -> None:
        """Answer an evicted call RESOURCE_EXHAUSTED (holding ``c.lock``); a connection whose lock is busy closes."""
        self.refused("evicted_stalled_call")
        error = Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "evicted: the call sent nothing for too long while the server was full")
        if victim.conn is c:
            return self._answer_error(victim, error)
        if not victim.conn.lock.acquire(blocking=False):
            return victim.conn.close("evicted_stalled_call")
        try:
            self._answer_error(victim, error)
            victim.conn.flush()
        finally:
            victim.conn.lock.release()

    def _data(self, call: Call, data: bytes) -> None:
        call.heard = call.conn.heard
        if call.need >= 0:
            return self._fill(call, data)
        call.early += data
        if not call.waiting and len(call.early) >= 5:
            self._admit(call)

    def _fill(self, call: Call, data: bytes | bytearray) -> None:
        if len(data) > call.need:
            self.refused("grpc_message_refused")
            return self._answer_error(call, Abort(grpc.StatusCode.UNIMPLEMENTED,
                                                  "more than one request message in a unary call"))
        got = len(call.buf) - call.need
        call.buf[got : got + len(data)] = data
        call.need -= len(data)
        return None

    def _admit(self, call: Call) -> None:
        """The length prefix arrived: check it; a large message waits for a receive slot (holding back its data
        under flow control) unless one is free."""
        compressed, size = _PREFIX.unpack_from(call.early)
        name = call.method.rsplit("/", 1)[-1]
        limit = message_limit(self.plane, self.limits) if name == "ModelInfer" else SMALL_MESSAGE
        if compressed:
            self.refused("grpc_message_refused")
            return self._answer_error(call, Abort(grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not served"))
        if size > limit:
            self.refused("grpc_message_refused")
            return self._answer_error(call, Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                  f"Received message larger than max ({size} vs. {limit})"))
        if size > SMALL_MESSAGE:
            with self._lock:
                call.slot = self._slots < self.pool_size
                if call.slot:
                    self._slots += 1
                else:
                    call.waiting = True
                    self._waiting.append(call)
            if call.waiting:
                return None
        return self._start(call, size)

    def _start(self, call: Call, size: int) -> None:
        """Charge the message to the memory budget, grant flow-control credit for it, take in what came early."""
        lease = call.lease = self.plane.lease()
        try:
            charge(lease, size * MESSAGE_EXPANSION, f"a message of {size} bytes")
        except MemoryRefused as e:
            self.plane.metrics.count("grpc", e.status)
            self.refused("memory_budget")
            return self._answer_error(call, Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message))
        call.need = size
        call.buf = bytearray(size)  # charged above: filled in place as the message arrives
        early, call.early = call.early[5:], bytearray()
        call.conn.h2.grant(call.sid, size + 5 - FIRST_WINDOW)  # its first window held the prefix and maybe more
        return self._fill(call, early)

    def _admit_waiting(self) -> None:
        """Give free receive slots to calls waiting for one (from threads that hold no connection's lock)."""
        for _ in range(self.calls_limit):
            with self._lock:
                if not self._waiting or self._slots >= self.pool_size:
                    return
                call = self._waiting.popleft()
                if call.state != "receiving" or call.conn.closed_by is not None:
                    continue
                self._slots += 1
                call.slot, call.waiting = True, False
            c = call.conn
            if not c.lock.acquire(timeout=0.05):
                self._release(call)
                with self._lock:
                    call.waiting = True
                    self._waiting.appendleft(call)
                return
            try:
                if c.calls.get(call.sid) is call:
                    self._start(call, _PREFIX.unpack_from(call.early)[1])
                    if call.ended and call.state == "receiving":
                        ready: list[Call] = []
                        self._ended(call, ready)
                        for r in ready:
                            self.pool.submit(self._run, r)
                else:
                    self._release(call)
                c.flush()
            finally:
                c.lock.release()

    def _ended(self, call: Call, ready: list[Call]) -> None:
        call.ended = True
        if call.state != "receiving" or call.waiting:
            return
        if call.need != 0:
            self.refused("grpc_message_refused")
            return self._answer_error(call, Abort(grpc.StatusCode.INTERNAL,
                                                  "the call ended before its request message was complete"))
        call.state = "ready"
        ready.append(call)
        return None

    def _run(self, call: Call) -> None:
        """Decode, run and answer one call whose message is complete (on the connection's thread or the pool)."""
        c = call.conn
        if call.state != "ready" or c.closed_by is not None:
            return self._release(call)
        call.state = "running"
        behavior, request_type = self.methods[call.method]
        context = Context()
        try:
            if request_type is None:  # ModelInfer: the service parses the message, charged here already
                out = behavior(call.buf, context, call.lease)
            else:
                out = behavior(request_type.FromString(call.buf), context)
            payload = out.SerializeToString()
        except Abort as e:
            with c.lock:
                self._answer_error(call, e)
                c.flush()
            return
        except Exception as e:  # noqa: BLE001 - a malformed small message (DecodeError) or a bug: the call fails
            error = Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {call.method.rsplit('/', 1)[-1]} message")
            if "DecodeError" not in type(e).__name__:
                log.exception("grpc call failed", extra={"method": call.method})
                error = Abort(grpc.StatusCode.INTERNAL, "internal error")
            with c.lock:
                self._answer_error(call, error)
                c.flush()
            return
        finally:
            self._release(call)
        with c.lock:
            self._answer(call, payload, context.trailers)
            c.flush()
        if self._waiting:
            self._admit_waiting()

    # ------------------------------------------------------------------ answers (holding the connection's lock)
    def _answer(self, call: Call, payload: bytes, trailers: list[tuple[str, str]]) -> None:
        c = call.conn
        if call.sid not in c.calls or c.closed_by is not None:
            return
        data = _PREFIX.pack(0, len(payload)) + payload
        tail = _OK + b"".join(http2.literal(k.encode(), v.encode()) for k, v in trailers) if trailers else _OK
        if c.h2.send_whole(call.sid, _RESPONSE_HEADERS, data, tail):  # the usual case: one write of three frames
            return self._forget(c, call.sid)
        c.h2.send_headers(call.sid, _RESPONSE_HEADERS)
        out = memoryview(data)
        c.pending[call.sid] = (out, tail, time.monotonic() + self.limits.write_seconds)
        self._send_pending(c)

    def _send_pending(self, c: Conn) -> None:
        """Send what the client's windows allow of each pending response; trailers once a response is out."""
        for sid, (out, tail, deadline) in list(c.pending.items()):
            if sid not in c.h2.answering:  # reset by the client meanwhile
                self._forget(c, sid)
                continue
            out = out[c.h2.send_data(sid, out) :]
            if out:
                c.pending[sid] = (out, tail, deadline)
                continue
            c.h2.send_headers(sid, tail, end=True)
            self._forget(c, sid)

    def _answer_error(self, call: Call, e: Abort) -> None:
        """A response of one HEADERS frame with the status (gRPC's Trailers-Only), or trailers after a response
        began; then the stream is over (reset NO_ERROR if the client is still sending)."""
        c = call.conn
        if call.sid in c.h2.answering:
            if call.sid in c.pending:
                c.h2.send_headers(call.sid, self._status(e), end=True)
            else:
                c.h2.send_headers(call.sid, _RESPONSE_HEADERS + self._status(e), end=True)
        self._forget(c, call.sid)

    def _trailers_only(self, call: Call, e: Abort) -> None:
        self._answer_error(call, e)

    @staticmethod
    def _status(e: Abort) -> bytes:
        block = http2.literal(b"grpc-status", str(e.code.value[0]).encode())
        block += http2.literal(b"grpc-message", _percent(e.details))
        return block + b"".join(http2.literal(k.encode(), v.encode()) for k, v in e.trailers)

    def _forget(self, c: Conn, sid: int) -> None:
        """The stream is over (answered or reset): drop its call and what it holds."""
        c.pending.pop(sid, None)
        call = c.calls.pop(sid, None)
        if call is not None:
            if call.state != "running":
                self._release(call)
            call.state = "done"
            with self._lock:
                self._open.discard(call)
        if not c.calls:
            c.deadline = time.monotonic() + self.limits.idle_seconds
        if sid in c.h2.open:  # the client still sends: stop it
            c.h2.reset(sid, http2.NO_ERROR)

    def _release(self, call: Call) -> None:
        if call.lease is not None:
            call.lease.release()
        call.buf = call.early = bytearray()
        if call.slot:
            call.slot = False
            with self._lock:
                self._slots -= 1


class _Calm(Exception):
    """The client sends too many resets or control frames: GOAWAY ENHANCE_YOUR_CALM."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
