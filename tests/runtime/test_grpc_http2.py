"""The default gRPC transport (``grpch2`` on ``http2``) against hostile HTTP/2 clients: real sockets, frames built
with the ``h2`` library's client (or by hand where h2 refuses to misbehave); after each attack a grpcio client is
still served."""

from __future__ import annotations

import socket
import struct
import time

import grpc
import h2.config
import h2.connection
import h2.events
import numpy as np
import pytest
from conftest import free_port
from edgefleet_runtime.grpcserver import pb
from test_attacks import PeakRss, metric

SERVICE = "/inference.GRPCInferenceService"
ENHANCE_YOUR_CALM, REFUSED_STREAM, PROTOCOL_ERROR = 0xB, 0x7, 0x1


@pytest.fixture
def grpc_h2(start_server, digits):
    def start(*extra):
        port = free_port()
        s = start_server(*digits, "--grpc-port", str(port), *extra)
        s.grpc_port = port
        return s

    return start


class Client:
    """An h2 client connection on a blocking socket."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.flush()

    def flush(self):
        self.sock.sendall(self.h2.data_to_send())

    def headers(self, path=f"{SERVICE}/ModelInfer", extra=()):
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                   (":authority", "t"), ("content-type", "application/grpc"), ("te", "trailers"),
                                   *extra])  # fmt: skip
        return sid

    def events(self, until: float = 10.0):
        """Events until the server closes or ``until`` seconds pass."""
        deadline = time.monotonic() + until
        out = []
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            out += self.h2.receive_data(data)
            try:
                self.flush()
            except OSError:
                break
        return out

    def goaway(self, until: float = 10.0):
        return next((e for e in self.events(until) if isinstance(e, h2.events.ConnectionTerminated)), None)


def _served(port: int) -> None:
    """A grpcio client still gets an inference."""
    req = pb.ModelInferRequest(model_name="digits", raw_input_contents=[np.zeros(64, np.float32).tobytes()])
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(f"{SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                              response_deserializer=pb.ModelInferResponse.FromString)  # fmt: skip
        assert len(call(req, timeout=10).raw_output_contents[0]) == 40


def _status(events, sid):
    for e in events:
        if isinstance(e, h2.events.TrailersReceived | h2.events.ResponseReceived) and e.stream_id == sid:
            headers = dict(e.headers)
            if "grpc-status" in headers:
                return headers["grpc-status"], headers.get("grpc-message", "")
    return None


def test_grpc_rapid_reset_gets_goaway(grpc_h2):
    """CVE-2023-44487: streams opened and reset at once, thousands of them: GOAWAY ENHANCE_YOUR_CALM, closed."""
    s = grpc_h2()
    c = Client(s.grpc_port)
    c.events(0.3)
    for _ in range(2000):
        sid = c.headers()
        c.h2.reset_stream(sid)
    try:
        c.flush()
    except OSError:
        pass
    ended = c.goaway()
    assert ended is not None and ended.error_code == ENHANCE_YOUR_CALM, ended
    assert metric(s, "edgefleet_runtime_refused_total", reason="grpc_rapid_reset") == 1
    _served(s.grpc_port)


@pytest.mark.parametrize("flood", ["ping", "settings"])
def test_grpc_ping_and_settings_floods_get_goaway(grpc_h2, flood):
    s = grpc_h2()
    c = Client(s.grpc_port)
    c.events(0.3)
    for i in range(3000):
        if flood == "ping":
            c.h2.ping(struct.pack(">Q", i))
        else:
            try:
                c.sock.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an empty SETTINGS, by hand
            except OSError:  # closed by the server
                break
    try:
        c.flush()
    except OSError:
        pass
    ended = c.goaway()
    assert ended is not None and ended.error_code == ENHANCE_YOUR_CALM, ended
    assert metric(s, "edgefleet_runtime_refused_total", reason="grpc_control_flood") == 1
    _served(s.grpc_port)


def test_grpc_streams_over_max_concurrent_streams_are_refused(grpc_h2):
    """The server advertises 64 concurrent streams; a 65th open one (sent by hand: h2 keeps the limit) is reset
    REFUSED_STREAM and the first 64 stay open."""
    s = grpc_h2()
    c = Client(s.grpc_port)
    c.events(0.3)
    assert c.h2.remote_settings.max_concurrent_streams == 64
    for _ in range(64):
        c.headers()
    c.flush()
    block = b"\x83\x86\x84"  # :method POST, :scheme http, :path / (HPACK static table)
    c.sock.sendall(struct.pack(">HBBBI", 0, len(block), 1, 0x4, 129) + block)  # HEADERS, END_HEADERS, stream 129
    frames = _frames(c.sock, 1.0)
    resets = [(sid, payload) for kind, sid, payload in frames if kind == 3]
    assert resets == [(129, struct.pack(">I", REFUSED_STREAM))], resets
    assert not [f for f in frames if f[0] == 7], "no GOAWAY"
    _served(s.grpc_port)


def _frames(sock, seconds):
    """(type, stream, payload) of the frames that arrive within ``seconds``."""
    data = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    out, pos = [], 0
    while len(data) - pos >= 9:
        hi, lo, kind, _flags, sid = struct.unpack_from(">HBBBI", data, pos)
        n = (hi << 8) | lo
        out.append((kind, sid & 0x7FFFFFFF, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


def test_grpc_header_list_over_the_limit_closes_the_connection(grpc_h2):
    """A 40 kB header (HEADERS + CONTINUATION) against --max-header-bytes 32768: GOAWAY, nothing buffered."""
    s = grpc_h2()
    c = Client(s.grpc_port)
    c.events(0.3)
    c.headers(extra=[("x-big", "a" * 40000)])
    c.flush()
    ended = c.goaway()
    assert ended is not None and ended.error_code in (ENHANCE_YOUR_CALM, PROTOCOL_ERROR), ended
    _served(s.grpc_port)


def test_grpc_huge_length_prefix_is_refused_before_buffering(grpc_h2):
    """A message that announces 1 GiB: RESOURCE_EXHAUSTED at once from its length prefix, memory untouched."""
    s = grpc_h2()
    c = Client(s.grpc_port)
    c.events(0.3)
    with PeakRss(s.proc.pid, every=0.01) as rss:
        sid = c.headers()
        c.h2.send_data(sid, struct.pack(">BI", 0, 1 << 30) + b"\0" * 1000)
        c.flush()
        got = _status(c.events(1.0), sid)
    assert got is not None and got[0] == "8" and "larger than max" in got[1], got  # 8: RESOURCE_EXHAUSTED
    assert rss.peak - rss.base < 20, (rss.base, rss.peak)
    assert metric(s, "edgefleet_runtime_refused_total", reason="grpc_message_refused") == 1
    _served(s.grpc_port)


def test_grpc_stalled_message_meets_its_deadline(grpc_h2):
    """Half a message, then silence: DEADLINE_EXCEEDED at the client's grpc-timeout (500 ms here), well before
    --body-timeout; the connection stays usable."""
    s = grpc_h2()
    c = Client(s.grpc_port)
    c.events(0.3)
    t0 = time.monotonic()
    sid = c.headers(extra=[("grpc-timeout", "500m")])
    c.h2.send_data(sid, struct.pack(">BI", 0, 300) + b"\0" * 100)
    c.flush()
    got = None
    while got is None and time.monotonic() - t0 < 5:
        got = _status(c.events(0.5), sid)
    assert got is not None and got[0] == "4", got  # 4: DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2.5
    assert metric(s, "edgefleet_runtime_refused_total", reason="body_timeout") == 1
    _served(s.grpc_port)


def test_grpc_stalled_connections_are_evicted_at_the_connection_cap(grpc_h2):
    """--max-connections 4, each held by a call that stalls mid-message: a new client evicts the silent ones."""
    s = grpc_h2("--max-connections", "4")
    holders = []
    for _ in range(4):
        c = Client(s.grpc_port)
        c.events(0.2)
        sid = c.headers()
        c.h2.send_data(sid, struct.pack(">BI", 0, 300) + b"\0" * 10)
        c.flush()
        holders.append(c)
    time.sleep(2.5)  # longer than STALL_SECONDS
    _served(s.grpc_port)
    assert metric(s, "edgefleet_runtime_refused_total", reason="evicted_stalled_body") >= 1


def test_grpc_not_http2_is_closed_with_goaway(grpc_h2):
    s = grpc_h2()
    sock = socket.create_connection(("127.0.0.1", s.grpc_port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    # our SETTINGS, then GOAWAY (type 7) with PROTOCOL_ERROR
    assert b"\x07\x00\x00\x00\x00\x00" in data, data[:200]
    sock.close()
    assert metric(s, "edgefleet_runtime_refused_total", reason="grpc_protocol_error") == 1


def test_grpc_unknown_method_is_unimplemented(grpc_h2):
    s = grpc_h2()
    with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"{SERVICE}/RepositoryIndex")(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "RepositoryIndex" in err.value.details()


def test_grpc_drain_finishes_calls_and_refuses_new_connections(grpc_h2):
    """SIGTERM: GOAWAY to open connections, the server exits 0."""
    s = grpc_h2()
    c = Client(s.grpc_port)
    c.events(0.3)
    assert s.stop() == 0
    ended = c.goaway(5)
    assert ended is not None and ended.error_code == 0, ended


def test_grpc_server_flag_selects_the_grpcio_fallback(grpc_h2):
    """--grpc-server grpcio serves the same service on grpcio (its own UNIMPLEMENTED text tells them apart)."""
    s = grpc_h2("--grpc-server", "grpcio")
    with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"{SERVICE}/RepositoryIndex")(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "RepositoryIndex" not in err.value.details()
    _served(s.grpc_port)
