"""Issue 23, the runtime's second hardening round: each class of hostile input, over REST and gRPC where both apply."""

from __future__ import annotations

import socket
import time

from test_attacks import INFER, exchange, metric, status_of


# ------------------------------------------------------------------------------------------ connection cap
def test_bodies_that_stall_are_evicted_at_the_connection_cap(start_server, digits):
    """8 connections at a cap of 8 announce a body, send 10 bytes of it and stall: a probe is still answered
    (the longest-stalled body is evicted, as an idle or slow-header connection would be), not 503 until
    --body-timeout."""
    s = start_server(*digits, "--max-connections", "8", "--body-timeout", "30")
    stalled = []
    for _ in range(8):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        c.sendall(INFER + b"Content-Length: 4000\r\n\r\n" + b'{"inputs":')
        stalled.append(c)
    try:
        time.sleep(1.5)  # long enough for every body to count as stalled
        t0 = time.monotonic()
        out = exchange(s.port, b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status_of(out) == 200, out[:200]
        assert time.monotonic() - t0 < 2
        assert metric(s, "edgefleet_runtime_refused_total", reason="evicted_stalled_body") >= 1
    finally:
        for c in stalled:
            c.close()


# ------------------------------------------------------------------------------------------ numeric headers
def test_numeric_headers_take_ascii_digits_only(server):
    """'\\xb2' (superscript two) is a digit to str.isdigit and to int() a ValueError: 400 naming the header."""
    body = b'{"inputs":[]}'
    for header in (b"Inference-Header-Content-Length: \xb2", b"Inference-Header-Content-Length: \xd9\xa3",
                   b"Inference-Header-Content-Length: +5", b"Content-Length: \xb2"):
        framing = b"" if header.startswith(b"Content-Length") else b"Content-Length: %d\r\n" % len(body)
        out = exchange(server.port, INFER + header + b"\r\n" + framing + b"\r\n" + body)
        assert status_of(out) == 400, (header, out[:300])
        assert header.split(b":")[0] in out, out[:300]
