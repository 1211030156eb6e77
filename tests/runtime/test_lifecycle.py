"""Digest check, hot reload under concurrent load (watch, load API, SIGHUP), graceful drain."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import numpy as np
import onnxruntime as ort
from conftest import make_cache

X = np.random.default_rng(7).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)
BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": X.ravel().tolist()}]}
).encode()


def _expected(*variants):
    out = {}
    for path, digest in variants:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out[digest.split(":")[1][:12]] = sess.run(["logits"], {"input": X})[0].ravel()
    return out


def test_digest_mismatch_is_refused(start_server, digits, digits_v1):
    s = start_server(digits[0], digits_v1[1], wait=False)
    assert s.proc.wait(20) == 3
    logs = s.logs()
    assert "digest mismatch" in logs and digits_v1[1] in logs and "refusing to serve" in logs
    s = start_server(digits[0], "sha256:1234", wait=False)
    assert s.proc.wait(20) == 3
    assert "not of the form sha256:<64 lowercase hex>" in s.logs()


class Load:
    """Client threads on keep-alive connections; every response is checked against the version it names."""

    def __init__(self, port: int, expected: dict, threads: int = 4):
        self.port, self.expected = port, expected
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("POST", "/v2/models/digits/infer", BODY)
                r = conn.getresponse()
                body = r.read()
                if r.status != 200:
                    raise AssertionError(f"status {r.status}: {body[:200]!r}")
                resp = json.loads(body)
                version = resp["model_version"]
                got = np.array(resp["outputs"][0]["data"], dtype=np.float32)
                if not np.allclose(got, self.expected[version], rtol=1e-5, atol=1e-5):
                    raise AssertionError(f"outputs do not match version {version}")
                with self.lock:
                    self.seen[version] = self.seen.get(version, 0) + 1
            except Exception as e:  # noqa: BLE001 - every failure is a test failure
                with self.lock:
                    self.failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def wait_for(self, version: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        base = self.seen.get(version, 0)
        while time.monotonic() < deadline:
            if self.seen.get(version, 0) > base + 20:
                return
            time.sleep(0.02)
        raise AssertionError(f"never served version {version}; seen {self.seen}, failures {self.failures[:3]}")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_hot_reload_under_load_has_zero_failed_requests(start_server, tmp_path, digits, digits_v1):
    cache = tmp_path / "cache"
    link = make_cache(cache, *digits)
    make_cache(cache, *digits_v1, name="staging")  # v1 is in the cache too
    v0, v1 = (d[1].split(":")[1][:12] for d in (digits, digits_v1))
    token = tmp_path / "token"
    token.write_text("t0k3n-" + "x" * 26 + "\n")
    auth = {"Authorization": "Bearer t0k3n-" + "x" * 26}
    s = start_server(
        link, None, "--watch", "--watch-interval", "0.1", "--cache", str(cache), "--management-token-file", str(token)
    )
    load = Load(s.port, _expected(digits, digits_v1))
    try:
        load.wait_for(v0)
        make_cache(cache, *digits_v1)  # the node cache now points at v1: the watcher swaps
        load.wait_for(v1)
        # the load API (repository extension) swaps back to v0 by digest from the cache
        status, _, body = s.request(
            "POST", "/v2/repository/models/digits/load", json.dumps({"parameters": {"digest": digits[1]}}).encode(),
            auth,
        )
        assert status == 200, body
        assert json.loads(body)["version"] == v0
        load.wait_for(v0)
        # a cached file whose bytes do not match its name is refused (without saying what its digest is)
        # and the old model keeps serving
        fake = "sha256:" + "ab" * 32
        (cache / "sha256" / ("ab" * 32)).write_bytes(digits_v1[0].read_bytes())
        status, _, body = s.request(
            "POST", "/v2/repository/models/digits/load", json.dumps({"parameters": {"digest": fake}}).encode(), auth
        )
        error = json.loads(body)["error"]
        assert status == 409 and "does not match that digest" in error, body
        assert digits_v1[1].split(":")[1] not in error
        load.wait_for(v0)
    finally:
        load.finish()
    assert load.failures == [], load.failures[:5]
    assert load.seen[v0] > 0 and load.seen[v1] > 0
    metrics = s.request("GET", "/metrics")[2].decode()
    assert 'edgefleet_runtime_reloads_total{result="loaded"} 3.0' in metrics
    assert s.stop() == 0


def test_sighup_reloads_and_a_corrupt_blob_is_refused(start_server, tmp_path, digits, digits_v1):
    cache = tmp_path / "cache"
    link = make_cache(cache, *digits)
    s = start_server(link, digits[1])
    v1 = digits_v1[1].split(":")[1][:12]
    make_cache(cache, *digits_v1)
    s.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while json.loads(s.request("GET", "/v2/models/digits")[2])["versions"] != [v1]:
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.05)
    # a blob whose name claims a digest its bytes do not have
    fake = "ab" * 32
    (cache / "sha256" / fake).write_bytes(digits[0].read_bytes())
    make_cache(cache, digits[0], "sha256:" + fake)
    s.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in s.logs():
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.05)
    assert json.loads(s.request("GET", "/v2/models/digits")[2])["versions"] == [v1]
    assert s.request("GET", "/v2/health/ready")[0] == 200


def test_graceful_shutdown_drains_in_flight_requests(start_server, digits):
    s = start_server(digits[0], digits[1], "--shutdown-delay", "0.5")
    idle = s.conn()
    idle.request("GET", "/v2/health/live")
    assert idle.getresponse().read()
    # a request that is in flight when SIGTERM arrives: headers and half the body sent
    sock = socket.create_connection(("127.0.0.1", s.port))
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n").encode()
    sock.sendall(head + BODY[:100])
    time.sleep(0.2)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    assert s.request("GET", "/v2/health/ready")[0] == 503  # not ready, still serving during the delay
    assert s.request("GET", "/v2/health/live")[0] == 200
    time.sleep(0.7)
    try:  # after the delay: no new connections
        socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
        refused = False
    except OSError:
        refused = True
    assert refused
    sock.sendall(BODY[100:])
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK"), data[:200]
    assert b"Connection: close" in data and b'"model_name":"digits"' in data
    assert s.proc.wait(10) == 0
    assert '"drained":true' in s.logs()
