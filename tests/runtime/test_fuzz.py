"""Property test: thousands of malformed requests never get a 5xx, and the server stays up."""

from __future__ import annotations

import http.client
import json
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT64", "UINT8", "BOOL", "BYTES", "float", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30,
)
dims = st.lists(st.one_of(st.integers(-3, 10), st.integers(0, 2**62), st.text(max_size=2)), max_size=5)
tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["input", "Input", "logits", ""]) | st.text(max_size=8) | json_values,
        "shape": st.just([1, 1, 8, 8]) | dims | json_values,
        "datatype": st.sampled_from(DATATYPES) | json_values,
        "data": st.lists(st.floats(allow_nan=False, width=32), max_size=70) | json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-5, 400) | json_values}),
    },
)
request = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(tensor, max_size=3) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries({}, optional={"name": st.text(max_size=8) | json_values, "parameters": json_values}),
            max_size=2,
        ),
        "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "x"]), json_values, max_size=2),
        "id": json_values,
    },
)
SETTINGS = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


class Client:
    def __init__(self, port):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.count = 0

    def post(self, path, body, headers):
        self.count += 1
        for attempt in range(2):
            try:
                self.conn.request("POST", path, body, headers)
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                return r.status, data
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _check(status, data):
    assert status < 500, (status, data[:300])
    if status >= 400:
        assert "error" in json.loads(data)


def test_fuzz_infer_requests(server):
    client = Client(server.port)

    @settings(SETTINGS, max_examples=1500)
    @given(
        req=request,
        tail=st.binary(max_size=300),
        header_len=st.none() | st.integers(-10, 2000) | st.text(alphabet="0123456789abc -+.", max_size=4),
        path=st.sampled_from(
            ["/v2/models/digits/infer", "/v2/models/nope/infer", "/v2/models/digits/versions/x/infer"]
        ),
    )
    def structured(req, tail, header_len, path):
        head = json.dumps(req).encode()
        headers = {}
        if header_len is not None:
            headers["Inference-Header-Content-Length"] = str(header_len if header_len != 0 else len(head))
        _check(*client.post(path, head + (tail if header_len is not None else b""), headers))

    @settings(SETTINGS, max_examples=600)
    @given(body=st.binary(max_size=500))
    def raw_bodies(body):
        _check(*client.post("/v2/models/digits/infer", body, {}))

    structured()
    raw_bodies()
    assert client.count >= 2000
    assert server.request("GET", "/v2/health/live")[0] == 200


def test_fuzz_raw_http(server):
    @settings(SETTINGS, max_examples=400)
    @given(
        line=st.binary(max_size=60) | st.sampled_from([b"GET / HTTP/1.1", b"POST /v2/models/digits/infer HTTP/1.1"]),
        headers=st.lists(
            st.binary(max_size=40)
            | st.sampled_from(
                [
                    b"Content-Length: -1",
                    b"Content-Length: 99999999999",
                    b"Transfer-Encoding: chunked",
                    b"Transfer-Encoding: gzip",
                    b"Inference-Header-Content-Length: x",
                    b"Expect: 100-continue",
                ]
            ),
            max_size=4,
        ),
        body=st.binary(max_size=80),
    )
    def raw(line, headers, body):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body)
            s.shutdown(socket.SHUT_WR)
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except OSError:
                pass
        if data:
            status = int(data.split(b" ", 2)[1])
            # 501 (unknown Transfer-Encoding) and 505 (HTTP/2.0 on this port) are the RFC 9112 answers
            assert status < 500 or status in (501, 505), data[:300]

    raw()
    assert server.request("GET", "/v2/health/live")[0] == 200
