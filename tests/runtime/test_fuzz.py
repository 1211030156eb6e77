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


# ------------------------------------------------------------------------------ the request parser in-process
class _OverLimit(Exception):
    pass


def _parse(data: bytes, limit: int = 1 << 16):
    import io

    from edgefleet_runtime.httpserver import Limits, RequestParser

    parser = RequestParser(Limits())
    rfile = io.BufferedReader(io.BytesIO(data))
    method, path, version, headers = parser.read_head(rfile)
    chunked, length = parser.body_framing(version, headers)
    if length > limit:
        raise _OverLimit  # the server answers 413 here, before reading
    return method, path, headers, parser.read_body(rfile, headers, limit), rfile.read()


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=12)
field_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip)


@st.composite
def valid_request(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "HEAD"]))
    path = "/" + draw(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30))
    names = draw(st.lists(token, max_size=6, unique_by=str.lower))
    names = [n for n in names if n.lower() not in ("host", "content-length", "transfer-encoding", "expect")]
    fields = {n: draw(field_value) for n in names}
    body = draw(st.binary(max_size=300))
    use_chunked = draw(st.booleans())
    head = f"{method} {path} HTTP/1.1\r\nHost: h\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    if use_chunked:
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        wire = b""
        for p in pieces:
            ext = draw(st.sampled_from(["", ";a=b", ' ; q="x"', ";flag"]))
            wire += f"{len(p):{draw(st.sampled_from(['x', 'X', '04x']))}}{ext}\r\n".encode() + p + b"\r\n"
        trailer = draw(st.sampled_from(["", "X-T: 1\r\n"]))
        data = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + wire + f"0\r\n{trailer}\r\n".encode()
    else:
        data = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    return method, path, {k.lower(): v for k, v in fields.items()}, body, data


@settings(SETTINGS, max_examples=1500)
@given(req=valid_request(), tail=st.binary(max_size=20))
def test_parser_round_trips_valid_requests(req, tail):
    """Every valid framing (random fields, chunk splits, extensions, trailers) parses back to what was sent,
    and not one byte more is consumed (what follows belongs to the next pipelined request)."""
    method, path, fields, body, data = req
    got_method, got_path, headers, got_body, rest = _parse(data + tail)
    assert (got_method, got_path, got_body, rest) == (method, path, body, tail)
    assert all(headers[k] == v for k, v in fields.items())


def _mutations(data: bytes):
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, max(len(data) - 1, 0)), st.binary(min_size=1, max_size=4)).map(
            lambda m: data[: m[0]] + m[1] + data[m[0] + 1 :]
        ),
        st.integers(0, len(data)).map(lambda i: data[:i]),
    )


@settings(SETTINGS, max_examples=3000)
@given(data=valid_request().flatmap(lambda r: _mutations(r[4])))
def test_parser_never_fails_outside_its_contract(data):
    """Random and mutated requests: the parser answers with an HTTP error status, reports the peer gone, or
    parses; it never raises anything else, never hangs, and never returns a body over the limit."""
    from edgefleet_runtime.httpserver import HTTPError, _Closed

    try:
        _, _, _, body, _ = _parse(data, limit=256)
    except HTTPError as e:
        assert e.status in (400, 413, 414, 417, 431, 501, 505), e.status
        assert e.message
    except (_Closed, _OverLimit):
        pass
    else:
        assert len(body) <= 256


# ------------------------------------------------------------------------------ JSON tensor values in-process
element = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**80), 2**80),
    st.none(),
    st.booleans(),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1.5", ""]),
)


@settings(SETTINGS, max_examples=1500)
@given(values=st.lists(element, min_size=4, max_size=4), datatype=st.sampled_from(["FP32", "FP16", "INT8", "INT64"]))
def test_json_values_are_numbers_of_the_datatype_or_400(values, datatype):
    """Differential: accepted exactly when every value is a number (not a bool) that the datatype holds
    (integers for INT types), and then equal to numpy's conversion; otherwise 400 naming the input."""
    import numpy as np
    from edgefleet_runtime.backends import OIP_TO_NP, TensorSpec
    from edgefleet_runtime.protocol import RequestError, decode_infer_request

    dtype = OIP_TO_NP[datatype]
    body = json.dumps({"inputs": [{"name": "x", "shape": [4], "datatype": datatype, "data": values}]}).encode()
    spec = {"x": TensorSpec("x", datatype, (4,))}

    def holds(v):
        if type(v) not in (int, float):
            return False
        if dtype.kind == "f":
            return abs(v) <= float(np.finfo(dtype).max)
        info = np.iinfo(dtype)
        return float(v).is_integer() and info.min <= v <= info.max

    try:
        _, feeds, _ = decode_infer_request(body, None, "m", spec, {})
    except RequestError as e:
        assert e.status == 400 and "input 'x'" in e.message, e.message
        assert not all(holds(v) for v in values), (values, e.message)
    else:
        assert all(holds(v) for v in values), values
        expected = np.array([float(v) for v in values], dtype=np.float64).astype(dtype)
        np.testing.assert_array_equal(feeds["x"], expected)
